"""Numerical properties of the Blueprint models, grouped by the property each test checks.

Every "X does not change" test has a companion (or a built-in reference) showing that the same perturbation is
large enough to be seen, so that none of them can pass vacuously.
"""

import warnings

import pytest
import torch
from transformers.activations import ACT2FN

from conftest import PAD, POSITION_TYPES, lm_class, random_ids, sinusoidal_table, tiny_model

IMPLS = ["eager", "sdpa"]
NOISE = 1e-5  # fp32 agreement tolerance
VISIBLE = 1e-3  # an effect must be at least this big to count as "changes the output"


def max_diff(a, b):
    return (a - b).abs().max().item()


# Decoder variants used by the cache / generation / backend tests: every positional encoding, plus local attention
# (window smaller than the sequences used), grouped- and multi-query attention and a pre-norm RMSNorm SwiGLU block.
DECODER_VARIANTS = {
    **{pos: dict(position_embedding_type=pos) for pos in POSITION_TYPES},
    "rope-window4": dict(position_embedding_type="rope", sliding_window=4),
    "alibi-window4": dict(position_embedding_type="alibi", sliding_window=4),
    "learned-window4": dict(position_embedding_type="learned", sliding_window=4),
    "rope-gqa": dict(position_embedding_type="rope", num_key_value_heads=2),
    "learned-mqa": dict(position_embedding_type="learned", num_key_value_heads=1),
    "llama-like": dict(position_embedding_type="rope", norm_position="pre", norm_type="rmsnorm", ffn_type="glu",
                       hidden_act="silu", num_key_value_heads=2),
}
# generate() is the slowest thing in the suite: its tests use every positional encoding, two windows, GQA and MQA.
GENERATE_VARIANTS = [*POSITION_TYPES, "rope-window4", "alibi-window4", "rope-gqa", "learned-mqa"]

ENCODER_VARIANTS = {
    **{pos: dict(position_embedding_type=pos) for pos in POSITION_TYPES},
    "rope-window3": dict(position_embedding_type="rope", sliding_window=3),
    "alibi-window3": dict(position_embedding_type="alibi", sliding_window=3),
    "sinusoidal-gqa": dict(position_embedding_type="sinusoidal", num_key_value_heads=2),
    "bert-like": dict(position_embedding_type="learned", type_vocab_size=2, embedding_norm=True,
                      scale_embeddings=False, hidden_act="gelu", attention_bias=True),
}


