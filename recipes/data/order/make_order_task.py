#!/usr/bin/env python
"""A task that only word order decides: does the word `x` come before the word `y`?

Each example is 8 to 16 words drawn from 20 filler words, with one `x` and one `y` at random places; the label is 1
when `x` comes first. The two classes hold the same words in the same numbers, so a model that sees a bag of words
(an encoder without positions is one: its outputs are permutation-equivariant) can do no better than chance, 50%.

    python recipes/data/order/make_order_task.py --output_dir recipes/data/order

writes train.tsv (4,000), validation.tsv (500) and test.tsv (1,000), `sentence<TAB>label`, from --seed 0. The files
in the repository were written by exactly that command.
"""

import argparse
import os
import random

FILLER = "a b c d e f g h i j k l m n o p q r s t".split()


def example(rng: random.Random) -> tuple[str, int]:
    length = rng.randint(8, 16)
    words = [rng.choice(FILLER) for _ in range(length - 2)]
    first, second = sorted(rng.sample(range(length), 2))
    x_first = rng.random() < 0.5
    words.insert(first, "x" if x_first else "y")
    words.insert(second, "y" if x_first else "x")
    return " ".join(words), int(x_first)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    for split, size in (("train", 4000), ("validation", 500), ("test", 1000)):
        with open(os.path.join(args.output_dir, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for _ in range(size):
                sentence, label = example(rng)
                f.write(f"{sentence}\t{label}\n")


if __name__ == "__main__":
    main()
