#!/usr/bin/env python
"""Is attention an explanation? Attention, attention rollout and a gradient attribution of a trained classifier,
compared token by token (Jain & Wallace 2019, "Attention is not Explanation"; Wiegreffe & Pinter 2019, "Attention is
not not Explanation").

For each sentence and each classifier, every word-piece of the sentence (not [CLS], [SEP] or padding) gets a score
from three methods:

- attention: the last layer's attention from the position the classifier reads (the first token for a [CLS] pooler
  or `first` pooling, else the mean of the queries), averaged over heads;
- rollout: attention rollout (Abnar & Zuidema 2020) over all layers, from the same position;
- input x gradient: |sum over the embedding dimension of embedding * d(predicted class logit)/d(embedding)|, the
  gradient-based attribution.

It reports (1) how the rankings agree: Kendall's tau of attention and of rollout against input x gradient, per
sentence, averaged; and (2) whether the ranking points at what the decision rests on: the drop of the predicted
class's probability when the k top-ranked tokens are deleted, against deleting k random ones (the mean of 10 random
draws), and how often the prediction flips.

    python recipes/attention_attribution.py --model out/sst2-minilm-lr1e-4-s42 --model out/sst2-minilm-lr1e-4-s1 \\
        --data recipes/data/sst2/dev.tsv --max_examples 300 --output out/attribution.json

With several models (seeds) the table gives mean +- sd over them.
"""

import argparse
import json
import math
import statistics
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_blueprint  # noqa: F401  (registers the Blueprint models with the Auto classes)
from hf_blueprint.data import read_data_file
from hf_blueprint.visualize import attention_rollout

METHODS = ("attention", "rollout", "gradient")
RANDOM_DRAWS = 10


def kendall_tau(first: list[float], second: list[float]) -> float:
    """Kendall's tau-b of two score lists (ties counted as neither concordant nor discordant)."""
    concordant = discordant = ties_first = ties_second = 0
    n = len(first)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = first[i] - first[j], second[i] - second[j]
            if a == 0 and b == 0:
                continue
            if a == 0:
                ties_first += 1
            elif b == 0:
                ties_second += 1
            elif (a > 0) == (b > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_first) * (concordant + discordant + ties_second))
    return (concordant - discordant) / denominator if denominator else float("nan")


