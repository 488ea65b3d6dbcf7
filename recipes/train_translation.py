#!/usr/bin/env python
"""Train a Blueprint encoder-decoder (the paper's Transformer) for translation, in the manner of run_translation.py.

A shared byte-level BPE vocabulary is trained on the source and target sides of the training data together (the
paper's shared vocabulary; the embeddings of both sides and the output projection are one matrix). The model trains
with label smoothing and is scored with BLEU from its own beam-search translations: sacreBLEU on the detokenized,
cased text (with its signature), and BLEU on lowercased Moses-tokenized text, the number most Multi30k papers
report. A few test translations are printed at the end; model, tokenizer and generation settings are saved in
--output_dir, ready for `AutoModelForSeq2SeqLM.from_pretrained` and `push_to_hub`.

Multi30k English -> German (the settings of docs/RESULTS.md):

    python recipes/train_translation.py recipes/configs/multi30k_en_de.yaml

or with its main settings spelled out:

    python recipes/train_translation.py --source_lang en --target_lang de \\
        --train_file recipes/data/multi30k/train --validation_file recipes/data/multi30k/val \\
        --test_file recipes/data/multi30k/test_2016_flickr --tokenizer_vocab_size 8000 \\
        --config_overrides "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,intermediate_size=256,norm_position=pre" \\
        --num_train_epochs 10 --per_device_train_batch_size 64 --learning_rate 3e-3 --warmup_steps 400 \\
        --num_beams 5 --output_dir out/multi30k-en-de

Data: a pair of aligned text files, one sentence per line, given by their common prefix (`data/train` for
`data/train.en` and `data/train.de`, gzipped or not; the source file's own name works too), or a .json/.jsonl/.csv/.tsv
file with one column per language (or run_translation.py's `translation` column of {"en": ..., "de": ...}), or a Hub
dataset (`--dataset_name bentrevett/multi30k`). Any Trainer flag works (`--resume_from_checkpoint true`,
`--push_to_hub`, `--generation_num_beams` for the evaluations during training, ...).
"""

import gzip
import logging
import math
import os
import zlib
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
)

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)
from hf_blueprint.data import (
    JSON_EXTENSIONS,
    LINE_COLUMN,
    TABLE_DELIMITERS,
    DataError,
    decode,
    describe_row,
    load_raw_datasets,
    read_data_file,
    require_columns,
    truncate_splits,
)
from hf_blueprint.metrics import TranslationMetrics
from hf_blueprint.recipe_run import end_run, load_model, record_metrics, start_run
from hf_blueprint.recipe_args import (
    DataArguments,
    ModelArguments,
    RecipeSeq2SeqTrainingArguments,
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
    "output_dir": "out/train_translation",
    "do_train": True,
    "do_eval": True,
    "predict_with_generate": True,
    "label_smoothing_factor": 0.1,  # the paper's
}
TABLE_EXTENSIONS = tuple(TABLE_DELIMITERS) + JSON_EXTENSIONS
PAIR_SEPARATOR = " + "  # between the two files of a parallel pair, where the data's source is named


@dataclass
class TranslationModelArguments(ModelArguments):
    """The shared model arguments, with the encoder-decoder as the only family to build from scratch."""

    model_type: str | None = field(
        default="blueprint_seq2seq",
        metadata={"help": "When training from scratch: the Blueprint family to build.",
                  "choices": ["blueprint_seq2seq"]},
    )


@dataclass
class TranslationArguments:
    """Languages, lengths, and the decoding used for the BLEU scores."""

    source_lang: str = field(default="en", metadata={"help": "Source language: the file suffix or column name."})
    target_lang: str = field(default="de", metadata={"help": "Target language: the file suffix or column name."})
    max_source_length: int | None = field(
        default=None,
        metadata={"help": "Source sentences are truncated to this many tokens. Default: 128, or the model's "
                          "max_position_embeddings if smaller."},
    )
    max_target_length: int | None = field(
        default=None,
        metadata={"help": "Targets are truncated to this many tokens, and translations stop there. Default: 128, or "
                          "the model's max_position_embeddings if smaller. A truncated validation or test reference "
                          "is reported: BLEU is computed against the references as tokenized."},
    )
    num_beams: int = field(
        default=5, metadata={"help": "Beam size of the translations that are scored (1: greedy); saved as the "
                                     "model's generation default. --generation_num_beams overrides it during training."}
    )
    length_penalty: float = field(
        default=1.0,
        metadata={"help": "Beam search ranks finished translations by log-probability / length**length_penalty: "
                          "above 0 favours longer ones, 0 compares raw log-probabilities."},
    )
    num_examples_to_print: int = field(
        default=5,
        metadata={"help": "Test (else validation) translations printed at the end, with source and reference."},
    )

    def __post_init__(self):
        # Checked here, not when the translations are scored after training.
        require_positive_length(self.max_source_length, "--max_source_length")
        require_positive_length(self.max_target_length, "--max_target_length")
        require_positive_length(self.num_beams, "--num_beams")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"--length_penalty must be a finite number, got {self.length_penalty}.")
        if self.num_examples_to_print < 0:
            raise ValueError(f"--num_examples_to_print must be 0 or more, got {self.num_examples_to_print}.")


