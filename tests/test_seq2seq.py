"""The encoder-decoder of the paper: the same properties as the other families, plus cross-attention caching,
beam search, and the transformers tooling for seq2seq (DataCollatorForSeq2Seq, Seq2SeqTrainer, pipelines)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    pipeline,
)
from datasets import Dataset

import hf_blueprint

POSITIONS = ["sinusoidal", "learned", "rope", "alibi", "none"]


def tiny_config(**overrides):
    fields = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                  max_position_embeddings=64)
    return hf_blueprint.BlueprintSeq2SeqConfig(**{**fields, **overrides})


def tiny_model(**overrides):
    torch.manual_seed(0)
    return hf_blueprint.BlueprintForConditionalGeneration(tiny_config(**overrides)).eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(3, 40, (2, 7), generator=generator)
    source_mask = torch.ones_like(source)
    source[1, 5:], source_mask[1, 5:] = 0, 0
    labels = torch.randint(3, 40, (2, 6), generator=generator)
    return source, source_mask, labels


VARIANTS = [
    dict(),
    dict(decoder_layers=3, norm_position="pre", norm_type="rmsnorm", ffn_type="glu", hidden_act="silu",
         tie_word_embeddings=False, num_key_value_heads=2),
]


def test_auto_classes_resolve_the_seq2seq_type():
    config = tiny_config()
    assert type(AutoModel.from_config(config)) is hf_blueprint.BlueprintSeq2SeqModel
    assert type(AutoModelForSeq2SeqLM.from_config(config)) is hf_blueprint.BlueprintForConditionalGeneration


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("position_embedding_type", POSITIONS)
def test_save_load_round_trip_is_bitwise(position_embedding_type, variant, batch, tmp_path):
    source, source_mask, labels = batch
    model = tiny_model(position_embedding_type=position_embedding_type, **VARIANTS[variant])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    kwargs = dict(input_ids=source, attention_mask=source_mask, labels=labels)
    torch.testing.assert_close(reloaded(**kwargs).logits, model(**kwargs).logits, atol=0, rtol=0)


def test_tied_embeddings_are_stored_once(tmp_path):
    from safetensors import safe_open

    tiny_model().save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert "model.encoder.embed_tokens.weight" in keys
    assert "model.decoder.embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    shared = reloaded.model.encoder.embed_tokens.weight
    assert reloaded.lm_head.weight.data_ptr() == shared.data_ptr()
    assert reloaded.model.decoder.embed_tokens.weight.data_ptr() == shared.data_ptr()


def test_labels_are_shifted_behind_the_start_token_and_scored(batch):
    source, source_mask, labels = batch
    model = tiny_model()
    labels = labels.clone()
    labels[0, -2:] = -100
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    assert decoder_input_ids[:, 0].tolist() == [1, 1]
    assert torch.equal(decoder_input_ids[1, 1:], labels[1, :-1])
    assert decoder_input_ids[0, -1].item() == 0  # an ignored label is read back as padding
    output = model(input_ids=source, attention_mask=source_mask, labels=labels)
    manual = torch.nn.functional.cross_entropy(output.logits.reshape(-1, 40), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, manual)


@pytest.mark.parametrize("variant", range(len(VARIANTS)))
@pytest.mark.parametrize("position_embedding_type", POSITIONS)
def test_incremental_decoding_with_self_and_cross_caches_equals_full_forward(position_embedding_type, variant,
                                                                            batch):
    source, source_mask, labels = batch
    model = tiny_model(position_embedding_type=position_embedding_type, **VARIANTS[variant])
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    full = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=decoder_input_ids).logits
    encoder_outputs = model.get_encoder()(input_ids=source, attention_mask=source_mask)
    cache, steps = None, []
    for t in range(decoder_input_ids.shape[1]):
        output = model(encoder_outputs=encoder_outputs, attention_mask=source_mask, cache=cache, use_cache=True,
                       decoder_input_ids=decoder_input_ids[:, t : t + 1])
        cache = output.cache
        steps.append(output.logits)
    assert all(cache.is_updated.values())  # cross-attention keys were projected once, then reused
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position_embedding_type", POSITIONS)
def test_generation_with_and_without_cache_is_identical(position_embedding_type, batch):
    source, source_mask, _ = batch
    model = tiny_model(position_embedding_type=position_embedding_type)
    for search in (dict(do_sample=False), dict(num_beams=3, length_penalty=0.6)):
        cached = model.generate(source, attention_mask=source_mask, max_new_tokens=8, **search)
        uncached = model.generate(source, attention_mask=source_mask, max_new_tokens=8, use_cache=False, **search)
        assert torch.equal(cached, uncached), search


def test_sampling_runs_and_is_reproducible(batch):
    source, source_mask, _ = batch
    model = tiny_model()
    torch.manual_seed(3)
    first = model.generate(source, attention_mask=source_mask, max_new_tokens=8, do_sample=True, top_k=10)
    torch.manual_seed(3)
    second = model.generate(source, attention_mask=source_mask, max_new_tokens=8, do_sample=True, top_k=10)
    assert torch.equal(first, second)


@pytest.mark.parametrize("position_embedding_type", POSITIONS)
def test_padding_on_either_side_does_not_change_real_positions(position_embedding_type, batch):
    source, source_mask, labels = batch
    model = tiny_model(position_embedding_type=position_embedding_type)
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    alone = model(input_ids=source[1:, :5], decoder_input_ids=decoder_input_ids[1:]).logits
    padded_source = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(padded_source[1:], alone, atol=1e-5, rtol=0)

    padded_target = torch.cat([decoder_input_ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    target_mask = torch.cat([torch.ones(2, 6), torch.zeros(2, 3)], dim=1).long()
    longer = model(input_ids=source, attention_mask=source_mask, decoder_input_ids=padded_target,
                   decoder_attention_mask=target_mask).logits
    torch.testing.assert_close(longer[:, :6], padded_source, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position_embedding_type", POSITIONS + ["sliding"])
def test_eager_and_sdpa_agree(position_embedding_type, batch):
    source, source_mask, labels = batch
    overrides = dict(sliding_window=2) if position_embedding_type == "sliding" else dict(
        position_embedding_type=position_embedding_type)
    model = tiny_model(**overrides)
    kwargs = dict(input_ids=source, attention_mask=source_mask, labels=labels)
    sdpa = model(**kwargs).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(model(**kwargs).logits, sdpa, atol=1e-5, rtol=0)


def test_cross_attention_weights_are_returned_and_respect_source_padding(batch):
    source, source_mask, labels = batch
    output = tiny_model()(input_ids=source, attention_mask=source_mask, labels=labels, output_attentions=True)
    assert len(output.cross_attentions) == 2 and len(output.encoder_attentions) == 2
    cross = output.cross_attentions[0]  # (batch, heads, target, source)
    torch.testing.assert_close(cross.sum(-1), torch.ones_like(cross.sum(-1)))
    assert cross[1, :, :, 5:].abs().max() == 0  # padded source tokens get no attention


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    source, source_mask, labels = batch
    model = tiny_model().train()
    model(input_ids=source, attention_mask=source_mask, labels=labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids=source, attention_mask=source_mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="decoder_layers"):
        tiny_config(decoder_layers=0)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        tiny_config(decoder_start_token_id=99)
    model = tiny_model(decoder_start_token_id=None, bos_token_id=None)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        model(input_ids=torch.tensor([[3, 4]]), labels=torch.tensor([[5, 6]]))


# -- transformers' seq2seq tooling -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def build_tokenizer():
    """A word-level tokenizer over a toy 'translation' vocabulary: target = source words reversed."""
    words = [f"w{i}" for i in range(30)]
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 2)])
    from tokenizers import decoders

    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", unk_token="[UNK]")


def reversal_pairs(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        length = int(torch.randint(2, 5, (1,), generator=generator))
        words = [f"w{int(i)}" for i in torch.randint(0, 30, (length,), generator=generator)]
        pairs.append({"source": " ".join(words), "target": " ".join(reversed(words))})
    return pairs


def test_seq2seq_trainer_with_collator_learns_and_pipelines_generate(tokenizer, tmp_path):
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         decoder_start_token_id=1, hidden_size=48, intermediate_size=96)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config)

    def tokenize(example):
        encoded = tokenizer(example["source"])
        encoded["labels"] = tokenizer(text_target=example["target"])["input_ids"]
        return encoded

    train = Dataset.from_list(reversal_pairs(256)).map(tokenize, remove_columns=["source", "target"])
    evaluation = Dataset.from_list(reversal_pairs(32, seed=1)).map(tokenize, remove_columns=["source", "target"])
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=60,
                                    learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                                    predict_with_generate=True, generation_max_length=8, logging_steps=10,
                                    per_device_eval_batch_size=16, label_smoothing_factor=0.1)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                             processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)

    # transformers 5 removed the "translation" and "text2text-generation" pipelines; generate + decode is the API.
    with pytest.raises(KeyError, match="removed"):
        pipeline("translation", model=model, tokenizer=tokenizer)
    model.eval()
    inputs = tokenizer(["w3 w7 w9"], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=6, num_beams=2)
    assert output[0, 0].item() == config.decoder_start_token_id
    assert isinstance(tokenizer.batch_decode(output, skip_special_tokens=True)[0], str)
