"""Corpus BLEU computed by sacreBLEU, as an `evaluate` metric module that loads from a local path (no Hub access).

Same inputs and outputs as the Hub's `sacrebleu` module, plus `signature`: sacreBLEU's string that records every
setting the score depends on (references, casing, tokenizer, smoothing, version), to be reported with the number.
"""

import datasets
import evaluate
from sacrebleu.metrics import BLEU


_DESCRIPTION = """
BLEU (Papineni et al., 2002) is the geometric mean of the modified 1- to 4-gram precisions of the predictions against
the references, times a brevity penalty, over the whole corpus (not an average of sentence scores). sacreBLEU
(Post, 2018) tokenizes the detokenized text itself (13a, the WMT standard, by default), so that scores of different
systems are comparable; the signature says how a score was computed.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the system's translations, detokenized.
    references (`list` of `list` of `str`, or `list` of `str`): for each prediction, its reference translation(s);
        every prediction must have the same number of references.
    smooth_method (`str`, defaults to `"exp"`): `"none"`, `"floor"`, `"add-k"` or `"exp"`.
    smooth_value (`float`, *optional*): the value of the floor / add-k smoothing.
    force (`bool`, defaults to `False`): score text that looks tokenized already without a warning.
    lowercase (`bool`, defaults to `False`): case-insensitive BLEU.
    tokenize (`str`, *optional*): sacreBLEU's tokenizer (`"13a"` by default; `"none"` for text tokenized already,
        `"intl"`, `"char"`, ...).
    use_effective_order (`bool`, defaults to `False`): leave out n-gram orders with no matches (for sentence BLEU).

Returns:
    score (`float`): BLEU, from 0 to 100.
    counts (`list` of `int`): matching 1- to 4-grams.
    totals (`list` of `int`): 1- to 4-grams in the predictions.
    precisions (`list` of `float`): the modified n-gram precisions, in percent.
    bp (`float`): the brevity penalty.
    sys_len (`int`), ref_len (`int`): tokens in the predictions and in the (closest) references.
    signature (`str`): sacreBLEU's signature of the settings, e.g.
        `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`.

Examples:
    >>> bleu = evaluate.load("hf_blueprint/evaluate_modules/sacrebleu")
    >>> result = bleu.compute(predictions=["Ein Mann fährt Fahrrad ."], references=[["Ein Mann fährt Fahrrad ."]])
    >>> result["score"]
    100.00000000000004
"""

_CITATION = """
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Sequence(datasets.Value("string", id="sequence"),
                                                                   id="references")}),
                datasets.Features({"predictions": datasets.Value("string", id="sequence"),
                                   "references": datasets.Value("string", id="sequence")}),
            ],
            reference_urls=["https://github.com/mjpost/sacreBLEU"],
        )

    def _compute(self, predictions, references, smooth_method="exp", smooth_value=None, force=False, lowercase=False,
                 tokenize=None, use_effective_order=False):
        if not predictions:
            raise ValueError("sacrebleu: got no predictions; there is nothing to score.")
        references = [[reference] if isinstance(reference, str) else list(reference) for reference in references]
        counts = {len(reference) for reference in references}
        if len(counts) != 1:
            raise ValueError(f"sacrebleu: every prediction needs the same number of references, got {sorted(counts)}.")
        # sacreBLEU takes the references as streams: the i-th reference of every prediction, then the next.
        streams = [[reference[i] for reference in references] for i in range(counts.pop())]
        bleu = BLEU(lowercase=lowercase, force=force, tokenize=tokenize, smooth_method=smooth_method,
                    smooth_value=smooth_value, effective_order=use_effective_order)
        output = bleu.corpus_score(predictions, streams)
        return {
            "score": output.score,
            "counts": output.counts,
            "totals": output.totals,
            "precisions": output.precisions,
            "bp": output.bp,
            "sys_len": output.sys_len,
            "ref_len": output.ref_len,
            "signature": str(bleu.get_signature()),
        }

