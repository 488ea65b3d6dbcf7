"""Bad input gets a clear ValueError naming the field; degenerate but legal input (fully padded rows) stays finite."""

import re

import pytest
import torch

from conftest import FAMILIES, PAD, POSITION_TYPES, TINY, VOCAB_SIZE, lm_class, random_ids, tiny_config, tiny_model

BASE = {"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}


# ================================================================================================================
# Impossible configurations are refused when the config is built, naming the field and what is allowed.
# ================================================================================================================

CHOICES = {
    "position_embedding_type": ("relative", ["sinusoidal", "learned", "rope", "alibi", "none"]),
    "norm_type": ("batchnorm", ["layernorm", "rmsnorm"]),
    "norm_position": ("sandwich", ["post", "pre"]),
    "ffn_type": ("moe", ["mlp", "glu"]),
    "classifier_pooling": ("attention", ["first", "mean", "last", "max"]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("field", list(CHOICES))
def test_unknown_choice_names_the_field_and_lists_valid_values(family, field):
    bad, valid = CHOICES[field]
    with pytest.raises(ValueError) as err:
        tiny_config(family, **{field: bad})
    message = str(err.value)
    assert field in message and bad in message and all(v in message for v in valid)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_activation_names_the_field(family):
    with pytest.raises(ValueError, match="hidden_act.*swishy"):
        tiny_config(family, hidden_act="swishy")


IMPOSSIBLE = {
    "hidden-not-divisible-by-heads": (dict(hidden_size=30, num_attention_heads=4),
                                      ["hidden_size", "num_attention_heads"]),
    "heads-not-divisible-by-kv-heads": (dict(num_attention_heads=4, num_key_value_heads=3),
                                        ["num_attention_heads", "num_key_value_heads"]),
    "odd-head-dim-with-rope": (dict(position_embedding_type="rope", head_dim=7), ["head_dim", "rope"]),
    "odd-derived-head-dim-with-rope": (dict(position_embedding_type="rope", hidden_size=28, num_attention_heads=4),
                                       ["head_dim", "rope"]),
    "zero-heads": (dict(num_attention_heads=0), ["num_attention_heads"]),
    "zero-layers": (dict(num_hidden_layers=0), ["num_hidden_layers"]),
    "negative-vocab": (dict(vocab_size=-5), ["vocab_size"]),
    "zero-window": (dict(sliding_window=0), ["sliding_window"]),
    "dropout-above-one": (dict(hidden_dropout_prob=1.5), ["hidden_dropout_prob"]),
    "word-dropout-of-one": (dict(word_dropout_prob=1.0), ["word_dropout_prob"]),
    "negative-token-types": (dict(type_vocab_size=-1), ["type_vocab_size"]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_impossible_config_names_the_fields(family, case):
    overrides, fields = IMPOSSIBLE[case]
    with pytest.raises(ValueError) as err:
        tiny_config(family, **overrides)
    assert all(f in str(err.value) for f in fields), str(err.value)


def test_decoder_refuses_the_encoder_pooler():
    with pytest.raises(ValueError, match="add_pooling_layer"):
        tiny_config("decoder", add_pooling_layer=True)


POSSIBLE = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "explicit-head-dim": dict(hidden_size=30, num_attention_heads=4, head_dim=8),
    "even-head-dim-with-rope": dict(position_embedding_type="rope", head_dim=6),
    "odd-head-dim-without-rope": dict(position_embedding_type="alibi", head_dim=7),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(POSSIBLE))
def test_unusual_but_valid_config_builds_and_runs(family, case):
    # Counterpart of the refusals above: the rules are no stricter than the architecture needs.
    model = tiny_model(BASE[family], **POSSIBLE[case])
    with torch.no_grad():
        out = model(random_ids(2, 6)).last_hidden_state
    assert out.shape == (2, 6, model.config.hidden_size)


# ================================================================================================================
# Bad forward inputs: a ValueError naming the argument, not an IndexError from deep inside torch.
# ================================================================================================================


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad_id", [VOCAB_SIZE, VOCAB_SIZE + 7, -1])
def test_token_id_outside_vocabulary(family, bad_id):
    ids = random_ids(2, 6)
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match="input_ids.*vocab_size"):
        tiny_model(BASE[family])(ids)


@pytest.mark.parametrize("bad_type", [2, -1])
def test_token_type_outside_range(bad_type):
    ids = random_ids(1, 6)
    types = torch.zeros_like(ids)
    types[0, 2] = bad_type
    with pytest.raises(ValueError, match="token_type_ids.*type_vocab_size"):
        tiny_model("BlueprintEncoderModel", type_vocab_size=2)(ids, token_type_ids=types)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_sequence_longer_than_the_position_table(family, pos):
    model = tiny_model(BASE[family], position_embedding_type=pos)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(random_ids(1, TINY["max_position_embeddings"] + 1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_sequence_filling_the_position_table_is_accepted(family, pos):
    model = tiny_model(BASE[family], position_embedding_type=pos)
    with torch.no_grad():
        out = model(random_ids(1, TINY["max_position_embeddings"])).last_hidden_state
    assert out.shape[1] == TINY["max_position_embeddings"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pos", ["rope", "alibi", "none"])
def test_encodings_without_a_table_accept_longer_sequences(family, pos):
    model = tiny_model(BASE[family], position_embedding_type=pos)
    with torch.no_grad():
        out = model(random_ids(1, 2 * TINY["max_position_embeddings"])).last_hidden_state
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pos", ["sinusoidal", "learned"])
def test_decoding_past_the_position_table_through_the_cache(pos):
    model = tiny_model("BlueprintDecoderForCausalLM", position_embedding_type=pos)
    limit = TINY["max_position_embeddings"]
    with torch.no_grad():
        out = model(random_ids(1, limit - 2), use_cache=True)
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model(random_ids(1, 3, seed=1), cache=out.cache, use_cache=True)


BAD_MASKS = {
    "too-long": (2, 7),
    "too-short": (2, 5),
    "wrong-batch": (3, 6),
    "one-dimensional": (6,),
    "three-dimensional": (2, 6, 6),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(BAD_MASKS))
def test_attention_mask_shape_must_match_the_ids(family, case):
    ids = random_ids(2, 6)
    mask = torch.ones(BAD_MASKS[case], dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(BASE[family])(ids, attention_mask=mask)


def test_token_type_ids_shape_must_match_the_ids():
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="token_type_ids"):
        tiny_model("BlueprintEncoderModel", type_vocab_size=2)(ids, token_type_ids=torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("give", ["both", "neither"])
def test_exactly_one_of_input_ids_and_inputs_embeds(family, give):
    model = tiny_model(BASE[family])
    ids = random_ids(2, 6)
    kwargs = {"input_ids": ids, "inputs_embeds": model.get_input_embeddings()(ids)} if give == "both" else {}
    with pytest.raises(ValueError, match=re.compile("input_ids.*inputs_embeds", re.S)):
        model(**kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_float_input_ids_are_refused(family):
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model(BASE[family])(random_ids(2, 6).float())


# ================================================================================================================
# Fully padded rows: legal (a batch may contain an empty example) and must never produce NaN.
# ================================================================================================================


def _batch_with_empty_row():
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    ids[1] = PAD
    mask[1] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("pos", POSITION_TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fully_padded_row_gives_no_nan(family, pos, impl, dtype):
    model = tiny_model(BASE[family], attn_implementation=impl, position_embedding_type=pos).to(dtype)
    ids, mask = _batch_with_empty_row()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
    assert not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pooling", ["first", "mean", "last", "max"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fully_padded_row_gives_finite_classification_logits(family, pooling, dtype):
    model = tiny_model(f"Blueprint{family.capitalize()}ForSequenceClassification", classifier_pooling=pooling)
    ids, mask = _batch_with_empty_row()
    with torch.no_grad():
        logits = model.to(dtype)(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_fully_padded_row_gives_finite_gradients(family):
    model = tiny_model(lm_class(family)).train()
    ids, mask = _batch_with_empty_row()
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fully_padded_row_leaves_the_other_rows_unchanged(family, impl):
    model = tiny_model(BASE[family], attn_implementation=impl)
    ids, mask = _batch_with_empty_row()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[:1]).last_hidden_state
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=0)
