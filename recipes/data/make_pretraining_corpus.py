#!/usr/bin/env python
"""The unlabelled English text the project may pretrain on for its classification tasks, one text per line.

Gathers the training text of every shipped English data set and never an evaluation set:

- SST-2: the training sentences not held out for validation (`train_sentences.tsv` of make_sentence_validation.py)
  and GLUE's training phrases without those overlapping the held-out sentences (`train.tsv`), labels dropped;
- TREC: the 5,452 training questions, labels dropped (not the 500 test questions);
- Multi30k: the 29,000 English training captions (not validation or test);
- tinyshakespeare: its lines, the first 90% (the causal-LM recipe's validation text, the last 10%, left out).

Each text keeps its own case, as the fine-tuning recipes read it (SST-2 is lowercased, TREC and the others are not):
a word-level vocabulary is case-sensitive, and a corpus lowercased throughout made TREC's capitalized words, its
question words first of all, [UNK] for the pretrained model. Whitespace is normalized only (SST's and TREC's own
tokenization stays).

    python recipes/data/sst_sentences/make_sentence_validation.py --output_dir out/sst2-sentences
    python recipes/data/make_pretraining_corpus.py --sst2_dir out/sst2-sentences --output out/pretraining/corpus.txt
"""

import argparse
import gzip
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def tsv_column(path: str, column: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        header, *lines = f.read().splitlines()
    index = header.split("\t").index(column)
    return [line.split("\t")[index] for line in lines]


def trec_questions(path: str) -> list[str]:
    with open(path, encoding="latin-1") as f:  # one 0xF0 byte on line 66
        return [line.split(" ", 1)[1].strip() for line in f if line.strip()]


def corpus(sst2_dir: str) -> dict[str, list[str]]:
    shakespeare = open(os.path.join(HERE, "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    shakespeare = shakespeare[: int(len(shakespeare) * 0.9)]
    with gzip.open(os.path.join(HERE, "multi30k", "train.en.gz"), "rt", encoding="utf-8") as f:
        captions = f.read().splitlines()
    return {
        "sst2 sentences": tsv_column(os.path.join(sst2_dir, "train_sentences.tsv"), "sentence"),
        "sst2 phrases": tsv_column(os.path.join(sst2_dir, "train.tsv"), "sentence"),
        "trec questions": trec_questions(os.path.join(HERE, "trec", "train_5500.label")),
        "multi30k captions": captions,
        "tinyshakespeare lines": [line for line in shakespeare.splitlines() if line.strip()],
    }


def main(argv=None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2_dir", required=True, help="make_sentence_validation.py's output folder.")
    parser.add_argument("--output", required=True, help="The corpus file to write (a new file).")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        parser.error(f"--output {args.output} exists already; give a new file.")
    sources = corpus(args.sst2_dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for texts in sources.values():
            f.writelines(" ".join(text.split()) + "\n" for text in texts if text.strip())
    counts = {name: len(texts) for name, texts in sources.items()}
    print(f"{args.output}: " + ", ".join(f"{count:,} {name}" for name, count in counts.items()))
    return counts


if __name__ == "__main__":
    main()
