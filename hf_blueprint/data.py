"""Reading, splitting and preparing the recipes' data.

Local files are read here rather than by `datasets`' generic builders so that bad data fails with a message that
names the file, the line or column, and what was expected. Formats, chosen by extension:

    .txt            one example per line, in a column "text" (language modeling)
    .csv / .tsv     a header row, then one example per row (.tsv: tab-separated, no quoting, as GLUE ships it)
    .json / .jsonl  JSON Lines, or one JSON list of objects (or {"data": [...]}, as run_glue.py accepts)
    .label          TREC question classification (Li & Roth): "COARSE:fine question ..." per line

Files are read into memory: fine for corpora of some hundreds of MB. Bigger corpora belong in `--dataset_name`.
Each example keeps the line it came from (column `LINE_COLUMN`) for error messages; tokenization drops it.
"""

import codecs
import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

import pyarrow
import torch
from datasets import Dataset, DatasetDict, load_dataset
from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening


logger = logging.getLogger(__name__)

LINE_COLUMN = "__line__"
TEXT_EXTENSIONS = (".txt", ".text")
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSON_EXTENSIONS = (".json", ".jsonl")
TREC_EXTENSIONS = (".label",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + tuple(TABLE_DELIMITERS) + JSON_EXTENSIONS + TREC_EXTENSIONS
# The one non-ASCII byte of the TREC training file ("sister\xf0city", line 66). HF's `trec` loader replaces it
# with a space; so do we, so that our TREC numbers are comparable with those of that loader.
TREC_BAD_BYTE = b"\xf0"


class DataError(ValueError):
    """Bad input data. The message names the file, the line or column, and what was expected."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------


def read_data_file(path: str, encoding: str = "utf-8", keep_linebreaks: bool = True) -> Dataset:
    """Reads one local data file into a `Dataset` (format by extension, see the module docstring)."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {extension or '(none)'!r}; expected one of "
                        f"{', '.join(SUPPORTED_EXTENSIONS)}.")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file.")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"{path} is empty: expected {_expected_content(extension)}.")

    if extension in TREC_EXTENSIONS:
        text = _decode_trec(raw, path, encoding)
        rows = _read_trec(text, path)
    else:
        text = decode(raw, path, encoding)
        if extension in TEXT_EXTENSIONS:
            rows = _read_lines(text, keep_linebreaks)
        elif extension in TABLE_DELIMITERS:
            rows = _read_table(text, path, TABLE_DELIMITERS[extension])
        else:
            rows = _read_json(text, path)
    if not rows:
        raise DataError(f"{path} has no examples: expected {_expected_content(extension)}.")
    try:
        return Dataset.from_list(rows)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:  # values no one column type holds
        raise DataError(f"{path}: the values of a column do not share one type ({error}); expected each column to "
                        f"hold values of one kind (text, numbers, ...).") from None


def decode(raw: bytes, path: str, encoding: str = "utf-8") -> str:
    """The text of a file's bytes. A UTF-8 byte-order mark (Excel's "CSV UTF-8" writes one) is dropped: kept, it would
    become part of the first column's name or the first line's text."""
    raw = _without_utf8_bom(raw, path, encoding)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise _decode_error(raw, error, path, encoding) from None


def _without_utf8_bom(raw: bytes, path: str, encoding: str) -> bytes:
    """`raw` without a leading UTF-8 byte-order mark when the encoding is UTF-8; an unknown encoding names the file."""
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"{path}: --encoding {encoding!r} is not a text encoding Python knows; e.g. utf-8, latin-1, "
                        f"cp1252, utf-16.") from None
    if codec.name == "utf-8" and raw.startswith(codecs.BOM_UTF8):
        return raw[len(codecs.BOM_UTF8):]
    return raw


def _decode_error(raw: bytes, error: UnicodeDecodeError, path: str, encoding: str) -> DataError:
    line, column = _line_and_column(raw, error.start)
    return DataError(
        f"{path}, line {line}, column {column}: byte 0x{raw[error.start]:02X} is not valid {encoding}. Expected "
        f"{encoding} text: re-save the file as {encoding}, or pass --encoding with the file's real encoding "
        f"(e.g. --encoding latin-1)."
    )


