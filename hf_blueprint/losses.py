"""Cross-entropy over the vocabulary without the logits: the loss of `hidden @ W^T + b` and its gradients, computed
block by block of tokens.

A language-model training step otherwise holds logits of shape (tokens, vocabulary) in fp32, then their softmax and
its gradient: with a 49k vocabulary and 8 x 2,048 tokens that is over 3 GiB per copy, far more than the model. Here
each block of tokens gets its logits, its loss and its gradients (with respect to the hidden states, the weight and
the bias) at once in the forward pass, and the block's logits are dropped before the next block: the memory is one
block's logits plus the gradients the backward pass needs anyway (Wijmans et al. 2024, "Cut Your Losses in
Large-Vocabulary Language Models"; Liger-Kernel's fused linear cross-entropy, which is used on CUDA when installed).

Shipped as Hub remote code beside modeling_blueprint.py: it may import only torch, transformers and its siblings.
"""

import torch

from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import is_torchdynamo_compiling


# The largest block of logits computed at once, in elements: 2^24 fp32 values are 64 MiB.
BLOCK_ELEMENTS = 2**24


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """`cross_entropy(hidden_states @ weight.T + bias, labels)` with the reduction of transformers' loss functions
    (the mean over the tokens whose label is not `ignore_index`, or their sum divided by `num_items_in_batch` when the
    Trainer gives it, for gradient accumulation), without ever holding the logits of all tokens.

    hidden_states (..., hidden), labels (...) of the same leading shape; weight (vocabulary, hidden)."""
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = labels.reshape(-1).to(hidden_states.device)
    scored = labels != ignore_index
    # Only the scored tokens take part (a masked-LM batch scores 15% of them): the others add nothing to the loss.
    hidden_states, labels = hidden_states[scored], labels[scored]
    if labels.shape[0] == 0:  # nothing to score: 0 connected to the graph, not the NaN of an empty mean
        connected = hidden_states.sum() + weight.sum() + (bias.sum() if bias is not None else 0.0)
        return connected.float() * 0.0 + 0.0  # + 0.0 turns -0.0 into 0.0
    fused = _fused_kernel(hidden_states)
    if fused is not None:
        total = fused(hidden_states, weight, labels, bias, label_smoothing)
    else:
        total = LinearCrossEntropy.apply(hidden_states, weight, bias, labels, label_smoothing)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / labels.shape[0]


def logits_are_computed(model, labels, return_logits: bool | None) -> bool:
    """Whether a head computes its full logits. A training step with labels takes its loss from
    `linear_cross_entropy` and returns no logits, unless `return_logits=True`; evaluation (the Trainer's metrics read
    the logits) and a forward without labels compute them, as `return_logits=True` does. The logits are also
    computed where the blockwise loss cannot run: under torch.compile (its token selection has a data-dependent
    shape), and where the output layer's weight is sharded and gathered only inside its own forward (DeepSpeed ZeRO-3,
    tensor parallelism)."""
    sharded = hasattr(model.get_output_embeddings().weight, "device_mesh")  # a DTensor: its forward gathers it
    if labels is None or return_logits or is_torchdynamo_compiling() or is_deepspeed_zero3_enabled() or sharded:
        return True
    return False if return_logits is False else not model.training


def causal_lm_loss(hidden_states, lm_head, labels, shift_labels=None, ignore_index: int = -100,
                   num_items_in_batch=None, **kwargs) -> torch.Tensor:
    """transformers' ForCausalLMLoss without logits: position t predicts label t + 1 (or `shift_labels`, already
    shifted)."""
    if shift_labels is None:
        hidden_states, shift_labels = hidden_states[:, :-1], labels[:, 1:]
    return linear_cross_entropy(hidden_states, lm_head.weight, lm_head.bias, shift_labels, ignore_index=ignore_index,
                                num_items_in_batch=num_items_in_batch)


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of `hidden @ weight.T + bias` against `labels` (every label scored), with the gradients
    computed in the forward pass one block of tokens at a time and kept for the backward pass."""

    @staticmethod
    def forward(ctx, hidden_states, weight, bias, labels, label_smoothing):
        tokens, vocabulary = hidden_states.shape[0], weight.shape[0]
        block = max(1, BLOCK_ELEMENTS // vocabulary)
        needs_gradients = any(ctx.needs_input_grad[:3])  # autograd is off inside forward: ask the context
        total = torch.zeros((), dtype=torch.float32, device=hidden_states.device)
        grad_hidden = torch.empty_like(hidden_states) if needs_gradients else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_gradients else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_gradients and bias is not None else None
        for start in range(0, tokens, block):
            rows = slice(start, min(start + block, tokens))
            hidden, target = hidden_states[rows], labels[rows]
            logits = hidden @ weight.T
            if bias is not None:
                logits = logits + bias
            logits = logits.float()  # the loss in fp32, as transformers' loss functions compute it
            log_normalizer = logits.logsumexp(dim=-1)
            target_logits = logits.gather(1, target[:, None]).squeeze(1)
            loss = log_normalizer - target_logits
            if label_smoothing:
                # torch's label smoothing: (1 - e) * nll + e * mean over the vocabulary of -log p.
                loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_normalizer - logits.mean(dim=-1))
            total += loss.sum()
            if not needs_gradients:
                continue
            # d loss / d logits = softmax - (1 - e) * one_hot - e / V, in the logits' own buffer (one block fewer).
            grad_logits = logits.sub_(log_normalizer[:, None]).exp_()
            grad_logits[torch.arange(grad_logits.shape[0], device=grad_logits.device), target] -= 1.0 - label_smoothing
            if label_smoothing:
                grad_logits -= label_smoothing / vocabulary
            grad_bias_block = grad_logits.sum(dim=0) if grad_bias is not None else None
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[rows] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.T.float(), hidden.float())
            if grad_bias is not None:
                grad_bias += grad_bias_block
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_weight = (grad_weight * grad_output).to(weight_dtype) if ctx.needs_input_grad[1] else None
        grad_bias = (grad_bias * grad_output).to(bias_dtype) if grad_bias is not None and ctx.needs_input_grad[2] \
            else None
        grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _fused_kernel(hidden_states: torch.Tensor):
    """Liger-Kernel's fused linear cross-entropy (Triton) on CUDA, when it is installed; None otherwise. It returns the
    summed loss with the same arguments."""
    if hidden_states.device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None

    def fused(hidden, weight, labels, bias, label_smoothing):
        loss = liger_fused_linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=label_smoothing,
                                                reduction="sum")
        return loss[0] if isinstance(loss, tuple) else loss  # (loss, z_loss) in some versions

    return fused
