"""Export a Blueprint model to run without PyTorch's eager mode: ONNX (onnxruntime or any ONNX runtime) and
torch.export with a static key/value cache (the ExecuTorch path).

    python -m hf_blueprint.export onnx FOLDER OUT [--dtype float32|float16] [--overwrite]
    python -m hf_blueprint.export executorch FOLDER OUT [--max-cache-len 128] [--overwrite]

FOLDER is a saved Blueprint model (or a Hub repo id). OUT must be new or empty unless --overwrite. Everything is
written inside OUT: first into a hidden staging folder there, moved into place only once the check below has
passed, so that a failed export leaves OUT as it was. OUT also gets the model's config.json,
generation_config.json and tokenizer files, which the runners below read.

ONNX, with torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`; optimum cannot be installed next to
transformers 5). One graph per head, named inputs and outputs, dynamic batch and sequence axes:

    head                                  file                inputs -> outputs
    BlueprintEncoderModel / DecoderModel  model.onnx          input_ids, attention_mask[, token_type_ids]
                                                              -> last_hidden_state[, pooler_output]
    masked LM, sequence and token         model.onnx          input_ids, attention_mask[, token_type_ids] -> logits
    classifiers (encoder or decoder)
    BlueprintDecoderForCausalLM           model.onnx          input_ids, attention_mask, past_key_values.{i}.key,
                                                              past_key_values.{i}.value
                                                              -> logits, present.{i}.key, present.{i}.value
    BlueprintForConditionalGeneration     encoder_model.onnx  input_ids, attention_mask -> last_hidden_state
                                          decoder_model.onnx  decoder_input_ids, encoder_hidden_states,
                                                              encoder_attention_mask, past_key_values.{i}.key/.value
                                                              -> logits, present.{i}.key/.value

The decoders' `past_key_values.*` may have length 0: one graph runs the prompt and then every step, with
`present.*` fed back as the next step's past. The causal LM's `attention_mask` covers the past and the new tokens
(as in `generate()`; left padding works); key/value tensors are (batch, key/value heads, length, head_dim). With a
sliding window the cache keeps every key and the window is applied by the mask: same numbers, longer cache. The
encoder-decoder's decoder recomputes the cross-attention keys and values from `encoder_hidden_states` at each step
(its past holds the self-attention only).

After export each graph runs in onnxruntime on inputs of other shapes than the ones it was traced with (padding, an
empty past and a non-empty one) and is compared with PyTorch in the same dtype; the max abs diff is printed, and
above the tolerance (fp32: 1e-4, fp16: 1e-2, each plus the same fraction of the largest reference value) the export
fails and nothing is written. `onnx_generate(OUT, input_ids)` decodes greedily with onnxruntime and returns the
tokens `model.generate(input_ids, do_sample=False)` returns.

ExecuTorch / torch.export with a static cache, through transformers' own wrappers (exported with strict=True, their
default: a strict=False program of these wrappers fails `run_decompositions()`, which ExecuTorch's lowering calls, on
torch 2.13, for transformers' Llama too): `TorchExportableModuleForDecoderOnlyLM` for the causal LM (OUT/model.pt2:
input_ids (1, 1) and cache_position (1,) -> logits (1, 1, vocab), one token per call, batch 1, a StaticCache of
--max-cache-len positions) and `Seq2SeqLMExportableModule` for the encoder-decoder (OUT/encoder.pt2: input_ids ->
hidden states; OUT/decoder.pt2: decoder_input_ids (1, 1), encoder_hidden_states, cache_position -> logits; batch 1,
no source padding). With --pte (needs the `executorch` package, not a dependency of this project) each program is
also lowered to an ExecuTorch `.pte` file with the XNNPACK backend. The check runs the saved programs (and the `.pte`
files in ExecuTorch's runtime) greedily on a sample prompt and compares their tokens with `generate()`'s.
`static_cache_generate(OUT, input_ids, runtime="pt2" | "pte")` runs them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from transformers import AutoConfig, AutoTokenizer, DynamicCache, EncoderDecoderCache, GenerationConfig

import hf_blueprint

from .configuration_blueprint import BlueprintDecoderConfig, BlueprintEncoderConfig, BlueprintSeq2SeqConfig


__all__ = ["ExportError", "export_executorch", "export_onnx", "lower_to_executorch", "main", "onnx_generate",
           "static_cache_generate"]

INSTALL_HINT = 'pip install "hf_blueprint[use]" (or: pip install onnx onnxscript onnxruntime)'
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# The check's tolerance: max |onnx - torch| <= atol + rtol * max |torch|, per dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
# Heads whose ONNX graph is one forward pass without a cache, and the outputs it returns.
FORWARD_HEADS = {
    "BlueprintEncoderModel": ("last_hidden_state", "pooler_output"),
    "BlueprintDecoderModel": ("last_hidden_state",),
    "BlueprintEncoderForMaskedLM": ("logits",),
    "BlueprintEncoderForSequenceClassification": ("logits",),
    "BlueprintEncoderForTokenClassification": ("logits",),
    "BlueprintDecoderForSequenceClassification": ("logits",),
}
CAUSAL_LM, SEQ2SEQ = "BlueprintDecoderForCausalLM", "BlueprintForConditionalGeneration"
PROGRAM_FILES = {CAUSAL_LM: ("model.pt2",), SEQ2SEQ: ("encoder.pt2", "decoder.pt2")}


class ExportError(ValueError):
    """The export cannot be done: the input is not a Blueprint model, an argument is out of range, the output folder
    is not offered for writing, or the exported graph does not reproduce PyTorch."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading and the output folder
