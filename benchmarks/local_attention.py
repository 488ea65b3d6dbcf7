"""Local and sparse attention against sequence length: forward + backward time and peak memory, CPU, one thread.

One attention layer's core (batch 1, hidden 128 = 4 heads x 32, the model's (batch, seq, heads, head_dim) layout),
forward and backward, for:

- full SDPA: `scaled_dot_product_attention` without a mask (its memory-efficient CPU kernel), every key;
- dense band mask: SDPA with a boolean (seq, seq) sliding-window mask, what a window laid over full attention costs
  (the mask is built inside the step, as a model does per forward); run only up to --dense-max-length;
- block path (`hf_blueprint.sparse_attention.block_sparse_attention`): the bidirectional window, the causal window,
  a dilated window and a window with global tokens, the last two at the bidirectional window's count of attended
  keys per query (2 x 256 - 1 = 511).

Times are medians of --repeats runs, the variants interleaved at each length. Peak memory is the growth of the
resident set during one forward + backward in a fresh process (after a warm-up at a small length), from Linux's
resettable high-water mark (VmHWM), with glibc set to return every freed block above 64 KiB to the system, so that
the resident set follows the live tensors. The exponent of time against length is a least-squares line in log-log.

    python benchmarks/local_attention.py                                   # 1k..32k, markdown to stdout
    python benchmarks/local_attention.py --output docs/local_attention.md --plot docs/images/local_attention.png
    python benchmarks/local_attention.py --lengths 512 1024 --repeats 1    # a quick run
"""

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _load_sparse_attention():
    """hf_blueprint/sparse_attention.py by path: it imports only torch, while importing the package would import
    transformers too, seconds in each of the many measuring processes."""
    path = Path(__file__).resolve().parents[1] / "hf_blueprint" / "sparse_attention.py"
    spec = importlib.util.spec_from_file_location("sparse_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sparse_attention = _load_sparse_attention()
block_sparse_attention = sparse_attention.block_sparse_attention

HEADS, HEAD_DIM, WINDOW = 4, 32, 256
GLOBAL_TOKENS = 16
# Attended keys per query: 2 * WINDOW - 1 for the window, the dilated window (the same count, twice the span) and
# the window narrowed by GLOBAL_TOKENS / 2 with GLOBAL_TOKENS global tokens.
GLOBAL_WINDOW = WINDOW - GLOBAL_TOKENS // 2
SCALING = HEAD_DIM**-0.5


def full_sdpa(query, key, value):
    return F.scaled_dot_product_attention(query, key, value, scale=SCALING).transpose(1, 2)


def band_mask(length: int, window: int, causal: bool = False) -> torch.Tensor:
    """The window's dense (length, length) bool mask, built as transformers' masking_utils builds a sliding window:
    comparisons broadcast straight into it (inside the timed step, as a model builds it per forward)."""
    index = torch.arange(length)
    distance = index[:, None] - index[None, :]
    return (distance < window) & ((distance >= 0) if causal else (distance > -window))


def dense_band(query, key, value):
    mask = band_mask(query.shape[2], WINDOW)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=SCALING).transpose(1, 2)


def block_window(query, key, value):
    return block_sparse_attention(query, key, value, window=WINDOW, causal=False, scaling=SCALING)


def block_causal_window(query, key, value):
    return block_sparse_attention(query, key, value, window=WINDOW, causal=True, scaling=SCALING)


def block_dilated(query, key, value):
    return block_sparse_attention(query, key, value, window=WINDOW, causal=False, dilation=2, scaling=SCALING)


def block_global(query, key, value):
    global_mask = torch.zeros(query.shape[0], query.shape[2], dtype=torch.bool)
    global_mask[:, :GLOBAL_TOKENS] = True
    return block_sparse_attention(
        query, key, value, window=GLOBAL_WINDOW, causal=False, global_mask=global_mask, scaling=SCALING
    )


VARIANTS = {
    # name: (function, attended keys per query as a function of the length)
    "full SDPA": (full_sdpa, lambda length: length),
    "dense band mask": (dense_band, lambda length: min(2 * WINDOW - 1, length)),
    "block window": (block_window, lambda length: min(2 * WINDOW - 1, length)),
    "block causal window": (block_causal_window, lambda length: min(WINDOW, length)),
    "block dilated (d=2)": (block_dilated, lambda length: min(2 * WINDOW - 1, length)),
    f"block window + {GLOBAL_TOKENS} global": (
        block_global, lambda length: min(2 * GLOBAL_WINDOW - 1 + GLOBAL_TOKENS, length)
    ),
}
FULL, DENSE = "full SDPA", "dense band mask"


