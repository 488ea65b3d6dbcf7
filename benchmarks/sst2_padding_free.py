"""Classification fine-tuning on SST-2's real length distribution: padding-free Blueprint vs padded native BERT.

SST-2's training texts are short and uneven (about 15 tokens on average, up to 64), so a padded batch of 64 random
texts is about two-thirds padding. This benchmark trains a BERT-style classifier on real SST-2 batches three ways, on
the same weights (the Blueprint model converted with `hf_blueprint.convert.to_transformers`):

    native padded       BertForSequenceClassification, DataCollatorWithPadding (what run_glue.py does)
    Blueprint padded    the same batches, padded, through the Blueprint model
    Blueprint packed    the same batches padding-free: DataCollatorForPaddingFreeClassification, one row per batch

Speed: each repeat draws one random batch of training texts and times one training step (forward, backward, AdamW) of
each path on it, interleaved, after a warm-up; the figure is effective tokens/s, counting only real (non-pad) tokens,
and the ratios are the medians of the per-repeat ratios.

Same accuracy: the three paths train from the same weights on the same batches with dropout 0 for a hundred-odd
steps (at the recipe's shape by default, --train-shapes); the losses step by step and the GLUE dev accuracy after
training must agree, prediction by prediction (packed and padded batches compute the same function, so any
difference is float rounding).

    python benchmarks/sst2_padding_free.py --threads 1 --output sst2.md      # both shapes, markdown to a file
    python benchmarks/sst2_padding_free.py --shapes tiny --train-shapes tiny --repeats 1 --train-steps 2 \
        --max-texts 300 --vocab-size 400                                     # the smoke test's run
"""

import argparse
import datetime
import platform
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding

import hf_blueprint
from hf_blueprint.convert import to_transformers
from hf_blueprint.data import DataCollatorForPaddingFreeClassification, read_data_file
from hf_blueprint.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import machine_load, publish, timed  # noqa: E402  (the sibling benchmark's helpers)


SST2 = Path(__file__).resolve().parents[1] / "recipes" / "data" / "sst2"
MAX_LENGTH = 64  # recipes/configs/sst2_scratch.yaml's max_seq_length


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    batch: int


SHAPES = {
    "tiny": Shape(hidden=32, layers=1, heads=2, batch=8),
    "sst2": Shape(hidden=128, layers=2, heads=4, batch=64),  # recipes/configs/sst2_scratch.yaml
    "bert-small": Shape(hidden=256, layers=4, heads=4, batch=64),  # BERT-Small (Turc et al., 2019): L=4, H=256
}
PATHS = ("native padded", "Blueprint padded", "Blueprint packed")


def load_sst2(max_texts: int | None, vocab_size: int):
    """Tokenized SST-2 train and dev (BPE trained on the training texts, as the recipe does): features and labels."""
    train, dev = read_data_file(str(SST2 / "train.tsv")), read_data_file(str(SST2 / "dev.tsv"))
    if max_texts is not None:
        train = train.select(range(min(max_texts, len(train))))
    tokenizer = train_tokenizer(iter(train["sentence"]), tokenizer_type="bpe", vocab_size=vocab_size,
                                family="encoder")

    def features(dataset):
        encoded = tokenizer(list(dataset["sentence"]), truncation=True, max_length=MAX_LENGTH)
        return [{"input_ids": ids, "attention_mask": mask, "labels": int(label)}
                for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], dataset["label"])]

    return tokenizer, features(train), features(dev)


