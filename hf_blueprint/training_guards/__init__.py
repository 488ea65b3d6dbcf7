"""Guards for long training runs: a step with a non-finite loss never reaches the weights, a half-written checkpoint is
never resumed from, and a tokenizer that does not fit the model is refused before training starts.

Four pieces, each usable with a stock `transformers.Trainer` (nothing to subclass), in a module each
(`nonfinite_loss`, `checkpoints`, `launch`):

- `NonFiniteLossCallback(policy="stop" | "skip")`: checks every optimizer step *before* it is applied (in
  `on_pre_optimizer_step`, after backward and gradient clipping) for a non-finite loss or gradient. `"stop"` raises
  `NonFiniteLossError` naming the step, with the weights still those of the previous step; `"skip"` drops the
  gradients so that the optimizer leaves the weights and its own state untouched, logs the step, and goes on (and
  raises after `max_consecutive_skips` skipped steps in a row: a run that only skips is not training). Under DDP
  the ranks agree on the verdict (one all-reduce), so no replica skips alone.
- `last_good_checkpoint(output_dir)`: the newest `checkpoint-N` folder that a resume can trust. transformers'
  `get_last_checkpoint` takes the highest N even when the process was killed while writing it; a Trainer checkpoint
  is complete only when `trainer_state.json` (written last) is there and parses, and the weights (and optimizer,
  scheduler, RNG files, when present) are whole files. `resolve_resume_checkpoint` applies it to the value of
  `--resume_from_checkpoint`.
- `check_tokenizer_fits_model(tokenizer, model)`: a tokenizer whose ids reach past the model's embedding table
  fails only at the first batch that contains such an id; this says so up front, naming both.
- `prepare_distributed_launch` / `check_distributed_launch` (called by the recipes' argument parsing): processes
  started by torchrun, accelerate or deepspeed on a machine without GPUs train as one DDP run over gloo, and a
  launch that started one process where several were asked for stops with how to launch instead, rather than N
  runs (or one) that each train alone.

Why a callback and not a Trainer subclass: a callback composes with any Trainer (Seq2SeqTrainer, TRL's trainers)
and with other callbacks. It cannot see the value the Trainer computed in `training_step`, so it reads the loss from
the model's own output through a forward hook (every micro-batch of the accumulation window), and the gradients,
which decide what the update would do, from the parameters. A loss computed outside the model (label smoothing,
`compute_loss_func`) is caught through the gradients it produces.
"""

from .checkpoints import (
    CHECKPOINT_PATTERN,
    CheckpointMismatchError,
    check_checkpoint_config,
    check_tokenizer_fits_model,
    checkpoint_config_differences,
    checkpoint_problems,
    is_complete_checkpoint,
    last_good_checkpoint,
    resolve_resume_checkpoint,
)
from .launch import (
    DistributedLaunchError,
    check_distributed_launch,
    launched_world_size,
    prepare_distributed_launch,
)
from .nonfinite_loss import NonFiniteLossCallback, NonFiniteLossError, drop_gradients, non_finite_gradients

__all__ = [
    "CHECKPOINT_PATTERN", "CheckpointMismatchError", "DistributedLaunchError", "NonFiniteLossCallback",
    "NonFiniteLossError", "check_checkpoint_config", "check_distributed_launch", "check_tokenizer_fits_model",
    "checkpoint_config_differences", "checkpoint_problems", "drop_gradients", "is_complete_checkpoint",
    "last_good_checkpoint", "launched_world_size", "non_finite_gradients", "prepare_distributed_launch",
    "resolve_resume_checkpoint",
]