def readout_weights(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """Which query positions the classifier reads, as weights over the sequence: the first token for a pooler or
    `first` pooling, the real tokens evenly for `mean`, the last real token for `last`, evenly for `max`."""
    config = model.config
    length = attention_mask.shape[-1]
    weights = torch.zeros(length)
    pooling = getattr(config, "classifier_pooling", "first")
    if getattr(config, "add_pooling_layer", False) or pooling == "first" or config.model_type == "bert":
        weights[0] = 1.0
    elif pooling == "last":
        weights[int(attention_mask[0].nonzero().max())] = 1.0
    else:
        weights = attention_mask[0].float() / attention_mask[0].sum()
    return weights


def scores(model, tokenizer, text: str) -> tuple[list[int], dict[str, list[float]], int, float]:
    """The sentence's word-piece positions, each method's score per position, the predicted class and its
    probability."""
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    special = set(tokenizer.all_special_ids)
    positions = [i for i, token in enumerate(ids[0].tolist()) if token not in special]
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    extra = {k: v for k, v in encoded.items() if k == "token_type_ids"}
    output = model(inputs_embeds=embeddings, attention_mask=mask, output_attentions=True, **extra)
    probabilities = output.logits.softmax(-1)[0]
    predicted = int(probabilities.argmax())
    output.logits[0, predicted].backward()
    gradient = (embeddings * embeddings.grad).sum(-1)[0].abs()
    attentions = torch.stack([layer[0] for layer in output.attentions]).detach()  # (layers, heads, q, k)
    readout = readout_weights(model, mask)
    last_layer = readout @ attentions[-1].mean(0)
    rollout = readout @ attention_rollout(attentions)[-1]
    method_scores = {"attention": last_layer, "rollout": rollout, "gradient": gradient.detach()}
    per_position = {name: [float(values[p]) for p in positions] for name, values in method_scores.items()}
    return positions, per_position, predicted, probabilities[predicted].item()


@torch.no_grad()
def probability_without(model, tokenizer, text: str, removed: list[int], predicted: int) -> float:
    """The predicted class's probability with the word-pieces at `removed` deleted from the input."""
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
    keep = [i for i in range(encoded["input_ids"].shape[1]) if i not in set(removed)]
    inputs = {key: value[:, keep] for key, value in encoded.items()}
    return float(model(**inputs).logits.softmax(-1)[0, predicted])


def analyze(model, tokenizer, texts: list[str], ks=(1, 3), seed: int = 0) -> dict:
    """Agreement and deletion statistics of one classifier over `texts`."""
    generator = torch.Generator().manual_seed(seed)
    taus = {"attention": [], "rollout": []}
    drops = {(method, k): [] for method in (*METHODS, "random") for k in ks}
    flips = {(method, k): [] for method in (*METHODS, "random") for k in ks}
    for text in texts:
        positions, per_position, predicted, probability = scores(model, tokenizer, text)
        if len(positions) < max(ks) + 1:
            continue
        for method in ("attention", "rollout"):
            taus[method].append(kendall_tau(per_position[method], per_position["gradient"]))
        for k in ks:
            for method in METHODS:
                order = sorted(range(len(positions)), key=lambda i: -per_position[method][i])
                after = probability_without(model, tokenizer, text, [positions[i] for i in order[:k]], predicted)
                drops[(method, k)].append(probability - after)
                flips[(method, k)].append(float(after < 0.5))
            random_drops, random_flips = [], []
            for _ in range(RANDOM_DRAWS):
                chosen = torch.randperm(len(positions), generator=generator)[:k].tolist()
                after = probability_without(model, tokenizer, text, [positions[i] for i in chosen], predicted)
                random_drops.append(probability - after)
                random_flips.append(float(after < 0.5))
            drops[("random", k)].append(statistics.fmean(random_drops))
            flips[("random", k)].append(statistics.fmean(random_flips))
    result = {f"tau_{method}_vs_gradient": statistics.fmean(values) for method, values in taus.items()}
    for (method, k), values in drops.items():
        result[f"drop_top{k}_{method}"] = statistics.fmean(values)
        result[f"flip_top{k}_{method}"] = statistics.fmean(flips[(method, k)])
    result["sentences"] = len(taus["attention"])
    return result


def table(results: list[dict]) -> str:
    """Markdown: one row per statistic, mean +- sd over the models."""
    lines = ["| statistic | mean | sd | per model |", "| --- | --- | --- | --- |"]
    for key in results[0]:
        values = [result[key] for result in results]
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"| {key} | {statistics.fmean(values):.4f} | {sd:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in values)} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="A trained classifier folder (repeatable).")
    parser.add_argument("--data", required=True, help="A .tsv/.csv/.json file with a text column.")
    parser.add_argument("--text_column", default="sentence")
    parser.add_argument("--max_examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random deletions.")
    parser.add_argument("--output", help="JSON file for the per-model statistics.")
    args = parser.parse_args(argv)
    if args.max_examples < 1:
        parser.error(f"--max_examples must be at least 1, got {args.max_examples}")
    dataset = read_data_file(args.data)
    if args.text_column not in dataset.column_names:
        parser.error(f"{args.data} has no column {args.text_column!r} (it has {dataset.column_names})")
    texts = dataset[args.text_column][: args.max_examples]
    torch.set_grad_enabled(True)
    results = []
    for folder in args.model:
        model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        result = analyze(model, tokenizer, texts, seed=args.seed)
        print(f"{folder}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in result.items()), file=sys.stderr)
        results.append(result)
    print(table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"models": args.model, "data": args.data, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