# ---------------------------------------------------------------------------------------------------------------------


def blueprint_architecture(model_id) -> str:
    """The Blueprint class that `model_id` (a folder or a Hub repo id) names in its config, read without loading any
    weight; an ExportError naming MODEL when it is not an exportable Blueprint model."""
    path = Path(model_id)
    if path.is_absolute() or str(model_id).startswith((".", "~")) or path.exists():
        if not path.is_dir():
            raise ExportError(f"MODEL {model_id}: no such folder.")
        if not (path / "config.json").is_file():
            raise ExportError(f"MODEL {model_id}: not a model folder (no config.json in it).")
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise ExportError(f"MODEL {model_id}: cannot read its config ({' '.join(str(error).split())}).") from None
    blueprint_types = [config_class.model_type
                       for config_class in (BlueprintEncoderConfig, BlueprintDecoderConfig, BlueprintSeq2SeqConfig)]
    if config.model_type not in blueprint_types:
        raise ExportError(f"MODEL {model_id}: model_type {config.model_type!r} is not a Blueprint model (expected one "
                          f"of {', '.join(blueprint_types)}).")
    architectures = list(config.architectures or [])
    name = architectures[0] if architectures else None
    if name not in (*FORWARD_HEADS, CAUSAL_LM, SEQ2SEQ):
        raise ExportError(f"MODEL {model_id}: config.json names the architecture {name!r}; the exporter takes "
                          f"{', '.join((*FORWARD_HEADS, CAUSAL_LM, SEQ2SEQ))}.")
    return name


def load_blueprint_model(model_id, name: str, dtype: torch.dtype = torch.float32):
    """The model of `model_id` as the class `name` (see `blueprint_architecture`), in eval mode."""
    return getattr(hf_blueprint, name).from_pretrained(model_id, dtype=dtype).eval()


def check_output_folder(out: Path, model_id, overwrite: bool):
    """Refuses, before anything is loaded, an output that is a file, the model folder itself, or a folder with
    files in it (unless `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT {out} exists and is not a folder.")
    if Path(model_id).exists() and out.resolve() == Path(model_id).resolve():
        raise ExportError(f"OUT {out} is the model folder MODEL; export into another folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"OUT {out} is not empty; pass --overwrite (overwrite=True) to write the exported files "
                          f"there (files of the same name are replaced, others are kept).")


class StagedOutput:
    """Files are written into a hidden folder inside OUT and moved into OUT only when `publish()` is called; on an
    error everything written (and OUT itself, if this created it) goes. Nothing is written outside OUT."""

    def __init__(self, out: Path):
        self.out, self.created = out, not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        self.staging = out / f".export-{secrets.token_hex(4)}"
        self.staging.mkdir()

    def publish(self):
        for entry in sorted(self.staging.iterdir()):
            target = self.out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)  # replaces a link itself, never what it points to

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, error_type, error, traceback):
        shutil.rmtree(self.staging, ignore_errors=True)
        if error_type is not None and self.created and not any(self.out.iterdir()):
            self.out.rmdir()
        return False


def save_model_files(model, model_id, folder: Path):
    """The config, generation config and tokenizer beside the graphs: the runners read them."""
    model.config.to_json_file(folder / "config.json")  # not save_pretrained: it would copy the code files too
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError):
        print(f"note: MODEL {model_id} has no tokenizer; only the model files were written.")
        return
    tokenizer.save_pretrained(folder)


def _load_config_files(folder: Path):
    config = AutoConfig.from_pretrained(folder)
    generation_config = GenerationConfig.from_pretrained(folder)
    return config, generation_config


# ---------------------------------------------------------------------------------------------------------------------
# ONNX: the modules that are exported (tensors in, tensors out: no Cache object crosses the graph's boundary)
# ---------------------------------------------------------------------------------------------------------------------


def cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def _cache_from_tensors(past: tuple[torch.Tensor, ...]) -> DynamicCache:
    # Full (non-sliding) layers on purpose: the mask applies a sliding window, and the cache's length stays
    # past + new, which the graph's outputs promise.
    cache = DynamicCache()
    for layer in range(len(past) // 2):
        cache.update(past[2 * layer], past[2 * layer + 1], layer)
    return cache


def _cache_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


class ForwardForOnnx(nn.Module):
    """A head without a cache: the outputs of `output_names`, in that order."""

    def __init__(self, model, output_names: tuple[str, ...]):
        super().__init__()
        self.model, self.output_names = model, output_names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        return tuple(outputs[name] for name in self.output_names)


class CausalLMWithPastForOnnx(nn.Module):
    """The causal LM as one step of generation: new tokens and the past keys/values in, logits and the past extended
    by the new tokens out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=_cache_from_tensors(past),
                             use_cache=True, return_dict=True)
        return (outputs.logits, *_cache_tensors(outputs.cache))


