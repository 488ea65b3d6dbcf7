"""Local and sparse attention (hf_blueprint/sparse_attention.py), grouped by the property each test checks:

- the pattern: `dense_pattern_mask` is the documented definition, checked against a loop over (i, j);
- exactness: the block path equals eager attention under the dense mask (fp32, 1e-5), values and gradients of the
  query, key and value, for every pattern, padding, GQA/MQA, ALiBi, odd lengths, windows >= T and window 1;
- rows that see no key: zeros, and no gradient;
- dropout: off outside training, the same draws in the forward and backward passes;
- cost: no tensor of seq^2 elements anywhere in the forward or backward pass (a detector shown to catch the dense path);
- the attention interface (`sparse_attention_forward`, `SparseAttentionPattern`) and its input checks;
- flex_attention (GPU path): against the block path, on CUDA, or on CPU (forward only) when asked for.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hf_blueprint.sparse_attention import (
    SparseAttentionPattern,
    block_sparse_attention,
    dense_pattern_mask,
    flex_attention,
    flex_sparse_attention,
    sparse_attention_forward,
)

TOLERANCE = 1e-5  # fp32


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: the definition written as loops, and eager attention under a dense mask
# ---------------------------------------------------------------------------------------------------------------------


def loop_mask(seq_len, window, causal, dilation=1, global_mask=None, key_padding_mask=None):
    """The module docstring's definition, one (i, j) at a time."""
    batch = next((m.shape[0] for m in (global_mask, key_padding_mask) if m is not None), 1)
    mask = torch.zeros(batch, 1, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(seq_len):
            for j in range(seq_len):
                steps, on_stride = divmod(i - j, dilation)
                allowed = on_stride == 0 and (0 <= steps < window if causal else abs(steps) < window)
                if global_mask is not None and (global_mask[b, i] or global_mask[b, j]):
                    allowed = j <= i if causal else True
                if key_padding_mask is not None and not key_padding_mask[b, j]:
                    allowed = False
                mask[b, 0, i, j] = allowed
    return mask


def eager_reference(query, key, value, mask, scaling, alibi_slopes=None, positions=None):
    """softmax(q k^T * scaling - slope * |pos_i - pos_j|) v over the dense mask; a row with no key gives zeros."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if alibi_slopes is not None:
        positions = positions if positions is not None else torch.arange(query.shape[2])[None]
        distance = (positions[:, None, :, None] - positions[:, None, None, :]).abs().to(scores.dtype)
        scores = scores - alibi_slopes.view(1, -1, 1, 1) * distance
    has_key = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_key, 0.0)
    weights = torch.softmax(scores, dim=-1) * has_key
    return torch.matmul(weights, value).transpose(1, 2)


def random_qkv(batch, heads, kv_heads, seq_len, head_dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, seq_len, head_dim, generator=generator, dtype=dtype).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def first_k_global(batch, seq_len, k):
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[:, :k] = True
    return mask


def marked_global(batch, seq_len):
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[0, [3, seq_len - 2]] = True
    mask[-1, seq_len // 2] = True
    return mask


def padding(batch, seq_len):
    """Right padding in the first sequence, left padding in the last."""
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[0, seq_len - 7 :] = False
    mask[-1, :5] = False
    return mask


def global_in_first_only(batch, seq_len):
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[0, [0, seq_len // 3]] = True
    return mask


def first_fully_padded(batch, seq_len):
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[0] = False
    return mask


def slopes(heads):
    return torch.tensor([2.0 ** -(h + 1) for h in range(heads)])


def restarting_positions(seq_len):
    """Positions of two packed sequences, restarting at 0 halfway (ALiBi distances that are not i - j)."""
    half = seq_len // 2
    return torch.cat([torch.arange(half), torch.arange(seq_len - half)])[None]


# ---------------------------------------------------------------------------------------------------------------------
# The pattern
# ---------------------------------------------------------------------------------------------------------------------

MASK_CASES = {
    "window": dict(window=3, causal=False),
    "causal-window": dict(window=3, causal=True),
    "dilation-2": dict(window=2, causal=False, dilation=2),
    "causal-dilation-3": dict(window=2, causal=True, dilation=3),
    "global": dict(window=2, causal=False, global_mask=marked_global(2, 13)),
    "causal-global": dict(window=2, causal=True, global_mask=marked_global(2, 13)),
    "global-dilation-padding": dict(
        window=2, causal=False, dilation=2, global_mask=first_k_global(2, 13, 1), key_padding_mask=padding(2, 13)
    ),
}


@pytest.mark.parametrize("case", MASK_CASES)
def test_dense_pattern_mask_is_the_documented_definition(case):
    kwargs = MASK_CASES[case]
    dense = dense_pattern_mask(13, **kwargs)
    assert torch.equal(dense, loop_mask(13, **kwargs).expand(dense.shape))


def test_causal_window_is_transformers_sliding_window():
    # Mistral's sliding window: query i sees keys i - window < j <= i (transformers' sliding_window_overlay).
    index = torch.arange(10)
    distance = index[:, None] - index[None, :]
    mistral = (distance >= 0) & (distance < 4)
    assert torch.equal(dense_pattern_mask(10, window=4, causal=True)[0, 0], mistral)


def test_pattern_dense_mask_matches_dense_pattern_mask():
    pattern = SparseAttentionPattern(window=3, causal=True, dilation=2, global_mask=marked_global(2, 13))
    expected = dense_pattern_mask(13, window=3, causal=True, dilation=2, global_mask=marked_global(2, 13))
    assert torch.equal(pattern.dense_mask(), expected)
    without_tensors = SparseAttentionPattern(window=3, causal=False)
    assert torch.equal(without_tensors.dense_mask(seq_len=9), dense_pattern_mask(9, window=3, causal=False))


# ---------------------------------------------------------------------------------------------------------------------
# Exactness: the block path equals eager attention under the dense mask, values and gradients
# ---------------------------------------------------------------------------------------------------------------------

# (seq_len, heads, kv_heads, pattern and block-path arguments). Block sizes are small so that short sequences
# still have first, inner and last blocks; lengths are not multiples of them.
EXACT_CASES = {
    "window": (37, 2, 2, dict(window=4, causal=False, block_size=4)),
    "causal-window": (37, 2, 2, dict(window=4, causal=True, block_size=4)),
    "window-blocks-smaller-than-window": (41, 2, 2, dict(window=6, causal=False, block_size=3)),
    "causal-window-default-blocks": (150, 2, 2, dict(window=5, causal=True)),
    "dilation-2": (41, 4, 2, dict(window=3, causal=False, dilation=2, block_size=3)),
    "causal-dilation-3": (41, 4, 1, dict(window=3, causal=True, dilation=3, block_size=5)),
    "global-first-k": (40, 2, 2, dict(window=5, causal=False, global_mask=first_k_global(2, 40, 2), block_size=5)),
    "causal-global-first-k": (
        40, 2, 2, dict(window=5, causal=True, global_mask=first_k_global(2, 40, 2), block_size=5)
    ),
    "global-marked": (40, 2, 2, dict(window=3, causal=False, global_mask=marked_global(2, 40), block_size=4)),
    "causal-global-marked": (40, 2, 2, dict(window=3, causal=True, global_mask=marked_global(2, 40), block_size=4)),
    "padding": (33, 2, 2, dict(window=4, causal=False, key_padding_mask=padding(2, 33), block_size=4)),
    "causal-padding": (33, 2, 2, dict(window=4, causal=True, key_padding_mask=padding(2, 33), block_size=4)),
    "gqa": (35, 4, 2, dict(window=4, causal=False, block_size=4)),
    "causal-mqa": (35, 4, 1, dict(window=4, causal=True, block_size=4)),
    "alibi": (33, 4, 2, dict(window=4, causal=False, alibi_slopes=slopes(4), block_size=4)),
    "causal-alibi-restarting-positions": (
        33, 4, 2, dict(window=4, causal=True, alibi_slopes=slopes(4), positions=restarting_positions(33), block_size=4)
    ),
    "window-at-least-seq-len": (20, 2, 2, dict(window=50, causal=False, key_padding_mask=padding(2, 20))),
    "causal-window-1": (20, 2, 2, dict(window=1, causal=True, block_size=4)),
    "window-1-dilation-2-global": (
        20, 2, 1, dict(window=1, causal=False, dilation=2, global_mask=marked_global(2, 20), block_size=4)
    ),
    "dilation-beyond-seq-len": (6, 2, 2, dict(window=2, causal=False, dilation=8)),
    "causal-global-in-one-sequence-only": (
        30, 2, 2, dict(window=3, causal=True, global_mask=global_in_first_only(2, 30), block_size=4)
    ),
    "fully-padded-sequence": (
        30, 2, 2, dict(window=3, causal=False, global_mask=first_k_global(2, 30, 1),
                       key_padding_mask=first_fully_padded(2, 30), block_size=4)
    ),
    "everything-causal": (
        50, 4, 2, dict(window=6, causal=True, dilation=2, global_mask=marked_global(2, 50),
                       key_padding_mask=padding(2, 50), alibi_slopes=slopes(4), positions=restarting_positions(50),
                       block_size=6)
    ),
    "everything-bidirectional": (
        50, 4, 2, dict(window=6, causal=False, dilation=2, global_mask=first_k_global(2, 50, 3),
                       key_padding_mask=padding(2, 50), alibi_slopes=slopes(4), block_size=6)
    ),
}


@pytest.mark.parametrize("case", EXACT_CASES)
def test_block_path_equals_dense_reference(case):
    seq_len, heads, kv_heads, kwargs = EXACT_CASES[case]
    query, key, value = random_qkv(2, heads, kv_heads, seq_len)
    mask = dense_pattern_mask(
        seq_len, window=kwargs["window"], causal=kwargs["causal"], dilation=kwargs.get("dilation", 1),
        global_mask=kwargs.get("global_mask"), key_padding_mask=kwargs.get("key_padding_mask"),
    )
    expected = eager_reference(query, key, value, mask, 0.3, kwargs.get("alibi_slopes"), kwargs.get("positions"))
    output = block_sparse_attention(query, key, value, scaling=0.3, **kwargs)
    assert output.shape == (2, seq_len, heads, 8)
    assert (output - expected).abs().max().item() < TOLERANCE

    grad_output = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_output)
    grads = torch.autograd.grad(output, (query, key, value), grad_output)
    for name, grad, expected_grad in zip(("query", "key", "value"), grads, expected_grads):
        assert (grad - expected_grad).abs().max().item() < TOLERANCE, name


def test_block_path_without_grad_equals_with_grad():
    query, key, value = random_qkv(2, 4, 2, 40)
    kwargs = dict(window=5, causal=True, global_mask=marked_global(2, 40), key_padding_mask=padding(2, 40),
                  block_size=4)
    with_grad = block_sparse_attention(query, key, value, scaling=0.3, **kwargs)
    with torch.no_grad():
        without_grad = block_sparse_attention(query, key, value, scaling=0.3, **kwargs)
    assert torch.equal(with_grad.detach(), without_grad)


def test_explicit_default_positions_equal_none():
    query, key, value = random_qkv(1, 4, 4, 30)
    kwargs = dict(window=4, causal=False, alibi_slopes=slopes(4), block_size=4, scaling=0.3)
    implicit = block_sparse_attention(query, key, value, **kwargs)
    explicit = block_sparse_attention(query, key, value, positions=torch.arange(30)[None], **kwargs)
    assert (implicit - explicit).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_fp32(dtype):
    query, key, value = random_qkv(1, 4, 2, 40)
    kwargs = dict(window=5, causal=True, global_mask=first_k_global(1, 40, 2), alibi_slopes=slopes(4), block_size=4,
                  scaling=0.3)
    reference = block_sparse_attention(query, key, value, **kwargs)
    low = block_sparse_attention(query.to(dtype), key.to(dtype), value.to(dtype), **kwargs)
    assert low.dtype == dtype
    assert (low.float() - reference).abs().max().item() < 3e-2


# ---------------------------------------------------------------------------------------------------------------------
# A query that sees no key: zeros, no gradient
# ---------------------------------------------------------------------------------------------------------------------


def test_query_without_visible_key_gives_zeros_and_no_gradient():
    # Causal, left padding of 10: queries 0..9 only reach padded keys (whole blocks of them for block_size 4).
    query, key, value = random_qkv(1, 2, 2, 30)
    key_padding_mask = torch.ones(1, 30, dtype=torch.bool)
    key_padding_mask[0, :10] = False
    output = block_sparse_attention(query, key, value, window=3, causal=True, key_padding_mask=key_padding_mask,
                                    scaling=0.3, block_size=4)
    assert torch.equal(output[0, :10], torch.zeros_like(output[0, :10]))
    assert output[0, 10:].abs().min().item() > 0  # the others are not zero
    grad_query, = torch.autograd.grad(output.sum(), query)
    assert torch.equal(grad_query[0, :, :10], torch.zeros_like(grad_query[0, :, :10]))
    assert torch.isfinite(grad_query).all()


# ---------------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------------

DROPOUT_PATTERNS = {
    "window": dict(window=5, causal=False),
    "causal-global-padding-alibi": dict(window=5, causal=True, global_mask=marked_global(2, 45),
                                        key_padding_mask=padding(2, 45), alibi_slopes=slopes(4)),
}


@pytest.mark.parametrize("case", DROPOUT_PATTERNS)
def test_dropout_is_off_outside_training(case):
    query, key, value = random_qkv(2, 4, 2, 45)
    kwargs = dict(scaling=0.3, block_size=4, **DROPOUT_PATTERNS[case])
    evaluation = block_sparse_attention(query, key, value, dropout=0.5, training=False, **kwargs)
    training = block_sparse_attention(query, key, value, dropout=0.5, training=True, **kwargs)
    assert torch.equal(evaluation, block_sparse_attention(query, key, value, **kwargs))
    assert (training - evaluation).abs().max().item() > 0.1


@pytest.mark.parametrize("case", DROPOUT_PATTERNS)
def test_dropout_backward_redraws_the_forward_masks(case):
    # With the generator reseeded, the dropout masks are a function of the shapes only, so the output is a smooth
    # function of the inputs: its gradient must match central finite differences (fp64) along a random direction.
    query, key, value = random_qkv(2, 4, 2, 45, dtype=torch.float64)
    kwargs = dict(scaling=0.35, block_size=4, dropout=0.3, training=True, **DROPOUT_PATTERNS[case])

    def run(q, k, v):
        torch.manual_seed(1234)
        return block_sparse_attention(q, k, v, **kwargs)

    output = run(query, key, value)
    assert torch.equal(output, run(query, key, value))
    weights = torch.randn_like(output)
    grads = torch.autograd.grad((output * weights).sum(), (query, key, value))
    directions = [torch.randn_like(x) for x in (query, key, value)]
    step = 1e-6
    plus = run(*(x + step * d for x, d in zip((query, key, value), directions)))
    minus = run(*(x - step * d for x, d in zip((query, key, value), directions)))
    numeric = ((plus - minus) * weights).sum() / (2 * step)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions))
    assert abs(numeric - analytic).item() < 1e-6 * max(1.0, abs(analytic).item())


# ---------------------------------------------------------------------------------------------------------------------
# Cost: nothing of seq^2 elements, forward or backward
# ---------------------------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns (forward and backward run through the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), str(func)
        return out


COST_SEQ_LEN = 2048  # seq^2 = 4.2M elements; the inputs are 32K


def run_forward_backward(attention):
    query, key, value = random_qkv(1, 2, 2, COST_SEQ_LEN)
    with LargestTensor() as largest:
        attention(query, key, value).sum().backward()
    return largest


def test_cost_detector_sees_the_dense_band_mask():
    # The companion of the test below: the old path (a dense band mask over SDPA) trips the detector.
    band = dense_pattern_mask(COST_SEQ_LEN, window=16, causal=False)
    largest = run_forward_backward(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=band.expand(1, 2, -1, -1).contiguous())
    )
    assert largest.numel >= COST_SEQ_LEN**2


@pytest.mark.parametrize("pattern", ["window", "everything"])
def test_no_seq_squared_tensor_in_forward_or_backward(pattern):
    kwargs = dict(window=16, causal=False)
    if pattern == "everything":
        kwargs = dict(window=16, causal=True, dilation=2, global_mask=first_k_global(1, COST_SEQ_LEN, 4),
                      key_padding_mask=padding(1, COST_SEQ_LEN), alibi_slopes=slopes(2),
                      positions=restarting_positions(COST_SEQ_LEN))
    largest = run_forward_backward(lambda q, k, v: block_sparse_attention(q, k, v, scaling=0.3, **kwargs))
    assert largest.numel < COST_SEQ_LEN**2 // 16, (largest.numel, largest.op)


# ---------------------------------------------------------------------------------------------------------------------
# The attention interface and its input checks
# ---------------------------------------------------------------------------------------------------------------------


class AttentionModule(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


def test_sparse_attention_forward_follows_the_interface():
    query, key, value = random_qkv(2, 4, 2, 40)
    pattern = SparseAttentionPattern(window=5, causal=True, global_mask=marked_global(2, 40),
                                     key_padding_mask=padding(2, 40), alibi_slopes=slopes(4), block_size=4)
    module = AttentionModule().eval()
    output, weights = sparse_attention_forward(module, query, key, value, pattern, scaling=0.3, dropout=0.0,
                                               sliding_window=5, position_bias=None)
    assert weights is None
    expected = eager_reference(query, key, value, pattern.dense_mask(), 0.3, slopes(4))
    assert (output - expected).abs().max().item() < TOLERANCE


def test_sparse_attention_forward_registers_as_an_attention_implementation():
    from transformers import AttentionInterface

    interface = AttentionInterface()
    interface.register("blueprint_sparse", sparse_attention_forward)
    query, key, value = random_qkv(1, 2, 2, 20)
    pattern = SparseAttentionPattern(window=3, causal=False)
    output, _ = interface["blueprint_sparse"](AttentionModule(), query, key, value, pattern, scaling=0.3)
    expected = eager_reference(query, key, value, pattern.dense_mask(seq_len=20), 0.3)
    assert (output - expected).abs().max().item() < TOLERANCE


def test_sparse_attention_forward_rejects_dense_masks_and_position_bias():
    query, key, value = random_qkv(1, 2, 2, 10)
    with pytest.raises(TypeError, match="SparseAttentionPattern"):
        sparse_attention_forward(AttentionModule(), query, key, value, torch.ones(1, 1, 10, 10, dtype=torch.bool), 0.3)
    with pytest.raises(ValueError, match="position_bias"):
        sparse_attention_forward(AttentionModule(), query, key, value, SparseAttentionPattern(window=3, causal=True),
                                 0.3, position_bias=torch.zeros(1, 2, 10, 10))


@pytest.mark.parametrize(
    "field, kwargs, message",
    [
        ("window", dict(window=0), "window"),
        ("dilation", dict(dilation=0), "dilation"),
        ("block_size", dict(block_size=0), "block_size"),
        ("global_mask dtype", dict(global_mask=torch.ones(1, 10)), "global_mask"),
        ("global_mask shape", dict(global_mask=torch.ones(1, 9, dtype=torch.bool)), "global_mask"),
        ("key_padding_mask shape", dict(key_padding_mask=torch.ones(2, 10, dtype=torch.bool)), "key_padding_mask"),
        ("alibi_slopes shape", dict(alibi_slopes=torch.ones(3)), "alibi_slopes"),
        ("positions shape", dict(positions=torch.arange(9)[None]), "positions"),
    ],
)
def test_bad_arguments_name_the_field(field, kwargs, message):
    query, key, value = random_qkv(1, 2, 2, 10)
    arguments = dict(window=3, causal=False, scaling=0.3)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(query, key, value, **arguments)


def test_bad_shapes_are_refused():
    query, key, value = random_qkv(1, 3, 2, 10)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        block_sparse_attention(query, key, value, window=3, causal=False, scaling=0.3)
    query, key, value = random_qkv(1, 2, 2, 10)
    with pytest.raises(ValueError, match="without a cache"):
        block_sparse_attention(query, key[:, :, :4], value[:, :, :4], window=3, causal=True, scaling=0.3)


def test_pattern_without_tensors_needs_seq_len_for_a_dense_mask():
    with pytest.raises(ValueError, match="seq_len"):
        SparseAttentionPattern(window=3, causal=True).dense_mask()


# ---------------------------------------------------------------------------------------------------------------------
# flex_attention (the GPU path): the same pattern through a block mask
# ---------------------------------------------------------------------------------------------------------------------

FLEX_CPU = os.environ.get("BLUEPRINT_RUN_FLEX_CPU", "") in ("1", "true")


@pytest.mark.skipif(flex_attention is None, reason="torch has no flex_attention")
@pytest.mark.skipif(
    not torch.cuda.is_available() and not FLEX_CPU,
    reason="flex_attention runs compiled; on CPU (forward only) its compilation took ~25 s on this 2-core machine, "
    "over this suite's budget: set BLUEPRINT_RUN_FLEX_CPU=1 to run it",
)
def test_flex_path_equals_block_path():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    query, key, value = (
        x.detach().to(device).requires_grad_(device == "cuda") for x in random_qkv(2, 4, 2, 200, head_dim=16)
    )
    pattern = SparseAttentionPattern(
        window=9, causal=True, dilation=2, global_mask=marked_global(2, 200).to(device),
        key_padding_mask=padding(2, 200).to(device), alibi_slopes=slopes(4).to(device),
        positions=restarting_positions(200).to(device),
    )
    flex = flex_sparse_attention(query, key, value, pattern, scaling=0.25)
    block = block_sparse_attention(
        query, key, value, window=9, causal=True, dilation=2, global_mask=pattern.global_mask,
        key_padding_mask=pattern.key_padding_mask, alibi_slopes=pattern.alibi_slopes, positions=pattern.positions,
        scaling=0.25,
    )
    assert (flex - block).abs().max().item() < 1e-4
    if device == "cuda":  # flex has no backward on CPU
        grad_output = torch.randn_like(flex)
        for a, b in zip(torch.autograd.grad(flex, (query, key, value), grad_output),
                        torch.autograd.grad(block, (query, key, value), grad_output)):
            assert (a - b).abs().max().item() < 1e-4
