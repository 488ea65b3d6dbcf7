"""Perplexity from the model's log-probabilities of the reference tokens, as an `evaluate` metric module.

The Hub's `perplexity` module downloads a model by name and scores texts with it. This one scores predictions the
training loop already made: it takes, for each target token, the log-probability the model gave it, and returns
exp(mean negative log-likelihood), the perplexity per token.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Perplexity is the exponential of the mean negative log-likelihood per token:
PPL = exp(-(1/N) * sum_i log p(x_i | context_i)). Lower is better; a uniform guess over V tokens scores V.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): natural-log probabilities (<= 0) that the model assigned to each reference
        token, one value per scored token (padding and unscored positions left out).

Returns:
    perplexity (`float`): exp of the mean negative log-likelihood.
    mean_nll (`float`): the mean negative log-likelihood in nats per token (the cross-entropy loss).
    num_tokens (`int`): how many tokens were scored.

Examples:
    >>> perplexity = evaluate.load("hf_blueprint/evaluate_modules/perplexity")
    >>> perplexity.compute(predictions=[math.log(0.5), math.log(0.25)])
    {'perplexity': 2.8284271247461903, 'mean_nll': 1.0397207708399179, 'num_tokens': 2}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions):
        log_probs = np.asarray(predictions, dtype=np.float64)
        if log_probs.size == 0:
            raise ValueError("perplexity: got no token log-probabilities; there is nothing to score.")
        if np.isnan(log_probs).any():
            raise ValueError("perplexity: the log-probabilities contain NaN.")
        if (log_probs > 1e-6).any():
            raise ValueError(
                f"perplexity: expected log-probabilities (<= 0), got a maximum of {log_probs.max():.4g}. "
                "Pass log p(token), not the negative log-likelihood or a probability."
            )
        mean_nll = float(-log_probs.mean())
        return {"perplexity": float(np.exp(mean_nll)), "mean_nll": mean_nll, "num_tokens": int(log_probs.size)}
