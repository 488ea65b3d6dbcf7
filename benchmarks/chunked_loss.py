"""Training-step peak memory and speed of the causal-LM loss computed block by block, against materialized logits.

The Blueprint decoder's training step (labels given, no logits asked for) takes its cross-entropy block by block of
tokens (hf_blueprint/losses.py) and never holds the (tokens, vocabulary) fp32 logits. Three variants run at the same
shape and weights:

- chunked: `BlueprintDecoderForCausalLM(input_ids, labels)`, the Blueprint's default training path;
- materialized: the same Blueprint model with `return_logits=True`, which computes the full logits and transformers'
  loss function over them;
- native: transformers' `LlamaForCausalLM` converted from the Blueprint with `hf_blueprint.convert.to_transformers`.

The model body is compare_native.py's Llama-style one (size `cpu`: hidden 256, 4 layers, 4 heads, 2 key/value heads,
untied embeddings), so that the logits dominate, over a grid of vocabularies and tokens per step (batch 4 x
tokens / 4). Measured per cell:

- peak memory of one training step (forward, loss, backward and an AdamW step with a fresh optimizer, so the
  optimizer's state counts): compare_native.py's `cpu_peak_memory_mib`, the growth of the resident set from Linux's
  resettable high-water mark, in a fresh process per cell whose freed memory returns to the system, each variant
  after a warm-up step of its own;
- time of the same training step: compare_native.py's protocol, the variants interleaved in alternating order in one
  process after a warm-up, median of the repeats (fewer repeats for the large cells, `--large-repeats`).

Once, at the first cell in the issue's target range (vocabulary 32k-50k, 4k-8k tokens; the largest cell when the grid
has none), the loss and every parameter's gradient of the chunked step are compared with the native model's.

    OMP_NUM_THREADS=1 python benchmarks/chunked_loss.py --threads 1 --output chunked_loss.md \\
        --plot docs/images/chunked_loss.png
    python benchmarks/chunked_loss.py --size tiny --vocabularies 256 --tokens 64 --repeats 1   # the smoke test's run
"""

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from hf_blueprint.ablate import write_atomically
from hf_blueprint.convert import to_transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_native  # noqa: E402  (the sibling benchmark's model shapes and measurements)

VARIANTS = ("chunked", "materialized", "native")
# Keyword arguments each variant's forward takes besides the batch.
VARIANT_ARGUMENTS = {"chunked": {}, "materialized": {"return_logits": True}, "native": {}}
BATCH = 4
VOCABULARIES = (8192, 16384, 32000, 49152)
TOKENS = (1024, 2048, 4096, 8192)
# The target range: vocabulary 32k-50k, 4k-8k tokens per step.
TARGET_VOCABULARIES = range(32000, 50001)
TARGET_TOKENS = range(4096, 8193)
# Cells with more logits than this take --large-repeats timed steps: at 49,152 x 8,192 one step takes seconds.
LARGE_CELL_LOGITS = 2**27


def llama_style(size: str, vocabulary: int, tokens: int):
    """compare_native.py's Llama-style shape at this vocabulary, with room for a sequence of tokens / BATCH."""
    style = next(style for style in compare_native.styles(size) if style.name == "llama")
    sequence = tokens // BATCH
    overrides = dict(style.overrides, vocab_size=vocabulary,
                     max_position_embeddings=max(style.overrides["max_position_embeddings"], sequence))
    return dataclasses.replace(style, overrides=overrides)


def build_models(size: str, vocabulary: int, tokens: int) -> dict:
    """Each variant's model: the Blueprint (chunked and materialized share it) and its native twin."""
    blueprint, native = compare_native.build_pair(llama_style(size, vocabulary, tokens), "cpu", torch.float32)
    return {"chunked": blueprint, "materialized": blueprint, "native": native}


