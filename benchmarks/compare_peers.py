"""Blueprint vs litgpt and x-transformers at the identical shape, side by side.

A user choosing a hackable Transformer would also consider Lightning AI's litgpt and lucidrains' x-transformers. For a
Llama-style decoder (RMSNorm, Pre-LN, RoPE, SwiGLU, grouped-query attention, no biases) and a GPT-2-style decoder
(LayerNorm, Pre-LN, learned positions, GELU MLP, biases) each library builds its own model at the same width, depth,
heads, key/value heads, FFN width and vocabulary, with untied input and output embeddings (litgpt cannot tie them).
Where a library lacks a switch its model differs, and the parameter counts say by how much (`PEER_DIFFERENCES`).

The protocol is compare_native.py's: one process, the libraries interleaved in alternating order after a warm-up
call each, the median of the repeats; the ratios Blueprint / peer of the same run are the result.

    python benchmarks/compare_peers.py --threads 1                        # CPU-sized shapes, markdown to stdout
    python benchmarks/compare_peers.py --size tiny --repeats 1 --styles llama   # the smoke test's run

Measured per style and library: training step tokens/s (forward, loss, backward, AdamW step), inference forward
latency (full logits, no gradients), greedy generation tokens/s with each library's own KV cache at batch 1 and 8
(Blueprint: `generate()`; litgpt: `litgpt.generate.base.generate` at batch 1 and `batched_generate_fn` at batch 8
after `set_kv_cache`, as its `LLM.generate` does; x-transformers: `AutoregressiveWrapper.generate(cache_kv=True)`),
and the peak memory of a training step (CUDA's allocator on a GPU; on a CPU the growth of the resident set during
one step, measured in a fresh process whose freed memory returns to the system, from Linux's resettable high-water
mark VmHWM, each model after a warm-up step of its own). A library that is not installed is skipped and the report
says so.

The peers compute their loss as their own training scripts do, `cross_entropy` over the full logits; the Blueprint's
training step takes its loss block by block without materializing the logits (hf_blueprint/losses.py).
"""

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import hf_blueprint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_native import (  # noqa: E402  (the sibling benchmark's helpers)
    EXACT_MALLOC,
    add_measurement_arguments,
    cpu_peak_mib_of,
    interleaved,
    machine_load,
)


LIBRARIES = ("blueprint", "litgpt", "x-transformers")
LIBRARY_NAMES = {"blueprint": "Blueprint", "litgpt": "litgpt", "x-transformers": "x-transformers"}
STYLES = ("llama", "gpt2")

SIZES = {
    # name: (hidden, layers, heads, kv heads, vocab, batch, sequence, new tokens)
    "tiny": (32, 2, 4, 2, 256, 2, 16, 8),
    "cpu": (256, 4, 4, 2, 8000, 8, 256, 64),
    "gpu": (768, 12, 12, 4, 32000, 16, 1024, 128),
}
PROMPT_TOKENS = 16


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    sequence: int
    new_tokens: int
    style: str
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads if self.style == "llama" else self.heads  # GPT-2 has one key/value head per query head

    @property
    def intermediate(self) -> int:
        # Llama's SwiGLU width 8/3 d rounded down to a multiple of 8 (compare_native.py's), GPT-2's 4 d.
        return int(8 * self.hidden / 3) // 8 * 8 if self.style == "llama" else 4 * self.hidden

    @property
    def max_positions(self) -> int:
        return max(512, 2 * self.sequence)


def shape_of(size: str, style: str, **overrides) -> Shape:
    return Shape(*SIZES[size], style=style, **overrides)