def left_padded(seqs):
    """Left-pads a list of 1-D id tensors with PAD; returns ids, attention_mask."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, length - len(s):] = s
        mask[i, length - len(s):] = 1
    return ids, mask


def right_padded(seqs):
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


# ================================================================================================================
# Causality: a decoder position never sees the future; an encoder position sees both sides.
# ================================================================================================================

CUT = 6  # tokens [0, CUT) are kept, tokens [CUT, 12) are replaced


def _future_changed(model):
    ids = random_ids(2, 12, seed=0)
    alt = ids.clone()
    alt[:, CUT:] = (ids[:, CUT:] - 7 + 13) % 93 + 7  # every later token changes, stays a non-special id
    with torch.no_grad():
        return model(ids).logits, model(alt).logits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_decoder_logits_ignore_future_tokens(pos, impl):
    a, b = _future_changed(tiny_model("BlueprintDecoderForCausalLM", attn_implementation=impl,
                                      position_embedding_type=pos))
    torch.testing.assert_close(a[:, :CUT], b[:, :CUT], atol=1e-6, rtol=0)


@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_decoder_logits_do_see_changed_tokens(pos):
    # Counterpart of the test above: the replaced tokens do move the logits at and after the cut.
    a, b = _future_changed(tiny_model("BlueprintDecoderForCausalLM", position_embedding_type=pos))
    assert max_diff(a[:, CUT:], b[:, CUT:]) > VISIBLE


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_encoder_logits_see_future_tokens(pos, impl):
    a, b = _future_changed(tiny_model("BlueprintEncoderForMaskedLM", attn_implementation=impl,
                                      position_embedding_type=pos))
    assert max_diff(a[:, :CUT], b[:, :CUT]) > VISIBLE


# ================================================================================================================
# Local attention: sliding_window limits what a position sees (one layer, so the receptive field is the window).
# ================================================================================================================

WINDOW = 4
QUERY = 10


def _one_layer_effect(cls_name, pos, impl, changed_position):
    model = tiny_model(cls_name, attn_implementation=impl, position_embedding_type=pos, sliding_window=WINDOW,
                       num_hidden_layers=1)
    ids = random_ids(1, 16, seed=3)
    alt = ids.clone()
    alt[0, changed_position] = (ids[0, changed_position] - 7 + 31) % 93 + 7
    with torch.no_grad():
        a, b = model(ids).logits, model(alt).logits
    return max_diff(a[0, QUERY], b[0, QUERY])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi"])
def test_decoder_window_hides_tokens_sliding_window_back(pos, impl):
    # The last `sliding_window` tokens are QUERY-WINDOW+1 .. QUERY; QUERY-WINDOW is out of sight.
    assert _one_layer_effect("BlueprintDecoderForCausalLM", pos, impl, QUERY - WINDOW) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi"])
def test_decoder_window_shows_oldest_token_inside(pos, impl):
    assert _one_layer_effect("BlueprintDecoderForCausalLM", pos, impl, QUERY - WINDOW + 1) > VISIBLE


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("changed", [QUERY - WINDOW, QUERY + WINDOW])
def test_encoder_window_hides_tokens_sliding_window_away(changed, impl):
    # The same meaning as the decoder's: keys less than `sliding_window` positions away, here on both sides.
    assert _one_layer_effect("BlueprintEncoderForMaskedLM", "rope", impl, changed) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("changed", [QUERY - WINDOW + 1, QUERY + WINDOW - 1])
def test_encoder_window_shows_tokens_within_distance_on_both_sides(changed, impl):
    assert _one_layer_effect("BlueprintEncoderForMaskedLM", "rope", impl, changed) > VISIBLE


# ================================================================================================================
# Permutation equivariance: without a position signal the encoder cannot tell token order.
# ================================================================================================================


def _permutation_gap(pos, impl="sdpa"):
    model = tiny_model("BlueprintEncoderModel", attn_implementation=impl, position_embedding_type=pos)
    ids = random_ids(2, 10, seed=1)
    perm = torch.tensor([3, 7, 0, 9, 5, 1, 8, 2, 6, 4])
    with torch.no_grad():
        out = model(ids).last_hidden_state
        out_perm = model(ids[:, perm]).last_hidden_state
    return max_diff(out_perm, out[:, perm])


@pytest.mark.parametrize("impl", IMPLS)
def test_encoder_without_positions_is_permutation_equivariant(impl):
    assert _permutation_gap("none", impl) < NOISE


@pytest.mark.parametrize("pos", [p for p in POSITION_TYPES if p != "none"])
def test_encoder_with_positions_is_not_permutation_equivariant(pos):
    assert _permutation_gap(pos) > VISIBLE


# ================================================================================================================
# Positions: relative encodings are invariant to a shift of position_ids, absolute ones are not.
# ================================================================================================================


def _shift_gap(family, pos):
    cls_name = {"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family]
    model = tiny_model(cls_name, position_embedding_type=pos)
    ids = random_ids(2, 10, seed=2)
    position_ids = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        a = model(ids, position_ids=position_ids).last_hidden_state
        b = model(ids, position_ids=position_ids + 7).last_hidden_state
    return max_diff(a, b)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("pos", ["rope", "alibi", "none"])
def test_relative_encodings_ignore_a_shift_of_position_ids(family, pos):
    assert _shift_gap(family, pos) < NOISE


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_absolute_encodings_follow_position_ids(family, pos):
    assert _shift_gap(family, pos) > VISIBLE


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_default_position_ids_are_0_to_length(family, pos):
    cls_name = {"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family]
    model = tiny_model(cls_name, position_embedding_type=pos)
    ids = random_ids(2, 10, seed=2)
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = model(ids, position_ids=torch.arange(10).expand(2, 10)).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ================================================================================================================
# Padding: padded positions never leak into real ones.
# ================================================================================================================


def _encoder_padding_gap(pos, impl, use_mask=True):
    model = tiny_model("BlueprintEncoderModel", attn_implementation=impl, position_embedding_type=pos)
    short, long = random_ids(1, 7, seed=4)[0], random_ids(1, 11, seed=5)[0]
    ids, mask = right_padded([short, long])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask if use_mask else None).last_hidden_state
        alone = model(short[None]).last_hidden_state
    return max_diff(batch[0, :7], alone[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_encoder_right_padding_leaves_real_positions_unchanged(pos, impl):
    assert _encoder_padding_gap(pos, impl) < NOISE


@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_encoder_pad_tokens_would_be_visible_without_the_mask(pos):
    # Shows the padding test above is sensitive: unmasked, the same pad tokens change the real positions.
    assert _encoder_padding_gap(pos, "sdpa", use_mask=False) > VISIBLE


def _decoder_padding_gap(pos, impl, explicit_position_ids):
    model = tiny_model("BlueprintDecoderForCausalLM", attn_implementation=impl, position_embedding_type=pos)
    seqs = [random_ids(1, 5, seed=6)[0], random_ids(1, 11, seed=7)[0], random_ids(1, 8, seed=8)[0]]
    ids, mask = left_padded(seqs)
    kwargs = {}
    if explicit_position_ids:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    gaps = []
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, **kwargs).logits
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            gaps.append(max_diff(batch[i, -len(s):], alone))
    return max(gaps)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_decoder_left_padded_batch_matches_each_sequence_alone(pos, impl):
    # No position_ids given: the model must count positions from the first real token of each row.
    assert _decoder_padding_gap(pos, impl, explicit_position_ids=False) < NOISE


@pytest.mark.parametrize("pos", POSITION_TYPES)
def test_decoder_left_padded_batch_with_explicit_position_ids(pos):
    assert _decoder_padding_gap(pos, "sdpa", explicit_position_ids=True) < NOISE


@pytest.mark.parametrize("family,padding", [("encoder", "right"), ("decoder", "left"), ("decoder", "right")])
@pytest.mark.parametrize("pooling", ["first", "mean", "last", "max"])
def test_sequence_classification_ignores_padding(family, padding, pooling):
    cls_name = f"Blueprint{family.capitalize()}ForSequenceClassification"
    model = tiny_model(cls_name, classifier_pooling=pooling, num_labels=3)
    seqs = [random_ids(1, 4, seed=9)[0], random_ids(1, 9, seed=10)[0]]
    ids, mask = (left_padded if padding == "left" else right_padded)(seqs)
    kwargs = {}
    if family == "decoder" and padding == "left":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, **kwargs).logits
        alone = model(seqs[0][None]).logits
    torch.testing.assert_close(batch[0], alone[0], atol=NOISE, rtol=0)


# ================================================================================================================
# Pooling: the classifier receives exactly the pooled vector the config asks for.
# ================================================================================================================


@pytest.mark.parametrize("family,padding", [("encoder", "right"), ("decoder", "left"), ("decoder", "right")])
@pytest.mark.parametrize("pooling", ["first", "mean", "last", "max"])
def test_classifier_input_is_the_configured_pooling(family, padding, pooling):
    cls_name = f"Blueprint{family.capitalize()}ForSequenceClassification"
    model = tiny_model(cls_name, classifier_pooling=pooling, num_labels=3)
    seqs = [random_ids(1, 4, seed=11)[0], random_ids(1, 9, seed=12)[0]]
    ids, mask = (left_padded if padding == "left" else right_padded)(seqs)
    seen = {}
    handle = model.classifier.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(ids, attention_mask=mask)
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    handle.remove()
    real = mask.bool()
    expected = []
    for i in range(len(seqs)):
        positions = real[i].nonzero().flatten()
        if pooling == "first":
            expected.append(hidden[i, positions[0]])
        elif pooling == "last":
            expected.append(hidden[i, positions[-1]])
        elif pooling == "max":
            expected.append(hidden[i, positions].max(0).values)
        else:
            expected.append(hidden[i, positions].mean(0))
    torch.testing.assert_close(seen["x"], torch.stack(expected), atol=1e-6, rtol=1e-6)


# ================================================================================================================
# Cache: incremental decoding and generate() agree with full forwards.
# ================================================================================================================


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("variant", list(DECODER_VARIANTS))
def test_incremental_decoding_matches_full_forward(variant, chunk):
    model = tiny_model("BlueprintDecoderForCausalLM", **DECODER_VARIANTS[variant])
    ids = random_ids(2, 12, seed=13)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for start in range(5, 12, chunk):
            out = model(ids[:, start:start + chunk], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=NOISE, rtol=0)


def _generate(model, ids, mask=None, **kwargs):
    kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, **kwargs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), **kwargs)


@pytest.mark.parametrize("variant", GENERATE_VARIANTS)
def test_greedy_generate_with_and_without_cache_agree(variant):
    model = tiny_model("BlueprintDecoderForCausalLM", **DECODER_VARIANTS[variant])
    ids = random_ids(1, 5, seed=14)
    torch.testing.assert_close(_generate(model, ids, use_cache=True), _generate(model, ids, use_cache=False),
                               atol=0, rtol=0)


def test_generate_with_cache_feeds_one_token_per_step():
    # Guards the test above: a model whose forward ignored `cache` would see the whole prefix at every step and
    # still agree with the uncached run.
    model = tiny_model("BlueprintDecoderForCausalLM")
    lengths = []
    handle = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]),
        with_kwargs=True,
    )
    _generate(model, random_ids(1, 5, seed=14), use_cache=True)
    handle.remove()
    assert lengths == [5] + [1] * 7


@pytest.mark.parametrize("variant", GENERATE_VARIANTS)
def test_batched_left_padded_generate_matches_single_sequences(variant):
    model = tiny_model("BlueprintDecoderForCausalLM", **DECODER_VARIANTS[variant])
    seqs = [random_ids(1, 3, seed=15)[0], random_ids(1, 7, seed=16)[0]]
    ids, mask = left_padded(seqs)
    batch = _generate(model, ids, mask)[:, ids.shape[1]:]
    singles = torch.cat([_generate(model, s[None])[:, len(s):] for s in seqs])
    torch.testing.assert_close(batch, singles, atol=0, rtol=0)


# ================================================================================================================
# Attention backends: eager and sdpa compute the same function.
# ================================================================================================================


def _backend_pair(cls_name, overrides):
    eager = tiny_model(cls_name, attn_implementation="eager", **overrides)
    sdpa = tiny_model(cls_name, attn_implementation="sdpa", **overrides)
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa


@pytest.mark.parametrize("cls_name", ["BlueprintEncoderModel", "BlueprintDecoderModel"])
def test_backend_switch_is_real(cls_name):
    # Precondition of the agreement tests below: the two models do run different attention code.
    eager, sdpa = _backend_pair(cls_name, {})
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")


@pytest.mark.parametrize("variant", list(ENCODER_VARIANTS))
def test_encoder_eager_matches_sdpa(variant):
    eager, sdpa = _backend_pair("BlueprintEncoderModel", ENCODER_VARIANTS[variant])
    ids, mask = right_padded([random_ids(1, 12, seed=17)[0], random_ids(1, 7, seed=18)[0]])
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).last_hidden_state
        b = sdpa(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=NOISE, rtol=0)


@pytest.mark.parametrize("variant", list(DECODER_VARIANTS))
def test_decoder_eager_matches_sdpa(variant):
    eager, sdpa = _backend_pair("BlueprintDecoderModel", DECODER_VARIANTS[variant])
    ids, mask = left_padded([random_ids(1, 12, seed=17)[0], random_ids(1, 7, seed=18)[0]])
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).last_hidden_state
        b = sdpa(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=NOISE, rtol=0)


# ================================================================================================================
# Reference formulas: attention probabilities, the feed-forward network and the normalizations.
# ================================================================================================================


def _alibi_slopes(heads):
    start = 2 ** (-8 / heads)
    return torch.tensor([start ** (h + 1) for h in range(heads)])


@pytest.mark.parametrize("family,pos", [("encoder", "none"), ("decoder", "none"), ("encoder", "alibi"),
                                        ("decoder", "alibi")])
def test_attention_probabilities_match_reference(family, pos):
    cls_name = {"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family]
    model = tiny_model(cls_name, attn_implementation="eager", position_embedding_type=pos)  # post-norm
    ids = random_ids(1, 9, seed=19)
    seen = {}
    handle = model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions[0][0]
        attn = model.layers[0].self_attn
        x = seen["x"][0]
        heads, dim = model.config.num_attention_heads, model.config.head_dim
        q = attn.q_proj(x).view(9, heads, dim).transpose(0, 1)
        k = attn.k_proj(x).view(9, heads, dim).transpose(0, 1)
    handle.remove()
    scores = q @ k.transpose(1, 2) / dim ** 0.5
    i = torch.arange(9)
    if pos == "alibi":
        scores = scores - _alibi_slopes(heads)[:, None, None] * (i[:, None] - i[None, :]).abs()
    if family == "decoder":
        scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pos", ["none", "sinusoidal"])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_block_input_is_scaled_token_embedding_plus_positions(family, scale, pos):
    cls_name = {"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family]
    model = tiny_model(cls_name, scale_embeddings=scale, position_embedding_type=pos)
    ids = random_ids(2, 9, seed=24)
    seen = {}
    handle = model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(ids)
        expected = model.embed_tokens(ids) * (32**0.5 if scale else 1.0)
    handle.remove()
    if pos == "sinusoidal":
        expected = expected + sinusoidal_table(9, 32)
    torch.testing.assert_close(seen["x"], expected, atol=1e-5, rtol=1e-5)


def test_rope_attention_probabilities_match_reference():
    # Rotary embeddings in the rotate-half layout of transformers' Llama (checkpoint-compatible), with a
    # non-default rope_theta so that the base is seen to be used.
    theta = 500.0
    model = tiny_model("BlueprintDecoderModel", attn_implementation="eager", position_embedding_type="rope",
                       rope_theta=theta)
    ids = random_ids(1, 9, seed=19)
    seen = {}
    handle = model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions[0][0]
        attn = model.layers[0].self_attn
        x = seen["x"][0]
        heads, dim = model.config.num_attention_heads, model.config.head_dim
        q = attn.q_proj(x).view(9, heads, dim).transpose(0, 1)
        k = attn.k_proj(x).view(9, heads, dim).transpose(0, 1)
    handle.remove()
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(9, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()

    def rotate(t):
        t1, t2 = t[..., : dim // 2], t[..., dim // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    scores = rotate(q) @ rotate(k).transpose(1, 2) / dim ** 0.5
    i = torch.arange(9)
    scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_block_matches_reference(norm_position):
    # Post-LN: h = N1(x + Attn(x)), y = N2(h + FFN(h)).  Pre-LN: h = x + Attn(N1(x)), y = h + FFN(N2(h)).
    model = tiny_model("BlueprintEncoderModel", position_embedding_type="none", norm_position=norm_position)
    block = model.layers[0]
    norms = [m for m in block.children() if isinstance(m, torch.nn.LayerNorm) or "Norm" in type(m).__name__]
    assert len(norms) == 2
    first, second = norms
    with torch.no_grad():
        for norm in norms:  # distinct, non-trivial affine parameters: a swapped or skipped norm shows
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
        x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
        got = block(x)
        got = got[0] if isinstance(got, tuple) else got
        attn = lambda h: block.self_attn(h)[0]  # noqa: E731
        if norm_position == "post":
            h = first(x + attn(x))
            expected = second(h + block.mlp(h))
        else:
            h = x + attn(first(x))
            expected = h + block.mlp(second(h))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_block_without_residual_connections_matches_reference(norm_position):
    # The research switch drops the identity path: Post-LN h = N1(Attn(x)), y = N2(FFN(h)); Pre-LN h = Attn(N1(x)),
    # y = FFN(N2(h)).
    model = tiny_model("BlueprintEncoderModel", position_embedding_type="none", norm_position=norm_position,
                       residual_connections=False)
    block = model.layers[0]
    first, second = block.self_attn_norm, block.mlp_norm
    with torch.no_grad():
        x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
        attn = lambda h: block.self_attn(h)[0]  # noqa: E731
        if norm_position == "post":
            expected = second(block.mlp(first(attn(x))))
        else:
            expected = block.mlp(second(attn(first(x))))
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_norm_type_none_makes_every_norm_the_identity(norm_position):
    model = tiny_model("BlueprintEncoderForMaskedLM", norm_type="none", norm_position=norm_position,
                       embedding_norm=True)
    assert not [name for name, _ in model.named_parameters() if "norm" in name]
    ids = random_ids(2, 6, seed=4)
    with torch.no_grad():
        outputs = model(ids, output_hidden_states=True)
        last_block = model.model.layers[-1]
    # No final norm in Pre-LN, no norm after the last residual add in Post-LN: the trunk's output is the last
    # block's sum, which (hidden_states[-2] feeding it) the block computes without any normalization.
    block_output = last_block(outputs.hidden_states[-2])
    torch.testing.assert_close(outputs.hidden_states[-1], block_output, atol=0, rtol=0)


@pytest.mark.parametrize("ffn_type,act", [("mlp", "relu"), ("mlp", "gelu"), ("glu", "silu"), ("glu", "gelu")])
def test_feed_forward_matches_reference(ffn_type, act):
    model = tiny_model("BlueprintDecoderModel", ffn_type=ffn_type, hidden_act=act)
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    f = ACT2FN[act]
    with torch.no_grad():
        if ffn_type == "mlp":
            expected = mlp.down_proj(f(mlp.up_proj(x)))
        else:
            expected = mlp.down_proj(f(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-6)


def _final_hidden(norm_type, norm_position):
    # Post-norm ends every block with a norm, pre-norm ends the stack with one: either way the last hidden state
    # is a norm output, and norm weights start at 1 (biases at 0).
    model = tiny_model("BlueprintEncoderModel", norm_type=norm_type, norm_position=norm_position)
    with torch.no_grad():
        return model(random_ids(2, 10, seed=20)).last_hidden_state


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_layernorm_output_is_standardized(norm_position):
    h = _final_hidden("layernorm", norm_position)
    torch.testing.assert_close(h.mean(-1), torch.zeros(h.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(h.shape[:-1]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_rmsnorm_output_has_unit_root_mean_square(norm_position):
    h = _final_hidden("rmsnorm", norm_position)
    torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(h.shape[:-1]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_rmsnorm_does_not_center(norm_position):
    h = _final_hidden("rmsnorm", norm_position)
    assert h.mean(-1).abs().max() > VISIBLE


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_pre_and_post_norm_compute_different_functions(family):
    # Same weights (post-norm has no final norm, so load non-strictly); a placement switch that did nothing
    # would give equal outputs.
    cls_name = {"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family]
    pre = tiny_model(cls_name, norm_position="pre")
    post = tiny_model(cls_name, norm_position="post")
    post.load_state_dict(pre.state_dict(), strict=False)
    ids = random_ids(1, 8, seed=21)
    with torch.no_grad():
        assert max_diff(pre(ids).last_hidden_state, post(ids).last_hidden_state) > VISIBLE


# ================================================================================================================
# Dropout: every dropout switch acts in training mode, and none acts when all are 0 (or in eval mode).
# ================================================================================================================

DROPOUTS = ["hidden_dropout_prob", "attention_dropout", "activation_dropout", "word_dropout_prob", "classifier_dropout"]


@pytest.mark.parametrize("family", ["encoder", "decoder"])
@pytest.mark.parametrize("field", DROPOUTS)
def test_each_dropout_acts_in_training(family, field):
    zeros = {f: 0.0 for f in DROPOUTS}
    model = tiny_model(f"Blueprint{family.capitalize()}ForSequenceClassification",
                       **{**zeros, field: 0.5}).train()
    ids = random_ids(2, 10, seed=22)
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    b = model(ids).logits
    assert max_diff(a, b) > VISIBLE


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_hidden_dropout_acts_on_the_embeddings(family):
    # The paper also drops out the sums of the embeddings and the positional encodings: the first block's input.
    zeros = {f: 0.0 for f in DROPOUTS}
    model = tiny_model({"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family],
                       **{**zeros, "hidden_dropout_prob": 0.5}).train()
    inputs = []
    model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    ids = random_ids(2, 10, seed=22)
    with torch.no_grad():
        for seed in (0, 1):
            torch.manual_seed(seed)
            model(ids)
    assert max_diff(inputs[0], inputs[1]) > VISIBLE


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_word_dropout_zeroes_whole_token_vectors_and_rescales_the_rest(family):
    # Word dropout removes a token entirely (every feature of its vector at once), unlike element-wise dropout, and
    # keeps the expected input by scaling the kept tokens by 1 / (1 - p).
    probability = 0.5
    model = tiny_model({"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family],
                       position_embedding_type="none", embedding_norm=False,
                       **{**{f: 0.0 for f in DROPOUTS}, "word_dropout_prob": probability})
    inputs = []
    model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    ids = random_ids(8, 50, seed=22)
    with torch.no_grad():
        model(ids)
        torch.manual_seed(0)
        model.train()(ids)
    full, dropped = inputs
    is_zero = (dropped == 0).all(-1)
    assert ((dropped == 0) == is_zero[..., None]).all(), "a token vector was only partly zeroed"
    torch.testing.assert_close(dropped[~is_zero], full[~is_zero] / (1 - probability))
    assert 0.35 < is_zero.float().mean() < 0.65  # 400 tokens, p = 0.5


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_hidden_dropout_acts_on_the_sublayer_outputs(family, norm_position):
    # P_drop applies to each sub-layer output before the residual add, not only to the embeddings: feed the first
    # block a fixed input (so embedding dropout cannot matter) and look at its output.
    zeros = {f: 0.0 for f in DROPOUTS}
    model = tiny_model({"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family],
                       norm_position=norm_position, **{**zeros, "hidden_dropout_prob": 0.5}).train()
    block = model.layers[0]
    fixed = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    block.register_forward_pre_hook(lambda mod, args, kwargs: ((fixed, *args[1:]), kwargs), with_kwargs=True)
    block.register_forward_hook(lambda mod, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    ids = random_ids(2, 10, seed=22)
    with torch.no_grad():
        for seed in (0, 1):
            torch.manual_seed(seed)
            model(ids)
    assert max_diff(outputs[0], outputs[1]) > VISIBLE


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_zero_dropout_training_forward_is_deterministic(family):
    model = tiny_model(f"Blueprint{family.capitalize()}ForSequenceClassification",
                       **{f: 0.0 for f in DROPOUTS})
    ids = random_ids(2, 10, seed=22)
    with torch.no_grad():
        eval_logits = model(ids).logits
        train_logits = model.train()(ids).logits
    torch.testing.assert_close(train_logits, eval_logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_eval_mode_disables_dropout(family):
    model = tiny_model(f"Blueprint{family.capitalize()}ForSequenceClassification",
                       **{f: 0.5 for f in DROPOUTS})
    ids = random_ids(2, 10, seed=22)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(ids).logits
        torch.manual_seed(1)
        b = model(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


# ================================================================================================================
# Activation (gradient) checkpointing: same gradients, and it really recomputes.
# ================================================================================================================


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_checkpointing_gives_the_same_gradients(family):
    model = tiny_model(lm_class(family)).train()
    ids = random_ids(2, 10, seed=23)
    loss, grads = _loss_and_grads(model, ids)
    model.activation_checkpointing_enable()
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids)
    assert set(grads_ckpt) == set(grads)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("entry_point", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_checkpointing_recomputes_the_blocks(family, entry_point):
    model = tiny_model(lm_class(family)).train()
    calls = []
    model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    ids = random_ids(2, 10, seed=23)
    _loss_and_grads(model, ids)
    plain = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        getattr(model, entry_point)()
    calls.clear()
    _loss_and_grads(model, ids)
    assert (plain, len(calls)) == (1, 2)
