"""Guards for long training runs: a step with a non-finite loss never reaches the weights, a half-written checkpoint is
never resumed from, and a tokenizer that does not fit the model is refused before training starts.

Four pieces, each usable with a stock `transformers.Trainer` (nothing to subclass):

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

from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

POLICIES = ("stop", "skip")
TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Files written with torch.save (zip archives): optimizer.pt, scheduler.pt, scaler.pt, rng_state[_N].pth, ...
TORCH_ZIP_SUFFIXES = (".pt", ".pth", ".bin")
WEIGHTS_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
WEIGHTS_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class NonFiniteLossError(RuntimeError):
    """Training met a loss or gradient that is NaN or infinite, and the policy says to stop (or to stop skipping)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite loss guard
# ---------------------------------------------------------------------------------------------------------------------


class NonFiniteLossCallback(TrainerCallback):
    """Stops training, or skips the update, when a step's loss or gradients are not finite.

    Args:
        policy: `"stop"` raises `NonFiniteLossError` before the bad update is applied, so the weights in memory (and
            every checkpoint) are those after the previous step. `"skip"` discards the step's gradients: the
            optimizer then leaves every parameter and its own moments unchanged (torch optimizers skip parameters
            whose `.grad` is None), the learning-rate schedule and `global_step` still advance, and training goes on.
        max_consecutive_skips: with `"skip"`, raise once this many steps in a row were skipped (diverged weights or
            a broken data stream, not one bad batch). `None` never gives up.
        check_gradients: also look at the gradients (after clipping). On by default: a loss computed outside the
            model is invisible to the forward hook, and an overflow in backward shows up only there.

    Use: `Trainer(..., callbacks=[NonFiniteLossCallback(policy="skip")])`. After training, `skipped_steps` lists the
    steps whose update was dropped.

    With fp16 mixed precision (a `GradScaler`), infinite gradients are part of dynamic loss scaling and the scaler
    already skips those steps, so only the loss is checked; `"skip"` of a non-finite loss is then left to the scaler
    (whose gradients are non-finite too). Under DeepSpeed the gradients live in the engine, not in `.grad`: only the
    loss is checked and `"skip"` is refused.
    """

    def __init__(self, policy: str = "stop", max_consecutive_skips: int | None = 10, check_gradients: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"NonFiniteLossCallback.policy={policy!r} is not supported; "
                             f"choose one of {list(POLICIES)}.")
        if max_consecutive_skips is not None and (isinstance(max_consecutive_skips, bool)
                                                  or not isinstance(max_consecutive_skips, int)
                                                  or max_consecutive_skips < 1):
            raise ValueError(f"NonFiniteLossCallback.max_consecutive_skips must be a positive integer or None, "
                             f"got {max_consecutive_skips!r}.")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.check_gradients = check_gradients
        self.skipped_steps: list[int] = []
        self._consecutive_skips = 0
        self._window_losses: list[torch.Tensor] = []
        self._hook = None

    # -- wiring ------------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.policy == "skip" and getattr(args, "deepspeed", None):
            raise ValueError("NonFiniteLossCallback(policy='skip') cannot drop an update under DeepSpeed (the "
                             "gradients live in the engine); use policy='stop'.")
        self._remove_hook()
        self._window_losses = []
        self._consecutive_skips = 0
        if model is not None:
            self._hook = model.register_forward_hook(self._record_loss)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def _remove_hook(self):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record_loss(self, module, inputs, output):
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            self._window_losses.append(loss.detach())  # checked once per optimizer step: no sync per micro-batch

    # -- the check ---------------------------------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1  # the step this update would complete, as the logs will number it
        losses, self._window_losses = self._window_losses, []
        bad_losses = [value for loss in losses if not bool(torch.isfinite(loss).all())
                      for value in loss.float().flatten().tolist()]
        # Under a GradScaler, overflowing gradients are routine (the loss scale is too high) and the scaler skips
        # those steps itself: only the loss says something is wrong.
        has_scaler = getattr(optimizer, "scaler", None) is not None
        bad_grads = non_finite_gradients(model) if model is not None and (self.check_gradients or has_scaler) else []
        local_bad = bool(bad_losses) or (not has_scaler and bool(bad_grads))
        # Under DDP the gradients are already averaged (the same on every rank) but each rank has its own loss: all
        # ranks must take the same decision, or a skip on one rank alone would let the replicas drift apart.
        if not _any_rank(local_bad, model):
            self._consecutive_skips = 0
            return
        if not local_bad:
            bad_losses = ["(on another rank)"]

        what = []
        if bad_losses:
            what.append(f"loss {_format_values(bad_losses)}")
        if bad_grads:
            shown = ", ".join(bad_grads[:3]) + (f" and {len(bad_grads) - 3} more" if len(bad_grads) > 3 else "")
            what.append(f"non-finite gradients in {len(bad_grads)} parameter(s) ({shown})")
        epoch = f", epoch {state.epoch:.2f}" if state.epoch is not None else ""
        message = f"Non-finite training step {step}{epoch}: {'; '.join(what)}."

        # With a scaler the update is skipped only if the gradients are non-finite too (the scaler sees those).
        can_skip = not has_scaler or bool(bad_grads)
        if self.policy == "stop" or not can_skip:
            raise NonFiniteLossError(
                f"{message} Training stopped before applying this update (NonFiniteLossCallback(policy="
                f"'{self.policy}')): the weights are those after step {step - 1}. Lower the learning rate, check the "
                f"batch, or resume from the last checkpoint.", step)

        if not has_scaler:
            drop_gradients(model)  # torch optimizers skip parameters without a gradient: no update, moments untouched
        self.skipped_steps.append(step)
        self._consecutive_skips += 1
        logger.warning(f"{message} Skipped: this update was not applied (skipped steps so far: {self.skipped_steps}).")
        if self.max_consecutive_skips is not None and self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{message} That is {self._consecutive_skips} skipped steps in a row (max_consecutive_skips="
                f"{self.max_consecutive_skips}): the run has diverged or its data is broken; stopping.", step)