class Seq2SeqEncoderForOnnx(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder = model.get_encoder()

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class Seq2SeqDecoderWithPastForOnnx(nn.Module):
    """One decoding step of the encoder-decoder: the self-attention past in and out; the cross-attention keys and
    values are computed from `encoder_hidden_states` in the step (an empty cross-attention cache each call)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        cache = EncoderDecoderCache(_cache_from_tensors(past), DynamicCache())
        outputs = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                             decoder_input_ids=decoder_input_ids, cache=cache, use_cache=True, return_dict=True)
        return (outputs.logits, *_cache_tensors(outputs.cache.self_attention_cache))


class Graph:
    """One ONNX graph to write: the module, its named inputs and outputs, example inputs to trace with, the dynamic
    axes by input, and the inputs of the check."""

    def __init__(self, file_name, module, input_names, output_names, example, dynamic_shapes, check_cases):
        self.file_name, self.module = file_name, module
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.example, self.dynamic_shapes, self.check_cases = example, dynamic_shapes, check_cases


class CheckCase:
    """Inputs of the check, and which positions of its outputs hold real tokens: `query_mask` (batch, new tokens)
    for logits and hidden states, `key_mask` (batch, past + new) for the `present.*` caches. A padded position's
    output is not compared: the model never reads it (a left-padded position of a decoder attends to nothing, and
    PyTorch and onnxruntime fill such a row differently)."""

    def __init__(self, inputs: tuple, query_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None):
        self.inputs, self.query_mask, self.key_mask = inputs, query_mask, key_mask

    def real_positions(self, name: str, array):
        if name.startswith("present.") and self.key_mask is not None:
            return array.transpose(0, 2, 1, 3)[self.key_mask.bool().numpy()]
        if name in ("logits", "last_hidden_state") and array.ndim == 3 and self.query_mask is not None:
            return array[self.query_mask.bool().numpy()]
        return array


def _random_ids(config, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


def _padded(ids: torch.Tensor, lengths: list[int], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` with row i keeping `lengths[i]` real tokens, padded on the left or right, and the attention mask."""
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        if left:
            mask[row, ids.shape[1] - length:] = 1
        else:
            mask[row, :length] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


# Sizes of the traced example (all different and >= 2: torch.export would otherwise tie equal sizes together or
# specialize a size of 0 or 1) and of the check (other sizes again, an empty past included).
EXAMPLE_BATCH, EXAMPLE_PAST, EXAMPLE_NEW, EXAMPLE_SOURCE = 2, 5, 3, 7


def _empty_past(config, num_layers: int, batch: int, dtype) -> list[torch.Tensor]:
    shape = (batch, config.num_key_value_heads, 0, config.head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * num_layers)]


def _random_past(config, num_layers: int, batch: int, length: int, dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(2 * num_layers)]


