"""Arguments shared by the recipes in `recipes/`, and the small pieces of set-up they all repeat.

The recipes follow transformers' examples (run_clm.py, run_mlm.py, run_glue.py): `HfArgumentParser` over a model
dataclass, a data dataclass and `TrainingArguments`, so every Trainer flag works on every recipe. On top of that:

- a config file (JSON or YAML) as the first argument, with command-line flags after it overriding its values:
  `python recipes/pretrain_causal_lm.py recipes/configs/shakespeare_char.yaml --max_steps 100`;
- `--config_overrides "hidden_size=128,num_hidden_layers=4"` for any Blueprint config field, validated by the config;
- nothing lost: an `--output_dir` that holds a run is refused unless `--overwrite_output_dir` (the flag transformers'
  examples had) or `--resume_from_checkpoint`, a resume refuses checkpoints of another model config, arguments used
  only after training are checked before it, and the final model is saved right after training (`prepare_run`);
- a summary table printed at the end of each run.
"""

import argparse
import codecs
import glob
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin

import datasets
import transformers
import yaml
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Seq2SeqTrainingArguments,
    TrainingArguments,
)

from .callbacks import GradientNormCallback
from .configuration_blueprint import BlueprintConfig
from .data import DataError, iterate_texts
from .tokenizer import TOKENIZER_TYPES, special_tokens_per_text, train_tokenizer
from .training_guards import (
    CHECKPOINT_PATTERN,
    NonFiniteLossCallback,
    check_checkpoint_config,
    check_distributed_launch,
    prepare_distributed_launch,
    resolve_resume_checkpoint,
)


logger = logging.getLogger(__name__)

MODEL_TYPES = ("blueprint_encoder", "blueprint_decoder")
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to train; from a checkpoint or from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A checkpoint (local folder or Hub id) to start from. Leave unset to train from scratch."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "When training from scratch: which Blueprint family to build.", "choices": MODEL_TYPES},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "A config (folder, config.json or Hub id) to build the model from, if not the checkpoint's."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated `field=value` settings applied to the config, e.g. "
            "'hidden_size=128,num_hidden_layers=4,position_embedding_type=rope'. Fields are those of "
            "hf_blueprint.BlueprintConfig; values are parsed as int, float, true/false, none or text."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer folder or Hub id. Unset: the checkpoint's tokenizer, or (from scratch) a new one "
            "trained on the training split with --tokenizer_type and --tokenizer_vocab_size."
        },
    )
    tokenizer_type: str = field(
        default="bpe",
        metadata={"help": "Kind of tokenizer to train when none is given: byte-level BPE, characters, or "
                          "words (for small labelled sets: rare words become [UNK]).",
                  "choices": TOKENIZER_TYPES},
    )
    tokenizer_vocab_size: int = field(
        default=8000, metadata={"help": "Largest vocabulary of a newly trained tokenizer (special tokens included)."}
    )
    tokenizer_min_frequency: int | None = field(
        default=None,
        metadata={"help": "A BPE merge, character or word seen fewer times is left out of a new tokenizer "
                          "(default: 2 for bpe and word, 1 for char)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache files downloaded from the Hub."})
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private repositories (default: the one from `hf auth login`)."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow code from the Hub (datasets or models); only for repositories you trust."},
    )
    nonfinite_loss: str = field(
        default="stop",
        metadata={"help": "When a step's loss or gradients are NaN/inf: 'stop' raises before the update is applied "
                          "(naming the step), 'skip' drops that update and trains on (giving up after 10 in a row), "
                          "'off' trains on as the stock Trainer does.", "choices": ["stop", "skip", "off"]},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention implementation: sdpa (default), eager, block_sparse (local attention block by "
                          "block, linear in the length: with sliding_window), flash_attention_2 or flex_attention "
                          "where installed."},
    )
    tp_size: int = field(
        default=1,
        metadata={"help": "Tensor parallelism: shard every layer over this many ranks as --model_name_or_path is "
                          "loaded (launch as many processes; see recipes/accelerate/tp.yaml)."},
    )
    log_layer_grad_norms: bool = field(
        default=False,
        metadata={"help": "Log the gradient norm of the embeddings, of every block and of the head at each logging "
                          "step (grad_norm/layer_<i> in trainer_state.json), e.g. for the ablations of residual "
                          "connections and normalization."},
    )

    def __post_init__(self):
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"--tp_size must be a positive integer, got {self.tp_size!r}.")


