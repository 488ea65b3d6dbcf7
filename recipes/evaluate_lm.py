#!/usr/bin/env python
"""Evaluate a Blueprint causal LM with lm-evaluation-harness on the local tasks of recipes/data/lm_eval_tasks, and
(with --update_card) write the numbers into the model card's model-index.

    python recipes/evaluate_lm.py --model out/shakespeare-char --update_card
    python recipes/evaluate_lm.py --model out/shakespeare-char --tasks shakespeare_next_line --limit 20

The tasks read only this repository's files (lm-eval cannot download its own tasks' data here):

    tinyshakespeare_perplexity  perplexity on the tinyshakespeare validation text (the last 10%, which the causal-LM
                                recipe holds out): lm-eval's word_perplexity, byte_perplexity and bits_per_byte, plus
                                token_perplexity = exp(-sum of log-likelihoods / tokens scored), the recipe's
                                per-token perplexity (per character with a character tokenizer), here over whole
                                documents, each token scored after the ones before it in its document (the first after
                                the tokenizer's BOS/EOS token)
    shakespeare_next_line       which of four lines follows a verse line (acc, acc_norm; chance 25%)

The same run with lm-eval's own command line (the Blueprint classes then load as remote code):

    lm_eval --model hf --model_args pretrained=out/shakespeare-char,trust_remote_code=True \\
        --tasks tinyshakespeare_perplexity,shakespeare_next_line --include_path recipes/data/lm_eval_tasks --device cpu

Needs lm-eval (`pip install "hf_blueprint[use]"` or `pip install lm-eval`).
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes: no remote code runs)
from hf_blueprint.model_card import build_model_card


TASKS_DIR = Path(__file__).resolve().parent / "data" / "lm_eval_tasks"
DEFAULT_TASKS = ("tinyshakespeare_perplexity", "shakespeare_next_line")
# What each task measures on which data, for the card.
TASK_DATASETS = {
    "tinyshakespeare_perplexity": ("tinyshakespeare", "tinyshakespeare (validation: last 10% of the text)"),
    "shakespeare_next_line": ("shakespeare_next_line", "Shakespeare next line (4-way, tinyshakespeare validation)"),
}
# lm-eval metric -> (model-index metric type, readable name).
METRIC_NAMES = {
    "token_perplexity": ("perplexity", "perplexity per token"),
    "token_nll": ("nll", "mean negative log-likelihood per token"),
    "word_perplexity": ("perplexity", "perplexity per word"),
    "byte_perplexity": ("perplexity", "perplexity per byte"),
    "bits_per_byte": ("bits_per_byte", "bits per byte"),
    "acc": ("accuracy", "accuracy"),
    "acc_norm": ("accuracy", "accuracy (length-normalized)"),
}
CARD_SECTION_START, CARD_SECTION_END = "<!-- lm-eval results -->", "<!-- /lm-eval results -->"
INSTALL_HINT = 'pip install "hf_blueprint[use]" (or: pip install lm-eval)'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a Blueprint causal LM folder (or Hub repo id) with its tokenizer")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated tasks of {TASKS_DIR.name}/ (default: {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N documents of each task only")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_length", type=int, default=None,
                        help="window of the rolling log-likelihood (default: the model's max_position_embeddings)")
    parser.add_argument("--bootstrap_iters", type=int, default=1000, help="lm-eval's bootstrap for the stderr")
    parser.add_argument("--output_file", default=None, help="write the results as JSON here")
    parser.add_argument("--update_card", action="store_true",
                        help="write the results into MODEL/README.md (model-index and a results table)")
    args = parser.parse_args(argv)
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in args.tasks if not (TASKS_DIR / f"{task}.yaml").is_file()]
    if unknown or not args.tasks:
        parser.error(f"--tasks: {unknown or 'none given'}; the local tasks are "
                     f"{sorted(path.stem for path in TASKS_DIR.glob('*.yaml'))}.")
    for name in ("limit", "batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}.")
    if args.update_card and not Path(args.model).is_dir():
        parser.error(f"--update_card writes MODEL/README.md; --model {args.model} is not a local folder.")
    if not Path(args.model).exists() and Path(args.model).is_absolute():
        parser.error(f"--model {args.model} does not exist.")
    return args


def token_metrics(lm, task, samples: list[dict]) -> dict:
    """Per-token perplexity of a loglikelihood_rolling task from lm-eval's own per-document log-likelihoods: the
    tokens lm-eval scores in a document are those its model wrapper encodes it into (`tok_encode`)."""
    total_loglikelihood = sum(float(sample["filtered_resps"][0]) for sample in samples)
    tokens = sum(len(lm.tok_encode(task.doc_to_target(sample["doc"]))) for sample in samples)
    nll = -total_loglikelihood / tokens
    return {"token_nll": nll, "token_perplexity": math.exp(nll), "tokens": tokens, "documents": len(samples)}


def evaluate(model: str, tasks: list[str], limit=None, batch_size=8, device="cpu", max_length=None,
             bootstrap_iters=1000) -> dict:
    """lm-eval's results for each task ({metric: value}), with the per-token perplexity added to the perplexity
    tasks."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"lm-evaluation-harness is not installed ({error}); {INSTALL_HINT}") from None

    lm = HFLM(pretrained=model, backend="causal", batch_size=batch_size, device=device, dtype="float32",
              max_length=max_length)
    # Only this folder's tasks: indexing lm-eval's thousands of built-in task files takes seconds and adds nothing.
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit,
                                     bootstrap_iters=bootstrap_iters, log_samples=True, num_fewshot=0)
    task_objects = task_manager.load(tasks)["tasks"]
    results = {}
    for name in tasks:
        metrics = {key.split(",")[0]: value for key, value in output["results"][name].items()
                   if "," in key and "stderr" not in key and isinstance(value, (int, float))}
        stderr = {key.split(",")[0].replace("_stderr", ""): value for key, value in output["results"][name].items()
                  if "_stderr," in key and isinstance(value, (int, float))}
        if task_objects[name].OUTPUT_TYPE == "loglikelihood_rolling":
            metrics.update(token_metrics(lm, task_objects[name], output["samples"][name]))
        else:
            metrics["documents"] = len(output["samples"][name])
        results[name] = {"metrics": metrics, "stderr": stderr}
    return results


