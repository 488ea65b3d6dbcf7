"""Data of the local lm-evaluation-harness tasks in this folder, built from the repository's own copy of
tinyshakespeare (../tinyshakespeare/input.txt), so that the tasks run offline.

    tinyshakespeare_perplexity   the validation text (nanoGPT's split: the last 10% of the characters), one document
                                 per paragraph (speeches are separated by blank lines); the first paragraph, cut by
                                 the split point, is left out.
    shakespeare_next_line        shakespeare_next_line.jsonl: a verse line of the validation text and four candidate
                                 next lines, the true one and three true next lines of other items. Built by
                                 `build_next_line_items` (see PROVENANCE.md); `python utils.py` writes the file again.

lm-eval calls the loaders through the tasks' `custom_dataset: !function utils.<loader>` with the task's metadata as
keywords, which they ignore.
"""

import json
import random
from pathlib import Path

import datasets


HERE = Path(__file__).resolve().parent
TEXT_FILE = HERE.parent / "tinyshakespeare" / "input.txt"
NEXT_LINE_FILE = HERE / "shakespeare_next_line.jsonl"
VALIDATION_FRACTION = 0.1  # nanoGPT's split, the recipes' contiguous_validation default


def validation_text() -> str:
    text = TEXT_FILE.read_text(encoding="utf-8")
    return text[int(len(text) * (1 - VALIDATION_FRACTION)):]


def validation_paragraphs() -> list[str]:
    """The paragraphs of the validation text, the first (a fragment cut by the split) left out."""
    paragraphs = [paragraph.strip("\n") for paragraph in validation_text().split("\n\n")]
    return [paragraph for paragraph in paragraphs[1:] if paragraph.strip()]


def tinyshakespeare_validation(**metadata) -> datasets.DatasetDict:
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": validation_paragraphs()})})


def is_verse_line(line: str) -> bool:
    """A line of a speech (not a speaker's name, a stage direction or a blank), long enough to be told apart."""
    stripped = line.strip()
    return len(stripped) >= 25 and not stripped.endswith(":") and not stripped.isupper()


def build_next_line_items(count: int = 40, seed: int = 1) -> list[dict]:
    """`count` items, each a verse line of the validation text (`context`), four candidate next lines (`choices`) and
    the index of the true next line (`label`, item i's is i % 4); the distractors are the true next lines of three
    other items, in random order. `line` is the context's line number in input.txt (1-based)."""
    text = TEXT_FILE.read_text(encoding="utf-8")
    first_line = text[: int(len(text) * (1 - VALIDATION_FRACTION))].count("\n") + 2  # first whole validation line
    lines = text.split("\n")
    pairs = [index for index in range(first_line - 1, len(lines) - 1)
             if is_verse_line(lines[index]) and is_verse_line(lines[index + 1])]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pairs, count))
    items = []
    for position, index in enumerate(chosen):
        others = [other for other in range(count) if other != position]
        distractors = [lines[chosen[other] + 1] for other in rng.sample(others, 3)]
        label = position % 4  # balanced: no answer position is right more often than another
        choices = [*distractors[:label], lines[index + 1], *distractors[label:]]
        if len(set(choices)) != len(choices):
            raise ValueError(f"line {index + 1}: two candidate next lines are the same text; pick another seed.")
        items.append({"line": index + 1, "context": lines[index], "choices": choices, "label": label})
    return items


def shakespeare_next_line(**metadata) -> datasets.DatasetDict:
    items = [json.loads(line) for line in NEXT_LINE_FILE.read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(items)})


if __name__ == "__main__":
    with NEXT_LINE_FILE.open("w", encoding="utf-8") as file:
        for item in build_next_line_items():
            file.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {NEXT_LINE_FILE}")
