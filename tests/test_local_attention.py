"""Local and sparse attention inside the models: the block path (hf_blueprint/sparse_attention.py, linear in the
length) computes what eager attention with the dense mask of the same pattern computes, for every family and
positional encoding, with padding, packing and the cache; decoding with a window keeps a bounded cache."""

import pytest
import torch

import hf_blueprint
from hf_blueprint import modeling_blueprint

from conftest import random_ids

TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=128, hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2)
PATTERNS = {
    "window": dict(sliding_window=3),
    "dilated": dict(sliding_window=3, attention_dilation=2),
    "global": dict(sliding_window=2, global_attention_tokens=2),
}
POSITIONS = ["sinusoidal", "learned", "rope", "alibi", "none"]
CONFIGS = {"encoder": hf_blueprint.BlueprintEncoderConfig, "decoder": hf_blueprint.BlueprintDecoderConfig}
MODELS = {"encoder": hf_blueprint.BlueprintEncoderForMaskedLM, "decoder": hf_blueprint.BlueprintDecoderForCausalLM,
          "seq2seq": hf_blueprint.BlueprintForConditionalGeneration}


def build(family, implementation, **switches):
    if family == "seq2seq":
        config = hf_blueprint.BlueprintSeq2SeqConfig(**{**TINY, **switches, "decoder_start_token_id": 1})
    else:
        config = CONFIGS[family](**{**TINY, **switches})
    torch.manual_seed(0)
    return MODELS[family]._from_config(config, attn_implementation=implementation)


def padded_batch(length=13):
    ids = random_ids(2, length, low=3, high=60)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding (the decoder's side; the encoder does not mind)
    return ids, mask


def forward_and_gradients(model, ids, mask, **extra):
    model.zero_grad()
    inputs = dict(input_ids=ids, attention_mask=mask, **extra)
    if isinstance(model, hf_blueprint.BlueprintForConditionalGeneration):
        inputs["decoder_input_ids"] = random_ids(2, 11, seed=5, low=3, high=60)
    logits = model(**inputs).logits
    real = mask.bool() if not isinstance(model, hf_blueprint.BlueprintForConditionalGeneration) else slice(None)
    (logits[real] * torch.linspace(-1, 1, logits.shape[-1])).mean().backward()
    return logits[real], {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("family", ["encoder", "decoder", "seq2seq"])
def test_block_path_equals_eager_with_the_dense_mask(family, pattern, position):
    switches = dict(PATTERNS[pattern], position_embedding_type=position)
    blocks = build(family, "block_sparse", **switches).train()
    dense = build(family, "eager", **switches).train()
    ids, mask = padded_batch()
    got, got_grads = forward_and_gradients(blocks, ids, mask)
    expected, expected_grads = forward_and_gradients(dense, ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_marked_global_tokens_equal_eager_with_the_dense_mask():
    ids, mask = padded_batch()
    marked = torch.zeros_like(ids, dtype=torch.bool)
    marked[0, 6], marked[1, 9] = True, True
    blocks = build("encoder", "block_sparse", sliding_window=2).train()
    dense = build("encoder", "eager", sliding_window=2).train()
    got, got_grads = forward_and_gradients(blocks, ids, mask, global_attention_mask=marked)
    expected, expected_grads = forward_and_gradients(dense, ids, mask, global_attention_mask=marked)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    without = blocks(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert (without - got).abs().max() > 1e-3  # the marks change what the tokens see


def test_eager_weights_are_zero_exactly_outside_the_pattern():
    model = build("decoder", "eager", sliding_window=2, attention_dilation=2, global_attention_tokens=1).eval()
    ids = random_ids(1, 9, low=3, high=60)
    weights = model(ids, output_attentions=True).attentions[0][0, 0]
    query, key = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    distance = query - key
    visible = (distance >= 0) & (((distance % 2 == 0) & (distance // 2 < 2)) | (key == 0) | (query == 0))
    assert torch.equal(weights > 0, visible)


@pytest.mark.parametrize("window, dilation", [(2, 2), (80, 2)])  # 8 spans: 32 tokens (under 1,024), 1,280 (over)
def test_sdpa_takes_the_block_path_from_eight_window_spans_and_1024_tokens_on(monkeypatch, window, dilation):
    calls = []
    real = modeling_blueprint.sparse_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_blueprint, "sparse_attention_forward", counting)
    switches = dict(sliding_window=window, attention_dilation=dilation, position_embedding_type="rope")
    model = build("decoder", "sdpa", **switches).eval()
    eager = build("decoder", "eager", **switches).eval()
    threshold = max(8 * window * dilation, 1024)
    for length, expected_calls in ((threshold - 1, 0), (threshold, 2)):  # two layers
        calls.clear()
        ids = random_ids(1, length, low=3, high=60)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)
        assert len(calls) == expected_calls, length


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_packed_rows_on_the_block_path_equal_padded_rows(family, pattern):
    model = build(family, "block_sparse", **PATTERNS[pattern]).eval()
    lengths = [7, 4, 9]
    sequences = [random_ids(1, n, seed=n, low=3, high=60)[0] for n in lengths]
    packed_ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=position_ids).logits[0]
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_generation_with_and_without_the_cache_agrees(pattern):
    model = build("decoder", "block_sparse", **PATTERNS[pattern]).eval()
    ids, mask = padded_batch(length=9)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=-1)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_seq2seq_generation_with_and_without_the_cache_agrees(pattern):
    model = build("seq2seq", "block_sparse", **PATTERNS[pattern]).eval()
    ids, mask = padded_batch(length=9)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=-1)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_window_decoding_keeps_a_bounded_cache():
    model = build("decoder", "sdpa", sliding_window=3).eval()
    output = model.generate(random_ids(1, 5, low=3, high=60), max_new_tokens=30, do_sample=False, eos_token_id=-1,
                            return_dict_in_generate=True)
    assert output.sequences.shape[1] == 35
    for layer in output.cache.layers:
        assert layer.keys.shape[2] <= 3  # the window, however long the generation


@pytest.mark.parametrize("pattern", ["dilated", "global"])
def test_static_cache_is_refused_for_patterns_that_reach_past_the_window(pattern):
    model = build("decoder", "sdpa", **PATTERNS[pattern]).eval()
    with pytest.raises(ValueError, match="static cache.*dynamic cache"):
        model.generate(random_ids(1, 5, low=3, high=60), max_new_tokens=3, cache_implementation="static")


@pytest.mark.parametrize("field,value", [("attention_dilation", 2), ("global_attention_tokens", 1)])
def test_pattern_switches_without_a_window_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}.*sliding_window"):
        hf_blueprint.BlueprintDecoderConfig(**{**TINY, field: value})


def test_pattern_switches_survive_save_and_load(tmp_path):
    model = build("encoder", "sdpa", sliding_window=3, attention_dilation=2, global_attention_tokens=1).eval()
    model.save_pretrained(tmp_path)
    reloaded = hf_blueprint.BlueprintEncoderForMaskedLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.attention_dilation, reloaded.config.global_attention_tokens) == (2, 1)
    ids = random_ids(2, 40, low=3, high=60)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_compiled_forward_equals_the_block_path():
    model = build("decoder", "block_sparse", sliding_window=2).eval()
    ids = random_ids(1, 32, low=3, high=60)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits  # the block path
        compiled = torch.compile(model, fullgraph=True)(ids, use_cache=False).logits  # dense masks under dynamo
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
