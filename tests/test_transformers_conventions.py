"""The calls an experienced transformers user makes, answered as a native model answers them: the `past_key_values`
alias, unknown keywords, loading info, config round trips, generation conventions, and the encoder-decoder's
cache, resizing and checkpointing."""

import logging
import warnings

import pytest
import torch
from packaging import version
from transformers import GenerationMixin

import transformers
import hf_blueprint
from hf_blueprint.modeling_blueprint import BlueprintModel

from conftest import TINY, random_ids, tiny_model

SEQ2SEQ = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
               max_position_embeddings=64, initializer_range=0.1)

HEADS = ["BlueprintEncoderModel", "BlueprintEncoderForMaskedLM", "BlueprintEncoderForSequenceClassification",
         "BlueprintEncoderForTokenClassification", "BlueprintDecoderModel", "BlueprintDecoderForCausalLM",
         "BlueprintDecoderForSequenceClassification"]
SEQ2SEQ_HEADS = ["BlueprintSeq2SeqModel", "BlueprintForConditionalGeneration"]


def seq2seq_model(cls_name="BlueprintForConditionalGeneration", **overrides):
    torch.manual_seed(0)
    config = hf_blueprint.BlueprintSeq2SeqConfig(**{**SEQ2SEQ, **overrides})
    return getattr(hf_blueprint, cls_name)(config).eval()


def padded_source():
    source = random_ids(2, 9, seed=5, low=3, high=40)
    mask = torch.ones_like(source)
    source[1, 6:], mask[1, 6:] = 0, 0
    return source, mask


def model_for(cls_name, **overrides):
    if cls_name in SEQ2SEQ_HEADS:
        return seq2seq_model(cls_name, **overrides)
    return tiny_model(cls_name, **overrides)


def call_inputs(cls_name):
    if cls_name in SEQ2SEQ_HEADS:
        source, mask = padded_source()
        return dict(input_ids=source, attention_mask=mask, decoder_input_ids=random_ids(2, 4, seed=6, low=3, high=40))
    return dict(input_ids=random_ids(2, 6), attention_mask=torch.ones(2, 6, dtype=torch.long))


# -- the `past_key_values` alias ------------------------------------------------------------------------------------


