"""Blueprint vs transformers' native models at the identical shape and weights, side by side.

For each style (Llama-like, GPT-2-like, BERT-like) a Blueprint model is built from its preset and converted with
`hf_blueprint.convert.to_transformers`, so both sides hold the same weights. Measurements run in one process and
interleaved (Blueprint, native, native, Blueprint, ...: the order alternates) after a warm-up, and each figure is the median of the
repeats; a lone absolute time on a shared machine means little, the ratio Blueprint / native is the result.

    python benchmarks/compare_native.py                       # CPU-sized shapes, markdown to stdout
    python benchmarks/compare_native.py --output results.md   # also write the table
    python benchmarks/compare_native.py --size tiny --repeats 1 --styles gpt2   # the smoke test's run

Measured per style: training step (forward + backward + AdamW) tokens/s, inference forward latency, greedy
generation tokens/s with the KV cache at batch 1 and 8 (decoders), and peak memory of a training step (CUDA's
allocator on a GPU; on a CPU the growth of the resident set in a fresh process whose freed memory returns to
the system, from Linux's resettable high-water mark). The arithmetic efficiency of
the training step is model FLOPs per second (6 N + 12 L H Q T per token, PaLM's count) over this machine's measured
matmul rate.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import hf_blueprint
from hf_blueprint.convert import to_transformers

SIZES = {
    # name: (hidden, layers, heads, kv heads, vocab, batch, sequence, new tokens)
    "tiny": (32, 2, 4, 2, 256, 2, 16, 8),
    "cpu": (256, 4, 4, 2, 8000, 8, 128, 64),
    "gpu": (768, 12, 12, 4, 32000, 16, 1024, 128),
}


@dataclass
class Style:
    name: str
    preset: str
    config_class: type
    model_class: type
    overrides: dict


def styles(size: str) -> list[Style]:
    hidden, layers, heads, kv_heads, vocab, _, sequence, _ = SIZES[size]
    # Generation runs to a fixed length: no end-of-sequence token.
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, vocab_size=vocab,
                 max_position_embeddings=max(512, 2 * sequence), bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return [
        Style("llama", "llama-135m", hf_blueprint.BlueprintDecoderConfig, hf_blueprint.BlueprintDecoderForCausalLM,
              dict(shape, num_key_value_heads=kv_heads, intermediate_size=int(8 * hidden / 3) // 8 * 8,
                   tie_word_embeddings=False)),
        Style("gpt2", "gpt2", hf_blueprint.BlueprintDecoderConfig, hf_blueprint.BlueprintDecoderForCausalLM,
              dict(shape, intermediate_size=4 * hidden, hidden_dropout_prob=0.0, attention_dropout=0.0)),
        Style("bert", "bert-mini", hf_blueprint.BlueprintEncoderConfig,
              hf_blueprint.BlueprintEncoderForSequenceClassification,
              dict(shape, intermediate_size=4 * hidden, num_labels=2, hidden_dropout_prob=0.0,
                   attention_dropout=0.0)),
    ]


def build_pair(style: Style, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = style.config_class.from_preset(style.preset, **style.overrides)
    blueprint = style.model_class(config).to(dtype)
    native = to_transformers(blueprint)
    blueprint.set_attn_implementation("sdpa")
    native.set_attn_implementation("sdpa")
    return blueprint.to(device), native.to(device)


def machine_load() -> str:
    """The 1-, 5- and 15-minute load averages: on a shared machine, how busy the other cores were."""
    return " / ".join(f"{load:.2f}" for load in os.getloadavg())


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(functions: dict, repeats: int, device: str) -> dict:
    """Median seconds of each function, run A B B A A B ... after one warm-up call each. The order alternates because
    the first of a pair is measurably slower on a CPU (the allocator and caches still hold the other model's step):
    with a fixed A B order a Llama-style training step measured 0.965x as Blueprint-first and 1.011x as
    native-first."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            times[name].append(timed(functions[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def training_step(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward_pass(model, batch):
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    def forward():
        model.eval()
        with torch.no_grad():
            model(**inputs)

    return forward


def generation(model, prompt, new_tokens):
    def generate():
        model.eval()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return generate


def matmul_flops_per_second(device: str, dtype: torch.dtype) -> float:
    n = 2048 if device.startswith("cuda") else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = interleaved({"mm": lambda: [a @ b for _ in range(10)]}, 5, device)["mm"]
    return 10 * 2 * n**3 / seconds


def model_flops_per_token(model, sequence: int) -> float:
    config = model.config
    matmul_params = sum(p.numel() for name, p in model.named_parameters()
                        if p.dim() == 2 and "embed" not in name and "position" not in name)
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        matmul_params += model.lm_head.weight.numel()  # the tied projection is a matmul too
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * sequence
    return 6 * matmul_params + attention


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_memory_mib(model, batch) -> float:
    """Peak resident-set growth during one training step (fresh optimizer)."""
    return cpu_peak_mib_of(training_step(model, batch))


def cpu_peak_mib_of(step) -> float:
    """Peak resident-set growth while `step()` runs. Linux resets the high-water mark VmHWM when 5 is written to
    /proc/self/clear_refs, so the peak of this call alone is VmHWM - VmRSS before it. Only meaningful when freed memory
    goes back to the system (see `cpu_peak_memory_in_subprocess`), and only to the kernel's resolution: both numbers
    come from approximate per-CPU counters (some hundred KiB on 2 CPUs), so a step that grows the resident set by less
    can read below zero; such a step is reported as 0."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _proc_status_kib("VmRSS")
    step()
    return max(_proc_status_kib("VmHWM") - before, 0) / 1024


# glibc keeps freed blocks for reuse, which hides a step's allocations from the resident set; with these settings
# every allocation above 64 KiB is its own mapping, returned on free, so the resident set follows live tensors.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def cpu_peak_memory_in_subprocess(size: str, style_name: str) -> dict:
    """Both models' training-step peaks, measured in a fresh process with EXACT_MALLOC (after one warm-up step)."""
    result = subprocess.run([sys.executable, __file__, "--size", size, "--styles", style_name, "--memory-child"],
                            env={**os.environ, **EXACT_MALLOC}, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_child(size: str, style_name: str) -> None:
    style = next(s for s in styles(size) if s.name == style_name)
    models = dict(zip(("blueprint", "native"), build_pair(style, "cpu", torch.float32)))
    batch = example_batch(size, style_name, "cpu")
    peaks = {}
    for name, model in models.items():
        cpu_peak_memory_mib(model, batch)  # warm-up: lazy initialisation inside torch
        peaks[name] = cpu_peak_memory_mib(model, batch)
    print(json.dumps(peaks))


def example_batch(size: str, style_name: str, device: str) -> dict:
    _, _, _, _, vocab, batch_size, sequence, _ = SIZES[size]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab, (batch_size, sequence), generator=generator)
    labels = input_ids if style_name != "bert" else torch.randint(0, 2, (batch_size,), generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device)}


