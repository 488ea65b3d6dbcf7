"""The training loss without logits (hf_blueprint.losses): the same loss and gradients as cross-entropy over the
materialized logits, computed block by block without ever holding a (tokens, vocabulary) tensor."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_blueprint
from hf_blueprint import losses
from hf_blueprint.losses import linear_cross_entropy

from conftest import random_ids, tiny_model


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 tokens, so that every test crosses several block boundaries."""
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 7 * 100)


def reference_loss(hidden, weight, bias, labels, label_smoothing=0.0, num_items_in_batch=None):
    logits = (hidden @ weight.T + (bias if bias is not None else 0)).float()
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items_in_batch", [None, 50])
def test_blockwise_loss_and_gradients_equal_the_materialized_ones(small_blocks, label_smoothing, with_bias,
                                                                 num_items_in_batch):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(100, 16, generator=g, requires_grad=True)
    bias = torch.randn(100, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 100, (4, 11), generator=g)
    labels[:, ::3] = -100
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    blockwise = linear_cross_entropy(hidden, weight, bias, labels, label_smoothing=label_smoothing,
                                     num_items_in_batch=num_items_in_batch)
    reference = reference_loss(hidden, weight, bias, labels, label_smoothing, num_items_in_batch)
    torch.testing.assert_close(blockwise, reference, atol=0, rtol=1e-5)
    for got, expected in zip(torch.autograd.grad(blockwise, inputs), torch.autograd.grad(reference, inputs)):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5)


def test_blockwise_loss_of_nothing_scored_is_zero_and_connected():
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, None, torch.full((2, 3), -100))
    assert loss.item() == 0.0 and str(loss.item()) == "0.0"
    loss.backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(hidden.grad, torch.zeros_like(hidden))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return output


def test_training_step_never_holds_the_logits_of_all_tokens(monkeypatch):
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 32 * 1000)  # blocks of 32 tokens
    model = tiny_model("BlueprintDecoderForCausalLM", vocab_size=1000).train()
    ids = random_ids(8, 40)
    with LargestTensor() as blockwise:
        model(ids, labels=ids).loss.backward()
    with LargestTensor() as materialized:
        model(ids, labels=ids, return_logits=True).loss.backward()
    tokens_times_vocabulary = 8 * 40 * 1000
    assert materialized.largest >= tokens_times_vocabulary
    # The largest tensor is now a block's logits or the embedding matrix (32,000 elements), a tenth of the logits.
    assert blockwise.largest <= tokens_times_vocabulary / 10


# -- the heads ----------------------------------------------------------------------------------------------------


def _loss_and_gradients(model, **inputs):
    model.zero_grad()
    output = model(**inputs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_training_step(model, **inputs):
    blockwise, blockwise_grads = _loss_and_gradients(model, **inputs)
    materialized, materialized_grads = _loss_and_gradients(model, return_logits=True, **inputs)
    assert blockwise.logits is None and materialized.logits is not None
    torch.testing.assert_close(blockwise.loss, materialized.loss, atol=0, rtol=1e-5)
    assert blockwise_grads.keys() == materialized_grads.keys()
    for name, grad in blockwise_grads.items():
        torch.testing.assert_close(grad, materialized_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(23)])
def test_causal_lm_training_step_equals_the_materialized_one(small_blocks, num_items_in_batch):
    model = tiny_model("BlueprintDecoderForCausalLM", tie_word_embeddings=False).train()
    ids = random_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    _assert_same_training_step(model, input_ids=ids, attention_mask=mask, labels=labels,
                               num_items_in_batch=num_items_in_batch)


def test_causal_lm_with_shift_labels_equals_the_materialized_one(small_blocks):
    model = tiny_model("BlueprintDecoderForCausalLM").train()
    ids = random_ids(2, 8)
    shift_labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    _assert_same_training_step(model, input_ids=ids, labels=ids, shift_labels=shift_labels)


def test_padding_free_causal_lm_equals_the_materialized_one(small_blocks):
    model = tiny_model("BlueprintDecoderForCausalLM").train()
    ids = random_ids(1, 12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    labels = ids.clone()
    labels[0, [0, 5, 8]] = -100  # DataCollatorWithFlattening marks each sequence's first token
    _assert_same_training_step(model, input_ids=ids, position_ids=position_ids, labels=labels)


def test_masked_lm_training_step_equals_the_materialized_one(small_blocks):
    model = tiny_model("BlueprintEncoderForMaskedLM").train()
    ids = random_ids(3, 10)
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    _assert_same_training_step(model, input_ids=ids, labels=labels)


def test_seq2seq_training_step_equals_the_materialized_one(small_blocks):
    config = hf_blueprint.BlueprintSeq2SeqConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        hidden_dropout_prob=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = hf_blueprint.BlueprintForConditionalGeneration(config).train()
    labels = random_ids(2, 6, seed=3)
    labels[1, 4:] = -100
    _assert_same_training_step(model, input_ids=random_ids(2, 7, seed=2), labels=labels)


@pytest.mark.parametrize("cls_name", ["BlueprintDecoderForCausalLM", "BlueprintEncoderForMaskedLM"])
def test_logits_come_back_wherever_they_are_asked_for(cls_name):
    model = tiny_model(cls_name)
    ids = random_ids(2, 5)
    model.train()
    assert model(ids, labels=ids).logits is None  # a training step: the loss only
    assert model(ids).logits is not None  # no labels
    assert model(ids, labels=ids, return_logits=True).logits is not None
    model.eval()  # the Trainer's evaluation reads the logits
    assert model(ids, labels=ids).logits is not None
    assert model(ids, labels=ids, return_logits=False).logits is None
