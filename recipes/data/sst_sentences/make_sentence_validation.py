#!/usr/bin/env python
"""Splits SST-2 for model selection on whole sentences, and writes the labelled SST-2 test set as a TSV.

GLUE's SST-2 train.tsv holds 67k phrases cut from the parse trees of ~6.9k training sentences, together with the
sentences themselves. A random slice of it is a poor validation set for a sentence classifier: its phrases are
short, and the sentences they come from are in training. This script holds out `--num_sentences` whole training
sentences (from `stsa.binary.train`) and removes from GLUE's training file every phrase of `--min_overlap_words` or
more words that occurs inside one of them, so the held-out sentences are as new to the model as GLUE's dev set.
Shorter phrases ("good", "the film") stay: they occur everywhere, in dev sentences too.

    python recipes/data/sst_sentences/make_sentence_validation.py --output_dir out/sst2-sentences

writes `train.tsv` (GLUE train minus the overlapping phrases), `validation.tsv` (the held-out sentences),
`train_sentences.tsv` (the labelled training sentences that are not held out: 6,320, for fine-tuning a pretrained
model on sentences only) and `test.tsv` (`stsa.binary.test`, the 1,821 labelled test sentences Kim 2014 reports on),
all `sentence<TAB>label`.
"""

import argparse
import os
import random


HERE = os.path.dirname(os.path.abspath(__file__))
GLUE_TRAIN = os.path.join(HERE, "..", "sst2", "train.tsv")


def read_glue(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        header, *lines = f.read().splitlines()
    if header.split("\t") != ["sentence", "label"]:
        raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {header!r}.")
    return [(" ".join(sentence.split()), label) for sentence, label in (line.rsplit("\t", 1) for line in lines)]


def read_stsa(path: str) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            label, _, sentence = line.strip().partition(" ")
            if label not in ("0", "1") or not sentence:
                raise ValueError(f"{path}, line {number}: expected '<0 or 1> <sentence>', got {line.strip()!r:.80}.")
            rows.append((sentence, label))
    return rows


def word_spans(sentence: str, min_words: int) -> set[str]:
    words = sentence.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + min_words, len(words) + 1)}


def write_tsv(path: str, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        f.writelines(f"{sentence}\t{label}\n" for sentence, label in rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder for train.tsv, validation.tsv and test.tsv.")
    parser.add_argument("--num_sentences", type=int, default=600, help="Training sentences to hold out.")
    parser.add_argument("--min_overlap_words", type=int, default=3,
                        help="Training phrases this long or longer that occur in a held-out sentence are removed.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the choice of held-out sentences.")
    args = parser.parse_args(argv)

    glue_train = read_glue(GLUE_TRAIN)
    sentences = read_stsa(os.path.join(HERE, "stsa.binary.train"))
    if not 0 < args.num_sentences < len(sentences):
        raise ValueError(f"--num_sentences must be between 1 and {len(sentences) - 1}, got {args.num_sentences}.")
    held_out = random.Random(args.seed).sample(sentences, args.num_sentences)
    overlapping = set().union(*(word_spans(sentence, args.min_overlap_words) for sentence, _ in held_out))
    train = [(phrase, label) for phrase, label in glue_train if phrase not in overlapping]

    os.makedirs(args.output_dir, exist_ok=True)
    write_tsv(os.path.join(args.output_dir, "train.tsv"), train)
    write_tsv(os.path.join(args.output_dir, "validation.tsv"), held_out)
    held = set(held_out)
    write_tsv(os.path.join(args.output_dir, "train_sentences.tsv"), [row for row in sentences if row not in held])
    write_tsv(os.path.join(args.output_dir, "test.tsv"), read_stsa(os.path.join(HERE, "stsa.binary.test")))
    counts = {"train": len(train), "removed": len(glue_train) - len(train), "validation": len(held_out)}
    print(f"{args.output_dir}: {counts['train']:,} training phrases ({counts['removed']:,} overlapping the held-out "
          f"sentences removed), {counts['validation']:,} validation sentences, 1,821 test sentences")
    return counts


if __name__ == "__main__":
    main()
