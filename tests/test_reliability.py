"""Reliability: inputs that used to end in NaN or an error from deep inside torch get defined results or clear
errors before any arithmetic."""

import pytest
import torch

import hf_blueprint

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            hidden_dropout_prob=0.0, pad_token_id=0)
TOKEN_HEADS = {
    "causal-lm": (hf_blueprint.BlueprintDecoderConfig, hf_blueprint.BlueprintDecoderForCausalLM),
    "masked-lm": (hf_blueprint.BlueprintEncoderConfig, hf_blueprint.BlueprintEncoderForMaskedLM),
    "token-classification": (hf_blueprint.BlueprintEncoderConfig, hf_blueprint.BlueprintEncoderForTokenClassification),
}


def build(head):
    config_class, model_class = TOKEN_HEADS[head]
    torch.manual_seed(0)
    return model_class(config_class(**TINY))


@pytest.mark.parametrize("head", sorted(TOKEN_HEADS))
def test_a_batch_with_no_scored_labels_has_loss_zero_and_a_gradient(head):
    """Defined, documented behaviour: nothing to predict gives loss 0 (not the NaN of an empty mean)."""
    model = build(head)
    input_ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids, labels=torch.full_like(input_ids, -100)).loss
    assert loss.item() == 0.0 and not torch.signbit(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_causal_lm_labels_scored_only_at_the_first_position_count_as_none():
    """Next-token prediction never scores the first label: a batch labelled only there has nothing to predict."""
    model = build("causal-lm")
    input_ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, -100)
    labels[:, 0] = input_ids[:, 0]
    assert model(input_ids, labels=labels).loss.item() == 0.0
    labels[:, 1] = input_ids[:, 1]
    assert model(input_ids, labels=labels).loss.item() > 0.0


@pytest.mark.parametrize("head", sorted(TOKEN_HEADS))
def test_labels_of_the_wrong_shape_are_named(head):
    model = build(head)
    input_ids = torch.randint(1, 50, (2, 6))
    with pytest.raises(ValueError, match=r"`labels` has shape \(2, 3\), expected \(2, 6\)"):
        model(input_ids, labels=input_ids[:, :3])


def test_sequence_classification_labels_must_have_one_row_per_sequence():
    torch.manual_seed(0)
    model = hf_blueprint.BlueprintEncoderForSequenceClassification(hf_blueprint.BlueprintEncoderConfig(**TINY))
    with pytest.raises(ValueError, match="one label per sequence"):
        model(torch.randint(1, 50, (2, 6)), labels=torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("shape", [(2, 0), (0, 4)])
def test_empty_inputs_are_rejected_before_any_arithmetic(shape):
    model = build("causal-lm")
    with pytest.raises(ValueError, match="at least one sequence of at least one token"):
        model(torch.zeros(shape, dtype=torch.long))