def inputs(length: int, seed: int = 0):
    """Query, key, value (1, heads, length, head_dim) laid out as a model's projections are, and an output gradient."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(1, length, HEADS, HEAD_DIM, generator=generator).transpose(1, 2).requires_grad_()
    return make(), make(), make(), torch.randn(1, length, HEADS, HEAD_DIM, generator=generator)


def step(function, query, key, value, grad_output) -> None:
    function(query, key, value).backward(grad_output)
    query.grad = key.grad = value.grad = None


def measure_times(lengths, repeats, dense_max_length) -> dict:
    """{variant: {length: median seconds}}; at each length the variants take turns, in alternating order."""
    times = {name: {} for name in VARIANTS}
    for name, (function, _) in VARIANTS.items():  # warm-up: lazy initialisation inside torch
        step(function, *inputs(512))
    for length in lengths:
        tensors = inputs(length)
        names = [name for name in VARIANTS if name != DENSE or length <= dense_max_length]
        samples = {name: [] for name in names}
        for repeat in range(repeats):
            for name in names if repeat % 2 == 0 else reversed(names):
                start = time.perf_counter()
                step(VARIANTS[name][0], *tensors)
                samples[name].append(time.perf_counter() - start)
        for name in names:
            times[name][length] = statistics.median(samples[name])
        print(f"  {length}: " + ", ".join(f"{name} {times[name][length]:.3f}s" for name in names), file=sys.stderr)
    return times


# glibc keeps freed blocks for reuse, which hides allocations from the resident set; with these settings every
# allocation above 64 KiB is its own mapping, returned on free, so the resident set follows live tensors.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def memory_child(name: str, length: int) -> None:
    """One forward + backward at `length` in this fresh process; prints its peak resident-set growth in MiB."""
    torch.set_num_threads(1)
    function = VARIANTS[name][0]
    step(function, *inputs(512))  # warm-up at a small length
    tensors = inputs(length)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    before = _proc_status_kib("VmRSS")
    step(function, *tensors)
    print(json.dumps({"peak_mib": max(_proc_status_kib("VmHWM") - before, 0) / 1024}))


def measure_memory(lengths, dense_max_length) -> dict:
    memory = {name: {} for name in VARIANTS}
    for length in lengths:
        for name in VARIANTS:
            if name == DENSE and length > dense_max_length:
                continue
            result = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, str(length)],
                env={**os.environ, **EXACT_MALLOC, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True,
            )
            memory[name][length] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
        print(f"  {length}: " + ", ".join(f"{n} {m[length]:.1f} MiB" for n, m in memory.items() if length in m),
              file=sys.stderr)
    return memory


def fitted_exponent(points: dict) -> float | None:
    """Slope of log(time) against log(length), least squares; None with fewer than two points."""
    if len(points) < 2:
        return None
    xs, ys = zip(*((math.log(length), math.log(seconds)) for length, seconds in sorted(points.items())))
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def machine() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}, Python {platform.python_version()}"


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def markdown(lengths, times, memory, load_before, load_after) -> str:
    names = list(VARIANTS)
    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}, one thread.",
        f"Load before: `{load_before}`; after: `{load_after}`.",
        "",
        f"Batch 1, {HEADS} heads x {HEAD_DIM} (hidden {HEADS * HEAD_DIM}), window {WINDOW}; forward + backward of the "
        "attention alone. Keys per query: " + ", ".join(f"{n} {VARIANTS[n][1](max(lengths)):,}" for n in names) + ".",
        "",
        "Time (s, median), forward + backward:",
        "",
        "| T | " + " | ".join(names) + " | full / block window |",
        "| --- |" + " --- |" * (len(names) + 1),
    ]
    for length in lengths:
        cells = [f"{times[n][length]:.3f}" if length in times[n] else "-" for n in names]
        ratio = times[FULL][length] / times["block window"][length]
        lines.append(f"| {length:,} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    lines += [
        "",
        "Fitted exponent of time against T (log-log least squares), over all lengths / over T >= 4,096:",
        "",
        "| variant | all lengths | T >= 4,096 |",
        "| --- | --- | --- |",
    ]
    for name in names:
        tail = {length: t for length, t in times[name].items() if length >= 4096}
        exponents = [fitted_exponent(times[name]), fitted_exponent(tail)]
        lines.append(f"| {name} | " + " | ".join("-" if e is None else f"{e:.2f}" for e in exponents) + " |")
    lines += [
        "",
        "Peak memory (MiB): growth of the resident set during one forward + backward, fresh process per cell:",
        "",
        "| T | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for length in lengths:
        lines.append(f"| {length:,} | " + " | ".join(
            f"{memory[n][length]:.1f}" if length in memory[n] else "-" for n in names) + " |")
    return "\n".join(lines) + "\n"


def plot(lengths, times, memory, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in VARIANTS:
        style = dict(marker="o", linestyle="--" if not name.startswith("block") else "-")
        for axes, values in ((time_axes, times[name]), (memory_axes, memory[name])):
            if values:
                points = sorted(values.items())
                axes.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    for axes, label in ((time_axes, "forward + backward time (s)"), (memory_axes, "peak memory growth (MiB)")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("sequence length T")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    time_axes.legend(fontsize=8)
    figure.suptitle(f"Attention, CPU one thread: {HEADS} heads x {HEAD_DIM}, window {WINDOW}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-max-length", type=int, default=8192,
                        help="longest T for the dense band mask (its T x T mask and scores: ~1 GiB at 8,192)")
    parser.add_argument("--output", help="markdown file to write (stdout otherwise)")
    parser.add_argument("--plot", help="PNG file for the plot of time and memory against T")
    parser.add_argument("--json", help="file for the raw numbers")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    if args.repeats < 1 or any(length < 1 for length in args.lengths):
        parser.error("--repeats and --lengths must be positive")
    torch.set_num_threads(1)
    lengths = sorted(args.lengths)
    load_before = load()
    print("time:", file=sys.stderr)
    times = measure_times(lengths, args.repeats, args.dense_max_length)
    print("memory:", file=sys.stderr)
    memory = measure_memory(lengths, args.dense_max_length)
    text = markdown(lengths, times, memory, load_before, load())
    for path, write in ((args.output, lambda f: f.write(text)),
                        (args.json, lambda f: json.dump({"times": times, "memory": memory}, f, indent=1))):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path + ".partial", "w") as file:  # complete or absent: never a half-written file
                write(file)
            os.replace(path + ".partial", path)
    if args.plot:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plot(lengths, times, memory, args.plot)
    if not args.output:
        print(text)


if __name__ == "__main__":
    main()
