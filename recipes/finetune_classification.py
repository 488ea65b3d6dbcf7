#!/usr/bin/env python
"""Sequence classification with a Blueprint model, in the manner of run_glue.py.

Either fine-tune a pretrained Blueprint checkpoint (an encoder from `pretrain_masked_lm.py` or a decoder from
`pretrain_causal_lm.py`: the pretrain -> fine-tune path of the blueprint), or train from scratch from a config. The
classes are the labels found in the training data; they become the model's `id2label`/`label2id`. A label in the
validation or test data that training never saw is an error. Reports accuracy and macro-F1.

From scratch on SST-2 (validation: whole training sentences held out; GLUE dev as the test set):

    python recipes/data/sst_sentences/make_sentence_validation.py --output_dir out/sst2-sentences
    python recipes/finetune_classification.py recipes/configs/sst2_scratch.yaml

Fine-tuning an MLM checkpoint:

    python recipes/finetune_classification.py --model_name_or_path out/sst2-mlm \\
        --train_file recipes/data/sst2/train.tsv --validation_file recipes/data/sst2/dev.tsv --output_dir out/sst2-ft

TREC (coarse labels), validation carved out of train, the official 500 questions as the test set:

    python recipes/finetune_classification.py recipes/configs/trec_scratch.yaml

A test file without the label column is predicted instead of scored (predictions in test_predictions.tsv).

Padding-free batches (`--padding_free`, on in sst2_scratch.yaml): the examples of a batch go end to end in one row
instead of being padded to the longest, for the same per-example logits and loss without computing on the padding
(SST-2 batches of 64 are about two-thirds padding; the speed-up depends on the shape, docs/BENCHMARKS.md):

    python recipes/finetune_classification.py recipes/configs/trec_scratch.yaml --padding_free
"""

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
)

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)
from hf_blueprint.data import (
    DataCollatorForPaddingFreeClassification,
    build_label_maps,
    load_raw_datasets,
    map_labels,
    pick_text_column,
    require_columns,
    require_text,
    tokenize_texts,
    truncate_splits,
)
from hf_blueprint.metrics import classification_metrics
from hf_blueprint.recipe_run import end_run, evaluate_validation, load_model, record_metrics, start_run
from hf_blueprint.recipe_args import (
    DataArguments,
    ModelArguments,
    RecipeTrainingArguments,
    build_config,
    format_summary,
    load_or_train_tokenizer,
    parse_args,
    predict_in_order,
    require_positive_length,
    sequence_length,
    training_callbacks,
)


logger = logging.getLogger(__name__)

DEFAULTS = {
    "model_type": "blueprint_encoder",
    "output_dir": "out/finetune_classification",
    "do_train": True,
    "do_eval": True,
}


@dataclass
class ClassificationArguments:
    """Which columns hold the text and the label, and how long inputs may be."""

    label_column_name: str = field(default="label", metadata={"help": "Column holding the class of each example."})
    text_pair_column_name: str | None = field(
        default=None, metadata={"help": "Second text column, for sentence-pair tasks (encoded as a pair)."}
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Inputs are truncated to this many tokens. Default: 128, or the model's "
                          "max_position_embeddings if smaller."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Padding-free batches: the examples of a batch are put end to end in one row (position_ids "
                          "restart at 0 for each, no attention across examples, each example pooled on its own) "
                          "instead of padded to the longest. Same per-example logits and loss as padded batches, and "
                          "no computation on padding outside attention; the speed-up depends on the shape "
                          "(docs/BENCHMARKS.md). Off by default, as in transformers and TRL: with dropout the random "
                          "draws differ from a padded run's, so results match statistically, not bit for bit."},
    )

    def __post_init__(self):
        require_positive_length(self.max_seq_length, "--max_seq_length")


# The recipe's flags: one dataclass per group, in the order main() unpacks them.
ARGUMENTS = (ModelArguments, DataArguments, ClassificationArguments, RecipeTrainingArguments)


def main(argv=None):
    model_args, data_args, cls_args, training_args = parse_args(ARGUMENTS, argv, DEFAULTS, description=__doc__)
    return run(model_args, data_args, cls_args, training_args)