def _line_and_column(raw: bytes, offset: int) -> tuple[int, int]:
    line_start = raw.rfind(b"\n", 0, offset) + 1
    return raw.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _expected_content(extension: str) -> str:
    if extension in TEXT_EXTENSIONS:
        return "text, one example per line"
    if extension in TABLE_DELIMITERS:
        return "a header row naming the columns, then one example per row"
    if extension in JSON_EXTENSIONS:
        return "JSON Lines (one object per line) or a JSON list of objects"
    return "one 'LABEL:fine question' per line (TREC format)"


def _read_lines(text: str, keep_linebreaks: bool) -> list[dict]:
    lines = text.splitlines(keepends=keep_linebreaks)
    return [{"text": line, LINE_COLUMN: i} for i, line in enumerate(lines, start=1)]


def _read_table(text: str, path: str, delimiter: str) -> list[dict]:
    # GLUE's .tsv files are not quoted (a sentence may start with a double quote); .csv files follow RFC 4180.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(reader)
    if len(set(header)) != len(header) or any(not name.strip() for name in header):
        raise DataError(f"{path}, line 1: expected a header row of distinct, non-empty column names, got {header}.")
    rows = []
    for fields in reader:
        if not fields or fields == [""]:
            continue  # blank line
        if len(fields) != len(header):
            separator = "tabs" if delimiter == "\t" else f"{delimiter!r}"
            raise DataError(
                f"{path}, line {reader.line_num}: expected {len(header)} fields {header} separated by {separator}, "
                f"got {len(fields)}: {fields!r:.200}"
            )
        rows.append({**dict(zip(header, fields)), LINE_COLUMN: reader.line_num})
    return rows


def _read_json(text: str, path: str) -> list[dict]:
    records = None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # maybe JSON Lines, tried below
        if isinstance(document, dict) and isinstance(document.get("data"), list):
            document = document["data"]
        elif isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
            columns = ", ".join(f"{name!r}: {len(values)} values" for name, values in list(document.items())[:4])
            raise DataError(f"{path}: one JSON object of columns ({columns}); expected one object per example, as "
                            f"JSON Lines or a JSON list of objects (pandas: df.to_json(path, orient='records', "
                            f"lines=True)).")
        if isinstance(document, list):
            records = [(None, item) for item in document]
    if records is None:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                                f"expected one JSON object per line.") from None
    rows = []
    for index, (line, record) in enumerate(records):
        if not isinstance(record, dict):
            where = f"line {line}" if line else f"record {index + 1} of the JSON list"
            raise DataError(f"{path}, {where}: expected a JSON object of column values, got {type(record).__name__}.")
        # Records of a JSON list have no line of their own: None, and errors count records instead.
        rows.append({**record, LINE_COLUMN: line})
    # Columns missing from some records become None, caught by the column checks with the record's line.
    columns = list(dict.fromkeys(chain.from_iterable(rows)))
    rows = [{column: row.get(column) for column in columns} for row in rows]
    for column in columns:
        if column != LINE_COLUMN:
            _check_one_kind(rows, column, path)
    return rows