def cuda_peak_memory_mib(model, batch, device) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    training_step(model, batch)()
    return torch.cuda.max_memory_allocated(device) / 2**20


def run(size: str, repeats: int, style_names: list[str], device: str, dtype: torch.dtype) -> list[dict]:
    _, _, _, _, vocab, batch_size, sequence, new_tokens = SIZES[size]
    rows = []
    matmul_rate = matmul_flops_per_second(device, dtype)
    for style in styles(size):
        if style.name not in style_names:
            continue
        blueprint, native = build_pair(style, device, dtype)
        batch = example_batch(size, style.name, device)
        input_ids = batch["input_ids"]
        models = {"blueprint": blueprint, "native": native}
        tokens = batch_size * sequence

        def record(measure, seconds, unit, per_second_of=None):
            for name in models:
                value = per_second_of / seconds[name] if per_second_of else seconds[name] * 1000
                rows.append({"style": style.name, "measure": measure, "model": name, "value": value, "unit": unit})

        train = interleaved({name: training_step(model, batch) for name, model in models.items()}, repeats, device)
        record("training step", train, "tokens/s", per_second_of=tokens)
        flops_per_token = model_flops_per_token(blueprint, sequence)  # the same shape on both sides
        for name in models:
            flops = flops_per_token * tokens / train[name]
            rows.append({"style": style.name, "measure": "training FLOP/s / matmul peak", "model": name,
                         "value": flops / matmul_rate, "unit": "fraction"})
        forward = interleaved({name: forward_pass(model, batch) for name, model in models.items()}, repeats, device)
        record("inference forward", forward, "ms")
        if style.name != "bert":
            for gen_batch in (1, 8):
                prompt = input_ids[:1, :16].repeat(gen_batch, 1) if gen_batch > batch_size else input_ids[:gen_batch, :16]
                generate = interleaved({name: generation(model, prompt, new_tokens) for name, model in models.items()},
                                       repeats, device)
                record(f"greedy generation, batch {gen_batch}", generate, "tokens/s",
                       per_second_of=gen_batch * new_tokens)
        if device.startswith("cuda"):
            peaks = {name: cuda_peak_memory_mib(model, batch, device) for name, model in models.items()}
        else:
            peaks = cpu_peak_memory_in_subprocess(size, style.name)
        for name in models:
            rows.append({"style": style.name, "measure": "training step peak memory", "model": name,
                         "value": peaks[name], "unit": "MiB"})
    return rows, matmul_rate


