"""F1 score (macro-averaged by default), as an `evaluate` metric module that loads from a local path.

Same inputs and output as the Hub's `f1` module, computed with numpy instead of scikit-learn, with scikit-learn's
conventions: the classes are those in references or predictions (unless `labels` is given), and a class with no
predicted or no true examples gets precision or recall 0.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
Macro averaging takes the unweighted mean of the per-class F1 scores, so every class counts the same however rare.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    average (`str` or `None`, defaults to `"macro"`):
        - `"macro"`: unweighted mean of the per-class F1 scores.
        - `"micro"`: F1 of the pooled counts over all classes (equals accuracy for single-label data).
        - `"weighted"`: mean of the per-class F1 scores weighted by each class's number of true examples.
        - `"binary"`: F1 of the class `pos_label` only.
        - `None`: the per-class scores, as a list in the order of `labels`.
    labels (`list` of `int`, *optional*): the classes to score; defaults to every class seen in either input.
    pos_label (`int`, defaults to 1): the positive class for `average="binary"`.

Returns:
    f1 (`float`, or `list` of `float` with `average=None`): in [0, 1].

Examples:
    >>> f1 = evaluate.load("hf_blueprint/evaluate_modules/f1")
    >>> f1.compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average="macro")
    {'f1': 0.26666666666666666}
"""

_CITATION = ""

_AVERAGES = ("macro", "micro", "weighted", "binary", None)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="macro", labels=None, pos_label=1):
        if average not in _AVERAGES:
            raise ValueError(f"f1: average={average!r} is not supported; choose one of {list(_AVERAGES)}.")
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.size == 0:
            raise ValueError("f1: got no predictions; there is nothing to score.")
        if average == "binary":
            labels = [pos_label]
        elif labels is None:
            labels = np.union1d(predictions, references)
        labels = np.asarray(labels)

        # One row per class: true positives, predicted count, true count.
        true_positives = np.array([np.sum((predictions == c) & (references == c)) for c in labels], dtype=np.float64)
        predicted = np.array([np.sum(predictions == c) for c in labels], dtype=np.float64)
        actual = np.array([np.sum(references == c) for c in labels], dtype=np.float64)

        if average == "micro":
            return {"f1": float(_f1(true_positives.sum(), predicted.sum(), actual.sum()))}
        per_class = _f1(true_positives, predicted, actual)
        if average is None:
            return {"f1": per_class.tolist()}
        if average == "weighted":
            return {"f1": float(np.average(per_class, weights=actual)) if actual.sum() > 0 else 0.0}
        return {"f1": float(per_class.mean())}  # macro, or binary (a single class)


def _f1(true_positives, predicted, actual):
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual); 0 where a class was neither predicted nor present.
    denominator = np.asarray(predicted + actual, dtype=np.float64)
    return np.divide(2 * true_positives, denominator, out=np.zeros_like(denominator), where=denominator > 0)