def forward_head_graph(model, name: str) -> Graph:
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    outputs = tuple(output for output in FORWARD_HEADS[name] if output != "pooler_output" or model.pooler is not None)
    with_types = config.type_vocab_size > 0
    input_names = ["input_ids", "attention_mask", *(["token_type_ids"] if with_types else [])]
    left = config.is_causal  # decoders are padded on the left, encoders on the right

    def inputs(batch, length, seed):
        ids, mask = _padded(_random_ids(config, batch, length, seed), [length, *[length - 2] * (batch - 1)], pad, left)
        return (ids, mask, *([torch.zeros_like(ids)] if with_types else []))

    axes = {0: "batch", 1: "sequence_length"}
    dynamic = {name: axes for name in input_names}
    check = inputs(3, 4, 1)
    return Graph("model.onnx", ForwardForOnnx(model, outputs), input_names, outputs,
                 inputs(EXAMPLE_BATCH, EXAMPLE_SOURCE, 0), dynamic, [CheckCase(check, check[1])])


def causal_lm_graph(model) -> Graph:
    config, dtype = model.config, model.dtype
    layers = config.num_hidden_layers
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    past_names, present_names = cache_names(layers, "past_key_values"), cache_names(layers, "present")
    module = CausalLMWithPastForOnnx(model)

    ids, _ = _padded(_random_ids(config, EXAMPLE_BATCH, EXAMPLE_NEW, 0), [EXAMPLE_NEW] * EXAMPLE_BATCH, pad, True)
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_PAST + EXAMPLE_NEW, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row: the mask is traced as data, not assumed all ones
    example = (ids, mask, *_random_past(config, layers, EXAMPLE_BATCH, EXAMPLE_PAST, dtype, 0))
    past_axes = {0: "batch", 2: "past_sequence_length"}
    dynamic = {"input_ids": {0: "batch", 1: "sequence_length"},
               "attention_mask": {0: "batch", 1: "total_sequence_length"},
               "past": tuple(past_axes for _ in past_names)}

    # The check: a left-padded prompt with an empty past, then two more tokens after the prompt's own past.
    prompt, prompt_mask = _padded(_random_ids(config, 3, 6, 1), [6, 4, 1], pad, True)
    first = (prompt, prompt_mask, *_empty_past(config, layers, 3, dtype))
    with torch.no_grad():
        prompt_past = module(*first)[1:]
    following = _random_ids(config, 3, 2, 2)
    second = (following, torch.cat([prompt_mask, torch.ones_like(following)], 1), *prompt_past)
    cases = [CheckCase(first, prompt_mask, prompt_mask), CheckCase(second, second[1][:, -2:], second[1])]
    return Graph("model.onnx", module, ["input_ids", "attention_mask", *past_names], ["logits", *present_names],
                 example, dynamic, cases)


def seq2seq_graphs(model) -> list[Graph]:
    config, dtype = model.config, model.dtype
    layers = config.get_text_config(decoder=True).num_hidden_layers
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    past_names, present_names = cache_names(layers, "past_key_values"), cache_names(layers, "present")

    encoder = Seq2SeqEncoderForOnnx(model)
    source_axes = {0: "batch", 1: "encoder_sequence_length"}
    example_source = _padded(_random_ids(config, EXAMPLE_BATCH, EXAMPLE_SOURCE, 0), [EXAMPLE_SOURCE, 4], pad, False)
    source = _padded(_random_ids(config, 3, 5, 1), [5, 2, 4], pad, False)
    encoder_graph = Graph("encoder_model.onnx", encoder, ["input_ids", "attention_mask"], ["last_hidden_state"],
                          example_source, {"input_ids": source_axes, "attention_mask": source_axes},
                          [CheckCase(source, source[1])])

    decoder = Seq2SeqDecoderWithPastForOnnx(model)
    with torch.no_grad():
        example_states = encoder(*example_source)
        states = encoder(*source)
    example = (_random_ids(config, EXAMPLE_BATCH, EXAMPLE_NEW, 2), example_states, example_source[1],
               *_random_past(config, layers, EXAMPLE_BATCH, EXAMPLE_PAST, dtype, 0))
    past_axes = {0: "batch", 2: "past_sequence_length"}
    dynamic = {"decoder_input_ids": {0: "batch", 1: "sequence_length"},
               "encoder_hidden_states": {0: "batch", 1: "encoder_sequence_length"},
               "encoder_attention_mask": source_axes, "past": tuple(past_axes for _ in past_names)}
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
    first = (torch.full((3, 1), start if start is not None else 0), states, source[1],
             *_empty_past(config, layers, 3, dtype))
    with torch.no_grad():
        past = decoder(*first)[1:]
    second = (_random_ids(config, 3, 2, 3), states, source[1], *past)
    decoder_graph = Graph("decoder_model.onnx", decoder,
                          ["decoder_input_ids", "encoder_hidden_states", "encoder_attention_mask", *past_names],
                          ["logits", *present_names], example, dynamic, [CheckCase(first), CheckCase(second)])
    return [encoder_graph, decoder_graph]


