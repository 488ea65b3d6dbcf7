"""Where sdpa should hand a windowed layer to the block path: the block path against the band-masked SDPA it
replaces, at short lengths and small windows, CPU, one thread.

Under `attn_implementation="sdpa"` a model with `sliding_window` runs each layer either as SDPA with the window's
dense (T, T) mask or block by block (hf_blueprint/sparse_attention.py). `benchmarks/local_attention.py` measures the
two at window 256 from 1k tokens on; this script covers the short end, where the rule
`hf_blueprint.modeling_blueprint.takes_block_path` is decided: for each length and window, forward + backward of one
attention layer's core (batch --batch, 4 heads x 32), median of --repeats, the variants interleaved in alternating
order. The mask is built inside the step, as a model builds it per forward. Read the ratio block / band: below 1 the
block path is the right choice.

    OMP_NUM_THREADS=1 python benchmarks/block_path_dispatch.py               # causal and bidirectional, markdown
    OMP_NUM_THREADS=1 python benchmarks/block_path_dispatch.py --lengths 256 512 --windows 16 --repeats 3
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_attention import HEAD_DIM, HEADS, SCALING, band_mask, block_sparse_attention, load  # noqa: E402


def band_masked_sdpa(window: int, causal: bool):
    def attend(query, key, value):
        mask = band_mask(query.shape[2], window, causal)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=SCALING)
    return attend


def block_path(window: int, causal: bool):
    return lambda query, key, value: block_sparse_attention(query, key, value, window=window, causal=causal,
                                                            scaling=SCALING)


def seconds(attend, batch: int, length: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(batch, length, HEADS, HEAD_DIM, generator=generator).transpose(1, 2)
                         .requires_grad_() for _ in range(3))
    start = time.perf_counter()
    attend(query, key, value).sum().backward()
    return time.perf_counter() - start


def measure(lengths, windows, batch, repeats, causal) -> list[tuple[int, int, float, float]]:
    rows = []
    for length in lengths:
        for window in windows:
            if 2 * window > length:
                continue
            variants = {"band": band_masked_sdpa(window, causal), "block": block_path(window, causal)}
            for attend in variants.values():  # warm-up
                seconds(attend, batch, min(length, 256), seed=0)
            samples = {name: [] for name in variants}
            for repeat in range(repeats):
                for name in variants if repeat % 2 == 0 else reversed(variants):
                    samples[name].append(seconds(variants[name], batch, length, seed=repeat))
            band, block = (statistics.median(samples[name]) for name in ("band", "block"))
            rows.append((length, window, band, block))
            print(f"  {'causal' if causal else 'bidirectional'} T {length} W {window}: band {band * 1e3:.1f} ms, "
                  f"block {block * 1e3:.1f} ms", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.lengths + args.windows) < 1 or args.batch < 1 or args.repeats < 1:
        parser.error("--lengths, --windows, --batch and --repeats must be positive")
    torch.set_num_threads(1)
    load_before = load()
    tables = {causal: measure(sorted(args.lengths), sorted(args.windows), args.batch, args.repeats, causal)
              for causal in (True, False)}
    print(f"Batch {args.batch}, {HEADS} heads x {HEAD_DIM}, forward + backward, median of {args.repeats}, one thread, "
          f"torch {torch.__version__}. Load before: `{load_before}`; after: `{load()}`.\n")
    print("| T | window | spans (T / window) | causal: band mask (ms) | causal: block (ms) | causal: block / band "
          "| bidirectional: band mask (ms) | bidirectional: block (ms) | bidirectional: block / band |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (length, window, band, block), (_, _, band_bi, block_bi) in zip(tables[True], tables[False]):
        print(f"| {length:,} | {window} | {length // window} | {band * 1e3:.1f} | {block * 1e3:.1f} | "
              f"{block / band:.2f} | {band_bi * 1e3:.1f} | {block_bi * 1e3:.1f} | {block_bi / band_bi:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
