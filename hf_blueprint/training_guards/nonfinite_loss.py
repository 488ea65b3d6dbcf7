"""The non-finite loss guard: a step whose loss or gradients are NaN/inf never reaches the weights."""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training met a loss or gradient that is NaN or infinite, and the policy says to stop (or to stop skipping)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step




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
    # A NaN or an infinity makes a tensor's norm non-finite: one reduction per gradient and one verdict, where an
    # element-wise isfinite allocates a mask per gradient (7.5 ms a step for a 0.8M-parameter model on a CPU, twice
    # its optimizer step; the norms take 1.2 ms, benchmarks/train_loop.py).
    # Only when a norm is not finite are the gradients checked element by element, to name them; a finite fp16
    # gradient whose norm merely overflows is then not named.
    norms = torch.stack([torch.linalg.vector_norm(grad).to("cpu", non_blocking=True) for _, grad in named])
    if bool(torch.isfinite(norms).all()):
        return []
    return [name for name, grad in named if not bool(torch.isfinite(grad).all())]


def drop_gradients(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _format_values(values: list) -> str:
    shown = ", ".join(v if isinstance(v, str) else str(v) if math.isnan(v) or math.isinf(v) else f"{v:.4g}"
                      for v in values[:4])
    return shown + (", ..." if len(values) > 4 else "")

