"""Metrics for the recipes, through `evaluate`, from the metric modules shipped in `hf_blueprint/evaluate_modules/`.

`evaluate.load("accuracy")` fetches the module from the Hub; `evaluate.load(<local folder>)` does not. The package
therefore ships its own modules in evaluate's format (accuracy, macro-F1, perplexity, computed with numpy; BLEU,
computed by sacreBLEU) and `load_metric` loads them by path, so the recipes work offline.

The `Trainer` hooks below score real predictions: classification takes the argmax of the logits; language models
keep, for each scored token, the log-probability of the true token and the argmax (computed per batch in
`preprocess_logits_for_metrics`, so the full logits are never accumulated); translation decodes the generated ids
(`predict_with_generate`) and scores the text.
"""

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import EvalPrediction


METRICS_DIR = Path(__file__).resolve().parent / "evaluate_modules"
METRIC_NAMES = ("accuracy", "f1", "perplexity", "sacrebleu")
IGNORE_INDEX = -100


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Loads one of the shipped metric modules (`accuracy`, `f1`, `perplexity`, `sacrebleu`) without touching the
    Hub."""
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


def moses_lowercase_tokenize(texts: Sequence[str], lang: str) -> list[str]:
    """Lowercases, normalizes punctuation and tokenizes like Moses' `lowercase.perl | normalize-punctuation.perl -l LANG
    | tokenizer.perl -l LANG`: the preprocessing of Multi30k's official `*.lc.norm.tok.*` files, on which most Multi30k
    papers (and fairseq's BLEU on them) report "tokenized, lowercased" BLEU. The Moses scripts are run through their
    Python port, sacremoses; applied to the raw test2016 German references it gives the official `lc.norm.tok` file
    line for line (tests/test_recipes.py checks it)."""
    normalizer, tokenizer = _moses(lang)
    return [tokenizer.tokenize(normalizer.normalize(text.lower()), return_str=True, escape=True) for text in texts]


@lru_cache(maxsize=8)
def _moses(lang: str):
    from sacremoses import MosesPunctNormalizer, MosesTokenizer  # only translation needs it

    return MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)


class TranslationMetrics:
    """`compute_metrics` for translation with `predict_with_generate`: decodes the generated ids and the labels, and
    scores the text with two BLEUs.

    - `bleu`: sacreBLEU on the detokenized, cased text (its default 13a tokenization), the comparable number for
      systems that output real text. Its settings are in `signatures["bleu"]`.
    - `bleu_tok_lc`: BLEU on lowercased, Moses-normalized and Moses-tokenized text (`moses_lowercase_tokenize` on both
      sides, then no further tokenization), the number most Multi30k papers report. Its signature says `tok:none`
      and `case:lc`, because both happened before.

    `length_ratio` is the length of the predictions over that of the references (13a tokens); below 1 the brevity
    penalty lowers BLEU. `score(predictions, references)` scores texts directly (e.g. against raw reference files).
    """

    def __init__(self, tokenizer, target_lang: str):
        self.tokenizer = tokenizer
        self.target_lang = target_lang
        self.bleu = load_metric("sacrebleu")
        self.signatures: dict[str, str] = {}

    def __call__(self, eval_prediction: EvalPrediction) -> dict:
        predictions = eval_prediction.predictions
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        return self.score(self.decode(predictions), self.decode(eval_prediction.label_ids))

    def decode(self, ids) -> list[str]:
        """Token ids (padded with -100 between batches, as the Trainer gathers them) to text."""
        ids = np.where(np.asarray(ids) < 0, self.tokenizer.pad_token_id, ids)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references.")
        detokenized = self.bleu.compute(predictions=list(predictions), references=[[r] for r in references])
        tokenized = self.bleu.compute(
            predictions=moses_lowercase_tokenize(predictions, self.target_lang),
            references=[[r] for r in moses_lowercase_tokenize(references, self.target_lang)],
            tokenize="none", force=True, lowercase=True,  # lowercased already; the signature says so
        )
        self.signatures = {"bleu": detokenized["signature"], "bleu_tok_lc": tokenized["signature"]}
        return {
            "bleu": detokenized["score"],
            "bleu_tok_lc": tokenized["score"],
            "length_ratio": detokenized["sys_len"] / max(detokenized["ref_len"], 1),
        }
