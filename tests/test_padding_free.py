"""Padding-free batches: sequences packed into one row (position_ids restart per sequence, no attention across
sequence boundaries) give the same per-sequence outputs and the same loss as a padded batch."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

import hf_blueprint

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