# The recipe's flags: one dataclass per group, in the order main() unpacks them.
ARGUMENTS = (TranslationModelArguments, DataArguments, TranslationArguments, RecipeSeq2SeqTrainingArguments)


def main(argv=None):
    model_args, data_args, mt_args, training_args = parse_args(ARGUMENTS, argv, DEFAULTS, description=__doc__)
    return run(model_args, data_args, mt_args, training_args)


def run(model_args: TranslationModelArguments, data_args: DataArguments, mt_args: TranslationArguments,
        training_args: RecipeSeq2SeqTrainingArguments) -> dict:
    # The decoding of the evaluations during training, checked before the first one.
    require_positive_length(training_args.generation_num_beams, "--generation_num_beams")
    require_positive_length(training_args.generation_max_length, "--generation_max_length", minimum=2,
                            why=" (the decoder start token and one more)")
    run = start_run(training_args)
    source_lang, target_lang = mt_args.source_lang, mt_args.target_lang

    raw, sources = load_translation_data(data_args, mt_args, seed=training_args.seed, model_args=model_args)
    raw = truncate_splits(raw, data_args.max_train_samples, data_args.max_eval_samples)

    # One vocabulary for both languages: the embeddings of source, target and output are one matrix.
    tokenizer = load_or_train_tokenizer(model_args, raw["train"], [source_lang, target_lang], family="seq2seq",
                                        lengths={"--max_source_length": mt_args.max_source_length,
                                                 "--max_target_length": mt_args.max_target_length})
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"Translation needs a pad and an end-of-sentence token; the tokenizer "
                         f"{tokenizer.name_or_path!r} lacks one (pad: {tokenizer.pad_token!r}, eos: "
                         f"{tokenizer.eos_token!r}).")
    from_scratch = model_args.model_name_or_path is None
    # The decoder starts from the end-of-text token, as fairseq's and Marian's do.
    fixed = {"decoder_start_token_id": tokenizer.bos_token_id} if from_scratch else {}
    config = build_config(model_args, tokenizer, **fixed)
    model = load_model(AutoModelForSeq2SeqLM, model_args, config, tokenizer, run)
    max_source_length = sequence_length(mt_args.max_source_length, config, default=128, flag="--max_source_length")
    max_target_length = sequence_length(mt_args.max_target_length, config, default=128, flag="--max_target_length")
    tokenizer.model_max_length = max_source_length
    configure_generation(model, tokenizer, mt_args, max_target_length)

    with training_args.main_process_first(desc="tokenizing"):
        encoded = tokenize_pairs(raw, tokenizer, source_lang, target_lang, max_source_length, max_target_length,
                                 data_args.preprocessing_num_workers)

    generate = training_args.predict_with_generate
    if not generate:
        logger.warning("--predict_with_generate false: evaluation reports the loss only, no BLEU and no translations.")
    metrics_fn = TranslationMetrics(tokenizer, target_lang)
    has_eval = training_args.do_eval and "validation" in encoded
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"] if training_args.do_train else None,
        eval_dataset=encoded["validation"] if has_eval else None,
        processing_class=tokenizer,
        # Pads each batch to its longest sentence, and builds decoder_input_ids from the labels with the model's own
        # shift (needed with label smoothing, which takes the labels away from the model).
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=metrics_fn if generate else None,
        callbacks=training_callbacks(model_args),
    )

    def translate_and_score(trainer, results):
        printed_split = None
        for split, prefix in (("validation", "eval"), ("test", "test")):
            if split not in encoded or (split == "validation" and not has_eval):
                continue
            # num_beams explicitly: Seq2SeqTrainer would otherwise take --generation_num_beams, meant for the
            # (cheaper) evaluations during training, over the model's own setting. In order: the translations are
            # written out.
            output = predict_in_order(trainer, encoded[split], metric_key_prefix=prefix, num_beams=mt_args.num_beams)
            record_metrics(trainer, prefix, output.metrics, results)
            if not generate:
                continue
            if split == "validation":
                trainer.log(output.metrics)  # into the log history, where the model card reads eval_bleu
            translations = metrics_fn.decode(output.predictions)
            results[f"{prefix}_translations"] = translations
            results["bleu_signatures"] = metrics_fn.signatures
            write_translations(translations, os.path.join(training_args.output_dir, f"{prefix}_translations.txt"),
                               trainer)
            printed_split = split
        if printed_split and trainer.is_world_process_zero() and mt_args.num_examples_to_print > 0:
            prefix = "eval" if printed_split == "validation" else "test"
            print_examples(raw[printed_split], results[f"{prefix}_translations"], source_lang, target_lang,
                           mt_args.num_examples_to_print, sources[printed_split])

    results = {"num_parameters": model.num_parameters(), "vocab_size": len(tokenizer),
               "train_pairs": len(encoded["train"]), "output_dir": training_args.output_dir}
    # Of a pair of parallel files, the source-language file: its folder names the data set on the card.
    end_run(trainer, run, results, task="translation", model_args=model_args,
            data_source=data_args.dataset_name or sources["train"].split(PAIR_SEPARATOR)[0],
            evaluate=translate_and_score)
    if trainer.is_world_process_zero():
        print(format_summary("train_translation", _summary_rows(results, sources, mt_args)))
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Data: parallel text files, tables, or a Hub dataset, as one text column per language
# ---------------------------------------------------------------------------------------------------------------------