@dataclass
class Peer:
    """One library's model and the calls the benchmark times, each in the library's own way."""

    library: str
    model: torch.nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> next-token loss, in training mode
    logits: Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> logits (B, T, V)
    generate: Callable[[torch.Tensor, int], torch.Tensor]  # prompt (B, P), n -> greedy new tokens (B, n)
    notes: list[str] = field(default_factory=list)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1, the last position nothing (the tokens the Blueprint scores). The targets are
    shifted, not the logits, as litgpt's and x-transformers' training scripts do it: slicing the logits would copy
    them (and zero-fill their gradient), a cost those libraries do not pay."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------------------------------------------
# The three libraries
# ---------------------------------------------------------------------------------------------------------------------


def missing_library(library: str) -> str | None:
    """Why `library` cannot be benchmarked here, or None when it can."""
    module = {"litgpt": "litgpt.model", "x-transformers": "x_transformers"}.get(library)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as error:
        return (f"{library} is not installed ({error}); `pip install -e '.[bench]'` installs x-transformers and "
                f"litgpt's dependencies, then `pip install --no-deps litgpt==0.5.13` litgpt itself (its pins conflict "
                f"with transformers 5, pyproject.toml)")
    return None


def blueprint_config(shape: Shape) -> hf_blueprint.BlueprintDecoderConfig:
    # Generation runs to a fixed length: no end-of-sequence token.
    common = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.key_value_heads, intermediate_size=shape.intermediate,
                  vocab_size=shape.vocab, max_position_embeddings=shape.max_positions, tie_word_embeddings=False,
                  layer_norm_eps=shape.norm_eps, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if shape.style == "llama":
        return hf_blueprint.BlueprintDecoderConfig.from_preset("llama-135m", **common)
    # GPT-2 with exact GELU: x-transformers has no tanh approximation.
    return hf_blueprint.BlueprintDecoderConfig.from_preset(
        "gpt2", **common, hidden_act="gelu", hidden_dropout_prob=0.0, attention_dropout=0.0)


def build_blueprint(shape: Shape) -> Peer:
    model = hf_blueprint.BlueprintDecoderForCausalLM(blueprint_config(shape))
    model.set_attn_implementation("sdpa")

    def generate(prompt, new_tokens):
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return output[:, prompt.shape[1]:]

    return Peer("blueprint", model, loss=lambda ids: model(input_ids=ids, labels=ids).loss,
                logits=lambda ids: model(input_ids=ids).logits, generate=generate)


def build_litgpt(shape: Shape) -> Peer:
    from litgpt.config import Config
    from litgpt.generate.base import batched_generate_fn, generate as litgpt_generate
    from litgpt.model import GPT

    llama = shape.style == "llama"
    config = Config(
        name=f"bench-{shape.style}", block_size=shape.max_positions, vocab_size=shape.vocab,
        padded_vocab_size=shape.vocab, n_layer=shape.layers, n_head=shape.heads, n_embd=shape.hidden,
        n_query_groups=shape.key_value_heads, head_size=shape.head_dim, intermediate_size=shape.intermediate,
        parallel_residual=False, bias=not llama, norm_eps=shape.norm_eps,
        norm_class_name="RMSNorm" if llama else "LayerNorm", mlp_class_name="LLaMAMLP" if llama else "GptNeoxMLP",
        gelu_approximate="none",
        # litgpt has no learned position table: its GPT-2-style model rotates no dimension (rotary_percentage 0),
        # which leaves it without positions at all, one addition cheaper per forward than the table.
        rotary_percentage=1.0 if llama else 0.0, rope_base=10000,
    )
    model = GPT(config)
    model.apply(model._init_weights)

    def generate(prompt, new_tokens):
        batch, length = prompt.shape
        total = length + new_tokens
        # litgpt's LLM.generate sets the cache up for each call too (sized for this generation).
        model.set_kv_cache(batch_size=batch, max_seq_length=total, device=prompt.device)
        try:
            if batch == 1:
                tokens = litgpt_generate(model, prompt[0], max_returned_tokens=total, temperature=0.0,
                                         include_prompt=False)
                return tokens.view(1, -1)
            steps = list(batched_generate_fn(model, prompt, max_returned_tokens=total,
                                             sample_args={"temperature": 0.0}, include_prompt=False,
                                             include_eos=False))
            return torch.stack([torch.cat(step) for step in steps], dim=1)
        finally:
            model.clear_kv_cache()

    notes = [] if llama else [
        f"litgpt: no learned position table (no such switch; RoPE on 0% of the dimensions instead): "
        f"{shape.max_positions * shape.hidden:,} parameters fewer"]
    return Peer("litgpt", model, loss=lambda ids: next_token_loss(model(ids), ids), logits=lambda ids: model(ids),
                generate=generate, notes=notes)