def build_models(shape: Shape, tokenizer, dropout: float) -> dict:
    """Native BERT and two copies of the Blueprint BERT-style classifier, all with the same weights, keyed by path."""
    torch.manual_seed(0)
    config = hf_blueprint.BlueprintEncoderConfig.from_preset(
        "bert-mini", hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        intermediate_size=4 * shape.hidden, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=MAX_LENGTH, num_labels=2, hidden_dropout_prob=dropout, attention_dropout=dropout,
    )
    blueprint = hf_blueprint.BlueprintEncoderForSequenceClassification(config)
    models = {"native padded": to_transformers(blueprint), "Blueprint padded": blueprint,
              "Blueprint packed": hf_blueprint.BlueprintEncoderForSequenceClassification(config)}
    models["Blueprint packed"].load_state_dict(blueprint.state_dict())
    for model in models.values():
        model.set_attn_implementation("sdpa")
    return models


def collators(tokenizer) -> dict:
    padded = DataCollatorWithPadding(tokenizer)
    return {"native padded": padded, "Blueprint padded": padded,
            "Blueprint packed": DataCollatorForPaddingFreeClassification()}


def training_steps(models: dict, learning_rate: float = 1e-3) -> dict:
    """One `step(batch) -> loss` per path, each with its own AdamW."""
    steps = {}
    for path, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

        def step(batch, model=model, optimizer=optimizer) -> float:
            model.train()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        steps[path] = step
    return steps


def measure_speed(shape: Shape, tokenizer, train: list, repeats: int, seed: int) -> dict:
    """Median effective (non-pad) tokens/s per path, the median per-repeat ratios, and the share of padding."""
    models = build_models(shape, tokenizer, dropout=0.1)  # BERT's fine-tuning dropout
    steps, collate = training_steps(models), collators(tokenizer)
    sampler = random.Random(seed)
    rates = {path: [] for path in PATHS}
    padding_shares = []
    for repeat in range(repeats + 2):  # two warm-up batches, not counted
        examples = sampler.sample(train, shape.batch)
        real_tokens = sum(len(example["input_ids"]) for example in examples)
        batches = {path: collate[path](examples) for path in PATHS}
        # The order alternates: the first step after another model's is measurably slower on a CPU (compare_native).
        order = PATHS if repeat % 2 == 0 else PATHS[::-1]
        seconds = {path: timed(lambda path=path: steps[path](batches[path]), "cpu") for path in order}
        if repeat >= 2:
            for path in PATHS:
                rates[path].append(real_tokens / seconds[path])
            padding_shares.append(1 - real_tokens / batches["native padded"]["input_ids"].numel())
    median = {path: statistics.median(values) for path, values in rates.items()}
    ratios = {path: statistics.median(a / b for a, b in zip(rates[path], rates["native padded"])) for path in PATHS}
    return {"tokens_per_second": median, "ratio_to_native": ratios, "padding_share": statistics.mean(padding_shares)}


def compare_training(shape: Shape, tokenizer, train: list, dev: list, train_steps: int, seed: int) -> dict:
    """The same short training on the three paths (dropout 0): losses step by step, then dev accuracy."""
    models = build_models(shape, tokenizer, dropout=0.0)
    steps, collate = training_steps(models), collators(tokenizer)
    sampler = random.Random(seed)
    losses = {path: [] for path in PATHS}
    for _ in range(train_steps):
        examples = sampler.sample(train, shape.batch)
        for path in PATHS:
            losses[path].append(steps[path](collate[path](examples)))
    logits = {path: dev_logits(models[path], collate[path], dev) for path in PATHS}
    predictions = {path: logits[path].argmax(-1) for path in PATHS}
    labels = torch.tensor([example["labels"] for example in dev])
    accuracy = {path: (predictions[path] == labels).float().mean().item() for path in PATHS}
    # Equal accuracies alone could hide different predictions (a model predicting one class for every sentence scores
    # the same on any path): the predictions themselves, and the logits behind them, are compared.
    agreement = {path: int((predictions[path] == predictions["native padded"]).sum()) for path in PATHS}
    logit_difference = {path: (logits[path] - logits["native padded"]).abs().max().item() for path in PATHS}
    reference = losses["native padded"]
    largest_difference = {path: max(abs(a - b) for a, b in zip(losses[path], reference)) for path in PATHS}
    return {"losses": losses, "accuracy": accuracy, "max_loss_difference": largest_difference,
            "agreement": agreement, "max_logit_difference": logit_difference, "dev_size": len(dev)}