def _cached_step_with_alias(model, prefix_inputs, step_inputs):
    """Runs the prefix with a cache, then the step with the cache passed as `past_key_values`."""
    cache = model(**prefix_inputs, use_cache=True).cache
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = model(**step_inputs, past_key_values=cache)
    return step, [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.parametrize("cls_name", ["BlueprintDecoderModel", "BlueprintDecoderForCausalLM"])
def test_past_key_values_alias_feeds_the_cache(cls_name):
    model = tiny_model(cls_name)
    ids = random_ids(2, 7)
    full = model(ids)
    step, _ = _cached_step_with_alias(model, dict(input_ids=ids[:, :5]), dict(input_ids=ids[:, 5:]))
    name = "logits" if cls_name.endswith("CausalLM") else "last_hidden_state"
    torch.testing.assert_close(getattr(step, name), getattr(full, name)[:, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls_name", SEQ2SEQ_HEADS)
def test_past_key_values_alias_feeds_the_seq2seq_cache(cls_name):
    model = seq2seq_model(cls_name)
    source, mask = padded_source()
    target = random_ids(2, 5, seed=7, low=3, high=40)
    full = model(input_ids=source, attention_mask=mask, decoder_input_ids=target)
    step, _ = _cached_step_with_alias(
        model, dict(input_ids=source, attention_mask=mask, decoder_input_ids=target[:, :3]),
        dict(input_ids=source, attention_mask=mask, decoder_input_ids=target[:, 3:]),
    )
    name = "logits" if cls_name.endswith("Generation") else "last_hidden_state"
    torch.testing.assert_close(getattr(step, name), getattr(full, name)[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.skipif(version.parse(transformers.__version__) >= version.parse("5.40.0"),
                    reason="transformers stops warning about `past_key_values` from 5.40 on")
def test_past_key_values_alias_warns_like_a_native_model():
    model = tiny_model("BlueprintDecoderForCausalLM")
    ids = random_ids(1, 4)
    _, caught = _cached_step_with_alias(model, dict(input_ids=ids[:, :3]), dict(input_ids=ids[:, 3:]))
    assert len(caught) == 1 and issubclass(caught[0].category, FutureWarning)
    assert "cache" in str(caught[0].message)


# -- unknown keywords -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", HEADS + SEQ2SEQ_HEADS)
def test_misspelled_keyword_is_a_type_error_naming_it(cls_name):
    model = model_for(cls_name)
    inputs = call_inputs(cls_name)
    inputs["atention_mask"] = inputs.pop("attention_mask")
    with pytest.raises(TypeError, match=rf"{cls_name}\.forward\(\) got an unexpected keyword argument 'atention_mask'"):
        model(**inputs)


@pytest.mark.parametrize("cls_name", HEADS + SEQ2SEQ_HEADS)
def test_transformers_pass_through_keywords_are_accepted(cls_name):
    model = model_for(cls_name)
    inputs = call_inputs(cls_name)
    plain = model(**inputs)
    # What the Trainer, the flash-attention collators and transformers' output plumbing pass along.
    passed = model(**inputs, num_items_in_batch=torch.tensor(7), output_router_logits=False)
    first = next(name for name in ("logits", "last_hidden_state") if getattr(plain, name, None) is not None)
    torch.testing.assert_close(getattr(passed, first), getattr(plain, first), atol=0, rtol=0)


# -- the encoder-decoder with a sliding window -----------------------------------------------------------------------


def test_cross_attention_has_no_window():
    model = seq2seq_model(sliding_window=2)
    for layer in model.model.decoder.layers:
        assert layer.self_attn.sliding_window == 2
        assert layer.cross_attn.sliding_window is None


def test_windowed_seq2seq_cache_keeps_every_source_key_and_matches_the_full_forward():
    model = seq2seq_model(sliding_window=2)
    source, mask = padded_source()
    target = random_ids(2, 5, seed=7, low=3, high=40)
    full = model(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
    prefix = model(input_ids=source, attention_mask=mask, decoder_input_ids=target[:, :3], use_cache=True)
    cross_keys = prefix.cache.cross_attention_cache.layers[0].keys
    assert cross_keys.shape[2] == source.shape[1]  # all 9 source keys, not the window's last 1
    step = model(encoder_outputs=(prefix.encoder_last_hidden_state,), attention_mask=mask,
                 decoder_input_ids=target[:, 3:], cache=prefix.cache).logits
    torch.testing.assert_close(step, full[:, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_windowed_seq2seq_generates_from_a_padded_source_as_without_cache(cache_implementation):
    model = seq2seq_model(sliding_window=2)
    source, mask = padded_source()
    for search in (dict(do_sample=False), dict(num_beams=2)):
        kwargs = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=-1, **search)
        cached = model.generate(source, cache_implementation=cache_implementation, **kwargs)
        assert torch.equal(cached, model.generate(source, use_cache=False, **kwargs)), search


def test_windowed_decoder_generates_with_a_static_cache_as_without_cache():
    model = tiny_model("BlueprintDecoderForCausalLM", sliding_window=3)
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=-1)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, model.generate(ids, use_cache=False, **kwargs))


# -- one meaning of sliding_window in every family ------------------------------------------------------------------


def visible_keys_per_query(attentions: torch.Tensor) -> torch.Tensor:
    """(batch, heads, query, key) weights of one layer -> keys with non-zero weight per query (same in every head)."""
    counts = (attentions > 0).sum(-1)
    assert torch.equal(counts, counts[:, :1].expand_as(counts))
    return counts[0, 0]


def expected_visible(length: int, window: int, causal: bool) -> torch.Tensor:
    query, key = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    distance = query - key
    visible = (distance >= 0) & (distance < window) if causal else distance.abs() < window
    return visible.sum(-1)


WINDOW, LENGTH = 3, 9


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_sliding_window_counts_the_same_in_encoder_and_decoder(family, impl):
    cls_name = {"encoder": "BlueprintEncoderModel", "decoder": "BlueprintDecoderModel"}[family]
    model = tiny_model(cls_name, attn_implementation=impl, sliding_window=WINDOW)
    attentions = model(random_ids(1, LENGTH), output_attentions=True).attentions[0]
    counts = visible_keys_per_query(attentions)
    assert torch.equal(counts, expected_visible(LENGTH, WINDOW, causal=family == "decoder"))
    assert counts.max() == (WINDOW if family == "decoder" else 2 * WINDOW - 1)


def test_sliding_window_counts_the_same_in_the_encoder_decoder():
    model = seq2seq_model(sliding_window=WINDOW)
    source = random_ids(1, LENGTH, seed=3, low=3, high=40)
    target = random_ids(1, LENGTH, seed=4, low=3, high=40)
    output = model(input_ids=source, decoder_input_ids=target, output_attentions=True)
    assert torch.equal(visible_keys_per_query(output.encoder_attentions[0]), expected_visible(LENGTH, WINDOW, False))
    assert torch.equal(visible_keys_per_query(output.decoder_attentions[0]), expected_visible(LENGTH, WINDOW, True))
    assert torch.equal(visible_keys_per_query(output.cross_attentions[0]), torch.full((LENGTH,), LENGTH))


# -- resizing the untied encoder-decoder ----------------------------------------------------------------------------


def test_resize_grows_the_untied_decoder_embedding_too(tmp_path):
    model = seq2seq_model(tie_word_embeddings=False)
    old = model.model.decoder.embed_tokens.weight.detach().clone()
    model.resize_token_embeddings(48)
    assert model.model.encoder.embed_tokens.weight.shape[0] == 48
    assert model.model.decoder.embed_tokens.weight.shape[0] == 48
    assert model.lm_head.weight.shape[0] == 48
    torch.testing.assert_close(model.model.decoder.embed_tokens.weight[:40], old, atol=0, rtol=0)
    new_ids = torch.tensor([[44, 45, 46]])
    logits = model(input_ids=new_ids, decoder_input_ids=torch.tensor([[1, 47, 45]])).logits
    assert logits.shape == (1, 3, 48)
    model.save_pretrained(tmp_path)
    reloaded = hf_blueprint.BlueprintForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=new_ids, decoder_input_ids=torch.tensor([[1, 47, 45]])).logits,
                               logits, atol=0, rtol=0)


# -- loading ------------------------------------------------------------------------------------------------------------


def test_output_loading_info_returns_the_model_and_the_info(tmp_path):
    tiny_model("BlueprintDecoderForCausalLM").save_pretrained(tmp_path)
    model, info = hf_blueprint.BlueprintDecoderForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, hf_blueprint.BlueprintDecoderForCausalLM)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]


def test_output_loading_info_keeps_the_non_finite_weights_check(tmp_path):
    model = tiny_model("BlueprintDecoderForCausalLM")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        hf_blueprint.BlueprintDecoderForCausalLM.from_pretrained(tmp_path, output_loading_info=True)


@pytest.mark.parametrize("config_cls", [hf_blueprint.BlueprintEncoderConfig, hf_blueprint.BlueprintDecoderConfig,
                                        hf_blueprint.BlueprintSeq2SeqConfig])
def test_config_save_and_load_keeps_to_dict_identical(config_cls, tmp_path):
    fields = SEQ2SEQ if config_cls is hf_blueprint.BlueprintSeq2SeqConfig else TINY
    config = config_cls(**fields)
    config.save_pretrained(tmp_path / "first")
    loaded = config_cls.from_pretrained(tmp_path / "first")
    assert loaded.to_dict() == config.to_dict()
    loaded.save_pretrained(tmp_path / "second")
    assert config_cls.from_pretrained(tmp_path / "second").to_dict() == config.to_dict()


def test_generic_trunk_refuses_an_encoder_decoder_checkpoint(tmp_path):
    seq2seq_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-decoder config.*BlueprintSeq2SeqModel"):
        BlueprintModel.from_pretrained(tmp_path)


def test_generic_trunk_reads_a_decoder_checkpoint_as_causal(tmp_path, caplog):
    decoder = tiny_model("BlueprintDecoderModel")
    decoder.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        generic = BlueprintModel.from_pretrained(tmp_path).eval()
    assert generic.is_causal
    assert "newer version" not in caplog.text
    ids = random_ids(1, 6)
    torch.testing.assert_close(generic(ids).last_hidden_state, decoder(ids).last_hidden_state, atol=0, rtol=0)


# -- generation conventions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["BlueprintDecoderForCausalLM", "BlueprintForConditionalGeneration"])
def test_generating_classes_inherit_generation_mixin_directly(cls_name):
    cls = getattr(hf_blueprint, cls_name)
    assert GenerationMixin in cls.__bases__
    assert cls.can_generate()


def test_negative_eos_token_id_means_never_stop():
    model = tiny_model("BlueprintDecoderForCausalLM")
    ids = random_ids(1, 3)
    output = model.generate(ids, max_new_tokens=7, do_sample=False, eos_token_id=-1)
    assert output.shape == (1, 10)


def test_generate_with_a_tokenizer_works(tokenizer):
    # generate(tokenizer=...) (stop strings; transformers' server always passes it) keeps the tokenizer among the
    # model keywords; it must not reach forward.
    model = tiny_model("BlueprintDecoderForCausalLM")
    ids = random_ids(1, 3)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=-1)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=-1, tokenizer=tokenizer),
                       plain)


def test_eos_token_id_outside_the_vocabulary_is_still_refused():
    model = tiny_model("BlueprintDecoderForCausalLM")
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(random_ids(1, 3), max_new_tokens=2, eos_token_id=TINY["vocab_size"])


# -- gradient checkpointing of the encoder-decoder ------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_seq2seq_checkpointing_gives_the_gradients_of_a_plain_backward(use_reentrant):
    model = seq2seq_model().train()
    source, mask = padded_source()
    labels = random_ids(2, 4, seed=8, low=3, high=40)
    model(input_ids=source, attention_mask=mask, labels=labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    model(input_ids=source, attention_mask=mask, labels=labels).loss.backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == set(expected)
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
