"""Model cards for Blueprint models: what the model is (every switch), how it was trained, how well it does, and
how to load it with and without hf_blueprint installed.

    card = build_model_card(model, task="text-generation", dataset="tinyshakespeare",
                            eval_metrics={"eval_loss": 1.47, "eval_perplexity": 4.35}, training_args=args)
    card.save("out/README.md")

Recipes call `use_blueprint_model_card(trainer)` once: from then on the Trainer's own `create_model_card` (which
`trainer.push_to_hub` calls too) writes this card, with the hyperparameters from the Trainer's arguments and the
evaluation results from its log history, as `model-index` metadata as well.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from transformers import PretrainedConfig

from .configuration_blueprint import BlueprintConfig


# Every evaluation metric the Trainer logs or a recipe reports reaches the card: a metric named `<split>_<name>`
# (split `eval` or `test`, as trainer.evaluate and trainer.log_metrics name them). This table only gives the known
# names their model-index type and a readable name; any other name goes on the card as it is.
METRICS = {
    "loss": ("loss", "loss"),
    "perplexity": ("perplexity", "perplexity"),
    "loss_perplexity": ("perplexity", "perplexity (exp of the mean batch loss)"),
    "token_nll": ("nll", "mean negative log-likelihood per token"),
    "accuracy": ("accuracy", "accuracy"),
    "macro_f1": ("f1", "macro-F1"),
    "f1": ("f1", "F1"),
    "bleu": ("bleu", "BLEU"),
    "bleu_tok_lc": ("bleu", "BLEU (tokenized, lowercased)"),
    "length_ratio": ("length_ratio", "length ratio"),
}
SPLITS = {"eval": ("validation", "Validation"), "test": ("test", "Test")}
# What the Trainer logs beside the metrics that describes the run, not the model.
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "jit_compilation_time", "model_preparation_time",
               "samples")
TASK_NAMES = {
    "text-generation": "Causal language modeling",
    "fill-mask": "Masked language modeling",
    "text-classification": "Text classification",
    "token-classification": "Token classification",
    "translation": "Translation",
}
HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
                   "num_train_epochs", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay",
                   "adam_beta1", "adam_beta2", "max_grad_norm", "label_smoothing_factor", "seed", "bf16", "fp16")
AUTO_CLASS_OF_TASK = {
    "text-generation": "AutoModelForCausalLM",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "translation": "AutoModelForSeq2SeqLM",
}


def architecture_rows(config: BlueprintConfig) -> list[tuple[str, str]]:
    """Every switch the Blueprint config adds to transformers' base config, in the order it documents them."""
    inherited = PretrainedConfig.__dataclass_fields__
    return [(f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(config) if f.name not in inherited]


def attention_pattern(config: BlueprintConfig) -> str:
    """One sentence on which keys each query sees and what that costs, for the card's reader."""
    if config.sliding_window is None:
        sees = "itself and every token before it" if config.is_causal else "every token of the input"
        return f"**Attention:** full: each token attends to {sees}; time grows with the square of the input length."
    window = config.sliding_window
    keys = (f"{window} keys (itself and the {window - 1} before it)" if config.is_causal
            else f"{2 * window - 1} keys (itself and {window - 1} on each side)")
    parts = [f"local: a window of {keys}" + (" per query" if config.attention_dilation == 1 else
                                              f" spaced {config.attention_dilation} apart (dilated window)")]
    if config.global_attention_tokens:
        parts.append(f"the first {config.global_attention_tokens} tokens are global (they see and are seen by all)")
    cross = " The decoder's cross-attention sees the whole source." if config.model_type == "blueprint_seq2seq" else ""
    return ("**Attention:** " + "; ".join(parts) + ". Long inputs run block by block, time and memory linear in the "
            "length (`attn_implementation=\"block_sparse\"`, or sdpa from 8 window spans and 1,024 tokens on)." + cross)


def _split_and_name(key: str) -> tuple[str, str] | None:
    """("eval", "macro_f1") for "eval_macro_f1"; None for what is not an evaluation metric."""
    split, _, name = key.partition("_")
    if split not in SPLITS or not name or name in NOT_METRICS or name.endswith(tuple(f"_{n}" for n in NOT_METRICS)):
        return None
    return split, name


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def evaluation_metrics(log_history: list[dict], reported: dict | None = None) -> dict:
    """The most recent value of each evaluation metric (`eval_*`, `test_*`) of the Trainer's log history, where
    trainer.evaluate logs them, then of `reported`, the metrics a recipe reported with trainer.log_metrics (see
    `use_blueprint_model_card`), which come last."""
    metrics = {}
    for entry in [*log_history, reported or {}]:
        metrics.update({key: value for key, value in entry.items() if _split_and_name(key) and _is_number(value)})
    return metrics


def _metric_names(key: str) -> tuple[str, str, str]:
    """(dataset split, model-index metric type, readable name) of a metric such as "eval_macro_f1"."""
    split, name = _split_and_name(key)
    metric_type, readable = METRICS.get(name, (name, name.replace("_", " ")))
    split_name, split_title = SPLITS[split]
    return split_name, metric_type, f"{split_title} {readable}"


def shareable_path(path) -> str:
    """How a card names a local file or folder without telling where it sat on this machine: an absolute path
    inside the working directory relative to it (recipes/data/tinyshakespeare/input.txt), any other absolute path
    by its name alone, a relative path as given (unless it climbs out with `..`: then by its name). A Hub id is
    left as it is."""
    text = str(path)
    if os.path.isabs(text):
        here = os.getcwd()
        inside = here != os.path.dirname(here) and os.path.commonpath([here, os.path.abspath(text)]) == here
        return os.path.relpath(text, here) if inside else os.path.basename(os.path.normpath(text))
    normalized = os.path.normpath(text)
    return os.path.basename(normalized) if normalized.split(os.sep)[0] == ".." else text


def _is_local(path) -> bool:
    return os.path.isabs(str(path)) or os.path.exists(str(path))


def _dataset_name(dataset: str | None) -> str | None:
    """A Hub dataset id as it is; a local data file by its folder (recipes/data/tinyshakespeare/input.txt ->
    tinyshakespeare), which names the data set better than the file does, or by its name where the card may not say
    where it sat (see `shareable_path`)."""
    if not dataset:
        return None
    dataset = shareable_path(dataset)
    if os.path.splitext(dataset)[1] and os.sep in dataset:
        return os.path.basename(os.path.dirname(os.path.normpath(dataset)))
    return dataset


def build_model_card(model, *, task: str, dataset: str | None = None, eval_metrics: dict | None = None,
                     training_args=None, model_name: str | None = None, finetuned_from: str | None = None,
                     license: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """The card of `model`. `eval_metrics` are named as the Trainer names them (`eval_accuracy`, `test_macro_f1`, as
    trainer.evaluate returns them); what is not an `eval_*`/`test_*` metric (epoch, runtime, throughput) stays off
    the card. `dataset` and `finetuned_from` may be Hub ids or local paths; a local path is named without saying
    where it sat (see `shareable_path`), and a local starting point is not a `base_model`."""
    config = model.config
    model_name = model_name or os.path.basename(os.path.normpath(getattr(training_args, "output_dir", "") or "")) \
        or type(model).__name__
    eval_metrics = {key: value for key, value in (eval_metrics or {}).items() if _split_and_name(key)}
    dataset_name = _dataset_name(dataset)
    results = []
    for split in SPLITS:  # validation first, then test; each its own model-index entry (dataset split)
        for key, value in eval_metrics.items():
            if key.startswith(f"{split}_") and math.isfinite(value):
                split_name, metric_type, metric_name = _metric_names(key)
                results.append(EvalResult(
                    task_type=task, task_name=TASK_NAMES.get(task, task), dataset_type=dataset_name or "custom",
                    dataset_name=dataset_name or "custom", dataset_split=split_name, metric_type=metric_type,
                    metric_name=metric_name, metric_value=round(float(value), 4)))
    local_start = finetuned_from is not None and _is_local(finetuned_from)
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=task if task != "translation" else None,
        license=license,
        tags=sorted({"hf_blueprint", config.model_type, "custom_code", *(tags or [])}),
        datasets=[dataset_name] if dataset_name else None,
        base_model=None if local_start else finetuned_from,  # a Hub id; a local folder is named in the text
        eval_results=results or None,
    )
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    auto_class = AUTO_CLASS_OF_TASK.get(task, "AutoModel")
    lines = [
        f"# {model_name}",
        "",
        f"A `{config.model_type}` model of hf_blueprint (\"The Transformer Blueprint\" as Hugging Face "
        f"models), trained for {TASK_NAMES.get(task, task).lower()}"
        + (f" on `{dataset_name}`." if dataset_name else "."),
        *([f"Fine-tuned from `{shareable_path(finetuned_from)}`."] if finetuned_from else []),
        "",
        f"**Parameters:** {total:,} ({total - embedding:,} without the token embedding).",
        "",
        "## Architecture",
        "",
        "| switch | value |",
        "| --- | --- |",
        *(f"| `{name}` | `{value}` |" for name, value in architecture_rows(config)),
        "",
        # A recipe run on unconverted weights has a native config, whose attention this project does not describe.
        *([attention_pattern(config), ""] if isinstance(config, BlueprintConfig) else []),
    ]
    if training_args is not None:
        lines += ["## Training", "", f"Data: `{shareable_path(dataset)}`." if dataset else "", "",
                  "| hyperparameter | value |",
                  "| --- | --- |"]
        lines += [f"| `{name}` | `{getattr(training_args, name)}` |" for name in HYPERPARAMETERS
                  if hasattr(training_args, name)]
        lines += [""]
    if eval_metrics:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {_metric_names(key)[2]} | {float(value):.4f} |" for key, value in eval_metrics.items()]
        lines += [""]
    lines += [
        "## Usage",
        "",
        "With hf_blueprint installed (its classes run):",
        "",
        "```python",
        "import hf_blueprint  # registers the Blueprint models with the Auto classes",
        f"from transformers import {auto_class}, AutoTokenizer",
        f'model = {auto_class}.from_pretrained("{model_name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_name}")',
        "```",
        "",
        "Without it (the code files in this repository run; pin a revision to fix what you execute):",
        "",
        "```python",
        f"from transformers import {auto_class}",
        f'model = {auto_class}.from_pretrained("{model_name}", trust_remote_code=True, revision="<commit sha>")',
        "```",
        "",
    ]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))