@dataclass
class DataArguments:
    """Where the data comes from and how much of it to use."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub (or a local dataset folder) to load with `datasets`."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of --dataset_name."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training data: .txt (one example per line), .csv, .tsv, .json/.jsonl, "
                                        "or a TREC .label file."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation data, same formats. Unset: split off --validation_split_percentage."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Optional held-out data, same formats, scored once at the end."}
    )
    text_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the text. Unset: 'text' or 'sentence' if present, else the first column."},
    )
    validation_split_percentage: int = field(
        default=10,
        metadata={
            "help": "Percentage of the training data held out for validation when there is no validation split. "
            "Language-model recipes take the last N%% of the text, cut at the exact character (nanoGPT's split); "
            "classification takes a random N%% (seeded by --seed)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation (and test) examples (for quick runs)."}
    )
    encoding: str = field(
        default="utf-8",
        metadata={"help": "Text encoding of the data files; bytes that do not decode are reported with their line."},
    )
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Keep the newline at the end of each line of a .txt file (language models)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization (`datasets.map(num_proc=...)`)."}
    )

    def __post_init__(self):
        # An empty value unsets a file a config file set: `recipe.py config.yaml --test_file ""`.
        for name in ("train_file", "validation_file", "test_file", "dataset_name"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        if self.dataset_name is None and self.train_file is None:
            raise ValueError("Give the training data: --train_file PATH or --dataset_name NAME.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1 (or left unset for all examples), got {value}: "
                                 f"{'training' if name == 'max_train_samples' else 'evaluation'} would have no data.")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise DataError(f"--encoding {self.encoding!r} (for {self.train_file or self.dataset_name}) is not a text "
                            f"encoding Python knows; e.g. utf-8, latin-1, cp1252, utf-16.") from None


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """`TrainingArguments` and `--overwrite_output_dir`, the flag transformers' examples used to have (TrainingArguments
    no longer does in transformers 5)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run already in --output_dir. Without it (or --resume_from_checkpoint) a recipe "
                          "refuses an --output_dir that is not empty, so that no earlier model, card or checkpoint is "
                          "overwritten. With it, the folder's checkpoint-N folders are deleted before training starts "
                          "(else a resume, or the checkpoint rotation of --save_total_limit, would take them for "
                          "this run's); other files are replaced as the new run writes them."},
    )


@dataclass
class RecipeSeq2SeqTrainingArguments(Seq2SeqTrainingArguments, RecipeTrainingArguments):
    """`Seq2SeqTrainingArguments` and `--overwrite_output_dir`."""


# ---------------------------------------------------------------------------------------------------------------------
# Parsing: command line, config file, recipe defaults
# ---------------------------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the recipe's docstring (with its example commands) as written, and shows each flag's default."""


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    defaults: dict | None = None,
    description: str | None = None,
):
    """Parses `argv` (default: `sys.argv[1:]`) into the dataclasses.

    `defaults` changes a recipe's defaults (shown by `--help`), e.g. `do_train=True`. If the first argument is a
    .json/.yaml/.yml file, its keys are read as flags placed before the remaining arguments, so that flags given on
    the command line win. `description` (the recipe's docstring) heads `--help`.

    Under a launcher (torchrun, accelerate, deepspeed) the processes must train as one run: on a machine without
    GPUs they are switched to DDP over gloo, and a launch that cannot be one run stops with how to launch it
    (`training_guards.prepare_distributed_launch`).
    """
    epilog = ("A JSON/YAML file of flag: value pairs may come first, e.g. `recipe.py config.yaml --max_steps 10`; "
              "flags after it override it.")
    parser = HfArgumentParser(dataclass_types, description=description, epilog=epilog,
                              formatter_class=_HelpFormatter)
    if defaults:
        parser.set_defaults(**defaults)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        argv = config_file_to_argv(argv[0]) + argv[1:]
    trains = any(issubclass(cls, TrainingArguments) for cls in dataclass_types)
    if trains:
        # Before TrainingArguments exists: building it sets up the devices and joins (or not) the process group.
        flags, _ = parser.parse_known_args(args=argv)
        if prepare_distributed_launch(use_cpu=bool(flags.use_cpu)):
            argv.extend(["--use_cpu", "true"])
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    if trains:
        check_distributed_launch(next(args for args in parsed if isinstance(args, TrainingArguments)))
    return parsed


