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
import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from transformers import PretrainedConfig

from .configuration_blueprint import BlueprintConfig


# Trainer metric name -> (model-index metric type, readable name)
METRICS = {
    "eval_loss": ("loss", "Validation loss"),
    "eval_perplexity": ("perplexity", "Validation perplexity"),
    "eval_accuracy": ("accuracy", "Validation accuracy"),
    "eval_f1": ("f1", "Validation macro-F1"),
    "eval_bleu": ("bleu", "BLEU"),
}
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


def evaluation_metrics(log_history: list[dict]) -> dict:
    """The most recent value of each evaluation metric the Trainer logged."""
    metrics = {}
    for entry in log_history:
        metrics.update({key: value for key, value in entry.items() if key in METRICS})
    return metrics


def _dataset_name(dataset: str | None) -> str | None:
    """A Hub dataset id as it is; a local data file by its folder (recipes/data/tinyshakespeare/input.txt ->
    tinyshakespeare), which names the data set better than the file does."""
    if not dataset:
        return None
    dataset = str(dataset)
    if os.path.splitext(dataset)[1] and os.sep in dataset:
        return os.path.basename(os.path.dirname(os.path.abspath(dataset)))
    return dataset


def build_model_card(model, *, task: str, dataset: str | None = None, eval_metrics: dict | None = None,
                     training_args=None, model_name: str | None = None, finetuned_from: str | None = None,
                     license: str | None = None, tags: list[str] | None = None) -> ModelCard:
    config = model.config
    model_name = model_name or os.path.basename(os.path.normpath(getattr(training_args, "output_dir", "") or "")) \
        or type(model).__name__
    eval_metrics = eval_metrics or {}
    dataset_name = _dataset_name(dataset)
    results = [
        EvalResult(task_type=task, task_name=TASK_NAMES.get(task, task), dataset_type=dataset_name or "custom",
                   dataset_name=dataset_name or "custom", metric_type=METRICS[key][0], metric_name=METRICS[key][1],
                   metric_value=round(float(value), 4))
        for key, value in eval_metrics.items() if key in METRICS
    ]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=task if task != "translation" else None,
        license=license,
        tags=sorted({"hf_blueprint", config.model_type, "custom_code", *(tags or [])}),
        datasets=[dataset_name] if dataset_name else None,
        base_model=finetuned_from,
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
        "",
        f"**Parameters:** {total:,} ({total - embedding:,} without the token embedding).",
        "",
        "## Architecture",
        "",
        "| switch | value |",
        "| --- | --- |",
        *(f"| `{name}` | `{value}` |" for name, value in architecture_rows(config)),
        "",
    ]
    if training_args is not None:
        lines += ["## Training", "", f"Data: `{dataset}`." if dataset else "", "", "| hyperparameter | value |",
                  "| --- | --- |"]
        lines += [f"| `{name}` | `{getattr(training_args, name)}` |" for name in HYPERPARAMETERS
                  if hasattr(training_args, name)]
        lines += [""]
    if eval_metrics:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {METRICS.get(key, (key, key))[1]} | {float(value):.4f} |" for key, value in eval_metrics.items()]
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
    `model_name`, `license`, `tags`)."""

    def create_model_card(tasks=None, dataset=None, finetuned_from=None, model_name=None, license=None, tags=None,
                          **_ignored):
        if not trainer.is_world_process_zero():
            return
        chosen_task = task or (tasks[0] if isinstance(tasks, list) else tasks) or "text-generation"
        dataset_name = dataset[0] if isinstance(dataset, list) else dataset
        card = build_model_card(
            trainer.model, task=chosen_task, dataset=dataset_name,
            eval_metrics=evaluation_metrics(trainer.state.log_history), training_args=trainer.args,
            model_name=model_name or trainer.args.hub_model_id,
            finetuned_from=finetuned_from, license=license, tags=[tags] if isinstance(tags, str) else tags,
        )
        card.save(os.path.join(trainer.args.output_dir, "README.md"))

    trainer.create_model_card = create_model_card