def _import_onnx_tools():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's dynamo exporter translates with it)
    except ImportError as error:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({error}); {INSTALL_HINT}") from None
    return onnxruntime


def write_onnx_graph(graph: Graph, folder: Path) -> Path:
    path = folder / graph.file_name
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        program = torch.onnx.export(graph.module, graph.example, dynamo=True, input_names=graph.input_names,
                                    output_names=graph.output_names, dynamic_shapes=graph.dynamic_shapes,
                                    optimize=False, verbose=False)
    program.save(str(path))
    return path


def check_onnx_graph(graph: Graph, path: Path, dtype: torch.dtype) -> float:
    """Runs the graph in onnxruntime on the check inputs and compares every output with PyTorch's. Returns the max
    abs diff; raises ExportError above the tolerance or on a shape mismatch."""
    import numpy as np

    onnxruntime = _import_onnx_tools()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected_names = [node.name for node in session.get_inputs()]
    if expected_names != graph.input_names:
        raise ExportError(f"{graph.file_name}: the graph's inputs are {expected_names}, expected {graph.input_names}.")
    worst, tolerance = 0.0, TOLERANCE[dtype]
    for case in graph.check_cases:
        with torch.no_grad():
            reference = graph.module(*case.inputs)
        reference = reference if isinstance(reference, tuple) else (reference,)
        feed = {name: tensor.numpy() for name, tensor in zip(graph.input_names, case.inputs)}
        results = session.run(graph.output_names, feed)
        for name, want, got in zip(graph.output_names, reference, results):
            if tuple(got.shape) != tuple(want.shape):
                raise ExportError(f"{graph.file_name}: output {name} has shape {tuple(got.shape)} in onnxruntime, "
                                  f"{tuple(want.shape)} in PyTorch.")
            want = case.real_positions(name, want.double().numpy())
            got = case.real_positions(name, got)
            if want.size == 0:
                continue
            diff = float(np.abs(got.astype(np.float64) - want).max())
            if not np.isfinite(got).all() or diff > tolerance * (1.0 + float(np.abs(want).max())):
                raise ExportError(f"{graph.file_name}: output {name} differs from PyTorch by {diff:.3g} (max abs), "
                                  f"above the {dtype} tolerance {tolerance:g} x (1 + max |reference|); nothing was "
                                  f"written.")
            worst = max(worst, diff)
    return worst