def config_file_to_argv(path: str) -> list[str]:
    """Turns a JSON/YAML mapping of `flag: value` into command-line arguments."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of flag names to values, got {type(values).__name__}.")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


NO_RESUME_VALUES = ("false", "no", "none", "")


def resume_requested(training_args) -> bool:
    """Whether --resume_from_checkpoint asks for a resume: a path, `true` or `last`; `false` (as transformers' own
    `Trainer.train(resume_from_checkpoint=False)`), `none` or unset do not."""
    value = training_args.resume_from_checkpoint
    return value is not None and value is not False and str(value).strip().lower() not in NO_RESUME_VALUES


def resume_checkpoint(training_args) -> str | None:
    """`--resume_from_checkpoint true` resumes from the newest *complete* checkpoint in `output_dir`: a folder that a
    killed run (or a full disk) left half-written is skipped, and the log says which and why, where transformers'
    own choice would take it. A path resumes from that folder, which must be complete. `false` does not resume."""
    if not resume_requested(training_args):
        return None
    value = training_args.resume_from_checkpoint
    if str(value).lower() not in ("true", "last") and not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")
    return resolve_resume_checkpoint(value, training_args.output_dir)


def prepare_run(training_args) -> str | None:
    """The checks a recipe makes before it reads any data: the schedule trains something, and --output_dir holds no
    other run (or the user said to replace it, or resumes it). Returns the checkpoint to resume from, if any.

    An --output_dir that is not empty is refused unless --overwrite_output_dir (its checkpoint-N folders are then
    deleted, so that neither a later resume nor the checkpoint rotation takes them for this run's) or a resume (the
    checkpoints are this run's; `check_resume_config` then compares their model config with the run's)."""
    if training_args.do_train and training_args.max_steps <= 0:
        epochs = training_args.num_train_epochs
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"--num_train_epochs {epochs}: expected a positive, finite number of epochs (0 trains "
                             f"nothing), or --max_steps N; --do_train false only evaluates.")
    output_dir = training_args.output_dir
    overwrite = getattr(training_args, "overwrite_output_dir", False)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output_dir {output_dir} is a file, not a folder: give a folder to save the run in.")
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is not None:
        if overwrite:
            raise ValueError(f"--overwrite_output_dir and --resume_from_checkpoint {training_args.resume_from_checkpoint}"
                             f" contradict each other: a resume continues the run in --output_dir {output_dir}, "
                             f"--overwrite_output_dir replaces it. Give one of them.")
        return checkpoint
    held = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if not held:
        return None
    if not overwrite:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise FileExistsError(
            f"--output_dir {output_dir} is not empty (it holds {shown}): training would overwrite what is there. "
            f"Give a new --output_dir, --overwrite_output_dir to replace the run in it, or --resume_from_checkpoint "
            f"true to continue it."
        )
    old_checkpoints = [name for name in held if CHECKPOINT_PATTERN.match(name)
                       and os.path.isdir(os.path.join(output_dir, name))]
    if old_checkpoints and training_args.should_save:
        logger.warning(f"--overwrite_output_dir: deleting the checkpoints of the run in {output_dir}: {old_checkpoints}.")
        for name in old_checkpoints:
            shutil.rmtree(os.path.join(output_dir, name))
    return None


def check_resume_config(training_args, checkpoint: str | None, config: PretrainedConfig) -> None:
    """On a resume, the checkpoint resumed from and every checkpoint-N folder in --output_dir (those the rotation of
    --save_total_limit may delete) must hold a model of this run's config: one of another run is refused, naming it
    and the fields that differ, before training starts."""
    if checkpoint is None:
        return
    # The rotation takes every folder named checkpoint-* (transformers' sort_checkpoints), not only checkpoint-N.
    rotated = sorted(glob.glob(os.path.join(glob.escape(training_args.output_dir), "checkpoint-*")))
    for folder in dict.fromkeys(os.path.normpath(f) for f in [checkpoint, *rotated] if os.path.isdir(f)):
        check_checkpoint_config(folder, config)


def training_callbacks(model_args: ModelArguments) -> list:
    """The callbacks every recipe gives its Trainer: the non-finite loss guard (`--nonfinite_loss`) and the per-layer
    gradient norms (`--log_layer_grad_norms`)."""
    callbacks = [] if model_args.nonfinite_loss == "off" else [NonFiniteLossCallback(policy=model_args.nonfinite_loss)]
    if model_args.log_layer_grad_norms:
        callbacks.append(GradientNormCallback())
    return callbacks


def predict_in_order(trainer, dataset, **kwargs):
    """`trainer.predict(dataset, **kwargs)` with the predictions in the order of `dataset`.

    With `--train_sampling_strategy group_by_length`, transformers 5 groups the evaluation batches by length too, in
    a seeded shuffled order: harmless for a corpus metric (predictions and labels move together), wrong for
    predictions written out or shown beside their inputs. The prediction here reads the data in order instead."""
    strategy = trainer.args.train_sampling_strategy
    if strategy != "group_by_length":
        return trainer.predict(dataset, **kwargs)
    trainer.args.train_sampling_strategy = "random"  # for evaluation: sequential (or sharded in order under DDP)
    try:
        return trainer.predict(dataset, **kwargs)
    finally:
        trainer.args.train_sampling_strategy = strategy


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer and model config
# ---------------------------------------------------------------------------------------------------------------------


def load_or_train_tokenizer(
    model_args: ModelArguments, train_dataset: Dataset, text_columns: Sequence[str], family: str,
    lengths: dict[str, int | None] | None = None, pair: bool = False,
) -> PreTrainedTokenizerBase:
    """--tokenizer_name, else the checkpoint's tokenizer, else a new one trained on the training split only.

    `lengths` maps length flags (e.g. {"--max_seq_length": 1}) to their values: each must leave room for a text token
    beside the special tokens the tokenizer adds to every example (`pair`: to a pair of texts). A tokenizer to be
    trained is checked before it is trained, by what its family adds."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is not None:
        tokenizer = AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
        check_room_for_text(lengths, tokenizer.num_special_tokens_to_add(pair=pair), name)
        return tokenizer
    check_room_for_text(lengths, special_tokens_per_text(family, pair=pair), f"a new {family} tokenizer")
    logger.info(f"Training a {model_args.tokenizer_type} tokenizer ({family} family) on the training split.")
    texts = (text for column in text_columns for text in iterate_texts(train_dataset, column))
    return train_tokenizer(
        texts,
        tokenizer_type=model_args.tokenizer_type,
        vocab_size=model_args.tokenizer_vocab_size,
        min_frequency=model_args.tokenizer_min_frequency,
        family=family,
    )