def _value_kind(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def _check_one_kind(rows: list[dict], column: str, path: str) -> None:
    """A column must hold one kind of value (text, numbers, ...): Arrow cannot store `1` and `"pos"` in one column,
    and `"1"` against `1` would be two classes. The error names the first line of each kind."""
    first = {}
    for index, row in enumerate(rows):
        kind = _value_kind(row[column])
        if kind is not None and kind not in first:
            first[kind] = index
    if len(first) > 1:
        def where(index):
            line = rows[index][LINE_COLUMN]
            return f"line {line}" if line is not None else f"record {index + 1} of the JSON list"

        shown = ", ".join(f"{where(index)} holds {rows[index][column]!r:.60} ({kind})" for kind, index in first.items())
        raise DataError(f"{path}: column {column!r} mixes kinds of values: {shown}. Give every value of a column the "
                        f"same kind (e.g. all labels as text, or all as numbers).")


def _decode_trec(raw: bytes, path: str, encoding: str) -> str:
    raw = _without_utf8_bom(raw, path, encoding)
    lines = []
    while True:
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError as error:
            if raw[error.start:error.start + 1] != TREC_BAD_BYTE:
                raise _decode_error(raw, error, path, encoding) from None
            lines.append(_line_and_column(raw, error.start)[0])
            raw = raw[:error.start] + b" " + raw[error.start + 1:]
    if lines:
        logger.warning(
            f"{path}: replaced the undecodable byte 0xF0 with a space on line(s) {lines}, as the original TREC "
            f"loaders do (HF `datasets` trec: 'sister\\xf0city' -> 'sister city')."
        )
    return text


def _read_trec(text: str, path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fine_label, _, question = line.strip().partition(" ")
        coarse_label, colon, fine = fine_label.partition(":")
        if not colon or not coarse_label or not fine or not question.strip():
            raise DataError(f"{path}, line {number}: expected 'COARSE:fine question text' (TREC format, e.g. "
                            f"'DESC:manner How did serfdom develop ?'), got {line!r:.120}.")
        rows.append({"text": question.strip(), "label": coarse_label, "fine_label": fine_label, LINE_COLUMN: number})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Loading the splits
# ---------------------------------------------------------------------------------------------------------------------


def load_raw_datasets(
    data_args,
    *,
    contiguous_validation: bool,
    seed: int = 42,
    cache_dir: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[DatasetDict, dict[str, str]]:
    """Loads train/validation/test from files or the Hub; returns the splits and, per split, where it came from.

    Without a validation split, `data_args.validation_split_percentage` of train is held out: the contiguous tail
    (language models, nanoGPT's split: no shuffling, so no text of the validation part leaks into training through
    overlapping lines) or a seeded random sample (classification).
    """
    if data_args.dataset_name is not None:
        loaded = load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, token=token,
            **({"trust_remote_code": True} if trust_remote_code else {}),
        )
        raw = DatasetDict({split: loaded[split] for split in ("train", "validation", "test") if split in loaded})
        name = data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
        sources = {split: f"dataset {name}, split {split!r}" for split in raw}
    else:
        files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
        files = {split: path for split, path in files.items() if path is not None}
        raw = DatasetDict({
            split: read_data_file(path, data_args.encoding, data_args.keep_linebreaks) for split, path in files.items()
        })
        sources = {split: str(path) for split, path in files.items()}

    if "train" in raw and "validation" not in raw and data_args.validation_split_percentage > 0:
        percentage = data_args.validation_split_percentage
        if contiguous_validation:
            column = data_args.text_column_name or pick_text_column(raw["train"].column_names)
            raw["train"], raw["validation"] = split_contiguous_tail(raw["train"], percentage, column)
            sources["validation"] = f"{sources['train']} (last {percentage}% of the text)"
        else:
            parts = raw["train"].train_test_split(test_size=percentage / 100, seed=seed, shuffle=True)
            raw["train"], raw["validation"] = parts["train"], parts["test"]
            sources["validation"] = f"{sources['train']} (random {percentage}%, seed {seed})"
    return raw, sources


def split_contiguous_tail(dataset: Dataset, percentage: float, text_column: str) -> tuple[Dataset, Dataset]:
    """Splits a dataset of text lines at the character where the last `percentage`% of the text starts.

    This is nanoGPT's split (`data[:int(n * 0.9)]` / `data[int(n * 0.9):]`): the line that holds the boundary is
    cut in two, so the validation text is exactly the last characters of the file.
    """
    texts = list(dataset[text_column])
    total = sum(len(text) for text in texts)
    boundary = int(total * (100 - percentage) // 100)
    lines = list(dataset[LINE_COLUMN]) if LINE_COLUMN in dataset.column_names else list(range(1, len(texts) + 1))
    seen = 0
    for index, text in enumerate(texts):
        if seen + len(text) > boundary:
            break
        seen += len(text)
    else:
        index = len(texts)
    cut = boundary - seen
    train_texts, validation_texts = texts[:index], texts[index:]
    train_lines, validation_lines = lines[:index], lines[index:]
    if cut > 0:  # the boundary falls inside a line: its head goes to train, its tail to validation
        train_texts = train_texts + [validation_texts[0][:cut]]
        train_lines = train_lines + [validation_lines[0]]
        validation_texts = [validation_texts[0][cut:]] + validation_texts[1:]
    if not train_texts or not validation_texts:
        raise DataError(f"Splitting {percentage}% of {total} characters for validation leaves an empty split.")
    return (
        Dataset.from_dict({text_column: train_texts, LINE_COLUMN: train_lines}),
        Dataset.from_dict({text_column: validation_texts, LINE_COLUMN: validation_lines}),
    )


def truncate_splits(raw: DatasetDict, max_train_samples: int | None, max_eval_samples: int | None) -> DatasetDict:
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples), ("test", max_eval_samples)):
        if limit is not None and split in raw and len(raw[split]) > limit:
            raw[split] = raw[split].select(range(limit))
    return raw


# ---------------------------------------------------------------------------------------------------------------------
# Column checks
# ---------------------------------------------------------------------------------------------------------------------


def pick_text_column(columns: list[str], exclude: Iterable[str] = ()) -> str:
    """'text' or 'sentence' if present, else the first column that is not excluded (run_glue.py's convention)."""
    candidates = [c for c in columns if c != LINE_COLUMN and c not in set(exclude)]
    for preferred in ("text", "sentence"):
        if preferred in candidates:
            return preferred
    if not candidates:
        raise DataError(f"Found no text column among the columns {columns}.")
    return candidates[0]


def require_columns(raw: DatasetDict, sources: dict[str, str], columns: dict[str, str]) -> None:
    """Checks that every split has the columns, and no missing (None) values in them.

    `columns` maps each column to the flag that chose it, for the message.
    """
    for split, dataset in raw.items():
        present = [c for c in dataset.column_names if c != LINE_COLUMN]
        for column, flag in columns.items():
            if column not in dataset.column_names:
                raise DataError(
                    f"{sources[split]}: no column {column!r} (expected it as {flag}); the columns are {present}."
                )
            values = dataset[column]
            missing = next((i for i, value in enumerate(values) if value is None), None)
            if missing is not None:
                raise DataError(f"{sources[split]}, {describe_row(dataset, missing)}: column {column!r} ({flag}) "
                                f"has no value.")


def require_text(raw: DatasetDict, sources: dict[str, str], columns: dict[str, str]) -> None:
    """Checks that the text columns hold text: a number (JSON `{"text": 5}`), a list or an object is an error naming
    the file and line, not a TypeError deep inside tokenization. `columns` maps each column to the flag that chose it."""
    for split, dataset in raw.items():
        for column, flag in columns.items():
            if column not in dataset.column_names:
                continue
            feature = dataset.features[column]
            if getattr(feature, "dtype", None) in ("string", "large_string"):
                continue  # Arrow already holds nothing but text (and None, which require_columns reports)
            for index, value in enumerate(dataset[column]):
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{sources[split]}, {describe_row(dataset, index)}: column {column!r} ({flag}) "
                                    f"holds {value!r:.60} ({type(value).__name__}); expected text. Quote it if it "
                                    f"is meant as text, or choose the text column with {flag}.")


