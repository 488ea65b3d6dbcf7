"""Padding-free batches: sequences packed into one row (position_ids restart per sequence, no attention across
sequence boundaries) give the same per-sequence outputs and the same loss as a padded batch."""

import copy

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening

import hf_blueprint
from hf_blueprint.data import DataCollatorForPaddingFreeClassification, DataCollatorForPaddingFreeMaskedLM

POSITIONS = ["sinusoidal", "learned", "rope", "alibi", "none"]
LENGTHS = [5, 3, 7]


def tiny(config_class, position_embedding_type, **overrides):
    fields = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  hidden_dropout_prob=0.0, pad_token_id=0, max_position_embeddings=32,
                  position_embedding_type=position_embedding_type)
    return config_class(**{**fields, **overrides})


@pytest.fixture
def sequences():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, 53, (length,), generator=generator) for length in LENGTHS]


def padded_batch(sequences):
    width = max(LENGTHS)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def packed_batch(sequences):
    features = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in sequences]
    return DataCollatorWithFlattening(return_tensors="pt")(features)


def split_packed(tensor):
    return torch.split(tensor[0], LENGTHS)


@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("position_embedding_type", POSITIONS)
def test_packed_decoder_matches_padded_logits_and_loss(position_embedding_type, sliding_window, sequences):
    torch.manual_seed(0)
    config = tiny(hf_blueprint.BlueprintDecoderConfig, position_embedding_type, sliding_window=sliding_window)
    model = hf_blueprint.BlueprintDecoderForCausalLM(config).eval()
    input_ids, attention_mask = padded_batch(sequences)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    padded = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    batch = packed_batch(sequences)
    packed = model(**batch)

    assert packed.cache is None  # a packed row is not something to continue generating from
    for row, logits in enumerate(split_packed(packed.logits)):
        torch.testing.assert_close(logits, padded.logits[row, : LENGTHS[row]], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sliding_window", [None, 2])
@pytest.mark.parametrize("position_embedding_type", POSITIONS)
def test_packed_encoder_matches_padded_hidden_states(position_embedding_type, sliding_window, sequences):
    torch.manual_seed(0)
    config = tiny(hf_blueprint.BlueprintEncoderConfig, position_embedding_type, sliding_window=sliding_window)
    model = hf_blueprint.BlueprintEncoderForMaskedLM(config).eval()
    input_ids, attention_mask = padded_batch(sequences)
    padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
    batch = packed_batch(sequences)
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits

    for row, logits in enumerate(split_packed(packed)):
        torch.testing.assert_close(logits, padded[row, : LENGTHS[row]], atol=1e-5, rtol=0)


def test_packed_rows_do_not_attend_across_sequences(sequences):
    """The counterfactual: changing one packed sequence leaves the others' outputs untouched."""
    torch.manual_seed(0)
    model = hf_blueprint.BlueprintEncoderModel(tiny(hf_blueprint.BlueprintEncoderConfig, "rope")).eval()
    batch = packed_batch(sequences)
    changed = [sequences[0], (sequences[1] % 50) + 1, sequences[2]]
    changed_batch = packed_batch(changed)
    before = split_packed(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state)
    after = split_packed(
        model(input_ids=changed_batch["input_ids"], position_ids=changed_batch["position_ids"]).last_hidden_state
    )
    torch.testing.assert_close(before[0], after[0], atol=0, rtol=0)
    torch.testing.assert_close(before[2], after[2], atol=0, rtol=0)
    assert not torch.allclose(before[1], after[1])


# ---------------------------------------------------------------------------------------------------------------------
# Sequence classification over packed rows: one logits row per packed sequence, pooled within it
# ---------------------------------------------------------------------------------------------------------------------

POOLINGS = ["first", "mean", "last", "max"]
CLASSIFIERS = {"encoder": (hf_blueprint.BlueprintEncoderConfig, hf_blueprint.BlueprintEncoderForSequenceClassification),
               "decoder": (hf_blueprint.BlueprintDecoderConfig, hf_blueprint.BlueprintDecoderForSequenceClassification)}
SEQUENCE_LABELS = torch.tensor([1, 0, 2])


def classifier(family, position_embedding_type, classifier_pooling, **overrides):
    config_class, model_class = CLASSIFIERS[family]
    torch.manual_seed(0)
    config = tiny(config_class, position_embedding_type, classifier_pooling=classifier_pooling, num_labels=3,
                  initializer_range=0.1, **overrides)
    return model_class(config).eval()


def packed_classification_inputs(sequences):
    flat = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in sequences])
    return {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"]}


@pytest.mark.parametrize("classifier_pooling", POOLINGS)
@pytest.mark.parametrize("position_embedding_type", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_packed_classification_matches_padded_logits_and_loss(family, position_embedding_type, classifier_pooling,
                                                              sequences):
    model = classifier(family, position_embedding_type, classifier_pooling)
    input_ids, attention_mask = padded_batch(sequences)
    padded = model(input_ids=input_ids, attention_mask=attention_mask, labels=SEQUENCE_LABELS)
    packed = model(**packed_classification_inputs(sequences), labels=SEQUENCE_LABELS)

    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.loss, padded.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("classifier_pooling", POOLINGS)
def test_packed_classification_gives_the_padded_gradients(classifier_pooling, sequences):
    model = classifier("encoder", "rope", classifier_pooling)
    input_ids, attention_mask = padded_batch(sequences)
    model(input_ids=input_ids, attention_mask=attention_mask, labels=SEQUENCE_LABELS).loss.backward()
    padded = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(**packed_classification_inputs(sequences), labels=SEQUENCE_LABELS).loss.backward()
    packed = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    assert packed.keys() == padded.keys()
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-5, rtol=0, msg=name)


def test_packed_classification_with_berts_pooler_pools_each_sequence(sequences):
    model = classifier("encoder", "learned", "first", add_pooling_layer=True)
    input_ids, attention_mask = padded_batch(sequences)
    padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
    packed = model(**packed_classification_inputs(sequences)).logits

    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_packed_rows_number_their_sequences_across_rows_in_reading_order(sequences):
    """Two packed rows of 8 tokens: [s0 s1] and [s2 s3]; the logits come out as s0, s1, s2, s3."""
    model = classifier("encoder", "rope", "mean")
    extra = torch.tensor([9])
    everything = [*sequences, extra]
    rows = [packed_classification_inputs(everything[:2]), packed_classification_inputs(everything[2:])]
    packed = model(input_ids=torch.cat([row["input_ids"] for row in rows]),
                   position_ids=torch.cat([row["position_ids"] for row in rows])).logits
    width = max(len(ids) for ids in everything)
    input_ids = torch.zeros(len(everything), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(everything):
        input_ids[row, : len(ids)], attention_mask[row, : len(ids)] = ids, 1
    padded = model(input_ids=input_ids, attention_mask=attention_mask).logits

    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_packed_classification_rejects_a_label_count_that_is_not_the_sequence_count(sequences):
    model = classifier("encoder", "rope", "first")
    with pytest.raises(ValueError, match=r"`labels` has 2 rows for 3 sequences packed into 1 row\(s\)"):
        model(**packed_classification_inputs(sequences), labels=SEQUENCE_LABELS[:2])


# ---------------------------------------------------------------------------------------------------------------------
# The padding-free collators of hf_blueprint.data
# ---------------------------------------------------------------------------------------------------------------------

TEXTS = ["the cat sat on the mat", "a dog ran", "the big red fox jumped over the small cow and ate"]


def test_classification_collator_flattens_texts_and_keeps_one_label_per_example():
    features = [{"input_ids": [2, 11, 12, 3], "attention_mask": [1] * 4, "token_type_ids": [0] * 4, "labels": 1},
                {"input_ids": [2, 13, 3], "attention_mask": [1] * 3, "token_type_ids": [0, 0, 1], "labels": 0}]
    batch = DataCollatorForPaddingFreeClassification()(features)

    assert set(batch) == {"input_ids", "position_ids", "token_type_ids", "labels"}  # no attention mask: packed
    assert batch["input_ids"].tolist() == [[2, 11, 12, 3, 2, 13, 3]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


def test_classification_collator_refuses_an_empty_example_instead_of_shifting_the_labels():
    features = [{"input_ids": [5, 6], "labels": 1}, {"input_ids": [], "labels": 0}, {"input_ids": [7], "labels": 1}]
    with pytest.raises(ValueError, match=r"Examples \[1\] of this batch have no tokens"):
        DataCollatorForPaddingFreeClassification()(features)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_masked_lm_collator_masks_what_the_padded_collator_masks(encoder_tokenizer, padding_side):
    tokenizer = copy.deepcopy(encoder_tokenizer)
    tokenizer.padding_side = padding_side
    features = [tokenizer(text, return_special_tokens_mask=True) for text in TEXTS]
    torch.manual_seed(0)
    padded = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5)(copy.deepcopy(features))
    torch.manual_seed(0)
    packed = DataCollatorForPaddingFreeMaskedLM(tokenizer, mlm_probability=0.5)(copy.deepcopy(features))

    is_real = padded["attention_mask"].bool()
    assert packed["input_ids"].tolist() == [padded["input_ids"][is_real].tolist()]
    assert packed["labels"].tolist() == [padded["labels"][is_real].tolist()]
    lengths = [len(feature["input_ids"]) for feature in features]
    assert packed["position_ids"].tolist() == [[i for length in lengths for i in range(length)]]
    assert "attention_mask" not in packed


def test_masked_lm_collator_gives_the_padded_loss(encoder_tokenizer):
    torch.manual_seed(0)
    config = tiny(hf_blueprint.BlueprintEncoderConfig, "rope", vocab_size=len(encoder_tokenizer))
    model = hf_blueprint.BlueprintEncoderForMaskedLM(config).eval()
    features = [encoder_tokenizer(text, return_special_tokens_mask=True) for text in TEXTS]
    torch.manual_seed(1)
    padded_inputs = DataCollatorForLanguageModeling(encoder_tokenizer, mlm_probability=0.5)(copy.deepcopy(features))
    torch.manual_seed(1)
    packed_inputs = DataCollatorForPaddingFreeMaskedLM(encoder_tokenizer, mlm_probability=0.5)(copy.deepcopy(features))

    assert int((packed_inputs["labels"] != -100).sum()) >= 5  # enough masked tokens for the loss to mean something
    torch.testing.assert_close(model(**packed_inputs).loss, model(**padded_inputs).loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_packed_attention_runs_per_sequence_not_over_the_whole_row(family, sequences, monkeypatch):
    """A packed row of 15 tokens attends as 3 sequences of at most 7 keys (what a padded batch costs), not as one
    15 x 15 block-diagonal matrix."""
    from transformers.integrations import sdpa_attention

    key_shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(sdpa_attention.torch.nn.functional, "scaled_dot_product_attention",
                        lambda query, key, value, **kwargs: key_shapes.append(tuple(key.shape[::2])) or
                        sdpa(query, key, value, **kwargs))
    config_class, model_class = CLASSIFIERS[family]
    model = model_class(tiny(config_class, "rope")).eval()
    model(**packed_classification_inputs(sequences))

    assert key_shapes == [(len(LENGTHS), max(LENGTHS))] * 2  # (sequences, longest) in each of the 2 layers