def run(model_args: ModelArguments, data_args: DataArguments, cls_args: ClassificationArguments,
        training_args: RecipeTrainingArguments) -> dict:
    run = start_run(training_args)

    raw, sources = load_raw_datasets(
        data_args, contiguous_validation=False, seed=training_args.seed, cache_dir=model_args.cache_dir,
        token=model_args.token, trust_remote_code=model_args.trust_remote_code,
    )
    label_column = cls_args.label_column_name
    text_column = data_args.text_column_name or pick_text_column(
        raw["train"].column_names, exclude=[label_column, cls_args.text_pair_column_name or ""]
    )
    text_columns = [text_column] + ([cls_args.text_pair_column_name] if cls_args.text_pair_column_name else [])
    columns = {text_column: "--text_column_name", label_column: "--label_column_name"}
    if cls_args.text_pair_column_name:
        columns[cls_args.text_pair_column_name] = "--text_pair_column_name"
    # An unlabeled test split (e.g. GLUE's test.tsv) is predicted rather than scored.
    unlabeled_test = "test" in raw and label_column not in raw["test"].column_names
    labeled = raw if not unlabeled_test else {split: ds for split, ds in raw.items() if split != "test"}
    require_columns(labeled, sources, columns)
    if unlabeled_test:
        require_columns({"test": raw["test"]}, sources, {c: f for c, f in columns.items() if c != label_column})
    require_text(raw, sources, {c: f for c, f in columns.items() if c != label_column})
    id2label, label2id = build_label_maps(labeled, sources, label_column)
    raw = truncate_splits(raw, data_args.max_train_samples, data_args.max_eval_samples)

    family = _family(model_args)
    tokenizer = load_or_train_tokenizer(model_args, raw["train"], text_columns, family=family,
                                        lengths={"--max_seq_length": cls_args.max_seq_length},
                                        pair=cls_args.text_pair_column_name is not None)
    if tokenizer.pad_token is None:
        raise ValueError(f"Batching needs a pad token; the tokenizer {tokenizer.name_or_path!r} has none.")
    config = build_config(model_args, tokenizer, num_labels=len(id2label), id2label=id2label, label2id=label2id)
    max_seq_length = sequence_length(cls_args.max_seq_length, config, default=128, flag="--max_seq_length")
    tokenizer.model_max_length = max_seq_length
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id  # "last" pooling finds the last real token by it
    # From a checkpoint, the encoder/decoder body loads and the classification head starts fresh (logged).
    model = load_model(AutoModelForSequenceClassification, model_args, config, tokenizer, run)

    with training_args.main_process_first(desc="tokenizing"):
        encoded = tokenize_texts(map_labels(raw, label_column, label2id), tokenizer, text_columns, data_args.preprocessing_num_workers,
                                 keep_columns=["labels"], truncation=True, max_length=max_seq_length)

    has_eval = training_args.do_eval and "validation" in encoded
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded["validation"] if has_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorForPaddingFreeClassification() if cls_args.padding_free
        else DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics(),
        callbacks=training_callbacks(model_args),
    )

    def evaluate_and_test(trainer, results):
        evaluate_validation(trainer, results)
        if "test" not in encoded:
            return
        if unlabeled_test:
            results["test_predictions_file"] = _write_predictions(trainer, encoded["test"], id2label, training_args)
        else:
            record_metrics(trainer, "test", trainer.evaluate(encoded["test"], metric_key_prefix="test"), results)

    results = {"num_parameters": model.num_parameters(), "num_labels": len(id2label), "family": family,
               "train_examples": len(encoded["train"]), "output_dir": training_args.output_dir,
               "batches": "padding-free (examples packed into one row)" if cls_args.padding_free else "padded"}
    end_run(trainer, run, results, task="text-classification", model_args=model_args,
            data_source=data_args.dataset_name or sources.get("train"), evaluate=evaluate_and_test)
    if trainer.is_world_process_zero():
        print(format_summary("finetune_classification", _summary_rows(results, sources, id2label, model_args)))
    return results


def _family(model_args: ModelArguments) -> str:
    """'encoder' or 'decoder': of the checkpoint (or --config_name) if given, else of --model_type."""
    source = model_args.config_name or model_args.model_name_or_path
    if source is None:
        model_type = model_args.model_type
    else:
        model_type = AutoConfig.from_pretrained(source, cache_dir=model_args.cache_dir, token=model_args.token,
                                                trust_remote_code=model_args.trust_remote_code).model_type
    return "decoder" if model_type == "blueprint_decoder" else "encoder"


def _write_predictions(trainer: Trainer, dataset, id2label: dict, training_args: RecipeTrainingArguments) -> str:
    logits = predict_in_order(trainer, dataset).predictions  # rows in file order, even with group_by_length
    logits = logits[0] if isinstance(logits, tuple) else logits
    path = os.path.join(training_args.output_dir, "test_predictions.tsv")
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("index\tprediction\n")
            for index, label_id in enumerate(np.argmax(logits, axis=-1)):
                f.write(f"{index}\t{id2label[int(label_id)]}\n")
    return path


def _summary_rows(results: dict, sources: dict, id2label: dict, model_args: ModelArguments) -> list:
    start = model_args.model_name_or_path or "from scratch"
    rows = [
        ("training data", f"{sources.get('train')} ({results['train_examples']:,} examples)"),
        ("model", f"{results['family']}, {results['num_parameters']:,} parameters, {start}"),
        ("labels", ", ".join(id2label[i] for i in sorted(id2label))[:80]),
        ("batches", results["batches"]),
    ]
    if "train_runtime" in results:
        rows += [("train steps / runtime", f"{results['global_step']} / {results['train_runtime']:.1f} s"),
                 ("train loss", results["train_loss"])]
    for split in ("eval", "test"):
        if f"{split}_accuracy" in results:
            name = "validation" if split == "eval" else "test"
            rows += [(f"{name} data", sources.get("validation" if split == "eval" else "test")),
                     (f"{name} accuracy", results[f"{split}_accuracy"]),
                     (f"{name} macro-F1", results[f"{split}_macro_f1"])]
    if "test_predictions_file" in results:
        rows.append(("test predictions", results["test_predictions_file"]))
    rows += [("saved to", results["output_dir"]), ("wall time", f"{results['wall_seconds']:.1f} s")]
    return rows


if __name__ == "__main__":
    main()