def build_x_transformers(shape: Shape) -> Peer:
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
    from x_transformers.x_transformers import GLU

    llama = shape.style == "llama"
    model = TransformerWrapper(
        num_tokens=shape.vocab, max_seq_len=shape.max_positions, use_abs_pos_emb=not llama, tie_embedding=False,
        attn_layers=Decoder(
            dim=shape.hidden, depth=shape.layers, heads=shape.heads, attn_dim_head=shape.head_dim,
            attn_kv_heads=shape.key_value_heads, attn_flash=True,  # flash: torch's scaled_dot_product_attention
            rotary_pos_emb=llama, rotary_emb_dim=shape.head_dim,  # rotate the whole head, as Llama (default: half)
            use_rmsnorm=llama, ff_glu=llama, ff_swish=llama, ff_mult=shape.intermediate / shape.hidden,
            ff_no_bias=llama, verbose=False,
        ),
    )
    for module in model.modules():
        if isinstance(module, GLU):  # x-transformers' GLU projection always has a bias; Llama's has none
            module.proj.register_parameter("bias", None)
    wrapper = AutoregressiveWrapper(model)

    def generate(prompt, new_tokens):
        return wrapper.generate(prompt, new_tokens, temperature=0.0, cache_kv=True)

    notes = [] if llama else [
        f"x-transformers: no biases in attention and LayerNorm (no such switches): "
        f"{x_transformers_missing_gpt2_biases(shape):,} parameters fewer"]
    return Peer("x-transformers", model, loss=lambda ids: next_token_loss(model(ids), ids),
                logits=lambda ids: model(ids), generate=generate, notes=notes)


def x_transformers_missing_gpt2_biases(shape: Shape) -> int:
    """The query, key, value and output biases of each layer and the bias of each LayerNorm (two a layer, one final)."""
    return 4 * shape.hidden * shape.layers + (2 * shape.layers + 1) * shape.hidden


def expected_parameter_difference(library: str, shape: Shape) -> int:
    """Blueprint's parameter count minus the peer's at the same shape: what the peer's missing switches leave out."""
    if shape.style == "llama" or library == "blueprint":
        return 0
    if library == "litgpt":
        return shape.max_positions * shape.hidden
    return x_transformers_missing_gpt2_biases(shape)


BUILDERS = {"blueprint": build_blueprint, "litgpt": build_litgpt, "x-transformers": build_x_transformers}


def build(library: str, shape: Shape, device: str, dtype: torch.dtype) -> Peer:
    torch.manual_seed(0)
    peer = BUILDERS[library](shape)
    peer.model.to(device=device, dtype=dtype)
    return peer