def load_translation_data(data_args: DataArguments, mt_args: TranslationArguments, seed: int,
                          model_args: ModelArguments) -> tuple[DatasetDict, dict[str, str]]:
    """Every split as a `Dataset` with a column per language (and the line each pair came from); per split, where
    it came from. Without a validation split, a random --validation_split_percentage of train (seeded) is held out."""
    source_lang, target_lang = mt_args.source_lang, mt_args.target_lang
    if source_lang == target_lang:
        raise ValueError(f"--source_lang and --target_lang are both {source_lang!r}.")
    if data_args.dataset_name is not None:
        raw, sources = load_raw_datasets(data_args, contiguous_validation=False, seed=seed,
                                         cache_dir=model_args.cache_dir, token=model_args.token,
                                         trust_remote_code=model_args.trust_remote_code)
    else:
        raw, sources = DatasetDict(), {}
        files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
        for split, path in files.items():
            if path is None:
                continue
            if path.lower().endswith(TABLE_EXTENSIONS):
                raw[split], sources[split] = read_data_file(path, data_args.encoding), path
            else:
                raw[split], sources[split] = read_parallel_text(path, source_lang, target_lang, data_args.encoding)
        if "validation" not in raw and data_args.validation_split_percentage > 0:
            percentage = data_args.validation_split_percentage
            parts = raw["train"].train_test_split(test_size=percentage / 100, seed=seed, shuffle=True)
            raw["train"], raw["validation"] = parts["train"], parts["test"]
            sources["validation"] = f"{sources['train']} (random {percentage}%, seed {seed})"
    raw = DatasetDict({split: language_columns(dataset, sources[split], source_lang, target_lang)
                       for split, dataset in raw.items()})
    require_columns(raw, sources, {source_lang: "--source_lang", target_lang: "--target_lang"})
    for split, dataset in raw.items():
        for lang in (source_lang, target_lang):
            for index, text in enumerate(dataset[lang]):
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{sources[split]}, {describe_row(dataset, index)}: column {lang!r} holds "
                                    f"{text!r}; expected a non-empty sentence.")
    return raw, sources


