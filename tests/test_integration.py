"""The Blueprint models inside the Hugging Face ecosystem: Auto classes, save/load, tied weights, outputs, losses,
Trainer, pipelines, PEFT and generate(). Grouped by the property each test checks."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

import hf_blueprint
from conftest import (
    FAMILIES,
    MASK,
    PAD,
    POSITION_TYPES,
    TINY,
    VOCAB_SIZE,
    lm_class,
    random_ids,
    sinusoidal_table,
    tiny_config,
    tiny_model,
)

ALL_CLASSES = [
    "BlueprintEncoderModel",
    "BlueprintEncoderForSequenceClassification",
    "BlueprintEncoderForMaskedLM",
    "BlueprintEncoderForTokenClassification",
    "BlueprintDecoderModel",
    "BlueprintDecoderForCausalLM",
    "BlueprintDecoderForSequenceClassification",
]


def family_of(cls_name):
    return "encoder" if cls_name.startswith("BlueprintEncoder") else "decoder"


def first_output(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs)[0]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ================================================================================================================
# Auto classes resolve both model types.
# ================================================================================================================

AUTO_CASES = [
    ("encoder", "AutoModel", "BlueprintEncoderModel"),
    ("encoder", "AutoModelForSequenceClassification", "BlueprintEncoderForSequenceClassification"),
    ("encoder", "AutoModelForMaskedLM", "BlueprintEncoderForMaskedLM"),
    ("encoder", "AutoModelForTokenClassification", "BlueprintEncoderForTokenClassification"),
    ("decoder", "AutoModel", "BlueprintDecoderModel"),
    ("decoder", "AutoModelForCausalLM", "BlueprintDecoderForCausalLM"),
    ("decoder", "AutoModelForSequenceClassification", "BlueprintDecoderForSequenceClassification"),
]


@pytest.mark.parametrize("family,config_cls", [("encoder", "BlueprintEncoderConfig"),
                                               ("decoder", "BlueprintDecoderConfig")])
def test_auto_config_resolves_model_type(family, config_cls):
    config = transformers.AutoConfig.for_model(f"blueprint_{family}", **TINY)
    assert type(config) is getattr(hf_blueprint, config_cls)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_config_round_trips_every_field(family, tmp_path):
    config = tiny_config(family, position_embedding_type="alibi", norm_type="rmsnorm", norm_position="pre",
                         ffn_type="glu", hidden_act="silu", num_key_value_heads=2, sliding_window=5,
                         type_vocab_size=3, classifier_pooling="first", tie_word_embeddings=False)
    config.save_pretrained(tmp_path)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert loaded.to_diff_dict() == config.to_diff_dict()


@pytest.mark.parametrize("family,auto_name,cls_name", AUTO_CASES)
def test_auto_model_from_config_builds_the_family_class(family, auto_name, cls_name):
    model = getattr(transformers, auto_name).from_config(tiny_config(family))
    assert type(model) is getattr(hf_blueprint, cls_name)


@pytest.mark.parametrize("family,auto_name,cls_name", AUTO_CASES)
def test_auto_model_from_pretrained_round_trip(family, auto_name, cls_name, tmp_path):
    model = tiny_model(cls_name)
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, auto_name).from_pretrained(tmp_path)
    ids = random_ids(2, 9)
    assert type(loaded) is type(model)
    assert torch.equal(first_output(loaded, ids), first_output(model, ids))


# ================================================================================================================
# save_pretrained / from_pretrained is exact for every architecture combination.
# ================================================================================================================

COMBOS = list(itertools.product(FAMILIES, POSITION_TYPES, ["layernorm", "rmsnorm"], ["post", "pre"], ["mlp", "glu"]))


@pytest.mark.parametrize("family,pos,norm_type,norm_position,ffn_type", COMBOS,
                         ids=["-".join(c) for c in COMBOS])
def test_save_load_gives_bitwise_equal_logits(family, pos, norm_type, norm_position, ffn_type, tmp_path):
    overrides = dict(position_embedding_type=pos, norm_type=norm_type, norm_position=norm_position,
                     ffn_type=ffn_type, hidden_act="gelu" if ffn_type == "glu" else "relu",
                     num_hidden_layers=1, intermediate_size=32)
    model = tiny_model(lm_class(family), **overrides)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    ids = random_ids(2, 8)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    assert torch.equal(first_output(loaded, ids, attention_mask=mask), first_output(model, ids, attention_mask=mask))


# ================================================================================================================
# The sinusoidal table is the paper's, also after a meta-device from_pretrained.
# ================================================================================================================


def _position_signal(model):
    """Input of the first block with all token embeddings zeroed: the positional encoding alone."""
    length = model.config.max_position_embeddings
    seen = {}
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model(random_ids(1, length))
    handle.remove()
    return seen["x"][0]


@pytest.mark.parametrize("loaded", [False, True], ids=["fresh", "from_pretrained"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sinusoidal_table_is_the_papers(family, loaded, tmp_path):
    model = tiny_model(lm_class(family), position_embedding_type="sinusoidal")
    if loaded:
        model.save_pretrained(tmp_path)
        model = type(model).from_pretrained(tmp_path)
    length, dim = model.config.max_position_embeddings, model.config.hidden_size
    torch.testing.assert_close(_position_signal(model), sinusoidal_table(length, dim), atol=1e-5, rtol=0)


# ================================================================================================================
# Tied embeddings: stored once, re-tied after loading, controlled by tie_word_embeddings.
# ================================================================================================================


def _saved_keys(model, path):
    model.save_pretrained(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_head_is_stored_once(family, tmp_path):
    keys = _saved_keys(tiny_model(lm_class(family)), tmp_path)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


@pytest.mark.parametrize("family", FAMILIES)
def test_untied_head_is_stored_separately(family, tmp_path):
    keys = _saved_keys(tiny_model(lm_class(family), tie_word_embeddings=False), tmp_path)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= keys


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_head_shares_storage_after_load(family, tmp_path):
    tiny_model(lm_class(family)).save_pretrained(tmp_path)
    loaded = getattr(hf_blueprint, lm_class(family)).from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_head_follows_embedding_updates_after_load(family, tmp_path):
    tiny_model(lm_class(family)).save_pretrained(tmp_path)
    loaded = getattr(hf_blueprint, lm_class(family)).from_pretrained(tmp_path)
    with torch.no_grad():
        loaded.model.embed_tokens.weight[17] += 1.0
    torch.testing.assert_close(loaded.lm_head.weight[17], loaded.model.embed_tokens.weight[17], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_untied_head_is_independent_after_load(family, tmp_path):
    tiny_model(lm_class(family), tie_word_embeddings=False).save_pretrained(tmp_path)
    loaded = getattr(hf_blueprint, lm_class(family)).from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


# ================================================================================================================
# resize_token_embeddings keeps the tie and grows the vocabulary everywhere.
# ================================================================================================================

NEW_VOCAB = VOCAB_SIZE + 20


def _resized(family):
    model = tiny_model(lm_class(family))
    old = model.model.embed_tokens.weight.detach().clone()
    model.resize_token_embeddings(NEW_VOCAB)
    return model, old


@pytest.mark.parametrize("family", FAMILIES)
def test_resize_keeps_the_tie(family):
    model, _ = _resized(family)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_resize_keeps_old_rows(family):
    model, old = _resized(family)
    torch.testing.assert_close(model.model.embed_tokens.weight[:VOCAB_SIZE], old, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_resized_model_accepts_and_predicts_new_ids(family):
    model, _ = _resized(family)
    ids = torch.tensor([[10, 11, NEW_VOCAB - 1, 12]])
    assert model.config.vocab_size == NEW_VOCAB
    assert first_output(model, ids).shape == (1, 4, NEW_VOCAB)


# ================================================================================================================
# Output structure: attentions, hidden states, tuples.
# ================================================================================================================


def _attentions(family, padding):
    model = tiny_model({"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family],
                       attn_implementation="eager")
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 6:] = 0
    else:
        mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    return model.config, out.attentions, mask


@pytest.mark.parametrize("family,padding", [("encoder", "right"), ("decoder", "left")])
def test_output_attentions_has_one_map_per_layer(family, padding):
    config, attentions, _ = _attentions(family, padding)
    assert [tuple(a.shape) for a in attentions] == [(2, config.num_attention_heads, 9, 9)] * config.num_hidden_layers


@pytest.mark.parametrize("family,padding", [("encoder", "right"), ("decoder", "left")])
def test_attention_rows_sum_to_one(family, padding):
    _, attentions, mask = _attentions(family, padding)
    real_queries = mask.bool()
    for a in attentions:
        sums = a.sum(-1).permute(0, 2, 1)[real_queries]  # (real queries, heads)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,padding", [("encoder", "right"), ("decoder", "left")])
def test_attention_puts_no_weight_on_padding(family, padding):
    _, attentions, mask = _attentions(family, padding)
    real_queries = mask.bool()
    for a in attentions:
        on_pads = a[1][:, real_queries[1]][..., ~real_queries[1]]
        assert on_pads.abs().max().item() == 0.0


def test_decoder_attention_is_lower_triangular():
    # Real query rows only: a left-pad query row has nothing to attend to, its values are a convention.
    _, attentions, mask = _attentions("decoder", "left")
    future = torch.ones(9, 9, dtype=torch.bool).triu(1) & mask.bool()[:, None, :, None]
    for a in attentions:
        assert a.masked_select(future).abs().max().item() == 0.0


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("cls_name", ALL_CLASSES)
def test_output_hidden_states_has_layers_plus_one(cls_name, layers):
    model = tiny_model(cls_name, num_hidden_layers=layers)
    with torch.no_grad():
        out = model(random_ids(2, 6), output_hidden_states=True)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 6, 32)] * (layers + 1)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("family", FAMILIES)
def test_last_hidden_state_is_the_last_of_hidden_states(family, norm_position):
    model = tiny_model({"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family],
                       norm_position=norm_position)
    with torch.no_grad():
        out = model(random_ids(2, 6), output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("cls_name", ALL_CLASSES)
def test_return_dict_false_returns_a_tuple(cls_name):
    model = tiny_model(cls_name)
    ids = random_ids(2, 6)
    with torch.no_grad():
        as_tuple = model(ids, return_dict=False)
        as_dict = model(ids, return_dict=True)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict[0], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_match_input_ids(family):
    model = tiny_model({"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family])
    ids = random_ids(2, 7)
    with torch.no_grad():
        from_ids = model(input_ids=ids).last_hidden_state
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).last_hidden_state
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-6, rtol=0)


def test_token_type_ids_change_the_encoding():
    model = tiny_model("BlueprintEncoderModel", type_vocab_size=2)
    ids = random_ids(1, 8)
    types = torch.tensor([[0] * 4 + [1] * 4])
    with torch.no_grad():
        a = model(ids, token_type_ids=types).last_hidden_state
        b = model(ids).last_hidden_state
    assert (a - b).abs().max() > 1e-3


def test_token_type_ids_default_to_zero():
    model = tiny_model("BlueprintEncoderModel", type_vocab_size=2)
    ids = random_ids(1, 8)
    with torch.no_grad():
        a = model(ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        b = model(ids).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("cls_name,overrides", [
    ("BlueprintEncoderForSequenceClassification", {}),
    ("BlueprintEncoderForSequenceClassification", dict(add_pooling_layer=True, type_vocab_size=2,
                                                       embedding_norm=True, norm_position="pre")),
    ("BlueprintEncoderForTokenClassification", dict(type_vocab_size=2)),
    ("BlueprintEncoderForMaskedLM", dict(tie_word_embeddings=False)),
    ("BlueprintDecoderForCausalLM", dict(position_embedding_type="learned", tie_word_embeddings=False)),
    ("BlueprintDecoderForSequenceClassification", dict(norm_position="pre", embedding_norm=True)),
], ids=["enc-cls", "enc-cls-bert", "enc-tok", "enc-mlm", "dec-lm", "dec-cls"])
def test_every_parameter_gets_a_gradient(cls_name, overrides):
    # A parameter that never receives a gradient is dead weight (and breaks DDP with find_unused_parameters=False).
    model = tiny_model(cls_name, **overrides).train()
    ids = random_ids(2, 8)
    kwargs = {"token_type_ids": torch.tensor([[0] * 4 + [1] * 4] * 2)} if overrides.get("type_vocab_size") else {}
    if "Sequence" in cls_name:
        labels = torch.tensor([0, 1])
    elif "Token" in cls_name:
        labels = torch.zeros_like(ids)
    else:
        labels = ids
    model(ids, labels=labels, **kwargs).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("flag", [True, False])
def test_pooling_layer_switch_gives_a_tanh_pooler_output(flag):
    # BERT's pooler belongs to the encoder family (the decoder config refuses it: see test_validation.py).
    model = tiny_model("BlueprintEncoderModel", add_pooling_layer=flag)
    with torch.no_grad():
        pooled = model(random_ids(2, 6)).pooler_output
    assert (pooled.shape == (2, 32) and pooled.abs().max() < 1) if flag else pooled is None


def test_pooling_layer_feeds_the_classifier():
    model = tiny_model("BlueprintEncoderForSequenceClassification", add_pooling_layer=True)
    seen = {}
    model.classifier.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    ids = random_ids(2, 6)
    with torch.no_grad():
        model(ids)
        pooled = model.model(ids).pooler_output
    torch.testing.assert_close(seen["x"], pooled, atol=0, rtol=0)


# ================================================================================================================
# Config switches are wired into the modules.
# ================================================================================================================


def _params(**overrides):
    return sum(p.numel() for p in tiny_model("BlueprintDecoderModel", **overrides).parameters())


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_key_value_heads_set_the_kv_projection_width(kv_heads):
    attn = tiny_model("BlueprintDecoderModel", num_key_value_heads=kv_heads).layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (32, 8 * kv_heads,
                                                                                               8 * kv_heads)


def test_explicit_head_dim_decouples_heads_from_hidden_size():
    attn = tiny_model("BlueprintDecoderModel", head_dim=16).layers[0].self_attn
    assert (attn.q_proj.out_features, attn.o_proj.in_features, attn.o_proj.out_features) == (64, 64, 32)


@pytest.mark.parametrize("flag", [True, False])
def test_attention_bias_switch(flag):
    attn = tiny_model("BlueprintDecoderModel", attention_bias=flag).layers[0].self_attn
    assert [m.bias is not None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)] == [flag] * 4


@pytest.mark.parametrize("flag", [True, False])
def test_mlp_bias_switch(flag):
    mlp = tiny_model("BlueprintDecoderModel", mlp_bias=flag).layers[0].mlp
    assert [m.bias is not None for m in (mlp.up_proj, mlp.down_proj)] == [flag] * 2


@pytest.mark.parametrize("ffn_type,has_gate", [("mlp", False), ("glu", True)])
def test_ffn_type_switch(ffn_type, has_gate):
    mlp = tiny_model("BlueprintDecoderModel", ffn_type=ffn_type).layers[0].mlp
    assert (getattr(mlp, "gate_proj", None) is not None) == has_gate


@pytest.mark.parametrize("overrides,extra", [
    (dict(position_embedding_type="learned"), 64 * 32),  # a trained table of max_position_embeddings rows
    (dict(type_vocab_size=2), 2 * 32),  # a token-type table
    (dict(embedding_norm=True), 2 * 32),  # one LayerNorm after the embeddings
    (dict(norm_position="pre"), 2 * 32),  # the final LayerNorm of Pre-LN
    (dict(norm_position="pre", norm_type="rmsnorm"), 32),  # ... an RMSNorm has no bias
], ids=["learned", "token-types", "embedding-norm", "pre-final-norm", "pre-final-rmsnorm"])
def test_switch_adds_exactly_its_parameters(overrides, extra):
    baseline = _params(norm_type=overrides.get("norm_type", "layernorm"))  # sinusoidal, post-norm, no extras
    assert _params(**overrides) - baseline == extra


def test_defaults_are_the_papers_base_model():
    config = hf_blueprint.BlueprintDecoderConfig()
    got = {k: getattr(config, k) for k in ["num_hidden_layers", "hidden_size", "num_attention_heads",
                                            "intermediate_size", "norm_position", "norm_type",
                                            "position_embedding_type", "hidden_act", "hidden_dropout_prob",
                                            "scale_embeddings", "tie_word_embeddings", "ffn_type"]}
    assert got == dict(num_hidden_layers=6, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                       norm_position="post", norm_type="layernorm", position_embedding_type="sinusoidal",
                       hidden_act="relu", hidden_dropout_prob=0.1, scale_embeddings=True, tie_word_embeddings=True,
                       ffn_type="mlp")


def test_default_block_has_the_papers_parameter_count():
    # 4 d^2 attention (no biases) + 2 d d_ff + d_ff + d FFN (with b1, b2) + 2 LayerNorms of 2d.
    config = hf_blueprint.BlueprintDecoderConfig(vocab_size=VOCAB_SIZE, num_hidden_layers=1)
    block = hf_blueprint.BlueprintDecoderModel(config).layers[0]
    assert sum(p.numel() for p in block.parameters()) == 4 * 512**2 + 2 * 512 * 2048 + 2048 + 512 + 2 * 2 * 512


@pytest.mark.parametrize("cls_name", ALL_CLASSES)
def test_no_split_modules_name_the_blocks(cls_name):
    model = tiny_model(cls_name)
    module_types = {type(m).__name__ for m in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= module_types
    base = model if not hasattr(model, "model") else model.model
    assert type(base.layers[0]).__name__ in model._no_split_modules


# ================================================================================================================
# Losses: labels give the textbook loss.
# ================================================================================================================


def test_causal_lm_loss_is_shifted_cross_entropy():
    model = tiny_model("BlueprintDecoderForCausalLM")
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 5] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB_SIZE), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


def test_masked_lm_loss_is_unshifted_cross_entropy():
    model = tiny_model("BlueprintEncoderForMaskedLM")
    ids = random_ids(2, 8)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[1, 6] = ids[0, 2], ids[1, 5], ids[1, 6]
    ids[0, 2] = ids[1, 5] = ids[1, 6] = MASK
    with torch.no_grad():
        out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits.reshape(-1, VOCAB_SIZE), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls_name", ["BlueprintEncoderForSequenceClassification",
                                      "BlueprintDecoderForSequenceClassification"])
def test_sequence_classification_loss_is_cross_entropy(cls_name):
    model = tiny_model(cls_name, num_labels=3)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        out = model(random_ids(2, 8), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls_name", ["BlueprintEncoderForSequenceClassification",
                                      "BlueprintDecoderForSequenceClassification"])
def test_sequence_regression_loss_is_mse(cls_name):
    model = tiny_model(cls_name, num_labels=1)
    labels = torch.tensor([0.5, -1.5])
    with torch.no_grad():
        out = model(random_ids(2, 8), labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), labels), atol=1e-6, rtol=1e-6)


def test_token_classification_loss_is_cross_entropy():
    model = tiny_model("BlueprintEncoderForTokenClassification", num_labels=5)
    labels = torch.randint(0, 5, (2, 8), generator=torch.Generator().manual_seed(0))
    labels[1, 6:] = -100
    with torch.no_grad():
        out = model(random_ids(2, 8), labels=labels)
    expected = F.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-6)


# ================================================================================================================
# bf16 forward.
# ================================================================================================================


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["BlueprintEncoderForMaskedLM", "BlueprintDecoderForCausalLM"])
def test_bf16_forward_is_close_to_fp32(cls_name, impl):
    model = tiny_model(cls_name, attn_implementation=impl)
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    reference = first_output(model, ids, attention_mask=mask)
    logits = first_output(model.to(torch.bfloat16), ids, attention_mask=mask)
    assert logits.dtype == torch.bfloat16
    real = mask.bool()
    assert (logits.float() - reference)[real].abs().max() < 0.1


# ================================================================================================================
# generate(): beam search and sampling.
# ================================================================================================================


def _gen(model, ids, **kwargs):
    mask = (ids != PAD).long()
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, **kwargs)


def _prompts():
    ids = random_ids(2, 6, seed=3)
    ids[1, :2] = PAD  # left padding
    return ids


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_beam_search_with_and_without_cache_agree(pos):
    # Beam search reorders the cache between steps: a wrong reorder changes the beams.
    model = tiny_model("BlueprintDecoderForCausalLM", position_embedding_type=pos)
    a = _gen(model, _prompts(), num_beams=3, do_sample=False, use_cache=True)
    b = _gen(model, _prompts(), num_beams=3, do_sample=False, use_cache=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_beam_search_returns_the_requested_sequences():
    model = tiny_model("BlueprintDecoderForCausalLM")
    out = _gen(model, _prompts(), num_beams=3, num_return_sequences=2, do_sample=False)
    assert out.shape == (4, 12)


def test_sampling_with_and_without_cache_agree():
    model = tiny_model("BlueprintDecoderForCausalLM", position_embedding_type="rope")
    torch.manual_seed(0)
    a = _gen(model, _prompts(), do_sample=True, top_k=0, use_cache=True)
    torch.manual_seed(0)
    b = _gen(model, _prompts(), do_sample=True, top_k=0, use_cache=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sampling_depends_on_the_seed():
    model = tiny_model("BlueprintDecoderForCausalLM")
    torch.manual_seed(0)
    a = _gen(model, _prompts(), do_sample=True, top_k=0)
    torch.manual_seed(1)
    b = _gen(model, _prompts(), do_sample=True, top_k=0)
    assert not torch.equal(a, b)


# ================================================================================================================
# Pipelines with the local tokenizer.
# ================================================================================================================


def test_text_generation_pipeline_matches_generate(tokenizer):
    model = tiny_model("BlueprintDecoderForCausalLM")
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe("the cat sat on the", max_new_tokens=5, min_new_tokens=5, do_sample=False, return_tensors=True)
    enc = tokenizer("the cat sat on the", return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert list(out[0]["generated_token_ids"]) == expected[0].tolist()


def test_text_generation_pipeline_returns_text(tokenizer):
    model = tiny_model("BlueprintDecoderForCausalLM")
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe("the cat sat on the", max_new_tokens=5, min_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("the cat sat on the") and len(text.split()) > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_text_classification_pipeline_matches_forward(family, tokenizer, encoder_tokenizer):
    tok = encoder_tokenizer if family == "encoder" else tokenizer
    model = tiny_model(f"Blueprint{family.capitalize()}ForSequenceClassification", num_labels=2,
                       id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tok)
    texts = ["the big dog ran", "a small red bird sang in the tree"]
    out = pipe(texts)
    with torch.no_grad():
        probs = model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    expected = [(model.config.id2label[int(p.argmax())], float(p.max())) for p in probs]
    assert [r["label"] for r in out] == [label for label, _ in expected]
    assert [r["score"] for r in out] == pytest.approx([score for _, score in expected], abs=1e-5)


def test_fill_mask_pipeline_matches_forward(tokenizer):
    model = tiny_model("BlueprintEncoderForMaskedLM")
    pipe = transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer)
    out = pipe("the [MASK] sat on the mat", top_k=3)
    enc = tokenizer("the [MASK] sat on the mat", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, 1]
    assert [r["token"] for r in out] == logits.topk(3).indices.tolist()
    assert all(r["sequence"].startswith("the ") for r in out)


# ================================================================================================================
# Training with Trainer: the loss drops on a learnable pattern.
# ================================================================================================================


def _cycle_rows(n, length, seed, cycle=tuple(range(10, 18))):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(cycle), (n,), generator=g)
    return [[cycle[(int(s) + i) % len(cycle)] for i in range(length)] for s in starts]


def causal_lm_data(n, seed):
    rows = _cycle_rows(n, 16, seed)
    return [{"input_ids": r, "attention_mask": [1] * 16, "labels": r} for r in rows]


def masked_lm_data(n, seed):
    out = []
    for k, row in enumerate(_cycle_rows(n, 16, seed)):
        ids, labels = list(row), [-100] * 16
        for i in range(k % 4, 16, 4):
            labels[i], ids[i] = row[i], MASK
        out.append({"input_ids": ids, "attention_mask": [1] * 16, "labels": labels})
    return out


def classification_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    out = []
    for label in labels.tolist():
        low = 10 if label == 0 else 40
        ids = torch.randint(low, low + 30, (12,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * 12, "labels": label})
    return out


def _training_args(path, **kwargs):
    defaults = dict(output_dir=str(path), use_cpu=True, report_to=[], max_steps=20, per_device_train_batch_size=16,
                    per_device_eval_batch_size=32, learning_rate=3e-3, warmup_steps=0, weight_decay=0.0,
                    logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
                    dataloader_num_workers=0, seed=0, log_level="error")
    return transformers.TrainingArguments(**{**defaults, **kwargs})


def _train(model, train, evaluation, path, **kwargs):
    trainer = transformers.Trainer(model=model, args=_training_args(path, **kwargs), train_dataset=train,
                                   eval_dataset=evaluation)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    return before, after, trainer


TRAIN_CASES = [
    ("BlueprintDecoderForCausalLM", causal_lm_data),
    ("BlueprintEncoderForMaskedLM", masked_lm_data),
    ("BlueprintEncoderForSequenceClassification", classification_data),
    ("BlueprintDecoderForSequenceClassification", classification_data),
]


@pytest.mark.parametrize("cls_name,data", TRAIN_CASES, ids=[c for c, _ in TRAIN_CASES])
def test_trainer_lowers_the_loss(cls_name, data, tmp_path):
    model = tiny_model(cls_name)
    before, after = _train(model, data(64, 0), data(32, 1), tmp_path)[:2]
    assert after < 0.75 * before


@pytest.fixture(scope="module")
def checkpointed_training(tmp_path_factory):
    """The same short decoder run with and without activation checkpointing (all dropout 0)."""
    runs = {}
    for flag in (False, True):
        model = tiny_model("BlueprintDecoderForCausalLM").train()
        calls = []
        model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
        _, _, trainer = _train(model, causal_lm_data(32, 0), causal_lm_data(16, 1),
                               tmp_path_factory.mktemp(f"gc{flag}"), max_steps=4, activation_checkpointing=flag)
        runs[flag] = dict(state={k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                          calls=len(calls))
    return runs


def test_trainer_activation_checkpointing_recomputes(checkpointed_training):
    # Same number of eval forwards in both runs; each of the 4 training steps adds one recompute of the block.
    assert checkpointed_training[True]["calls"] - checkpointed_training[False]["calls"] == 4


def test_trainer_activation_checkpointing_gives_the_same_weights(checkpointed_training):
    plain, ckpt = checkpointed_training[False]["state"], checkpointed_training[True]["state"]
    assert set(plain) == set(ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=0, msg=name)


# ================================================================================================================
# PEFT: a LoRA adapter on q_proj/v_proj trains, and only the adapter moves.
# ================================================================================================================


@pytest.fixture(scope="module", params=FAMILIES)
def lora_run(request):
    from peft import LoraConfig, get_peft_model

    family = request.param
    model = tiny_model(lm_class(family))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM" if family == "decoder" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft reads the deprecated is_gradient_checkpointing
        peft_model = get_peft_model(model, lora)
    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    batch = causal_lm_data(8, 0) if family == "decoder" else masked_lm_data(8, 0)
    batch = {k: torch.tensor([row[k] for row in batch]) for k in batch[0]}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    return dict(family=family, trainable=trainable, before=before, after=after, losses=losses,
                layers=model.config.num_hidden_layers)


def test_lora_trains_only_adapters_on_q_and_v(lora_run):
    expected = {f"layers.{i}.self_attn.{proj}.lora_{ab}" for i in range(lora_run["layers"])
                for proj in ("q_proj", "v_proj") for ab in ("A", "B")}
    found = {n[n.index("layers."):].replace(".default.weight", "") for n in lora_run["trainable"]}
    assert found == expected


def test_lora_training_changes_the_loss(lora_run):
    assert lora_run["losses"][-1] < lora_run["losses"][0]


def test_lora_training_leaves_base_weights_untouched(lora_run):
    changed = [n for n in lora_run["before"] if "lora_" not in n
               and not torch.equal(lora_run["before"][n], lora_run["after"][n])]
    assert changed == []


def test_lora_training_updates_the_adapters(lora_run):
    moved = [n for n in lora_run["before"] if "lora_B" in n
             and not torch.equal(lora_run["before"][n], lora_run["after"][n])]
    assert len(moved) == 2 * lora_run["layers"]
