"""Metrics for the recipes, through `evaluate`, from the metric modules shipped in `hf_blueprint/metrics/`.

`evaluate.load("accuracy")` fetches the module from the Hub; `evaluate.load(<local folder>)` does not. The package
therefore ships its own modules in evaluate's format (accuracy, macro-F1, perplexity, computed with numpy) and
`load_metric` loads them by path, so the recipes work offline.

The `Trainer` hooks below score real predictions: classification takes the argmax of the logits; language models
keep, for each scored token, the log-probability of the true token and the argmax (computed per batch in
`preprocess_logits_for_metrics`, so the full logits are never accumulated).
"""

from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import EvalPrediction


METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRIC_NAMES = ("accuracy", "f1", "perplexity")
IGNORE_INDEX = -100


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Loads one of the shipped metric modules (`accuracy`, `f1`, `perplexity`) without touching the Hub."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; the shipped metrics are {list(METRIC_NAMES)}.")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)


def classification_metrics():
    """`compute_metrics` for sequence classification: accuracy and macro-F1 of the argmax predictions."""
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(eval_prediction: EvalPrediction) -> dict:
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.argmax(logits, axis=-1)
        references = eval_prediction.label_ids
        return {
            "accuracy": accuracy.compute(predictions=predictions, references=references)["accuracy"],
            "macro_f1": f1.compute(predictions=predictions, references=references, average="macro")["f1"],
        }

    return compute_metrics


def language_model_metrics(causal: bool):
    """(`preprocess_logits_for_metrics`, `compute_metrics`) for language models: perplexity and token accuracy.

    `causal=True` scores next-token predictions (logits at t against the token at t+1, as the model's loss does);
    `causal=False` scores the masked positions of MLM (labels other than -100).
    """
    perplexity, accuracy = load_metric("perplexity"), load_metric("accuracy")

    def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor):
        logits = logits[0] if isinstance(logits, tuple) else logits
        if causal:
            logits, labels = logits[:, :-1], labels[:, 1:]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        true_log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return true_log_probs, logits.argmax(dim=-1)

    def compute_metrics(eval_prediction: EvalPrediction) -> dict:
        true_log_probs, predictions = eval_prediction.predictions
        labels = eval_prediction.label_ids
        if causal:
            labels = labels[:, 1:]
        scored = labels != IGNORE_INDEX
        ppl = perplexity.compute(predictions=true_log_probs[scored])
        return {
            "perplexity": ppl["perplexity"],
            "token_nll": ppl["mean_nll"],
            "accuracy": accuracy.compute(predictions=predictions[scored], references=labels[scored])["accuracy"],
        }

    return preprocess_logits_for_metrics, compute_metrics