def format_results(results: dict) -> str:
    rows = []
    for task, result in results.items():
        for name, value in result["metrics"].items():
            error = result["stderr"].get(name)
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append(f"{task:<28} {name:<18} {shown}" + (f" ± {error:.4f}" if isinstance(error, float) else ""))
    return "\n".join(rows)


def update_model_card(folder: Path, results: dict, lm_eval_version: str):
    """Adds the results to MODEL/README.md: model-index entries (replacing this script's earlier ones for the same
    tasks) and a results table. A folder without a card gets one from hf_blueprint.model_card.build_model_card."""
    from huggingface_hub import EvalResult, ModelCard
    from transformers import AutoModelForCausalLM

    card_path = folder / "README.md"
    if card_path.is_file():
        card = ModelCard.load(card_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
        card = build_model_card(model, task="text-generation", model_name=folder.name)
    source = f"lm-evaluation-harness {lm_eval_version}"
    fresh = []
    for task, result in results.items():
        dataset_type, dataset_name = TASK_DATASETS.get(task, (task, task))
        for name, value in result["metrics"].items():
            if name not in METRIC_NAMES or not math.isfinite(value):
                continue
            metric_type, readable = METRIC_NAMES[name]
            fresh.append(EvalResult(
                task_type="text-generation", task_name=f"lm-eval {task}", dataset_type=dataset_type,
                dataset_name=dataset_name, dataset_split="validation", metric_type=metric_type,
                metric_name=f"{readable} (lm-eval {task})", metric_value=round(float(value), 4)))
    earlier = [entry for entry in (card.data.eval_results or [])
               if not any(entry.task_name == f"lm-eval {task}" for task in results)]
    card.data.eval_results = earlier + fresh
    if card.data.model_name is None:
        card.data.model_name = folder.name

    table = ["## Evaluation with lm-evaluation-harness", "", f"{source}, local tasks of hf_blueprint's "
             "`recipes/data/lm_eval_tasks` (`python recipes/evaluate_lm.py`).", "",
             "| task | metric | value | documents |", "| --- | --- | --- | --- |"]
    for task, result in results.items():
        for name, value in result["metrics"].items():
            if name in METRIC_NAMES:
                table.append(f"| {task} | {METRIC_NAMES[name][1]} | {value:.4f} | {result['metrics']['documents']} |")
    section = "\n".join([CARD_SECTION_START, *table, CARD_SECTION_END])
    text = card.text
    pattern = re.compile(re.escape(CARD_SECTION_START) + r".*?" + re.escape(CARD_SECTION_END), re.DOTALL)
    if pattern.search(text):
        card.text = pattern.sub(lambda _: section, text)
    else:
        card.text = text.rstrip() + "\n\n" + section + "\n"
    card.save(card_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = evaluate(args.model, args.tasks, limit=args.limit, batch_size=args.batch_size, device=args.device,
                           max_length=args.max_length, bootstrap_iters=args.bootstrap_iters)
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_results(results))
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.update_card:
        import lm_eval

        update_model_card(Path(args.model), results, getattr(lm_eval, "__version__", "unknown version"))
        print(f"wrote the results into {Path(args.model) / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