@torch.no_grad()
def dev_logits(model, collate, dev: list, batch_size: int = 128) -> torch.Tensor:
    """The logits of every dev example, in order."""
    model.eval()
    logits = []
    for start in range(0, len(dev), batch_size):
        batch = collate(dev[start:start + batch_size])
        batch.pop("labels")
        logits.append(model(**batch).logits)
    return torch.cat(logits)


def markdown(results: dict, header: str) -> str:
    lines = [header, "", "Training steps (forward, backward, AdamW) on random batches of SST-2 training texts; "
             "effective tokens/s counts real tokens only. Ratios are to native BERT with padded batches, median of "
             "per-repeat ratios.", "",
             "| shape | batch | padding in padded batches | path | effective tokens/s | ratio to native padded |",
             "| --- | ---: | ---: | --- | ---: | ---: |"]
    for name, result in results.items():
        shape, speed = SHAPES[name], result["speed"]
        for path in PATHS:
            lines.append(f"| {name} (hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads) | "
                         f"{shape.batch} | {speed['padding_share']:.0%} | {path} | "
                         f"{speed['tokens_per_second'][path]:,.0f} | {speed['ratio_to_native'][path]:.2f} |")
    trained = {name: result["training"] for name, result in results.items() if "training" in result}
    if not trained:
        return "\n".join(lines) + "\n"
    lines += ["", "Same training, dropout 0, same weights and batches: largest difference of the per-step loss from "
              "native padded, GLUE dev accuracy (872 sentences) after training, how many dev predictions equal "
              "native padded's, and the largest difference of a dev logit from native padded's.", "",
              "| shape | steps | path | first loss | last loss | max abs loss difference | dev accuracy | "
              "dev predictions as native padded | max abs dev logit difference |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, training in trained.items():
        for path in PATHS:
            losses = training["losses"][path]
            lines.append(f"| {name} | {len(losses)} | {path} | {losses[0]:.6f} | {losses[-1]:.6f} | "
                         f"{training['max_loss_difference'][path]:.2e} | {training['accuracy'][path]:.4f} | "
                         f"{training['agreement'][path]} / {training['dev_size']} | "
                         f"{training['max_logit_difference'][path]:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="sst2,bert-small", help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=15, help="timed batches per path (median reported)")
    parser.add_argument("--train-steps", type=int, default=120, help="steps of the same-training comparison")
    parser.add_argument("--train-shapes", default="sst2",
                        help="the shapes (among --shapes) that also run the same-training comparison")
    parser.add_argument("--max-texts", type=int, default=None, help="use only the first N training texts")
    parser.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary (the recipe's 8,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names, train_names = args.shapes.split(","), [name for name in args.train_shapes.split(",") if name]
    unknown = [name for name in names + train_names if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    if not set(train_names) <= set(names):
        parser.error(f"--train-shapes {train_names} must be among --shapes {names}")

    load_before = machine_load()
    tokenizer, train, dev = load_sst2(args.max_texts, args.vocab_size)
    results = {}
    for name in names:
        results[name] = {"speed": measure_speed(SHAPES[name], tokenizer, train, args.repeats, args.seed)}
        if name in train_names:
            results[name]["training"] = compare_training(SHAPES[name], tokenizer, train, dev, args.train_steps,
                                                         args.seed)
    header = (f"SST-2 fine-tuning, padding-free Blueprint vs padded native BERT: {len(train):,} training texts, "
              f"{args.repeats} repeats, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
              f"torch thread(s), torch {torch.__version__}, {datetime.date.today().isoformat()}, load average "
              f"{load_before} before / {machine_load()} after")
    publish(markdown(results, header), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
