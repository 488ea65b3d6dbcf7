#!/usr/bin/env python
"""Pretrain a Blueprint encoder by masked language modeling, in the manner of run_mlm.py.

BERT's recipe: 15% of the tokens are chosen for prediction; of those, 80% become [MASK], 10% a random token and 10%
stay unchanged (`--mlm_probability`, `--mask_replace_prob`, `--random_replace_prob`). [CLS], [SEP] and padding are
never chosen. Texts are either packed into blocks of --max_seq_length tokens (default) or kept one per example
(`--line_by_line`, for sentence data such as SST-2). Reports the masked-token loss, perplexity and accuracy on the
validation split and saves model + tokenizer, ready for `AutoModelForMaskedLM` or, as a starting point, for
`recipes/finetune_classification.py --model_name_or_path`.

    python recipes/pretrain_masked_lm.py --train_file recipes/data/sst2/train.tsv --text_column_name sentence \\
        --line_by_line --max_seq_length 66 --tokenizer_vocab_size 8000 \\
        --config_overrides "hidden_size=128,num_hidden_layers=2,num_attention_heads=2,intermediate_size=512" \\
        --num_train_epochs 3 --output_dir out/sst2-mlm

With --line_by_line, `--padding_free` puts the examples of a batch end to end in one row instead of padding them to the
longest (same masking, same per-token loss, no computation on the padding):

    python recipes/pretrain_masked_lm.py recipes/configs/sst2_mlm.yaml --padding_free
"""

import logging
import math
from dataclasses import dataclass, field

from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    Trainer,
)

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)
from hf_blueprint.data import (
    DataCollatorForPaddingFreeMaskedLM,
    load_raw_datasets,
    pack_into_blocks,
    pick_text_column,
    require_columns,
    require_text,
    tokenize_texts,
    truncate_splits,
)
from hf_blueprint.metrics import language_model_metrics
from hf_blueprint.recipe_run import end_run, load_model, start_run
from hf_blueprint.recipe_args import (
    DataArguments,
    ModelArguments,
    RecipeTrainingArguments,
    build_config,
    format_summary,
    load_or_train_tokenizer,
    parse_args,
    require_positive_length,
    sequence_length,
    training_callbacks,
)


logger = logging.getLogger(__name__)

DEFAULTS = {
    "model_type": "blueprint_encoder",
    "output_dir": "out/pretrain_masked_lm",
    "do_train": True,
    "do_eval": True,
}


@dataclass
class MaskedLMArguments:
    """Sequence length and the masking scheme."""

    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per example (packed block, or the truncation length with --line_by_line). "
                          "Default: the model's max_position_embeddings, at most 512."},
    )
    line_by_line: bool = field(
        default=False, metadata={"help": "One example per text (padded per batch) instead of packed blocks."}
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "With --line_by_line: padding-free batches, the examples of a batch put end to end in one "
                          "row (position_ids restart at 0 for each, no attention across examples) instead of padded "
                          "to the longest. The same tokens are masked as in a padded run of the same seed, and the "
                          "loss per masked token is the same, with no computation on padding outside attention; the "
                          "speed-up depends on the shape (docs/BENCHMARKS.md). Off by default, as in transformers and "
                          "TRL: with dropout the random draws differ from a padded run's, so results match "
                          "statistically, not bit for bit."},
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens chosen for prediction."})
    mask_replace_prob: float = field(default=0.8, metadata={"help": "Of the chosen tokens: share replaced by [MASK]."})
    random_replace_prob: float = field(
        default=0.1, metadata={"help": "Of the chosen tokens: share replaced by a random token (the rest stay)."}
    )

    def __post_init__(self):
        if self.padding_free and not self.line_by_line:
            raise ValueError("--padding_free needs --line_by_line: packed blocks all have --max_seq_length tokens, so "
                             "there is no padding to remove (and one long row would only make attention dearer).")
        require_positive_length(self.max_seq_length, "--max_seq_length")
        # 0 masks nothing (loss 0.0, no training signal); 1 masks every token, leaving nothing to predict from.
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"--mlm_probability must be in (0, 1), got {self.mlm_probability}.")
        for name in ("mask_replace_prob", "random_replace_prob"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"--{name} must be in [0, 1], got {value}.")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ValueError(f"--mask_replace_prob {self.mask_replace_prob} and --random_replace_prob "
                             f"{self.random_replace_prob} add up to more than 1: they are shares of the chosen tokens.")


# The recipe's flags: one dataclass per group, in the order main() unpacks them.
ARGUMENTS = (ModelArguments, DataArguments, MaskedLMArguments, RecipeTrainingArguments)


def main(argv=None):
    model_args, data_args, mlm_args, training_args = parse_args(ARGUMENTS, argv, DEFAULTS, description=__doc__)
    return run(model_args, data_args, mlm_args, training_args)