def read_parallel_text(prefix: str, source_lang: str, target_lang: str, encoding: str = "utf-8"
                       ) -> tuple[Dataset, str]:
    """Reads PREFIX.SRC and PREFIX.TGT (or their .gz), aligned line by line, into columns named by language.

    Every line is a sentence: files of different lengths, or an empty line on either side, are errors that name the
    file and the line (a pair lost on one side shifts every later pair against its translation)."""
    paths = {lang: language_file(prefix, lang, source_lang) for lang in (source_lang, target_lang)}
    lines = {lang: read_lines(path, encoding) for lang, path in paths.items()}
    (short_lang, short), (long_lang, long) = sorted(lines.items(), key=lambda item: len(item[1]))
    if len(short) != len(long):
        raise DataError(
            f"{paths[long_lang]} has {len(long):,} lines but {paths[short_lang]} has {len(short):,}: line "
            f"{len(short) + 1:,} of {paths[long_lang]} has no translation. Parallel files must hold one sentence "
            f"per line, line i of one the translation of line i of the other."
        )
    for lang, other in ((source_lang, target_lang), (target_lang, source_lang)):
        for number, (text, translation) in enumerate(zip(lines[lang], lines[other]), start=1):
            if not text.strip():
                raise DataError(
                    f"{paths[lang]}, line {number}: empty line, but a sentence was expected (its translation, line "
                    f"{number} of {paths[other]}: {translation!r:.80}). Remove the pair from both files, or restore "
                    f"the sentence: the files are aligned by line."
                )
    columns = {lang: [text.strip() for text in lines[lang]] for lang in (source_lang, target_lang)}
    dataset = Dataset.from_dict({**columns, LINE_COLUMN: list(range(1, len(short) + 1))})
    return dataset, f"{paths[source_lang]}{PAIR_SEPARATOR}{paths[target_lang]}"