def export_onnx(model_id, out, *, dtype: str = "float32", overwrite: bool = False) -> dict[str, float]:
    """Exports the Blueprint model `model_id` to ONNX graphs in `out` (see the module docstring) and returns the max
    abs diff against PyTorch of each graph, by file name."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}.")
    out = Path(out)
    name = blueprint_architecture(model_id)
    check_output_folder(out, model_id, overwrite)
    _import_onnx_tools()
    model = load_blueprint_model(model_id, name, DTYPES[dtype])
    if name == CAUSAL_LM:
        graphs = [causal_lm_graph(model)]
    elif name == SEQ2SEQ:
        graphs = seq2seq_graphs(model)
    else:
        graphs = [forward_head_graph(model, name)]
    diffs = {}
    with StagedOutput(out) as staged:
        for graph in graphs:
            path = write_onnx_graph(graph, staged.staging)
            diffs[graph.file_name] = check_onnx_graph(graph, path, DTYPES[dtype])
            print(f"{graph.file_name}: inputs {', '.join(graph.input_names)}; outputs "
                  f"{', '.join(graph.output_names)}; max abs diff vs PyTorch ({dtype}): {diffs[graph.file_name]:.3g}")
        save_model_files(model, model_id, staged.staging)
        staged.publish()
    return diffs


# ---------------------------------------------------------------------------------------------------------------------
# Greedy decoding with onnxruntime
# ---------------------------------------------------------------------------------------------------------------------


def _greedy_step(logits, finished, eos_ids: list[int], pad_id: int):
    import numpy as np

    next_tokens = logits[:, -1, :].argmax(-1)
    next_tokens = np.where(finished, pad_id, next_tokens)  # a finished row only pads, as in generate()
    finished = finished | np.isin(next_tokens, eos_ids)
    return next_tokens[:, None].astype(np.int64), finished


def _stop_tokens(generation_config) -> tuple[list[int], int]:
    eos = generation_config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = generation_config.pad_token_id
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    return eos_ids, pad


def onnx_generate(folder, input_ids, attention_mask=None, max_new_tokens: int = 20):
    """Greedy decoding with onnxruntime on the graphs `export_onnx` wrote in `folder` (a causal LM or an
    encoder-decoder): the tokens `model.generate(input_ids, attention_mask=..., max_new_tokens=...,
    do_sample=False)` returns (prompt + new tokens for a causal LM, start token + new tokens for an encoder-decoder),
    stopping at the generation config's EOS as generate() does. Takes and returns int64 numpy arrays (or tensors)."""
    import numpy as np

    onnxruntime = _import_onnx_tools()
    folder = Path(folder)
    config, generation_config = _load_config_files(folder)
    eos_ids, pad_id = _stop_tokens(generation_config)
    input_ids = np.asarray(input_ids, dtype=np.int64)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if max_new_tokens < 1:
        raise ExportError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")

    def session(name):
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{folder}: no {name} (run `python -m hf_blueprint.export onnx` into it first).")
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def empty_past(decoder_session, batch):
        past = {}
        for node in decoder_session.get_inputs():
            if node.name.startswith("past_key_values."):
                dtype = np.float16 if node.type == "tensor(float16)" else np.float32
                past[node.name] = np.zeros((batch, config.num_key_value_heads, 0, config.head_dim), dtype)
        return past

    batch = input_ids.shape[0]
    finished = np.zeros(batch, dtype=bool)
    if getattr(config, "is_encoder_decoder", False):
        encoder, decoder = session("encoder_model.onnx"), session("decoder_model.onnx")
        (states,) = encoder.run(["last_hidden_state"], {"input_ids": input_ids, "attention_mask": attention_mask})
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
        tokens = np.full((batch, 1), start, dtype=np.int64)
        past, step_ids = empty_past(decoder, batch), tokens
        output_names = [node.name for node in decoder.get_outputs()]
        for _ in range(max_new_tokens):
            feed = {"decoder_input_ids": step_ids, "encoder_hidden_states": states,
                    "encoder_attention_mask": attention_mask, **past}
            results = dict(zip(output_names, decoder.run(output_names, feed)))
            past = {name.replace("present.", "past_key_values."): value for name, value in results.items()
                    if name.startswith("present.")}
            step_ids, finished = _greedy_step(results["logits"], finished, eos_ids, pad_id)
            tokens = np.concatenate([tokens, step_ids], 1)
            if finished.all():
                break
        return tokens

    if config.model_type != "blueprint_decoder":
        raise ExportError(f"{folder}: onnx_generate runs causal LMs and encoder-decoders; this is a "
                          f"{config.model_type} model.")
    decoder = session("model.onnx")
    output_names = [node.name for node in decoder.get_outputs()]
    past, step_ids, tokens, mask = empty_past(decoder, batch), input_ids, input_ids, attention_mask
    for _ in range(max_new_tokens):
        results = dict(zip(output_names, decoder.run(output_names, {"input_ids": step_ids, "attention_mask": mask,
                                                                    **past})))
        past = {name.replace("present.", "past_key_values."): value for name, value in results.items()
                if name.startswith("present.")}
        step_ids, finished = _greedy_step(results["logits"], finished, eos_ids, pad_id)
        tokens = np.concatenate([tokens, step_ids], 1)
        mask = np.concatenate([mask, np.ones_like(step_ids)], 1)
        if finished.all():
            break
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# torch.export with a static cache (the ExecuTorch path)
# ---------------------------------------------------------------------------------------------------------------------


def _exportable_generation_config(model, max_cache_len: int):
    """transformers' static-cache wrappers read the cache settings from the model's generation config."""
    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    model.generation_config.cache_config = {"batch_size": 1, "max_cache_len": max_cache_len}


def export_programs(model, name: str, max_cache_len: int, sample_ids: torch.Tensor) -> dict[str, object]:
    """The exported programs of the model, by file name."""
    from transformers.integrations.executorch import Seq2SeqLMExportableModule, TorchExportableModuleForDecoderOnlyLM

    _exportable_generation_config(model, max_cache_len)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == CAUSAL_LM:
            wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_cache_len)
            program = wrapper.export(input_ids=sample_ids[:, :1], cache_position=torch.tensor([0]), strict=True)
            return {"model.pt2": program}
        config = model.config
        wrapper = Seq2SeqLMExportableModule(model, batch_size=1, max_hidden_seq_length=config.max_position_embeddings,
                                            max_cache_length=max_cache_len)
        wrapper.export(encoder_input_ids=sample_ids)
        return {"encoder.pt2": wrapper.exported_encoder, "decoder.pt2": wrapper.exported_decoder}