# ---------------------------------------------------------------------------------------------------------------------
# Weight copies: the same function in each library (the smoke test checks the logits agree)
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def copy_blueprint_into_litgpt(blueprint, litgpt_model) -> None:
    """Blueprint weights into litgpt's GPT of the same shape (Llama-style, or GPT-2-style without positions):
    q, k, v stacked into litgpt's one qkv projection; gate/up/down are fc_1/fc_2/proj."""
    source, target = blueprint.model, litgpt_model.transformer
    target.wte.weight.copy_(source.embed_tokens.weight)
    for layer, block in zip(source.layers, target.h):
        attention = layer.self_attn
        _copy_linear(block.attn.qkv, [attention.q_proj, attention.k_proj, attention.v_proj])
        _copy_linear(block.attn.proj, [attention.o_proj])
        _copy_norm(block.norm_1, layer.self_attn_norm)
        _copy_norm(block.norm_2, layer.mlp_norm)
        mlp = layer.mlp
        if mlp.gate_proj is not None:
            _copy_linear(block.mlp.fc_1, [mlp.gate_proj])
            _copy_linear(block.mlp.fc_2, [mlp.up_proj])
        else:
            _copy_linear(block.mlp.fc, [mlp.up_proj])
        _copy_linear(block.mlp.proj, [mlp.down_proj])
    _copy_norm(target.ln_f, source.norm)
    litgpt_model.lm_head.weight.copy_(blueprint.lm_head.weight)