def run(model_args: ModelArguments, data_args: DataArguments, mlm_args: MaskedLMArguments,
        training_args: RecipeTrainingArguments) -> dict:
    run = start_run(training_args)

    raw, sources = load_raw_datasets(
        data_args, contiguous_validation=not mlm_args.line_by_line, seed=training_args.seed,
        cache_dir=model_args.cache_dir, token=model_args.token, trust_remote_code=model_args.trust_remote_code,
    )
    text_column = data_args.text_column_name or pick_text_column(raw["train"].column_names, exclude=["label"])
    require_columns(raw, sources, {text_column: "--text_column_name"})
    require_text(raw, sources, {text_column: "--text_column_name"})
    raw = truncate_splits(raw, data_args.max_train_samples, data_args.max_eval_samples)

    tokenizer = load_or_train_tokenizer(model_args, raw["train"], [text_column], family="encoder",
                                        lengths={"--max_seq_length": mlm_args.max_seq_length})
    if tokenizer.mask_token is None or tokenizer.pad_token is None:
        raise ValueError(f"Masked LM needs a tokenizer with a mask and a pad token; {type(tokenizer).__name__} has "
                         f"mask_token={tokenizer.mask_token!r}, pad_token={tokenizer.pad_token!r}.")
    config = build_config(model_args, tokenizer)
    model = load_model(AutoModelForMaskedLM, model_args, config, tokenizer, run)
    max_seq_length = sequence_length(mlm_args.max_seq_length, config, default=512, flag="--max_seq_length")

    with training_args.main_process_first(desc="tokenizing"):
        if mlm_args.line_by_line:
            # Blank lines carry nothing to predict; dropping them keeps every example informative.
            raw = raw.filter(lambda example: bool(example[text_column].strip()), desc="Dropping blank lines")
            examples = tokenize_texts(raw, tokenizer, text_column, data_args.preprocessing_num_workers,
                                      truncation=True, max_length=max_seq_length, return_special_tokens_mask=True)
        else:
            tokenized = tokenize_texts(raw, tokenizer, text_column, data_args.preprocessing_num_workers,
                                       return_special_tokens_mask=True)
            examples = pack_into_blocks(tokenized, max_seq_length, sources, data_args.preprocessing_num_workers)

    # Set after tokenizing: long lines are packed, not truncated, so the length warning would be noise.
    tokenizer.model_max_length = max_seq_length
    collator_class = DataCollatorForPaddingFreeMaskedLM if mlm_args.padding_free else DataCollatorForLanguageModeling
    collator = collator_class(
        tokenizer,
        mlm_probability=mlm_args.mlm_probability,
        mask_replace_prob=mlm_args.mask_replace_prob,
        random_replace_prob=mlm_args.random_replace_prob,
    )
    preprocess_logits, compute_metrics = language_model_metrics(causal=False)
    has_eval = training_args.do_eval and "validation" in examples
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=examples["train"] if training_args.do_train else None,
        eval_dataset=examples["validation"] if has_eval else None,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics if has_eval else None,
        preprocess_logits_for_metrics=preprocess_logits if has_eval else None,
        callbacks=training_callbacks(model_args),
    )
    results = {"num_parameters": model.num_parameters(), "train_examples": len(examples["train"]),
               "max_seq_length": max_seq_length, "output_dir": training_args.output_dir}
    end_run(trainer, run, results, task="fill-mask", model_args=model_args,
            data_source=data_args.dataset_name or sources.get("train"))
    if trainer.is_world_process_zero():
        print(format_summary("pretrain_masked_lm", _summary_rows(results, sources, mlm_args)))
    return results


def _summary_rows(results: dict, sources: dict, mlm_args: MaskedLMArguments) -> list:
    layout = "one text per example" if mlm_args.line_by_line else "packed blocks"
    if mlm_args.padding_free:
        layout += ", padding-free batches"
    rows = [
        ("training data", sources.get("train")),
        ("parameters", f"{results['num_parameters']:,}"),
        ("examples", f"{results['train_examples']:,} ({layout}, <= {results['max_seq_length']} tokens)"),
        ("masking", f"{mlm_args.mlm_probability:.0%} of tokens: {mlm_args.mask_replace_prob:.0%} [MASK], "
                    f"{mlm_args.random_replace_prob:.0%} random, rest unchanged"),
    ]
    if "train_runtime" in results:
        rows += [("train steps / runtime", f"{results['global_step']} / {results['train_runtime']:.1f} s"),
                 ("train loss", results["train_loss"])]
    if "eval_loss" in results:
        rows += [("validation masked-token loss", results["eval_loss"]),
                 ("validation perplexity", results["eval_perplexity"]),
                 ("validation masked-token accuracy", results["eval_accuracy"])]
    rows += [("saved to", results["output_dir"]), ("wall time", f"{results['wall_seconds']:.1f} s")]
    return rows


if __name__ == "__main__":
    main()