def example_batch(vocabulary: int, tokens: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocabulary, (BATCH, tokens // BATCH), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def variant_batches(vocabulary: int, tokens: int) -> dict:
    batch = example_batch(vocabulary, tokens)
    return {variant: {**batch, **VARIANT_ARGUMENTS[variant]} for variant in VARIANTS}


def memory_child(size: str, vocabulary: int, tokens: int) -> None:
    models, batches = build_models(size, vocabulary, tokens), variant_batches(vocabulary, tokens)
    peaks = {}
    for variant in VARIANTS:
        compare_native.cpu_peak_memory_mib(models[variant], batches[variant])  # warm-up: torch's lazy initialisation
        peaks[variant] = compare_native.cpu_peak_memory_mib(models[variant], batches[variant])
    print(json.dumps(peaks))


def peak_memory_in_subprocess(size: str, vocabulary: int, tokens: int, threads: int | None) -> dict:
    """Each variant's training-step peak (MiB) at one cell, in a fresh process whose freed memory goes back to the
    system (compare_native.EXACT_MALLOC)."""
    command = [sys.executable, __file__, "--memory-child", "--size", size, "--vocabularies", str(vocabulary),
               "--tokens", str(tokens)] + (["--threads", str(threads)] if threads else [])
    result = subprocess.run(command, env={**os.environ, **compare_native.EXACT_MALLOC}, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the memory measurement at vocabulary {vocabulary}, {tokens} tokens failed:\n"
                           f"{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_seconds(size: str, vocabulary: int, tokens: int, repeats: int) -> dict:
    """Median seconds of each variant's training step, interleaved in alternating order after a warm-up."""
    models, batches = build_models(size, vocabulary, tokens), variant_batches(vocabulary, tokens)
    steps = {variant: compare_native.training_step(models[variant], batches[variant]) for variant in VARIANTS}
    return compare_native.interleaved(steps, repeats, "cpu")


def largest_relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|: the difference relative to the tensor's scale."""
    return ((got - expected).abs().max() / expected.abs().max()).item()


def agreement(size: str, vocabulary: int, tokens: int) -> dict:
    """Loss and gradients of one chunked step against the native model's and the materialized step's, as the largest
    relative differences (the gradients: the worst parameter)."""
    models, batches = build_models(size, vocabulary, tokens), variant_batches(vocabulary, tokens)
    losses, gradients = {}, {}
    for variant in VARIANTS:
        model = models[variant]
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(**batches[variant]).loss
        loss.backward()
        losses[variant] = loss.detach()
        gradients[variant] = {name: parameter.grad for name, parameter in model.named_parameters()}
    # The chunked gradients under the native names: a copy of the Blueprint holding them as weights, converted.
    holder = copy.deepcopy(models["chunked"])
    with torch.no_grad():
        for name, parameter in holder.named_parameters():
            parameter.copy_(gradients["chunked"][name])
    chunked_as_native = to_transformers(holder).state_dict()
    return {
        "native loss": largest_relative_difference(losses["chunked"], losses["native"]),
        "native gradients": max(largest_relative_difference(chunked_as_native[name], gradient)
                                for name, gradient in gradients["native"].items()),
        "materialized loss": largest_relative_difference(losses["chunked"], losses["materialized"]),
        "materialized gradients": max(largest_relative_difference(gradients["chunked"][name], gradient)
                                      for name, gradient in gradients["materialized"].items()),
    }


def logits_mib(vocabulary: int, tokens: int) -> float:
    """One fp32 copy of the logits of every token."""
    return vocabulary * tokens * 4 / 2**20


def check_cell(cells: list[tuple[int, int]]) -> tuple[int, int]:
    targets = [(v, t) for v, t in cells if v in TARGET_VOCABULARIES and t in TARGET_TOKENS]
    return targets[0] if targets else max(cells, key=lambda cell: cell[0] * cell[1])


def run(size: str, vocabularies: list[int], tokens: list[int], repeats: int, large_repeats: int,
        threads: int | None) -> dict:
    cells = [(v, t) for v in vocabularies for t in tokens]
    # Memory first, while this process holds no model: a child and this process never hold two steps at once.
    rows = []
    for vocabulary, count in cells:
        print(f"memory: vocabulary {vocabulary}, {count} tokens", file=sys.stderr)
        rows.append({"vocabulary": vocabulary, "tokens": count,
                     "peak MiB": peak_memory_in_subprocess(size, vocabulary, count, threads)})
    checked = check_cell(cells)
    print(f"agreement: vocabulary {checked[0]}, {checked[1]} tokens", file=sys.stderr)
    differences = agreement(size, *checked)
    for row in rows:
        cell_repeats = large_repeats if row["vocabulary"] * row["tokens"] > LARGE_CELL_LOGITS else repeats
        print(f"time: vocabulary {row['vocabulary']}, {row['tokens']} tokens, {cell_repeats} repeats", file=sys.stderr)
        row["repeats"] = cell_repeats
        row["step s"] = step_seconds(size, row["vocabulary"], row["tokens"], cell_repeats)
    return {"rows": rows, "agreement": {"vocabulary": checked[0], "tokens": checked[1], **differences}}


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.3f}" if denominator else "nan"


def markdown(result: dict, header: str) -> str:
    rows = result["rows"]
    lines = [header, "",
             "Peak memory of a training step (forward, loss, backward, AdamW step with its state allocated), growth of "
             "the resident set in a fresh process per cell. Below 1 is better.", "",
             "| vocabulary | tokens | fp32 logits MiB | chunked MiB | materialized MiB | native MiB | chunked / native "
             "| materialized / native |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        peak = row["peak MiB"]
        lines.append(f"| {row['vocabulary']} | {row['tokens']} | {logits_mib(row['vocabulary'], row['tokens']):.4g} | "
                     f"{peak['chunked']:.4g} | {peak['materialized']:.4g} | {peak['native']:.4g} | "
                     f"{ratio(peak['chunked'], peak['native'])} | {ratio(peak['materialized'], peak['native'])} |")
    lines += ["", "Training-step speed (tokens per second, the same step), median of the interleaved repeats. Above 1 "
              "is better.", "",
              "| vocabulary | tokens | repeats | chunked tokens/s | materialized tokens/s | native tokens/s "
              "| chunked / native | materialized / native |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        speed = {variant: row["tokens"] / seconds for variant, seconds in row["step s"].items()}
        lines.append(f"| {row['vocabulary']} | {row['tokens']} | {row['repeats']} | {speed['chunked']:.4g} | "
                     f"{speed['materialized']:.4g} | {speed['native']:.4g} | "
                     f"{ratio(speed['chunked'], speed['native'])} | {ratio(speed['materialized'], speed['native'])} |")
    check = result["agreement"]
    lines += ["", f"Agreement at vocabulary {check['vocabulary']}, {check['tokens']} tokens, one training step (fp32), "
              f"largest relative difference max |a - b| / max |b| (gradients: the worst parameter): chunked vs "
              f"native loss {check['native loss']:.2e}, gradients {check['native gradients']:.2e}; chunked vs "
              f"materialized loss {check['materialized loss']:.2e}, gradients {check['materialized gradients']:.2e}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Peak memory against the vocabulary at the most tokens per step, and against the tokens per step at the largest
    vocabulary, each variant beside one fp32 copy of the logits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    most_tokens = max(row["tokens"] for row in rows)
    largest_vocabulary = max(row["vocabulary"] for row in rows)
    panels = [("vocabulary", [r for r in rows if r["tokens"] == most_tokens], f"{most_tokens} tokens per step"),
              ("tokens", [r for r in rows if r["vocabulary"] == largest_vocabulary],
               f"vocabulary {largest_vocabulary}")]
    styles = {"chunked": dict(marker="o", linestyle="-"), "materialized": dict(marker="s", linestyle="--"),
              "native": dict(marker="^", linestyle="--")}
    figure, axes_pair = plt.subplots(1, 2, figsize=(12, 4.5))
    for axes, (key, panel_rows, title) in zip(axes_pair, panels):
        panel_rows = sorted(panel_rows, key=lambda row: row[key])
        x = [row[key] for row in panel_rows]
        for variant in VARIANTS:
            axes.plot(x, [row["peak MiB"][variant] for row in panel_rows], label=variant, **styles[variant])
        axes.plot(x, [logits_mib(row["vocabulary"], row["tokens"]) for row in panel_rows], color="grey",
                  linestyle=":", label="one fp32 copy of the logits")
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(x, [str(value) for value in x])
        axes.minorticks_off()
        axes.set_xlabel("vocabulary size" if key == "vocabulary" else f"tokens per step (batch {BATCH})")
        axes.set_ylabel("training-step peak memory (MiB)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
    axes_pair[0].legend(fontsize=8)
    figure.suptitle("Causal-LM training step (fp32, CPU): loss block by block vs materialized logits")
    figure.tight_layout()
    partial = path + ".partial"  # the figure complete or absent, never half-written
    figure.savefig(partial, dpi=120, format="png")
    plt.close(figure)
    os.replace(partial, path)


def positive_integers(text: str) -> list[int]:
    values = [int(value) for value in text.split(",")]
    if any(value < 1 for value in values):
        raise ValueError
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "cpu"], default="cpu",
                        help="compare_native.py's model body: cpu (default) or tiny (smoke test)")
    parser.add_argument("--vocabularies", default=",".join(map(str, VOCABULARIES)),
                        help="comma-separated vocabulary sizes")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                        help=f"comma-separated tokens per step, multiples of the batch {BATCH}")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--large-repeats", type=int, default=3,
                        help=f"timed steps per variant in cells of more than {LARGE_CELL_LOGITS:,} logits")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--plot", default=None, metavar="PATH", help="draw peak memory against vocabulary and tokens "
                        "(PNG, needs matplotlib: the viz extra)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    grid = {}
    for flag, text in (("--vocabularies", args.vocabularies), ("--tokens", args.tokens)):
        try:
            grid[flag] = positive_integers(text)
        except ValueError:
            parser.error(f"{flag}: expected comma-separated positive integers, got {text!r}")
    uneven = [count for count in grid["--tokens"] if count % BATCH]
    if uneven:
        parser.error(f"--tokens: {uneven} not a multiple of the batch {BATCH}")
    if args.repeats < 1 or args.large_repeats < 1:
        parser.error("--repeats and --large-repeats must be at least 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the measurements, not after them)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -e '.[viz]'")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.size, grid["--vocabularies"][0], grid["--tokens"][0])
        return 0
    for path in (args.output, args.json, args.plot):  # folders made now: an unwritable one fails before the measurements
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    load_before = compare_native.machine_load()
    result = run(args.size, grid["--vocabularies"], grid["--tokens"], args.repeats, args.large_repeats, args.threads)
    hidden, layers, heads, kv_heads = compare_native.SIZES[args.size][:4]
    header = (f"Chunked vs materialized logits, Llama-style body of size `{args.size}` (hidden {hidden}, {layers} "
              f"layers, {heads} heads, {kv_heads} key/value heads, untied embeddings), batch {BATCH}, float32, "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, {datetime.date.today().isoformat()}, load average {load_before} before / "
              f"{compare_native.machine_load()} after")
    text = markdown(result, header)
    print(text)
    if args.output:
        write_atomically(Path(args.output), text)
    if args.json:
        write_atomically(Path(args.json), json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