def _any_rank(flag: bool, model) -> bool:
    """`flag` or-ed over the ranks of torch.distributed (one tiny all-reduce), or `flag` alone without it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return flag
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    if torch.distributed.get_backend() == "gloo":
        device = torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def non_finite_gradients(model: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds a NaN or an infinity (one device sync).

    Under FSDP2 a gradient is a DTensor sharded across the ranks: each rank checks its own shard, without
    communication (the callback then or-s the verdict over the ranks)."""
    named = [(name, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
             for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(grad).all().to("cpu", non_blocking=True) for _, grad in named])
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def drop_gradients(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _format_values(values: list) -> str:
    shown = ", ".join(v if isinstance(v, str) else str(v) if math.isnan(v) or math.isinf(v) else f"{v:.4g}"
                      for v in values[:4])
    return shown + (", ..." if len(values) > 4 else "")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint integrity
# ---------------------------------------------------------------------------------------------------------------------


def checkpoint_problems(path: str | os.PathLike) -> list[str]:
    """Why the Trainer checkpoint folder `path` cannot be resumed from; an empty list when it is complete.

    Complete means: `trainer_state.json` exists and parses (the Trainer writes it after everything else), its
    `global_step` matches the folder's number, a weights file exists and is whole (safetensors header covering
    the file, or a readable zip archive; every shard of a sharded index), and each torch.save file present
    (optimizer, scheduler, scaler, RNG states) is a whole zip archive. A file cut short by a kill or a full disk
    fails these checks; corruption inside a whole file (flipped bits) does not, as the Trainer writes no checksums.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [f"{path} is not a folder"]
    problems = []
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):
        problems.append(f"no {TRAINER_STATE_NAME} (the Trainer writes it last: the save did not finish)")
    else:
        try:
            with open(state_file, encoding="utf-8") as f:
                state = json.load(f)
            match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
            if not isinstance(state, dict):
                problems.append(f"{TRAINER_STATE_NAME} is not a JSON object")
            elif match and state.get("global_step") != int(match.group(1)):
                problems.append(f"{TRAINER_STATE_NAME} has global_step {state.get('global_step')!r}, "
                                f"expected {int(match.group(1))} for this folder")
        except (OSError, ValueError) as error:
            problems.append(f"{TRAINER_STATE_NAME} is unreadable ({error})")

    weights = [name for name in WEIGHTS_FILES + WEIGHTS_INDEX_FILES if os.path.isfile(os.path.join(path, name))]
    # DeepSpeed (global_step*/) and FSDP (pytorch_model_fsdp_*/) keep their own sharded layouts: past
    # trainer_state.json, which still gates them, their files are theirs to check.
    engine_layout = any(name.startswith(("global_step", "pytorch_model_fsdp")) for name in os.listdir(path))
    if not weights and not engine_layout:
        problems.append(f"no weights file (none of {list(WEIGHTS_FILES + WEIGHTS_INDEX_FILES)})")
    for name in weights:
        problems.extend(_weights_file_problems(path, name))
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(TORCH_ZIP_SUFFIXES) and name not in weights and os.path.isfile(file):
            problem = _zip_problem(file)
            if problem:
                problems.append(f"{name} {problem}")
    return problems


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return not checkpoint_problems(path)


def last_good_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that is complete (see `checkpoint_problems`), or None.

    Each newer folder that is skipped is logged with the reason, so a resume after a crash says which checkpoint it
    did not trust and why."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    candidates = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            candidates.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(candidates, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning(f"Not resuming from {path}: {'; '.join(problems)}.")
    return None


def resolve_resume_checkpoint(value, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to pass to `Trainer.train(resume_from_checkpoint=...)` for a `--resume_from_checkpoint` value.

    `None`/`False`: no resume. `True`, `"true"` or `"last"`: the newest complete checkpoint in `output_dir` (a
    ValueError if there is none, as transformers does). A path: that folder, which must be complete."""
    if value is None or value is False or str(value).lower() in ("false", "none", ""):
        return None
    if value is True or str(value).lower() in ("true", "last"):
        found = last_good_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {output_dir} "
                             f"(incomplete ones, if any, are logged above with the reason).")
        return found
    problems = checkpoint_problems(value)
    if problems:
        raise ValueError(f"--resume_from_checkpoint {value}: cannot resume from this folder: {'; '.join(problems)}.")
    return os.fspath(value)


