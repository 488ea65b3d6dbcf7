#!/usr/bin/env python
"""Train a tokenizer for Blueprint models on text files or a `datasets` dataset.

Byte-level BPE (GPT-2 style) or character level (for small corpora such as tinyshakespeare). The vocabulary holds the
special tokens of both families ([PAD] [UNK] [CLS] [SEP] [MASK] <|endoftext|>); `--family encoder` wraps texts in
[CLS] ... [SEP], `--family decoder` adds nothing. The output folder loads with `AutoTokenizer.from_pretrained`.

    python recipes/train_tokenizer.py --train_file recipes/data/tinyshakespeare/input.txt \\
        --tokenizer_type char --output_dir out/tokenizer-shakespeare-char

Only the training split is used: with a single file, the last --validation_split_percentage of it is held out,
exactly as the pretraining recipes hold it out, so the tokenizer never sees the validation text.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

from hf_blueprint.data import (
    iterate_texts,
    load_raw_datasets,
    pick_text_column,
    require_columns,
    require_text,
    truncate_splits,
)
from hf_blueprint.recipe_args import DataArguments, format_summary, parse_args
from hf_blueprint.tokenizer import FAMILIES, TOKENIZER_TYPES, train_tokenizer


logger = logging.getLogger(__name__)


@dataclass
class TokenizerTrainingArguments:
    """What tokenizer to train and where to put it."""

    output_dir: str = field(default="out/tokenizer", metadata={"help": "Folder to save the tokenizer in."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace what --output_dir holds (without it, a folder that is not empty is "
                                         "refused)."}
    )
    tokenizer_type: str = field(
        default="bpe", metadata={"help": "Byte-level BPE, one token per character, or one per word.",
                               "choices": TOKENIZER_TYPES}
    )
    vocab_size: int = field(
        default=8000,
        metadata={"help": "Largest vocabulary, special tokens included (char, word: caps the characters or words kept)."},
    )
    min_frequency: int | None = field(
        default=None,
        metadata={"help": "A merge, character or word seen fewer times is left out (default: 2 for bpe and word, "
                          "1 for char)."},
    )
    family: str = field(
        default="decoder",
        metadata={"help": "Model family the tokenizer is for: encoder adds [CLS] ... [SEP] around each text, decoder "
                          "adds nothing, seq2seq (encoder-decoder) ends each text with <|endoftext|>.",
                  "choices": FAMILIES},
    )
    model_max_length: int | None = field(
        default=None, metadata={"help": "Longest input of the model it will serve, stored in the tokenizer config."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the random validation split (tables, not text files)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Also upload the tokenizer to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository to push to (default: the name of --output_dir)."}
    )
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the one from `hf auth login`)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repository as private."})


def main(argv=None):
    data_args, tokenizer_args = parse_args((DataArguments, TokenizerTrainingArguments), argv, description=__doc__)
    return run(data_args, tokenizer_args)


def run(data_args: DataArguments, args: TokenizerTrainingArguments, report: bool = True) -> dict:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    check_output_dir(args)
    # Text files are language-model data: hold out their contiguous tail, as the pretraining recipes do.
    text_like = data_args.train_file is not None and data_args.train_file.endswith((".txt", ".text"))
    raw, sources = load_raw_datasets(data_args, contiguous_validation=text_like, seed=args.seed)
    text_column = data_args.text_column_name or pick_text_column(raw["train"].column_names, exclude=["label"])
    require_columns(raw, sources, {text_column: "--text_column_name"})
    require_text(raw, sources, {text_column: "--text_column_name"})
    train = truncate_splits(raw, data_args.max_train_samples, None)["train"]

    logger.info(f"Training a {args.tokenizer_type} tokenizer on {len(train):,} examples of {sources['train']}")
    tokenizer = train_tokenizer(
        iterate_texts(train, text_column),
        tokenizer_type=args.tokenizer_type,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        family=args.family,
        model_max_length=args.model_max_length,
    )
    tokenizer.save_pretrained(args.output_dir)
    if args.push_to_hub:
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        tokenizer.push_to_hub(repo_id, token=args.hub_token, private=args.hub_private_repo)

    sample = train[0][text_column]
    results = {
        "tokenizer": tokenizer,
        "output_dir": args.output_dir,
        "vocab_size": len(tokenizer),
        "train_examples": len(train),
    }
    if not report:
        return results
    print(format_summary("train_tokenizer", [
        ("type / family", f"{args.tokenizer_type} / {args.family}"),
        ("trained on", f"{len(train):,} examples of {sources['train']}"),
        ("vocabulary", f"{len(tokenizer):,} tokens"),
        ("first example", repr(sample[:60])),
        ("as tokens", repr(tokenizer.tokenize(sample[:60]))[:100]),
        ("saved to", args.output_dir),
    ]))
    return results


def check_output_dir(args: TokenizerTrainingArguments) -> None:
    """Before anything is read or trained: --output_dir must be a folder (`save_pretrained` only logs an error for a
    file, and the run would end "successfully" with nothing saved) and hold nothing yet, unless replacing it was
    asked for."""
    output_dir = args.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"--output_dir {output_dir} is a file, not a folder: give a folder to save the "
                              f"tokenizer in.")
    held = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if held and not args.overwrite_output_dir:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise FileExistsError(f"--output_dir {output_dir} is not empty (it holds {shown}): saving would overwrite "
                              f"what is there. Give a new --output_dir, or --overwrite_output_dir to replace it.")


if __name__ == "__main__":
    main()