def describe_row(dataset: Dataset, index: int) -> str:
    """Where example `index` came from: its line in the file, its record in a JSON list, or its row in a dataset."""
    if LINE_COLUMN not in dataset.column_names:
        return f"row {index}"
    line = dataset[index][LINE_COLUMN]
    return f"line {line}" if line is not None else f"record {index + 1} of the JSON list"


# ---------------------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------------------


def label_name(value) -> str:
    """The class name of a label value: text without surrounding whitespace (" pos" and "pos" are one class), numbers
    as written, an integral float as its integer (JSON's 1 and 1.0 are one class, as are a CSV's "1" and a JSON's 1)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def build_label_maps(
    raw: DatasetDict, sources: dict[str, str], label_column: str
) -> tuple[dict[int, str], dict[str, int]]:
    """`id2label`/`label2id` from the training labels; a label elsewhere that training never saw is an error.

    Labels are compared by `label_name` (stripped text; integral numbers as integers) and numbered in sorted order
    (numerically when all are integers), so the same data always gives the same ids. An empty label is an error.
    """
    if "train" not in raw:
        raise DataError("Classification needs training data to define the labels: give --train_file or "
                        "--dataset_name.")
    for split, dataset in raw.items():
        if label_column not in dataset.column_names:
            continue
        for index, label in enumerate(dataset[label_column]):
            if label is not None and not label_name(label):
                raise DataError(f"{sources[split]}, {describe_row(dataset, index)}: column {label_column!r} holds "
                                f"{label!r}, an empty label; expected a class name.")
    train_labels = {label_name(label) for label in raw["train"][label_column]}
    if len(train_labels) < 2:
        raise DataError(f"{sources['train']}: column {label_column!r} holds {len(train_labels)} distinct label(s) "
                        f"{sorted(train_labels)}; classification needs at least 2.")
    names = sorted(train_labels, key=lambda label: (0, int(label), "") if _is_int(label) else (1, 0, label))
    label2id = {name: i for i, name in enumerate(names)}

    for split, dataset in raw.items():
        if split == "train":
            continue
        for index, label in enumerate(dataset[label_column]):
            if label_name(label) not in label2id:
                unseen = sorted({label_name(v) for v in dataset[label_column]} - train_labels)
                raise DataError(
                    f"{sources[split]}, {describe_row(dataset, index)}: label {label!r} in column {label_column!r} "
                    f"never occurs in the training data ({sources['train']}), so the model has no class for it. "
                    f"Labels only in this split: {unseen}; training labels: {names}."
                )
    return {i: name for name, i in label2id.items()}, label2id


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizing and packing
# ---------------------------------------------------------------------------------------------------------------------


def tokenize_texts(raw: DatasetDict, tokenizer, text_columns: str | list[str], num_proc: int | None = None,
                   keep_columns: Iterable[str] = (), **tokenizer_kwargs) -> DatasetDict:
    """Tokenizes one text column (or a pair of them, as sentence pairs), dropping the columns not in `keep_columns`."""
    text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(f"Expected one text column or a pair of them, got {text_columns}.")

    def tokenize(examples):
        return tokenizer(*(examples[column] for column in text_columns), **tokenizer_kwargs)

    keep = set(keep_columns)
    return DatasetDict({
        split: dataset.map(tokenize, batched=True, num_proc=num_proc, desc=f"Tokenizing {split}",
                           remove_columns=[c for c in dataset.column_names if c not in keep])
        for split, dataset in raw.items()
    })


def group_texts(examples: dict, block_size: int, labels: bool = False) -> dict:
    """Concatenates the tokenized texts and cuts them into blocks of `block_size` (run_clm.py's `group_texts`).

    The remainder shorter than a block is dropped. With `labels`, each block's labels are its input ids: causal
    language models shift them inside the model.
    """
    concatenated = {key: list(chain.from_iterable(examples[key])) for key in examples}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    result = {key: [values[i:i + block_size] for i in range(0, total, block_size)]
              for key, values in concatenated.items()}
    if labels:
        result["labels"] = [list(block) for block in result["input_ids"]]
    return result


def pack_into_blocks(tokenized: DatasetDict, block_size: int, sources: dict[str, str],
                     num_proc: int | None = None, labels: bool = False) -> DatasetDict:
    """`group_texts` over every split; a split too short for a single block is an error naming its source."""
    # Batches of 1,000 texts are packed independently (run_clm.py's choice): a remainder is dropped per batch, a
    # loss of under one block per 1,000 texts.
    packed = tokenized.map(group_texts, batched=True, batch_size=1000, num_proc=num_proc,
                           fn_kwargs={"block_size": block_size, "labels": labels},
                           desc=f"Packing into blocks of {block_size}")
    for split, dataset in packed.items():
        if len(dataset) == 0:
            raise DataError(f"{sources[split]}: fewer than {block_size} tokens in total, not one block of "
                            f"--block_size {block_size}; give more text or a smaller --block_size.")
    return packed


# Up to this many tokens (1 GiB as int64) the causal recipe trains from its blocks held as one tensor.
IN_MEMORY_BLOCK_TOKENS = 2**27


class CausalBlocks(torch.utils.data.Dataset):
    """Packed causal-LM blocks held in memory as one (blocks, block_size) tensor; a row is its own labels.

    Reading a batch of rows from Arrow and collating them costs 2.3 ms a step where indexing a tensor costs 0.1 ms,
    3% of a small model's CPU training step (benchmarks/train_loop.py). The packed blocks' `attention_mask` is all
    ones (a block has no padding), so it is not kept. Same length and order as the Arrow dataset: the Trainer's
    sampler draws the same blocks from either.
    """

    def __init__(self, blocks: Dataset):
        self.input_ids = blocks.with_format("torch", columns=["input_ids"])[:]["input_ids"]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.input_ids[index]
        return {"input_ids": row, "labels": row}


def causal_training_blocks(blocks: Dataset) -> Dataset | CausalBlocks:
    """The blocks as a tensor when they fit in IN_MEMORY_BLOCK_TOKENS, else the Arrow dataset (read from disk)."""
    if len(blocks) * len(blocks[0]["input_ids"]) > IN_MEMORY_BLOCK_TOKENS:
        return blocks
    return CausalBlocks(blocks)


def map_labels(raw: DatasetDict, label_column: str, label2id: dict[str, int]) -> DatasetDict:
    """Adds `labels` (class ids) to every split that has the label column; an unlabeled test split stays as it is."""
    def to_ids(examples):
        return {"labels": [label2id[label_name(label)] for label in examples[label_column]]}

    return DatasetDict({
        split: dataset.map(to_ids, batched=True, desc=f"Mapping labels of {split}")
        if label_column in dataset.column_names else dataset
        for split, dataset in raw.items()
    })


def iterate_texts(dataset: Dataset, text_column: str, batch_size: int = 1000) -> Iterable[str]:
    """Yields the texts of a column in batches (for tokenizer training, without materializing the column)."""
    for start in range(0, len(dataset), batch_size):
        yield from dataset[start:start + batch_size][text_column]


# ---------------------------------------------------------------------------------------------------------------------
# Padding-free batches
# ---------------------------------------------------------------------------------------------------------------------
#
# Sentence data varies in length (SST-2: 15 tokens on average, up to 64), so a padded batch of 64 random examples is
# about two thirds padding that every layer computes on. These collators put the examples of a batch end to end in
# one row of shape (1, total tokens) instead, in transformers' DataCollatorWithFlattening convention: `position_ids`
# restart at 0 for each example and there is no `attention_mask`; from that the Blueprint models attend within each
# example only, and the sequence classification heads pool each example separately. Trainer batches stay
# `per_device_train_batch_size` examples; only their layout changes.


class DataCollatorForPaddingFreeClassification(DataCollatorWithFlattening):
    """DataCollatorWithFlattening for sequence classification: the texts are flattened into one row (with their
    `token_type_ids`, for sentence pairs), and the labels stay one per example, shape (number of examples,), in the
    order the model returns one logits row per packed example. Labels are integer class ids, or floats for
    regression, as with `default_data_collator`."""

    def __call__(self, features: list[dict], return_tensors=None, separator_id=None) -> dict:
        label_name = "label" if "label" in features[0] else "labels"
        empty = [index for index, feature in enumerate(features) if len(feature["input_ids"]) == 0]
        if empty:
            # DataCollatorWithFlattening would silently drop them, shifting every later label onto the wrong example.
            raise ValueError(f"Examples {empty} of this batch have no tokens; a padding-free batch needs at least one "
                             f"token per example (drop empty texts before training).")
        batch = super().__call__([{"input_ids": feature["input_ids"]} for feature in features], return_tensors,
                                 separator_id)
        del batch["labels"]  # the flattening's next-token labels; classification has one label per example
        if "token_type_ids" in features[0]:
            token_type_ids = chain.from_iterable(_as_list(feature["token_type_ids"]) for feature in features)
            batch["token_type_ids"] = torch.tensor([list(token_type_ids)], dtype=torch.long)
        if label_name in features[0]:  # typed as default_data_collator types them
            first = features[0][label_name]
            first = first.item() if isinstance(first, torch.Tensor) and first.dim() == 0 else first
            dtype = torch.long if isinstance(first, int) else torch.float
            batch["labels"] = torch.tensor([feature[label_name] for feature in features], dtype=dtype)
        return batch


@dataclass
class DataCollatorForPaddingFreeMaskedLM(DataCollatorForLanguageModeling):
    """DataCollatorForLanguageModeling, then flattened: the batch is padded and masked exactly as the stock collator
    does it (15% of the tokens chosen, of those 80% [MASK], 10% random, 10% unchanged; special tokens and padding
    never chosen), so the same seed chooses the same tokens as a padded run; then each example's real tokens, with
    their labels, are put end to end in one row by DataCollatorWithFlattening's convention. Returns torch tensors
    only (`return_tensors="pt"`)."""

    def __post_init__(self):
        super().__post_init__()
        if self.return_tensors != "pt":
            raise ValueError(f"DataCollatorForPaddingFreeMaskedLM returns torch tensors only; got "
                             f"return_tensors={self.return_tensors!r}.")
        self.flatten = DataCollatorWithFlattening(return_tensors="pt")

    def torch_call(self, examples: list[dict]) -> dict:
        lengths = [len(example["input_ids"]) for example in examples]
        padded = super().torch_call(examples)
        width = padded["input_ids"].shape[1]
        positions = torch.arange(width)
        lengths = torch.tensor(lengths)
        if self.tokenizer.padding_side == "left":
            is_real = positions[None, :] >= width - lengths[:, None]
        else:
            is_real = positions[None, :] < lengths[:, None]
        # Row by row, left to right: the real tokens of example 0, then those of example 1, ...
        batch = self.flatten([{"input_ids": ids[real]} for ids, real in zip(padded["input_ids"], is_real)])
        batch["labels"] = padded["labels"][is_real][None]
        if "token_type_ids" in padded:
            batch["token_type_ids"] = padded["token_type_ids"][is_real][None]
        return batch


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)