# Fields a save adds or rewrites without changing the model (where it was loaded from, the library version, dtype,
# the class names), and run-time switches (the Trainer saves use_cache=False while it trains); private `_` fields too.
CONFIG_FIELDS_NOT_COMPARED = ("transformers_version", "architectures", "dtype", "torch_dtype", "auto_map",
                              "use_cache", "output_attentions", "output_hidden_states", "return_dict")


def checkpoint_config_differences(checkpoint: str | os.PathLike, config) -> dict[str, tuple]:
    """The model config fields whose value in `checkpoint/config.json` differs from `config`'s, as
    {field: (checkpoint's value, config's value)}; {} when they agree or the folder has no config.json."""
    file = os.path.join(os.fspath(checkpoint), "config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("model_type") != config.model_type:
        return {"model_type": (saved.get("model_type"), config.model_type)}
    # The saved file holds only the fields that differ from the defaults: read it back through the config class for
    # every field, then compare both in their JSON form (int keys of id2label, tuples and lists alike).
    saved = type(config).from_json_file(file).to_dict()
    ours = config.to_dict()

    def normal(value):
        return json.loads(json.dumps(value, sort_keys=True, default=str))

    missing = "(not set)"
    return {key: (saved.get(key, missing), ours.get(key, missing)) for key in sorted(set(saved) | set(ours))
            if key not in CONFIG_FIELDS_NOT_COMPARED and not key.startswith("_")
            and normal(saved.get(key, missing)) != normal(ours.get(key, missing))}


class CheckpointMismatchError(ValueError):
    """A checkpoint holds a model of another config than the run that would resume from (or rotate) it."""


def check_checkpoint_config(checkpoint: str | os.PathLike, config) -> None:
    """Raises `CheckpointMismatchError` naming the checkpoint and each differing field when the checkpoint's model
    config is not `config`: resuming would load weights of another shape or meaning, and the checkpoint rotation
    would delete another run's checkpoints."""
    differences = checkpoint_config_differences(checkpoint, config)
    if differences:
        shown = "; ".join(f"{key}: {theirs!r} in the checkpoint, {ours!r} in this run"
                          for key, (theirs, ours) in differences.items())
        raise CheckpointMismatchError(
            f"{os.fspath(checkpoint)} holds a model of another configuration than this run's ({shown}). It belongs to "
            f"another run: resume with that run's settings, or train into a new --output_dir."
        )


def _weights_file_problems(folder: str, name: str) -> list[str]:
    file = os.path.join(folder, name)
    if name.endswith(".index.json"):
        try:
            with open(file, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as error:
            return [f"{name} is unreadable ({error})"]
        problems = []
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                problems.append(f"shard {shard} listed in {name} is missing")
            else:
                problems.extend(_weights_file_problems(folder, shard))
        return problems
    if name.endswith(".safetensors"):
        problem = _safetensors_problem(file)
    else:
        problem = _zip_problem(file)
    return [f"{name} {problem}"] if problem else []


def _safetensors_problem(file: str) -> str | None:
    """None when the header parses and its tensors exactly cover the file (safetensors checks both on open)."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
    except Exception as error:  # SafetensorError, OSError: the exact class depends on the safetensors version
        return f"is not a whole safetensors file ({error})"
    return None


def _zip_problem(file: str) -> str | None:
    """None when `file` is a zip archive whose central directory (written at the very end) is intact."""
    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        return f"is not a whole torch.save archive ({error})"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model agreement
# ---------------------------------------------------------------------------------------------------------------------


def check_tokenizer_fits_model(tokenizer, model_or_config) -> None:
    """Raise a ValueError when the tokenizer can produce ids the model has no embedding for.

    A tokenizer smaller than the model's vocabulary is fine (tables are often padded to a multiple of 64); a larger
    one fails only at the first batch that contains one of the extra ids, possibly hours into a run."""
    config = getattr(model_or_config, "config", model_or_config)
    vocab_size = config.vocab_size
    embeddings = getattr(model_or_config, "get_input_embeddings", None)
    if callable(embeddings) and embeddings() is not None:
        vocab_size = embeddings().num_embeddings
    size = len(tokenizer)
    if size > vocab_size:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        model_name = getattr(config, "_name_or_path", "") or type(config).__name__
        raise ValueError(
            f"The tokenizer ({tokenizer_name}) has {size} tokens (ids 0..{size - 1}) but the model ({model_name}) "
            f"embeds only vocab_size={vocab_size} ids: any id >= {vocab_size} would fail at the first batch that "
            f"contains it. Use the model's own tokenizer, or grow the model with "
            f"model.resize_token_embeddings(len(tokenizer)) before training."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Multi-process launches on machines without GPUs
# ---------------------------------------------------------------------------------------------------------------------


class DistributedLaunchError(RuntimeError):
    """A multi-process launch that would not train as one run (see `prepare_distributed_launch`)."""


# How a launcher tells a process the size of the run: torchrun, `accelerate launch --multi_gpu` and the deepspeed
# launcher set WORLD_SIZE; mpirun (`accelerate launch --mpirun_hostfile`) sets its own variables.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

CPU_LAUNCH_HELP = (
    "On a machine without GPUs, start one process per rank through torchrun, directly or through accelerate:\n"
    "    torchrun --nproc_per_node N recipes/<recipe>.py ...\n"
    "    accelerate launch --multi_gpu --num_processes N recipes/<recipe>.py ...\n"
    "and the recipe trains with DDP over gloo (README, 'Scaling out')."
)


def launched_world_size(environ=None) -> int:
    """The number of processes the launcher started for this run (1 when there is no launcher)."""
    environ = os.environ if environ is None else environ
    for name in WORLD_SIZE_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise DistributedLaunchError(f"Environment variable {name}={value!r}: expected a whole number of "
                                             f"processes.") from None
    return 1


def prepare_distributed_launch(use_cpu: bool = False, environ=None) -> bool:
    """Before `TrainingArguments` is built: whether this process must train on the CPU for the launched processes to
    train as one run. True means "add `--use_cpu true`"; a launch that cannot be one run raises.

    Two launches go wrong on a machine without GPUs, with no more than a warning from accelerate or transformers:

    - torchrun (or `accelerate launch --multi_gpu`, or a DeepSpeed launch) without `--use_cpu`: every rank sets
      itself up as a single, non-distributed process, so N copies train alone on the full data and overwrite each
      other's output. With `--use_cpu true` the ranks join a gloo process group and train with DDP (or DeepSpeed).
    - `accelerate launch --cpu --num_processes N` (or a MULTI_CPU accelerate config, or `--num_processes N` without
      GPUs): accelerate starts ONE process, which would train alone. Nothing can turn it into N processes from the
      inside, so this raises `DistributedLaunchError` saying how to launch instead.

    `use_cpu` is the value of the Trainer flag; `environ` defaults to `os.environ`.
    """
    environ = os.environ if environ is None else environ
    world_size = launched_world_size(environ)
    if world_size == 1:
        # accelerate's single-process launcher exports ACCELERATE_USE_CPU always, and MASTER_ADDR only when it was
        # asked for more than one process or machine; a real distributed launch also exports the world size.
        if "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ and "LOCAL_RANK" not in environ:
            raise DistributedLaunchError(
                "`accelerate launch` was asked for several processes (--num_processes, --num_machines or a "
                "MULTI_CPU config) but started only this one, which would train alone: accelerate starts one "
                "process per rank only through its torchrun-based launchers (--multi_gpu, --use_fsdp, "
                "--use_deepspeed) or mpirun (--mpirun_hostfile).\n" + CPU_LAUNCH_HELP
                + "\n(If you meant to run a single process, unset MASTER_ADDR.)"
            )
        return False
    if use_cpu or _truthy(environ.get("ACCELERATE_USE_CPU")) or _has_accelerator():
        return False
    logger.info(f"{world_size} processes launched on a machine without GPUs: training on the CPU over gloo "
                f"(--use_cpu true).")
    return True


def check_distributed_launch(training_args, environ=None) -> None:
    """After `TrainingArguments` is built: every launched process must see the same run of `launched_world_size`
    processes. Raises `DistributedLaunchError` otherwise (a rank that believes it is alone)."""
    environ = os.environ if environ is None else environ
    launched = launched_world_size(environ)
    if launched > 1 and training_args.world_size != launched:
        raise DistributedLaunchError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but this one sees a run of "
            f"{training_args.world_size} process(es) (distributed type: "
            f"{getattr(training_args.distributed_state, 'distributed_type', None)}): each would train alone. "
            f"Without GPUs pass --use_cpu true.\n" + CPU_LAUNCH_HELP
        )
    if launched > 1 and (training_args.fsdp or _truthy(environ.get("ACCELERATE_USE_FSDP"))) \
            and training_args.device.type == "cpu":
        logger.warning("FSDP was requested, but accelerate runs FSDP on GPUs only: on the CPU this run trains with "
                       "DDP (a full copy of the model on every rank).")


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, NPU, ...
    if accelerator is not None and accelerator.is_available():
        return True
    return torch.cuda.is_available()