def use_blueprint_model_card(trainer, task: str | None = None) -> None:
    """Make `trainer.create_model_card` (also called by `trainer.push_to_hub`) write the Blueprint card into
    `output_dir/README.md`. It accepts the Trainer's own keyword arguments (`tasks`, `dataset`, `finetuned_from`,
    `model_name`, `license`, `tags`). The card's results are every evaluation metric of the log history and every
    one reported with `trainer.log_metrics` (which is how the recipes report their final and test metrics)."""
    reported = {}
    log_metrics = trainer.log_metrics

    def log_metrics_and_remember(split, metrics):
        reported.update(metrics)
        return log_metrics(split, metrics)

    trainer.log_metrics = log_metrics_and_remember

    def create_model_card(tasks=None, dataset=None, finetuned_from=None, model_name=None, license=None, tags=None,
                          **_ignored):
        if not trainer.is_world_process_zero():
            return
        chosen_task = task or (tasks[0] if isinstance(tasks, list) else tasks) or "text-generation"
        dataset_name = dataset[0] if isinstance(dataset, list) else dataset
        card = build_model_card(
            trainer.model, task=chosen_task, dataset=dataset_name,
            eval_metrics=evaluation_metrics(trainer.state.log_history, reported), training_args=trainer.args,
            model_name=model_name or trainer.args.hub_model_id,
            finetuned_from=finetuned_from, license=license, tags=[tags] if isinstance(tags, str) else tags,
        )
        card.save(os.path.join(trainer.args.output_dir, "README.md"))

    trainer.create_model_card = create_model_card