def check_room_for_text(lengths: dict[str, int | None] | None, special_tokens: int, tokenizer: str) -> None:
    """Each length must exceed the special tokens added to every example: a length that only holds [CLS] and [SEP]
    trains on no text at all (an MLM with nothing to mask reaches loss 0.0)."""
    for flag, length in (lengths or {}).items():
        if length is not None and length <= special_tokens:
            raise ValueError(
                f"{flag} {length} leaves no room for a text token: {tokenizer} adds {special_tokens} special token(s) "
                f"to every example. Give {flag} {special_tokens + 1} or more."
            )


def require_positive_length(value: int | None, flag: str, minimum: int = 1, why: str = "") -> None:
    """Lengths are checked when the arguments are parsed, long before the first batch would fail on them."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be at least {minimum}{why}, got {value}.")


def parse_config_overrides(overrides: str) -> dict:
    """'hidden_size=128,use_cache=false,sliding_window=none' -> {'hidden_size': 128, 'use_cache': False, ...}."""
    parsed = {}
    for item in overrides.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides: expected `field=value`, got {item!r} (in {overrides!r}).")
        key, value = key.strip(), _parse_value(raw.strip())
        if value is None and key in NONE_IS_A_CHOICE:
            value = "none"  # position_embedding_type=none, norm_type=none: a choice of its own, not None
        parsed[key] = value
    return parsed


# String switches for which "none" is one of the choices (their Literal types), not "unset".
NONE_IS_A_CHOICE = {name for name, field in BlueprintConfig._declared_fields().items()
                    if get_origin(field.type) is Literal and "none" in get_args(field.type)}


def _parse_value(raw: str):
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None, "null": None}.get(raw.lower(), raw)


def build_config(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase | None = None, **fixed
) -> PretrainedConfig:
    """The model config: from --config_name, the checkpoint, or --model_type; then token ids, then overrides.

    From scratch, the vocabulary size and the special token ids come from the tokenizer, so that they always agree.
    `fixed` are settings the recipe needs (e.g. `num_labels`), applied before the user's --config_overrides.
    """
    common = {"cache_dir": model_args.cache_dir, "token": model_args.token,
              "trust_remote_code": model_args.trust_remote_code}
    from_scratch = model_args.model_name_or_path is None
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, **common)
    elif not from_scratch:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **common)
    elif model_args.model_type:
        config = AutoConfig.for_model(model_args.model_type)
    else:
        raise ValueError("Training from scratch needs --model_type (or --config_name, or --model_name_or_path).")

    settings = dict(fixed)
    if from_scratch and tokenizer is not None:
        settings.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    if model_args.config_overrides:
        settings.update(parse_config_overrides(model_args.config_overrides))
    unknown = sorted(k for k in settings if k not in config.to_dict() and not hasattr(config, k))
    if unknown:
        raise ValueError(
            f"--config_overrides: {unknown} are not fields of {type(config).__name__}; "
            f"its fields are {sorted(config.to_dict())}."
        )
    if settings:
        # Rebuilding (instead of setattr) runs the config's own validation on the new values.
        config = type(config).from_dict({**_underive(config.to_dict(), settings), **settings})
    return config


def sequence_length(requested: int | None, config: PretrainedConfig, default: int, flag: str) -> int:
    """The input length a recipe uses: `requested`, or `default` capped by the model's position table.

    Learned and sinusoidal positions stop at max_position_embeddings; asking for more is an error here rather than
    an index error in the middle of training. rope, alibi and none have no limit. A native transformers config (the
    unconverted BERT a user compares against) has no position_embedding_type: its max_position_embeddings (or GPT-2's
    n_positions) is taken as the limit, as run_glue.py caps by the model's maximum length.
    """
    positions = getattr(config, "position_embedding_type", "absolute (native model)")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    has_table = positions not in ("rope", "alibi", "none") and limit is not None
    if requested is None:
        return min(default, limit) if has_table else default
    if has_table and requested > limit:
        raise ValueError(
            f"{flag} {requested} exceeds the model's max_position_embeddings ({limit}) with "
            f"{positions} positions; lower {flag} or raise max_position_embeddings."
        )
    return requested


def _underive(values: dict, settings: dict) -> dict:
    """Resets head_dim / num_key_value_heads / decoder_layers that were derived from the heads, width and depth, when
    those change.

    A config stores `head_dim = hidden_size // num_attention_heads` and `num_key_value_heads = num_attention_heads`
    once resolved (and an encoder-decoder `decoder_layers = num_hidden_layers`); `num_attention_heads=4` alone must
    re-derive them, not keep the old values.
    """
    values = dict(values)
    heads, width = values.get("num_attention_heads"), values.get("hidden_size")
    if "num_key_value_heads" not in settings and values.get("num_key_value_heads") == heads:
        values["num_key_value_heads"] = None
    if "head_dim" not in settings and heads and width and values.get("head_dim") == width // heads:
        values["head_dim"] = None
    if "decoder_layers" in values and "decoder_layers" not in settings \
            and values["decoder_layers"] == values.get("num_hidden_layers"):
        values["decoder_layers"] = None
    return values


# ---------------------------------------------------------------------------------------------------------------------
# Logging and reporting
# ---------------------------------------------------------------------------------------------------------------------


def setup_logging(training_args) -> None:
    """transformers' examples' logging set-up: info on the main process, warnings on the others."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    # The root logger too: a recipe imported by another (the quickstart) logs under its module name, not __main__.
    for name in ("hf_blueprint", "__main__", None):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def perplexity_of(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def format_summary(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """A two-column text table: the last thing each recipe prints."""
    cells = [(str(key), _format_value(value)) for key, value in rows]
    left = max([len(k) for k, _ in cells] + [len(title)])
    right = max([len(v) for _, v in cells] + [1])
    rule = f"+-{'-' * left}-+-{'-' * right}-+"
    lines = [rule, f"| {title.ljust(left)} | {' ' * right} |", rule]
    lines += [f"| {k.ljust(left)} | {v.ljust(right)} |" for k, v in cells]
    lines.append(rule)
    return "\n".join(lines)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)