PTE_HINT = "pip install executorch (its XNNPACK backend lowers the program; not a dependency of this project)"
STATIC_CACHE_FILE = "static_cache.json"  # the cache size the programs were exported with


def lower_to_executorch(program, path: Path):
    """Lowers an exported program to an ExecuTorch `.pte` file, delegating what it can to XNNPACK."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as error:
        raise ImportError(f"--pte needs executorch ({error}); {PTE_HINT}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        path.write_bytes(lowered.to_executorch().buffer)


def _program_runners(folder: Path, files: tuple[str, ...]) -> list:
    """A callable per file (positional tensors in, the first output out): `.pt2` through torch.export.load, `.pte`
    through the ExecuTorch runtime."""
    runners = []
    for name in files:
        if name.endswith(".pte"):
            try:
                from executorch.runtime import Runtime
            except ImportError as error:
                raise ImportError(f"running {name} needs executorch ({error}); {PTE_HINT}") from None
            method = Runtime.get().load_program(str(folder / name)).load_method("forward")
            runners.append(lambda *inputs, method=method: method.execute(list(inputs))[0])
        elif name == "model.pt2":  # traced with keywords: called with them
            module = torch.export.load(folder / name).module()
            runners.append(lambda input_ids, cache_position, module=module: module(input_ids=input_ids,
                                                                                  cache_position=cache_position))
        else:
            runners.append(torch.export.load(folder / name).module())
    return runners


def _static_greedy(runners: list, config, generation_config, input_ids: torch.Tensor, max_new_tokens: int,
                   max_cache_len: int) -> torch.Tensor:
    """Greedy decoding of one prompt with the static-cache programs: a causal LM takes the prompt one token per
    call (as ExecuTorch's LLM runner feeds it), then its own tokens; an encoder-decoder encodes the source once and
    decodes from its start token. Stops at the generation config's EOS, like generate()."""
    eos_ids, _ = _stop_tokens(generation_config)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ExportError(f"input_ids must have shape (1, length): the static-cache programs take batch 1, got "
                          f"{tuple(input_ids.shape)}.")
    is_encoder_decoder = getattr(config, "is_encoder_decoder", False)
    needed = max_new_tokens + (1 if is_encoder_decoder else input_ids.shape[1])
    if needed > max_cache_len:
        raise ExportError(f"{needed} positions (prompt or start token + max_new_tokens) exceed the programs' static "
                          f"cache of {max_cache_len} (--max-cache-len).")
    with torch.no_grad():
        if is_encoder_decoder:
            encoder, decoder = runners
            states = encoder(input_ids)
            start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
            tokens = [start]
            for position in range(max_new_tokens):
                logits = decoder(torch.tensor([[tokens[-1]]]), states, torch.tensor([position]))
                tokens.append(int(logits[0, -1].argmax()))
                if tokens[-1] in eos_ids:
                    break
            return torch.tensor([tokens])
        (step,) = runners
        tokens = input_ids[0].tolist()
        for position, token in enumerate(tokens):
            logits = step(torch.tensor([[token]]), torch.tensor([position]))
        for _ in range(max_new_tokens):
            tokens.append(int(logits[0, -1].argmax()))
            if tokens[-1] in eos_ids or len(tokens) == input_ids.shape[1] + max_new_tokens:
                break
            logits = step(torch.tensor([[tokens[-1]]]), torch.tensor([len(tokens) - 1]))
        return torch.tensor([tokens])


def static_cache_generate(folder, input_ids, max_new_tokens: int = 20, runtime: str = "pt2") -> torch.Tensor:
    """Greedy decoding with the programs `export_executorch` saved in `folder` (batch 1), run as the `.pt2`
    programs (runtime="pt2") or the ExecuTorch `.pte` files (runtime="pte"): the tokens
    `model.generate(input_ids, max_new_tokens=..., do_sample=False)` returns."""
    if runtime not in ("pt2", "pte"):
        raise ExportError(f"runtime must be 'pt2' or 'pte', got {runtime!r}.")
    folder = Path(folder)
    config, generation_config = _load_config_files(folder)
    files = tuple(name.replace(".pt2", f".{runtime}")
                  for name in PROGRAM_FILES[SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL_LM])
    missing = [name for name in (*files, STATIC_CACHE_FILE) if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder}: no {', '.join(missing)} (run `python -m hf_blueprint.export executorch"
                          f"{' --pte' if runtime == 'pte' else ''}` into it first).")
    max_cache_len = json.loads((folder / STATIC_CACHE_FILE).read_text())["max_cache_len"]
    return _static_greedy(_program_runners(folder, files), config, generation_config, torch.as_tensor(input_ids),
                          max_new_tokens, max_cache_len)


def export_executorch(model_id, out, *, max_cache_len: int = 128, pte: bool = False, overwrite: bool = False
                      ) -> list[int]:
    """Exports the causal LM or encoder-decoder `model_id` with a static cache through transformers' exportable
    wrappers and saves the programs in `out` (`.pt2`, and with `pte=True` ExecuTorch `.pte` files lowered to
    XNNPACK). Checks that the saved programs decode a sample prompt greedily into generate()'s tokens, and returns
    those tokens."""
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise ExportError(f"--max-cache-len must be an integer >= 2, got {max_cache_len!r}.")
    out = Path(out)
    name = blueprint_architecture(model_id)
    if name not in PROGRAM_FILES:
        raise ExportError(f"MODEL {model_id}: the static-cache export is for generation ({CAUSAL_LM}, {SEQ2SEQ}); a "
                          f"{name} exports with `python -m hf_blueprint.export onnx`.")
    check_output_folder(out, model_id, overwrite)
    if pte and importlib.util.find_spec("executorch") is None:
        raise ImportError(f"--pte needs executorch; {PTE_HINT}")
    model = load_blueprint_model(model_id, name)
    if max_cache_len > model.config.max_position_embeddings:
        raise ExportError(f"--max-cache-len {max_cache_len} exceeds the model's max_position_embeddings "
                          f"({model.config.max_position_embeddings}).")
    sample = _random_ids(model.config, 1, min(6, max_cache_len // 2), 0)
    new_tokens = min(8, max_cache_len - sample.shape[1] - 1)
    expected = model.generate(sample, attention_mask=torch.ones_like(sample), max_new_tokens=new_tokens,
                              do_sample=False)
    programs = export_programs(model, name, max_cache_len, sample)
    with StagedOutput(out) as staged:
        staging = staged.staging
        for file_name, program in programs.items():
            torch.export.save(program, staging / file_name)
            if pte:
                lower_to_executorch(program, staging / file_name.replace(".pt2", ".pte"))
        (staging / STATIC_CACHE_FILE).write_text(json.dumps({"max_cache_len": max_cache_len, "batch_size": 1}) + "\n")
        save_model_files(model, model_id, staging)
        for runtime in ("pt2", "pte") if pte else ("pt2",):
            got = static_cache_generate(staging, sample, new_tokens, runtime=runtime)
            if got.tolist() != expected.tolist():
                raise ExportError(f"the exported .{runtime} program decodes {got.tolist()}, generate() "
                                  f"{expected.tolist()}; nothing was written.")
        written = [*programs, *([name.replace(".pt2", ".pte") for name in programs] if pte else [])]
        print(f"{', '.join(written)}: static cache of {max_cache_len} positions; greedy tokens equal generate()'s "
              f"on a sample prompt: {got[0].tolist()}")
        staged.publish()
    return got[0].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_blueprint.export",
        description="Export a Blueprint model folder (or Hub repo) to ONNX, or with a static key/value cache through "
                    "torch.export (the ExecuTorch path). The exported graphs are checked against PyTorch before "
                    "anything is written.",
    )
    commands = parser.add_subparsers(dest="format", required=True)
    onnx = commands.add_parser("onnx", help="ONNX graphs (torch's dynamo exporter), checked in onnxruntime")
    onnx.add_argument("model", metavar="MODEL", help="a Blueprint model folder or Hub repo id")
    onnx.add_argument("out", metavar="OUT", help="folder to write the graphs, config and tokenizer to")
    onnx.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the graph (default float32)")
    onnx.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT (same names replaced)")
    program = commands.add_parser("executorch", help="torch.export programs with a static cache (.pt2, .pte)")
    program.add_argument("model", metavar="MODEL", help="a Blueprint causal LM or encoder-decoder folder or Hub id")
    program.add_argument("out", metavar="OUT", help="folder to write the programs, config and tokenizer to")
    program.add_argument("--max-cache-len", type=int, default=128,
                         help="positions of the static cache: prompt + new tokens (default 128)")
    program.add_argument("--pte", action="store_true",
                         help="also lower the programs to ExecuTorch .pte files (XNNPACK); needs executorch")
    program.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT (same names replaced)")
    args = parser.parse_args(argv)
    try:
        if args.format == "onnx":
            export_onnx(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
        else:
            export_executorch(args.model, args.out, max_cache_len=args.max_cache_len, pte=args.pte,
                              overwrite=args.overwrite)
    except (ExportError, ImportError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