@torch.no_grad()
def copy_blueprint_into_x_transformers(blueprint, wrapper) -> None:
    """Blueprint weights into x-transformers' TransformerWrapper of the same shape. Its rotary embedding rotates
    interleaved pairs (2i, 2i + 1) where Llama's rotates (i, i + d/2): the query and key rows of each head are
    permuted to match (attention scores are unchanged by a permutation applied to both), and the query heads are
    reordered for its grouping of query heads under a key/value head (below). Its GLU projection is
    [up; gate]; its absolute positions are scaled by d^-1/2, so the table is copied times d^1/2."""
    source = blueprint.model
    config = blueprint.config
    head_dim = config.head_dim
    half = head_dim // 2
    interleave = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
    rotary = config.position_embedding_type == "rope"
    groups = config.num_key_value_heads
    per_group = config.num_attention_heads // groups
    query_heads = [(head % groups) * per_group + head // groups for head in range(config.num_attention_heads)]
    wrapper.token_emb.emb.weight.copy_(source.embed_tokens.weight)
    if config.position_embedding_type == "learned":
        wrapper.pos_emb.emb.weight.copy_(source.embed_positions.weight * config.hidden_size**0.5)
    layers = wrapper.attn_layers.layers
    for index, layer in enumerate(source.layers):
        (attention_norm, *_), attention, _ = layers[2 * index]
        (mlp_norm, *_), feed_forward, _ = layers[2 * index + 1]
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        if rotary:
            q = q.view(-1, head_dim, q.shape[1])[:, interleave].reshape(q.shape)
            k = k.view(-1, head_dim, k.shape[1])[:, interleave].reshape(k.shape)
        # Query heads in x-transformers' order: its grouped-query attention tiles the key/value heads (query head j
        # reads key/value head j mod G) where Llama repeats each (query head j reads head j div (H / G)).
        q = q.view(config.num_attention_heads, head_dim, -1)[query_heads].reshape(q.shape)
        output = layer.self_attn.o_proj.weight
        heads_of_output = output.view(output.shape[0], config.num_attention_heads, head_dim)
        output = heads_of_output[:, query_heads].reshape(output.shape)
        attention.to_q.weight.copy_(q)
        attention.to_k.weight.copy_(k)
        attention.to_v.weight.copy_(layer.self_attn.v_proj.weight)
        attention.to_out.weight.copy_(output)
        _copy_x_transformers_norm(attention_norm, layer.self_attn_norm)
        _copy_x_transformers_norm(mlp_norm, layer.mlp_norm)
        mlp = layer.mlp
        linears = [m for m in feed_forward.modules() if isinstance(m, torch.nn.Linear)]
        if mlp.gate_proj is not None:
            _copy_linear(linears[0], [mlp.up_proj, mlp.gate_proj])
        else:
            _copy_linear(linears[0], [mlp.up_proj])
        _copy_linear(linears[-1], [mlp.down_proj])
    _copy_x_transformers_norm(wrapper.attn_layers.final_norm, source.norm)
    wrapper.to_logits.weight.copy_(blueprint.lm_head.weight)


def _copy_linear(target: torch.nn.Linear, sources: list[torch.nn.Linear]) -> None:
    target.weight.copy_(torch.cat([s.weight for s in sources]))
    if target.bias is not None:
        target.bias.copy_(torch.cat([s.bias for s in sources]))


def _copy_norm(target, source) -> None:
    target.weight.copy_(source.weight)
    if getattr(target, "bias", None) is not None:
        target.bias.copy_(source.bias)


def _copy_x_transformers_norm(target, source) -> None:
    # x-transformers' decoders store norm gains as offsets from 1 (unit_offset): the gain is the parameter + 1.
    offset = float(getattr(target, "unit_offset", False))
    (target.g if hasattr(target, "g") else target.gamma).copy_(source.weight - offset)


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def training_step(peer: Peer, input_ids: torch.Tensor):
    optimizer = torch.optim.AdamW(peer.model.parameters(), lr=1e-4)

    def step():
        peer.model.train()
        peer.loss(input_ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def forward_pass(peer: Peer, input_ids: torch.Tensor):
    def forward():
        peer.model.eval()
        with torch.no_grad():
            peer.logits(input_ids)

    return forward


def generation(peer: Peer, prompt: torch.Tensor, new_tokens: int):
    def generate():
        peer.model.eval()
        with torch.no_grad():
            tokens = peer.generate(prompt, new_tokens)
        if tokens.shape != (prompt.shape[0], new_tokens):
            raise RuntimeError(f"{peer.library} generated {tuple(tokens.shape)} tokens, expected "
                               f"{(prompt.shape[0], new_tokens)}")

    return generate


def example_ids(shape: Shape, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, shape.vocab, (shape.batch, shape.sequence), generator=generator).to(device)


def prompt_of(input_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` prompts of PROMPT_TOKENS tokens (the first rows of the batch, repeated when the batch is smaller)."""
    prompt = input_ids[:, :PROMPT_TOKENS]
    repeats = -(-batch // prompt.shape[0])
    return prompt.repeat(repeats, 1)[:batch]


def cpu_step_peak_mib(peer: Peer, input_ids: torch.Tensor) -> float:
    """Peak resident-set growth during one training step with a fresh optimizer (compare_native.py's method)."""
    return cpu_peak_mib_of(training_step(peer, input_ids))


def cpu_peak_memory_in_subprocess(size: str, styles: list[str], libraries: list[str]) -> dict:
    """Each (style, library)'s training-step peak, measured in one fresh process with EXACT_MALLOC, one model after
    the other, each after a warm-up step of its own: freed memory goes back to the system, so the growth of the
    resident set during a step is that step's own."""
    result = subprocess.run([sys.executable, __file__, "--size", size, "--styles", ",".join(styles), "--libraries",
                             ",".join(libraries), "--memory-child"], env={**os.environ, **EXACT_MALLOC},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_child(size: str, styles: list[str], libraries: list[str]) -> None:
    peaks = {}
    for style in styles:
        shape = shape_of(size, style)
        input_ids = example_ids(shape, "cpu")
        for library in libraries:
            peer = build(library, shape, "cpu", torch.float32)
            cpu_step_peak_mib(peer, input_ids)  # warm-up: lazy initialisation inside torch and the library
            peaks[f"{style}/{library}"] = cpu_step_peak_mib(peer, input_ids)
            del peer
            gc.collect()
    print(json.dumps(peaks))


def cuda_peak_memory_mib(peer: Peer, input_ids: torch.Tensor, device: str) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    training_step(peer, input_ids)()
    return torch.cuda.max_memory_allocated(device) / 2**20


def run(size: str, repeats: int, styles: list[str], libraries: list[str], device: str, dtype: torch.dtype) -> dict:
    rows, notes, skipped, parameters = [], [], {}, []
    for library in libraries:
        reason = missing_library(library)
        if reason is not None:
            skipped[library] = reason
    present = [library for library in libraries if library not in skipped]
    for style in styles:
        shape = shape_of(size, style)
        peers = {library: build(library, shape, device, dtype) for library in present}
        for library, peer in peers.items():
            parameters.append({"style": style, "library": library, "parameters": peer.num_parameters(),
                               "expected_difference": expected_parameter_difference(library, shape)})
            notes += [f"{style}: {note}" for note in peer.notes]
        input_ids = example_ids(shape, device)
        tokens = shape.batch * shape.sequence

        def record(measure, values, unit, per_second_of=None):
            for library, measured in values.items():
                value = per_second_of / measured if per_second_of else measured
                rows.append({"style": style, "measure": measure, "library": library, "value": value, "unit": unit})

        seconds = interleaved({name: training_step(peer, input_ids) for name, peer in peers.items()}, repeats, device)
        record("training step", seconds, "tokens/s", per_second_of=tokens)
        seconds = interleaved({name: forward_pass(peer, input_ids) for name, peer in peers.items()}, repeats, device)
        record("inference forward", {name: 1000 * value for name, value in seconds.items()}, "ms")
        for batch in (1, 8):
            prompt = prompt_of(input_ids, batch)
            seconds = interleaved({name: generation(peer, prompt, shape.new_tokens) for name, peer in peers.items()},
                                  repeats, device)
            record(f"greedy generation, batch {batch}", seconds, "tokens/s", per_second_of=batch * shape.new_tokens)
        if device.startswith("cuda"):
            peaks = {name: cuda_peak_memory_mib(peer, input_ids, device) for name, peer in peers.items()}
            record("training step peak memory", peaks, "MiB")
        del peers
        gc.collect()
    if not device.startswith("cuda") and present:
        peaks = cpu_peak_memory_in_subprocess(size, styles, present)
        rows += [{"style": style, "measure": "training step peak memory", "library": library,
                  "value": peaks[f"{style}/{library}"], "unit": "MiB"} for style in styles for library in present]
    return {"rows": rows, "parameters": parameters, "notes": notes, "skipped": skipped}


def operator_profile(size: str, styles: list[str], libraries: list[str], rows: int) -> str:
    """torch.profiler's operator table (self CPU time) of one training step and of one batch-1 generation per
    library, after a warm-up call: where a library's time goes, side by side."""
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for style in styles:
        shape = shape_of(size, style)
        input_ids = example_ids(shape, "cpu")
        for measure, make in (("one training step", lambda peer: training_step(peer, input_ids)),
                              ("one batch-1 generation", lambda peer: generation(peer, prompt_of(input_ids, 1),
                                                                                shape.new_tokens))):
            for library in libraries:
                peer = build(library, shape, "cpu", torch.float32)
                call = make(peer)
                call()
                with profile(activities=[ProfilerActivity.CPU]) as profiler:
                    call()
                events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
                total_ms = sum(event.self_cpu_time_total for event in events) / 1000
                lines += ["", f"#### {style}, {LIBRARY_NAMES[library]}: {measure}, {total_ms:.1f} ms of operator "
                          f"self time, top {rows} operators", "",
                          "| operator | calls | self CPU ms | share |", "| --- | ---: | ---: | ---: |"]
                for event in events[:rows]:
                    ms = event.self_cpu_time_total / 1000
                    lines.append(f"| `{event.key}` | {event.count} | {ms:.2f} | {ms / total_ms:.1%} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def markdown(result: dict, libraries: list[str], header: str) -> str:
    present = [library for library in libraries if library not in result["skipped"]]
    peers = [library for library in present if library != "blueprint"]
    lines = [header, ""]
    for library, reason in result["skipped"].items():
        lines.append(f"Skipped {LIBRARY_NAMES[library]}: {reason}.")
    if result["skipped"]:
        lines.append("")
    lines += ["Parameters at the benchmark's shape (untied embeddings in every library):", "",
              "| style | library | parameters | Blueprint minus this | explained by |",
              "| --- | --- | ---: | ---: | --- |"]
    counts = {(p["style"], p["library"]): p for p in result["parameters"]}
    for (style, library), entry in counts.items():
        difference = counts[(style, "blueprint")]["parameters"] - entry["parameters"] \
            if (style, "blueprint") in counts else 0
        explained = "same model" if entry["expected_difference"] == 0 else "the switches it lacks (notes below)"
        lines.append(f"| {style} | {LIBRARY_NAMES[library]} | {entry['parameters']:,} | {difference:,} | {explained} |")
    if result["notes"]:
        lines += [""] + [f"- {note}" for note in result["notes"]]
    if "blueprint" in present:
        ratio_columns = [f"Blueprint / {LIBRARY_NAMES[p]}" for p in peers]
        lines += ["", "Ratios are Blueprint / peer: above 1 is better for tokens/s, below 1 is better for ms and MiB.",
                  ""]
    else:
        ratio_columns = []
    names = [LIBRARY_NAMES[library] for library in present]
    lines += ["| style | measure | unit | " + " | ".join(names + ratio_columns) + " |",
              "| --- | --- | --- |" + " ---: |" * (len(names) + len(ratio_columns))]
    keyed = {(r["style"], r["measure"], r["library"]): r["value"] for r in result["rows"]}
    units = {(r["style"], r["measure"]): r["unit"] for r in result["rows"]}
    for style, measure in units:
        values = [keyed[(style, measure, library)] for library in present]
        cells = [f"{value:.4g}" for value in values]
        if "blueprint" in present:
            blueprint = keyed[(style, measure, "blueprint")]
            for peer in peers:
                value = keyed[(style, measure, peer)]
                cells.append(f"{blueprint / value:.3f}" if value else "nan")
        lines.append(f"| {style} | {measure} | {units[(style, measure)]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_measurement_arguments(parser, SIZES, "library")
    parser.add_argument("--styles", default=",".join(STYLES), help="comma-separated subset of llama,gpt2")
    parser.add_argument("--libraries", default=",".join(LIBRARIES),
                        help="comma-separated subset of blueprint,litgpt,x-transformers")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also list the top N operators (torch.profiler) of a training step and a batch-1 "
                             "generation per library (CPU)")
    args = parser.parse_args(argv)
    styles, libraries = args.styles.split(","), args.libraries.split(",")
    for value, valid, flag in ((styles, STYLES, "--styles"), (libraries, LIBRARIES, "--libraries")):
        unknown = [v for v in value if v not in valid]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(valid)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    size = args.size or ("gpu" if args.device.startswith("cuda") else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(size, styles, libraries)
        return 0
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    load_before = machine_load()
    result = run(size, args.repeats, styles, libraries, args.device, dtype)
    machine = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    versions = ", ".join(f"{name} {version}" for name, version in library_versions().items())
    hidden, layers, heads, kv_heads, vocab, batch, sequence, new_tokens = SIZES[size]
    header = (f"Blueprint vs litgpt and x-transformers, size `{size}`: hidden {hidden}, {layers} layers, {heads} heads "
              f"({kv_heads} key/value heads for Llama), vocabulary {vocab}, batch {batch} x {sequence} tokens, "
              f"{new_tokens} new tokens after a {PROMPT_TOKENS}-token prompt; {dtype}, {args.repeats} repeats "
              f"(median), {machine}, {versions}, {datetime.date.today().isoformat()}, load average {load_before} "
              f"before / {machine_load()} after")
    text = markdown(result, libraries, header)
    if args.profile:
        present = [library for library in libraries if library not in result["skipped"]]
        text += "\n### Where the time goes: operator profiles" + operator_profile(size, styles, present, args.profile)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"torch": torch.__version__}
    for package in ("transformers", "litgpt", "x-transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


if __name__ == "__main__":
    raise SystemExit(main())