def ratio_table(rows: list[dict]) -> list[dict]:
    """One line per (style, measure): both values and Blueprint / native (higher is better for rates)."""
    table = []
    keyed = {(r["style"], r["measure"], r["model"]): r for r in rows}
    for style, measure in dict.fromkeys((r["style"], r["measure"]) for r in rows):
        blueprint, native = keyed[(style, measure, "blueprint")], keyed[(style, measure, "native")]
        ratio = blueprint["value"] / native["value"] if native["value"] else float("nan")
        table.append({"style": style, "measure": measure, "unit": blueprint["unit"], "blueprint": blueprint["value"],
                      "native": native["value"], "ratio": ratio})
    return table


def markdown(table: list[dict], header: str) -> str:
    lines = [header, "", "Ratios are Blueprint / native: above 1 is better for tokens/s and the FLOP fraction, below 1 is "
             "better for ms and MiB.", "", "| style | measure | unit | Blueprint | native | Blueprint / native |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in table:
        lines.append(f"| {row['style']} | {row['measure']} | {row['unit']} | {row['blueprint']:.4g} | "
                     f"{row['native']:.4g} | {row['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def publish(text: str, output: str | None) -> None:
    """Prints the markdown and, with --output, writes it to that file."""
    print(text)
    if output:
        with open(output, "w") as handle:
            handle.write(text)


def add_measurement_arguments(parser: argparse.ArgumentParser, sizes, repeated: str) -> None:
    """The flags this benchmark shares with compare_peers.py: shape preset, repeats, device, dtype, threads, outputs
    (and the hidden flag of the memory child process)."""
    parser.add_argument("--size", choices=sorted(sizes), default=None,
                        help="shape preset: tiny (smoke test), cpu (default on CPU), gpu (default on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help=f"timed repeats per {repeated} (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--output", default=None, help="also write the markdown table here")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_measurement_arguments(parser, SIZES, "model")
    parser.add_argument("--styles", default="llama,gpt2,bert", help="comma-separated subset of llama,gpt2,bert")
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.size, args.styles)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ("gpu" if args.device.startswith("cuda") else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    load_before = machine_load()
    rows, matmul_rate = run(size, args.repeats, args.styles.split(","), args.device, dtype)
    table = ratio_table(rows)
    machine = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = (f"Blueprint vs native, size `{size}` {SIZES[size]}, {dtype}, {args.repeats} repeats (median), "
              f"{machine}, torch {torch.__version__}, measured matmul rate {matmul_rate / 1e9:.1f} GFLOP/s, "
              f"{datetime.date.today().isoformat()}, load average {load_before} before / {machine_load()} after")
    publish(markdown(table, header), args.output)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "table": table, "matmul_flops_per_second": matmul_rate}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
