"""Where the time of greedy generation goes, per new token: generate()'s own loop vs the model's forward vs matmul.

For each model (Blueprint and the native model at the same shape and weights, as in compare_native.py):

    generate()           ms per new token of `model.generate(...)`, greedy, with the KV cache
    forward alone        ms per new token of the same cached forward calls made in a plain loop (one token in, the
                         attention mask grown by one, argmax out): what the model itself costs per step
    generate() overhead  the difference: logits processors, stopping criteria, input preparation, output bookkeeping
    matmul share         the share of one generate() call's CPU time spent in aten::mm / addmm (the weights
                         themselves); the rest is per-operator overhead of small tensors

followed by the operators that take the most time in one generate() call. The plain loop is a profiling aid only:
the benchmark's generation figures come from generate() itself.

    python benchmarks/profile_generation.py --threads 1                   # llama and gpt2 styles, batch 1
    python benchmarks/profile_generation.py --styles gpt2 --batch 8 --output profile.md
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import (  # noqa: E402  (the sibling benchmark's helpers)
    SIZES,
    build_pair,
    example_batch,
    generation,
    interleaved,
    machine_load,
    publish,
    styles,
)

MATMUL_OPERATORS = ("aten::mm", "aten::addmm", "aten::bmm")


def forward_loop(model, prompt: torch.Tensor, new_tokens: int):
    """The cached forward calls of greedy decoding, without generate() around them."""

    @torch.no_grad()
    def decode():
        model.eval()
        cache = DynamicCache(config=model.config)
        attention_mask = torch.ones_like(prompt)
        logits = model(input_ids=prompt, attention_mask=attention_mask, cache=cache, use_cache=True,
                       logits_to_keep=1).logits
        for _ in range(new_tokens - 1):
            next_tokens = logits[:, -1].argmax(-1, keepdim=True)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            logits = model(input_ids=next_tokens, attention_mask=attention_mask, cache=cache, use_cache=True,
                           logits_to_keep=1).logits

    return decode


def operator_profile(fn, rows: int) -> tuple[list[tuple[str, int, float]], float]:
    """The `rows` operators with the most self CPU time in one call of `fn` (name, calls, ms), and the matmul share."""
    with torch.profiler.profile() as profiler:
        fn()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    matmul = sum(event.self_cpu_time_total for event in events if event.key in MATMUL_OPERATORS)
    top = sorted(events, key=lambda event: -event.self_cpu_time_total)[:rows]
    return [(event.key, event.count, event.self_cpu_time_total / 1000) for event in top], matmul / total


def profile_style(style, size: str, batch: int, repeats: int, rows: int) -> str:
    _, _, _, _, _, _, _, new_tokens = SIZES[size]
    models = dict(zip(("Blueprint", "native"), build_pair(style, "cpu", torch.float32)))
    input_ids = example_batch(size, style.name, "cpu")["input_ids"]
    prompt = input_ids[:1, :16].repeat(batch, 1)
    functions = {}
    for name, model in models.items():
        functions[f"{name} generate()"] = generation(model, prompt, new_tokens)
        functions[f"{name} forward alone"] = forward_loop(model, prompt, new_tokens)
    seconds = interleaved(functions, repeats, "cpu")
    per_token = {name: 1000 * value / new_tokens for name, value in seconds.items()}

    lines = [f"### {style.name}-style, batch {batch}, {new_tokens} new tokens", "",
             "| model | generate() ms/token | forward alone ms/token | generate() overhead ms/token | matmul share |",
             "| --- | ---: | ---: | ---: | ---: |"]
    tables = []
    for name in models:
        generate_ms, forward_ms = per_token[f"{name} generate()"], per_token[f"{name} forward alone"]
        top, matmul_share = operator_profile(functions[f"{name} generate()"], rows)
        lines.append(f"| {name} | {generate_ms:.3f} | {forward_ms:.3f} | {generate_ms - forward_ms:.3f} | "
                     f"{matmul_share:.0%} |")
        tables += ["", f"Top operators of one {name} generate() call (self CPU time):", "",
                   "| operator | calls | ms |", "| --- | ---: | ---: |"]
        tables += [f"| `{key}` | {count} | {ms:.1f} |" for key, count, ms in top]
    ratio = per_token["native generate()"] / per_token["Blueprint generate()"]
    lines += ["", f"generate() tokens/s, Blueprint / native: {ratio:.3f}"]
    return "\n".join(lines + tables) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--styles", default="llama,gpt2", help="comma-separated subset of llama,gpt2")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    parser.add_argument("--rows", type=int, default=12, help="operators listed per model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = machine_load()
    sections = [profile_style(style, args.size, args.batch, args.repeats, args.rows)
                for style in styles(args.size) if style.name in args.styles.split(",")]
    header = (f"## Greedy generation profile, size `{args.size}`, {torch.get_num_threads()} torch thread(s), "
              f"{args.repeats} repeats (median), load average {load_before} before / {machine_load()} after\n")
    publish("\n".join([header, *sections]), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
