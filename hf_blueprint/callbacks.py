"""Trainer callbacks for looking inside a training run.

`GradientNormCallback` logs the L2 norm of the gradients of each transformer block, of the embeddings and of the
rest (final norm and head) at every logging step:

    grad_norm/embeddings, grad_norm/layer_0, ..., grad_norm/layer_{L-1}, grad_norm/head

(`encoder_layer_<i>` / `decoder_layer_<i>` for an encoder-decoder). They go into the Trainer's log history, hence
into `trainer_state.json`, beside the Trainer's own `grad_norm` (the norm of all gradients): with a residual stream
the gradient reaches every block about equally; without residual connections or normalization it vanishes or
explodes with depth, which is what the per-layer norms show.

    trainer = Trainer(..., callbacks=[GradientNormCallback()])

The norms are those of the gradients the Trainer clipped with --max_grad_norm, measured as they come out of backward:
clipping scales every gradient by the same factor, so each group's norm is divided by it back (the factor is the
Trainer's logged pre-clip `grad_norm` over the norm after clipping). The groups partition the trainable parameters,
so the square root of the sum of their squares is the Trainer's `grad_norm`.

Weights tied to the input embeddings (a tied LM head) count once, under `embeddings`. Under FSDP each rank holds a
shard of every gradient and the norms would be those of the shard: use it with a single process or DDP, where every
rank holds the whole (averaged) gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import TrainerCallback


__all__ = ["GradientNormCallback", "gradient_groups", "gradient_norms"]


def gradient_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters, by group: `embeddings` (every nn.Embedding), one group per block of each
    `layers` ModuleList (`layer_<i>`, or `<stack>_layer_<i>` when the list sits in a named stack such as an encoder
    or decoder), and `head` for the rest (final norm, LM head, pooler, classifier)."""
    owner = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and module_name.rsplit(".", 1)[-1] == "layers":
            parent = module_name.rsplit(".", 1)[0] if "." in module_name else ""
            stack = parent.rsplit(".", 1)[-1]
            prefix = "" if stack in ("", getattr(model, "base_model_prefix", "model"), "model") else f"{stack}_"
            for index, block in enumerate(module):
                for parameter in block.parameters():
                    owner.setdefault(id(parameter), f"{prefix}layer_{index}")
        elif isinstance(module, nn.Embedding):
            for parameter in module.parameters():
                owner.setdefault(id(parameter), "embeddings")
    groups = {}
    for _, parameter in model.named_parameters():  # each shared (tied) parameter once
        if parameter.requires_grad:
            groups.setdefault(owner.get(id(parameter), "head"), []).append(parameter)
    return groups


@torch.no_grad()
def gradient_norms(groups: dict[str, list[nn.Parameter]]) -> dict[str, float]:
    """The L2 norm of each group's gradients (parameters without a gradient count as zero), in float32."""
    names, norms = [], []
    for name, parameters in groups.items():
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            continue
        per_tensor = torch.stack([torch.linalg.vector_norm(g.detach().float()).to(grads[0].device) for g in grads])
        names.append(name)
        norms.append(torch.linalg.vector_norm(per_tensor))
    if not norms:
        return {}
    values = torch.stack([n.to(norms[0].device) for n in norms]).tolist()  # one device sync for all groups
    return dict(zip(names, values))


class GradientNormCallback(TrainerCallback):
    """Logs `grad_norm/<group>` (see `gradient_groups`) at each logging step, into the log history and thus
    `trainer_state.json`. Callbacks that report the logs (TensorBoard, W&B) see them only if this callback comes
    before them in the Trainer's list (`trainer.callback_handler.callbacks.insert(0, GradientNormCallback())`)."""

    def __init__(self):
        self._groups = None
        self._norms = None
        self._step = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._groups = gradient_groups(model) if model is not None else None
        self._norms, self._step = None, None

    def _logs_at(self, args, state, step: int) -> bool:
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if step == 1 and args.logging_first_step:
            return True
        if strategy == "steps":
            return state.logging_steps > 0 and step % state.logging_steps == 0
        return strategy == "epoch"  # the end of an epoch cannot be told in advance: measure every step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # After backward and clipping, before the update: the gradients the optimizer is about to apply.
        step = state.global_step + 1
        if self._groups is None or not self._logs_at(args, state, step):
            return
        self._norms, self._step = gradient_norms(self._groups), step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._norms is None or self._step != state.global_step:
            return
        norms, self._norms = self._norms, None
        scale = 1.0
        total_pre_clip = logs.get("grad_norm")
        total_after = math.sqrt(sum(value * value for value in norms.values()))
        if (args.max_grad_norm and args.max_grad_norm > 0 and isinstance(total_pre_clip, (int, float))
                and math.isfinite(total_pre_clip) and total_pre_clip > args.max_grad_norm and total_after > 0):
            scale = total_pre_clip / total_after  # undo the clipping factor, the same for every gradient
        values = {f"grad_norm/{name}": value * scale for name, value in norms.items()}
        logs.update(values)  # for the callbacks after this one
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks: update that entry.
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1].update(values)