def language_file(prefix: str, lang: str, source_lang: str) -> str:
    """PREFIX.LANG or PREFIX.LANG.gz; a prefix given as the source file itself (data/train.en) works too."""
    for suffix in (f".{source_lang}.gz", f".{source_lang}"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
            break
    candidates = [f"{prefix}.{lang}", f"{prefix}.{lang}.gz"]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise DataError(
        f"{prefix}: found neither {candidates[0]} nor {candidates[1]}. Expected a pair of aligned text files "
        f"PREFIX.SRC and PREFIX.TGT (the languages are --source_lang / --target_lang), or a "
        f"{'/'.join(TABLE_EXTENSIONS)} file with a column per language."
    )


def read_lines(path: str, encoding: str) -> list[str]:
    """The lines of a text file (gzip by its .gz suffix), split at "\\n" only: splitlines() would also split at
    characters such as U+2028 inside a sentence and misalign the pairs."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError; a cut-off file an EOFError
        if not path.endswith(".gz"):
            raise
        raise DataError(f"{path}: not a whole gzip file ({type(error).__name__}: {error}); expected gzipped text, "
                        f"one sentence per line. Re-download or re-compress it.") from None
    if not raw.strip():
        raise DataError(f"{path} is empty: expected one sentence per line.")
    text = decode(raw, path + (" (decompressed)" if path.endswith(".gz") else ""), encoding)
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def language_columns(dataset: Dataset, source: str, source_lang: str, target_lang: str) -> Dataset:
    """Unpacks run_translation.py's format, a `translation` column of {"en": ..., "de": ...}, into a column per
    language; a dataset that has the language columns already is returned as it is."""
    if {source_lang, target_lang} <= set(dataset.column_names) or "translation" not in dataset.column_names:
        return dataset
    for index, pair in enumerate(dataset["translation"]):
        # Arrow gives every record the keys of all records: a key missing from this one reads as None.
        if not isinstance(pair, dict) or pair.get(source_lang) is None or pair.get(target_lang) is None:
            raise DataError(f"{source}, {describe_row(dataset, index)}: column 'translation' holds {pair!r:.120}; "
                            f"expected an object with the keys {source_lang!r} and {target_lang!r}.")

    def unpack(examples):
        pairs = examples["translation"]
        return {source_lang: [pair[source_lang] for pair in pairs], target_lang: [pair[target_lang] for pair in pairs]}

    return dataset.map(unpack, batched=True, remove_columns=["translation"], desc="Unpacking the translation column")


def tokenize_pairs(raw: DatasetDict, tokenizer, source_lang: str, target_lang: str, max_source_length: int,
                   max_target_length: int, num_proc: int | None = None) -> DatasetDict:
    """input_ids / attention_mask from the source, labels from the target, both truncated to their maximum length
    (run_translation.py's choice: the model cannot read past its position table). The decoded labels are the
    references BLEU is computed against, so a truncated validation or test reference is reported with a warning."""
    limits = {source_lang: max_source_length, target_lang: max_target_length}

    def tokenize(examples):
        encoded = tokenizer(examples[source_lang], max_length=max_source_length, truncation=True)
        encoded["labels"] = tokenizer(text_target=examples[target_lang], max_length=max_target_length,
                                      truncation=True)["input_ids"]
        for lang, limit in limits.items():  # counted on the untruncated text, for the warning below
            full = tokenizer(text_target=examples[lang]) if lang == target_lang else tokenizer(examples[lang])
            encoded[f"__{lang}_truncated__"] = [len(ids) > limit for ids in full["input_ids"]]
        return encoded

    encoded = DatasetDict()
    for split, dataset in raw.items():
        dataset = dataset.map(tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                              desc=f"Tokenizing {split}")
        for lang, limit in limits.items():
            count = sum(dataset[f"__{lang}_truncated__"])
            if not count:
                continue
            flag = "--max_source_length" if lang == source_lang else "--max_target_length"
            message = (f"{split}: {count:,} of {len(dataset):,} {lang} sentences are longer than {limit} tokens and "
                       f"were truncated; raise {flag} to keep them whole.")
            if split != "train" and lang == target_lang:
                logger.warning(message + " BLEU compares the translations with the truncated references.")
            else:
                logger.info(message)
        encoded[split] = dataset.remove_columns([f"__{lang}_truncated__" for lang in limits])
    return encoded


# ---------------------------------------------------------------------------------------------------------------------
# Generation and reporting
# ---------------------------------------------------------------------------------------------------------------------


def configure_generation(model, tokenizer, mt_args: TranslationArguments, max_target_length: int) -> None:
    """Stores the decoding in the model's generation config: every evaluation uses it, it is saved with the model,
    and a reloaded model translates the same way without being told."""
    generation_config = model.generation_config
    generation_config.decoder_start_token_id = model.config.decoder_start_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    # max_length counts the decoder start token too, which takes a position of a learned or sinusoidal table.
    generation_config.max_length = max_target_length + 1
    if model.config.position_embedding_type in ("learned", "sinusoidal"):
        generation_config.max_length = min(max_target_length + 1, model.config.max_position_embeddings)
    generation_config.num_beams = mt_args.num_beams
    generation_config.length_penalty = mt_args.length_penalty
    # Beam search ends once num_beams translations are finished, as fairseq's does, rather than searching on for
    # hypotheses that could only win with an unlikely jump in score.
    generation_config.early_stopping = mt_args.num_beams > 1


def write_translations(translations: list[str], path: str, trainer) -> None:
    if trainer.is_world_process_zero():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{text}\n" for text in translations)


def print_examples(dataset: Dataset, translations: list[str], source_lang: str, target_lang: str, count: int,
                   source: str) -> None:
    print(f"\nTranslations of the first {min(count, len(translations))} pairs of {source}:")
    for index in range(min(count, len(translations))):
        print(f"  {source_lang}:  {dataset[index][source_lang]}\n  ref: {dataset[index][target_lang]}\n"
              f"  out: {translations[index]}\n")


def _summary_rows(results: dict, sources: dict, mt_args: TranslationArguments) -> list:
    rows = [
        ("training data", f"{sources.get('train')} ({results['train_pairs']:,} pairs)"),
        ("model", f"{results['num_parameters']:,} parameters, shared vocabulary of {results['vocab_size']:,}"),
    ]
    if "train_runtime" in results:
        rows += [("train steps / runtime", f"{results['global_step']} / {results['train_runtime']:.1f} s"),
                 ("train loss (label-smoothed)", results["train_loss"])]
    decoding = f"beam {mt_args.num_beams}, length penalty {mt_args.length_penalty}"
    for prefix, name in (("eval", "validation"), ("test", "test")):
        if f"{prefix}_bleu" in results:
            rows += [(f"{name} data", sources.get("validation" if prefix == "eval" else "test")),
                     (f"{name} sacreBLEU ({decoding})", results[f"{prefix}_bleu"]),
                     (f"{name} BLEU, tokenized lowercase", results[f"{prefix}_bleu_tok_lc"])]
        elif f"{prefix}_loss" in results:
            rows.append((f"{name} loss", results[f"{prefix}_loss"]))
    if "bleu_signatures" in results:
        rows += [("sacreBLEU signature", results["bleu_signatures"]["bleu"]),
                 ("tokenized-lowercase signature",
                  results["bleu_signatures"]["bleu_tok_lc"] + " (on Moses lc.norm.tok)")]
    rows += [("saved to", results["output_dir"]), ("wall time", f"{results['wall_seconds']:.1f} s")]
    return rows


if __name__ == "__main__":
    main()
