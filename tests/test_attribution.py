"""recipes/attention_attribution.py (the interpretability experiment of docs/ABLATIONS.md): its statistics are what
their definitions say."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import attention_attribution  # noqa: E402
from attention_attribution import kendall_tau  # noqa: E402

TEXTS = ["the cat sat on the mat", "a big dog ran fast and the fox hid", "the old bird sang"]


def test_kendall_tau_of_known_rankings():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # one discordant pair of six


def test_gradient_scores_are_input_times_gradient_of_the_predicted_logit(encoder_tokenizer):
    model = tiny_model("BlueprintEncoderForSequenceClassification", num_labels=2, classifier_pooling="first",
                       attn_implementation="eager")
    positions, scores, predicted, probability = attention_attribution.scores(model, encoder_tokenizer, TEXTS[0])
    ids = encoder_tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    assert positions == list(range(1, ids.shape[1] - 1))  # the words, not [CLS] / [SEP]
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits
    assert predicted == int(logits.argmax()) and probability == pytest.approx(logits.softmax(-1).max().item())
    logits[0, predicted].backward()
    expected = (embeddings * embeddings.grad).sum(-1)[0].abs()[positions]
    torch.testing.assert_close(torch.tensor(scores["gradient"]), expected)
    assert set(scores) == {"attention", "rollout", "gradient"} and all(len(v) == len(positions) for v in scores.values())


def test_analysis_reports_every_statistic_within_its_range(encoder_tokenizer):
    model = tiny_model("BlueprintEncoderForSequenceClassification", num_labels=2, classifier_pooling="first",
                       attn_implementation="eager")
    result = attention_attribution.analyze(model, encoder_tokenizer, TEXTS)
    assert result["sentences"] == 3
    for key, value in result.items():
        if key.startswith("tau_"):
            assert -1.0 <= value <= 1.0, key
        elif key.startswith("flip_"):
            assert 0.0 <= value <= 1.0, key
        elif key.startswith("drop_"):
            assert -1.0 <= value <= 1.0, key
