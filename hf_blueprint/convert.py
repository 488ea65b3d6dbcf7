"""Exact weight conversion between transformers' GPT-2, BERT, Llama (Mistral, Qwen2) and the Blueprint classes.

The famous models are points of the Blueprint design space, so their weights move over by renaming (and, for GPT-2,
transposing its Conv1D matrices and splitting its fused q/k/v projection): the converted model computes the same
function, not an approximation of it.

    from hf_blueprint.convert import from_transformers, to_transformers, convert
    blueprint = from_transformers(bert_model_or_folder)        # -> BlueprintEncoderModel / ...ForMaskedLM / ...
    native = to_transformers(blueprint_model_or_folder)         # -> BertModel / GPT2LMHeadModel / LlamaForCausalLM ...
    convert("path/to/bert", "path/to/blueprint-bert")           # folder -> folder, tokenizer copied along

    python -m hf_blueprint.convert path/to/gpt2 out/blueprint-gpt2
    python -m hf_blueprint.convert out/blueprint-gpt2 out/gpt2-again

Supported (both directions; the direction follows the source's model_type):

    GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification            <-> BlueprintDecoder{Model,ForCausalLM,...}
    BertModel, BertForMaskedLM, BertForSequenceClassification,
        BertForTokenClassification                                        <-> BlueprintEncoder{Model,ForMaskedLM,...}
    Llama / Mistral / Qwen2 {Model, ForCausalLM, ForSequenceClassification} <-> BlueprintDecoder...

The output folder must be new or empty (and apart from the source) unless `overwrite=True` / `--overwrite`; paths
read from the source folder (a sentence-transformers `modules.json`, linked tokenizer files) must stay inside it,
and weights that `--dtype` cannot hold are refused rather than written as inf.

What cannot be expressed on the other side is refused with a ValueError that names the switch (a RoPE scaling
type, sinusoidal positions for GPT-2, Pre-LN for BERT, ...). Where one side simply lacks a bias that the other has,
the missing bias is a zero vector, which is exact (Qwen2's o_proj, GPT-2's score layer, a bias-free Blueprint
converted to GPT-2 or BERT); a *non-zero* bias that the target cannot hold is refused. Dropout rates that the target
cannot express do not change what the model computes at inference; they are dropped with a warning.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import secrets
import shutil
import sys
import warnings
from pathlib import Path

import torch

import transformers
from transformers import AutoConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from . import modeling_blueprint
from .configuration_blueprint import BlueprintConfig, BlueprintDecoderConfig, BlueprintEncoderConfig
from .paths import UnsafePathError, copy_file, files_in_folder, safe_join


__all__ = ["ConversionError", "check_model_folder", "convert", "copy_tokenizer", "from_transformers", "main",
           "to_blueprint_config", "to_transformers", "tokenizer_files"]


class ConversionError(ValueError):
    """The conversion cannot be done: the source model uses something the target architecture cannot express, its
    folder is not a model of a supported type, or the output would overwrite something not offered for it."""


BASE, CAUSAL_LM, MASKED_LM, SEQ_CLS, TOKEN_CLS = "base", "causal_lm", "masked_lm", "seq_cls", "token_cls"
ENCODER, DECODER = "encoder", "decoder"

BLUEPRINT_CLASSES = {
    (ENCODER, BASE): "BlueprintEncoderModel",
    (ENCODER, MASKED_LM): "BlueprintEncoderForMaskedLM",
    (ENCODER, SEQ_CLS): "BlueprintEncoderForSequenceClassification",
    (ENCODER, TOKEN_CLS): "BlueprintEncoderForTokenClassification",
    (DECODER, BASE): "BlueprintDecoderModel",
    (DECODER, CAUSAL_LM): "BlueprintDecoderForCausalLM",
    (DECODER, SEQ_CLS): "BlueprintDecoderForSequenceClassification",
}
# Generic Blueprint class names (a model built from BlueprintConfig directly, or a subclass) -> head.
_BLUEPRINT_HEADS = {
    "BlueprintModel": BASE,
    "BlueprintForCausalLM": CAUSAL_LM,
    "BlueprintForMaskedLM": MASKED_LM,
    "BlueprintForSequenceClassification": SEQ_CLS,
    "BlueprintForTokenClassification": TOKEN_CLS,
}
_BLUEPRINT_HEADS.update({name: head for (_, head), name in BLUEPRINT_CLASSES.items()})

# Files that make up a tokenizer (and a sentence-transformers pipeline) and travel with the weights.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# Weights files of a model saved in a folder, single or sharded, with their index. Writing a model over another one,
# those of the old model that the new one does not replace are removed: transformers would load a stale
# `model.safetensors` before a new sharded index.
WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _linear(sd: dict, src: str, out: dict, dst: str, transpose: bool = False):
    """Moves `src.weight` (and `src.bias` if present) of `sd` to `dst.*` of `out`."""
    weight = sd.pop(f"{src}.weight")
    out[f"{dst}.weight"] = weight.t().contiguous() if transpose else weight
    if f"{src}.bias" in sd:
        out[f"{dst}.bias"] = sd.pop(f"{src}.bias")


def _rename(sd: dict, pairs: list[tuple[str, str]]) -> dict:
    """Moves every module `src` of `pairs` (weight and bias) to `dst`; keys are popped from `sd` so that what is left
    over afterwards is exactly what the converter did not map."""
    out = {}
    for src, dst in pairs:
        if f"{src}.weight" in sd:
            _linear(sd, src, out, dst)
        elif f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd.pop(f"{src}.bias")
    return out


def _invert(pairs):
    return [(dst, src) for src, dst in pairs]


def _problem(problems: list, condition: bool, message: str):
    if condition:
        problems.append(message)


def _warn_dropped(what: list[str], target: str):
    if what:
        warnings.warn(
            f"{target} cannot express {', '.join(what)}; this only matters for training (the converted model "
            f"computes the same outputs in eval mode) and is dropped.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------------------------


class Architecture:
    """One transformers architecture: its classes, its config mapping and its weight names."""

    name: str  # the `architecture=` value and the transformers model_type
    family: str  # the Blueprint family it maps to
    native_classes: dict[str, str]  # head -> transformers class name

    # -- heads ---------------------------------------------------------------------------------------------------------

    def native_class(self, head: str):
        if head not in self.native_classes:
            raise ConversionError(
                f"{BLUEPRINT_CLASSES[(self.family, head)]} has no {self.name} counterpart; {self.name} heads: "
                f"{', '.join(self.native_classes.values())}."
            )
        return getattr(transformers, self.native_classes[head])

    def head_of(self, model) -> str:
        for head, class_name in self.native_classes.items():
            if type(model).__name__ == class_name:
                return head
        raise ConversionError(
            f"{type(model).__name__} is not supported; convertible {self.name} classes: "
            f"{', '.join(self.native_classes.values())}."
        )

    # -- configs ------------------------------------------------------------------------------------------------------

    def blueprint_fields(self, config, head: str, has_pooler: bool) -> dict:
        raise NotImplementedError

    def native_config(self, config: BlueprintConfig, head: str):
        raise NotImplementedError

    def problems(self, config: BlueprintConfig, head: str) -> list[str]:
        """Switches of `config` the native architecture cannot express (empty: convertible)."""
        raise NotImplementedError

    # -- weights (base-model state dicts, without the head prefix) ----------------------------------------------------

    def trunk_to_blueprint(self, sd: dict, config) -> dict:
        raise NotImplementedError

    def trunk_from_blueprint(self, sd: dict, config) -> dict:
        raise NotImplementedError

    head_pairs: dict[str, list[tuple[str, str]]] = {}  # head -> (native module, blueprint module) pairs

    def head_to_blueprint(self, sd: dict, head: str) -> dict:
        return _rename(sd, self.head_pairs.get(head, []))

    def head_from_blueprint(self, sd: dict, head: str) -> dict:
        return _rename(sd, _invert(self.head_pairs.get(head, [])))

    def native_kwargs(self, config: BlueprintConfig, head: str) -> dict:
        return {}

    def dropped_dropouts(self, config: BlueprintConfig, head: str) -> list[str]:
        """Dropout settings the native model cannot express (training-only differences, warned about)."""
        return []

    def droppable_hint(self, key: str) -> str | None:
        """Why a weight (named as in the native model) has no place there; None: it must not be dropped. Only an
        all-zero tensor is ever dropped."""
        return None


def _common_fields(config, head: str) -> dict:
    """The fields every config has, the same on both sides: special tokens, tying, init, labels."""
    fields = dict(pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
                  eos_token_id=config.eos_token_id, tie_word_embeddings=config.tie_word_embeddings,
                  initializer_range=config.initializer_range)
    if head in (SEQ_CLS, TOKEN_CLS):
        fields.update(id2label=dict(config.id2label), label2id=dict(config.label2id), problem_type=config.problem_type)
    return fields


def _shape_problems(config: BlueprintConfig, target: str) -> list[str]:
    problems = []
    _problem(problems, config.num_key_value_heads != config.num_attention_heads,
             f"num_key_value_heads={config.num_key_value_heads} (grouped-query attention; {target} has "
             f"{config.num_attention_heads} key/value heads, one per query head)")
    _problem(problems, config.head_dim * config.num_attention_heads != config.hidden_size,
             f"head_dim={config.head_dim} (with {config.num_attention_heads} heads {target} needs head_dim = "
             f"hidden_size / num_attention_heads = {config.hidden_size / config.num_attention_heads:g})")
    return problems


class GPT2(Architecture):
    name, family = "gpt2", DECODER
    native_classes = {BASE: "GPT2Model", CAUSAL_LM: "GPT2LMHeadModel", SEQ_CLS: "GPT2ForSequenceClassification"}
    head_pairs = {CAUSAL_LM: [("lm_head", "lm_head")], SEQ_CLS: [("score", "classifier")]}

    def blueprint_fields(self, c, head, has_pooler):
        problems = []
        _problem(problems, c.add_cross_attention, "add_cross_attention=True (cross-attention blocks)")
        _problem(problems, not c.scale_attn_weights, "scale_attn_weights=False (scores not divided by sqrt(d_head))")
        _problem(problems, c.scale_attn_by_inverse_layer_idx,
                 "scale_attn_by_inverse_layer_idx=True (scores divided by the layer index)")
        _problem(problems, c.reorder_and_upcast_attn, "reorder_and_upcast_attn=True")
        if problems:
            raise ConversionError(f"The Blueprint cannot express this GPT-2: {'; '.join(problems)}.")
        if c.embd_pdrop != c.resid_pdrop:
            _warn_dropped([f"embd_pdrop={c.embd_pdrop} != resid_pdrop={c.resid_pdrop} (the Blueprint has one "
                           f"hidden_dropout_prob={c.resid_pdrop})"], "The Blueprint")
        fields = dict(
            vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            intermediate_size=c.n_inner if c.n_inner is not None else 4 * c.n_embd,
            max_position_embeddings=c.n_positions, type_vocab_size=0, position_embedding_type="learned",
            scale_embeddings=False, embedding_norm=False, norm_type="layernorm", norm_position="pre",
            layer_norm_eps=c.layer_norm_epsilon, ffn_type="mlp", hidden_act=c.activation_function,
            attention_bias=True, mlp_bias=True, hidden_dropout_prob=c.resid_pdrop, attention_dropout=c.attn_pdrop,
            activation_dropout=0.0,
        )
        if head == SEQ_CLS:  # the score layer reads the last real token, with no dropout before it
            fields.update(classifier_pooling="last", classifier_dropout=0.0)
        return fields

    def problems(self, config, head):
        problems = []
        _problem(problems, config.position_embedding_type != "learned",
                 f"position_embedding_type={config.position_embedding_type!r} (GPT-2 has a learned position table)")
        _problem(problems, config.norm_type != "layernorm", f"norm_type={config.norm_type!r} (GPT-2: layernorm)")
        _problem(problems, config.norm_position != "pre", f"norm_position={config.norm_position!r} (GPT-2: pre)")
        _problem(problems, config.ffn_type != "mlp", f"ffn_type={config.ffn_type!r} (GPT-2: mlp)")
        _problem(problems, config.scale_embeddings, "scale_embeddings=True (GPT-2 does not scale its embeddings)")
        _problem(problems, config.embedding_norm, "embedding_norm=True (GPT-2 has no embedding norm)")
        _problem(problems, config.type_vocab_size > 0,
                 f"type_vocab_size={config.type_vocab_size} (GPT-2 has no token-type table of its own)")
        _problem(problems, config.sliding_window is not None,
                 f"sliding_window={config.sliding_window} (GPT-2 attends to the whole context)")
        problems += _shape_problems(config, "GPT-2")
        if head == SEQ_CLS:
            _problem(problems, config.classifier_pooling != "last",
                     f"classifier_pooling={config.classifier_pooling!r} (GPT2ForSequenceClassification reads the "
                     f"last real token)")
        return problems

    def dropped_dropouts(self, config, head):
        dropped = []
        if config.activation_dropout:
            dropped.append(f"activation_dropout={config.activation_dropout}")
        if head == SEQ_CLS:
            rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
            if rate:
                dropped.append(f"classifier dropout {rate}")
        return dropped

    def native_config(self, config, head):
        return transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.max_position_embeddings, n_embd=config.hidden_size,
            n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, n_inner=config.intermediate_size,
            activation_function=config.hidden_act, resid_pdrop=config.hidden_dropout_prob,
            embd_pdrop=config.hidden_dropout_prob, attn_pdrop=config.attention_dropout,
            layer_norm_epsilon=config.layer_norm_eps, **_common_fields(config, head),
        )

    def trunk_to_blueprint(self, sd, config):
        out = _rename(sd, [("wte", "embed_tokens"), ("wpe", "embed_positions"), ("ln_f", "norm")])
        for i in range(config.n_layer):
            h, b = f"h.{i}", f"layers.{i}"
            out.update(_rename(sd, [(f"{h}.ln_1", f"{b}.self_attn_norm"), (f"{h}.ln_2", f"{b}.mlp_norm")]))
            # Conv1D stores (in, out): a Linear's weight transposed. c_attn fuses q, k and v along `out`.
            weight, bias = sd.pop(f"{h}.attn.c_attn.weight").t(), sd.pop(f"{h}.attn.c_attn.bias")
            for name, w, bb in zip("qkv", weight.chunk(3, dim=0), bias.chunk(3, dim=0)):
                out[f"{b}.self_attn.{name}_proj.weight"] = w.contiguous()
                out[f"{b}.self_attn.{name}_proj.bias"] = bb.contiguous()
            _linear(sd, f"{h}.attn.c_proj", out, f"{b}.self_attn.o_proj", transpose=True)
            _linear(sd, f"{h}.mlp.c_fc", out, f"{b}.mlp.up_proj", transpose=True)
            _linear(sd, f"{h}.mlp.c_proj", out, f"{b}.mlp.down_proj", transpose=True)
        return out

    def trunk_from_blueprint(self, sd, config):
        out = _rename(sd, [("embed_tokens", "wte"), ("embed_positions", "wpe"), ("norm", "ln_f")])
        hidden = config.hidden_size
        for i in range(config.num_hidden_layers):
            h, b = f"h.{i}", f"layers.{i}"
            out.update(_rename(sd, [(f"{b}.self_attn_norm", f"{h}.ln_1"), (f"{b}.mlp_norm", f"{h}.ln_2")]))
            weights = [sd.pop(f"{b}.self_attn.{name}_proj.weight") for name in "qkv"]
            biases = [sd.pop(f"{b}.self_attn.{name}_proj.bias", None) for name in "qkv"]
            biases = [bb if bb is not None else weights[0].new_zeros(hidden) for bb in biases]
            out[f"{h}.attn.c_attn.weight"] = torch.cat(weights, dim=0).t().contiguous()
            out[f"{h}.attn.c_attn.bias"] = torch.cat(biases, dim=0)
            _linear(sd, f"{b}.self_attn.o_proj", out, f"{h}.attn.c_proj", transpose=True)
            _linear(sd, f"{b}.mlp.up_proj", out, f"{h}.mlp.c_fc", transpose=True)
            _linear(sd, f"{b}.mlp.down_proj", out, f"{h}.mlp.c_proj", transpose=True)
        return out

    def droppable_hint(self, key):
        if key == "score.bias":
            return "GPT2ForSequenceClassification's score layer has no bias"
        return super().droppable_hint(key)


class Bert(Architecture):
    name, family = "bert", ENCODER
    native_classes = {BASE: "BertModel", MASKED_LM: "BertForMaskedLM", SEQ_CLS: "BertForSequenceClassification",
                      TOKEN_CLS: "BertForTokenClassification"}
    head_pairs = {
        MASKED_LM: [("cls.predictions.transform.dense", "mlm_transform.dense"),
                    ("cls.predictions.transform.LayerNorm", "mlm_transform.norm"),
                    ("cls.predictions.decoder", "lm_head")],
        SEQ_CLS: [("classifier", "classifier")],
        TOKEN_CLS: [("classifier", "classifier")],
    }

    @staticmethod
    def _layer_pairs(i):
        n, b = f"encoder.layer.{i}", f"layers.{i}"
        return [
            (f"{n}.attention.self.query", f"{b}.self_attn.q_proj"),
            (f"{n}.attention.self.key", f"{b}.self_attn.k_proj"),
            (f"{n}.attention.self.value", f"{b}.self_attn.v_proj"),
            (f"{n}.attention.output.dense", f"{b}.self_attn.o_proj"),
            (f"{n}.attention.output.LayerNorm", f"{b}.self_attn_norm"),
            (f"{n}.intermediate.dense", f"{b}.mlp.up_proj"),
            (f"{n}.output.dense", f"{b}.mlp.down_proj"),
            (f"{n}.output.LayerNorm", f"{b}.mlp_norm"),
        ]

    _embedding_pairs = [
        ("embeddings.word_embeddings", "embed_tokens"),
        ("embeddings.position_embeddings", "embed_positions"),
        ("embeddings.token_type_embeddings", "token_type_embeddings"),
        ("embeddings.LayerNorm", "embedding_norm"),
        ("pooler.dense", "pooler.dense"),
    ]

    def blueprint_fields(self, c, head, has_pooler):
        problems = []
        _problem(problems, c.is_decoder, "is_decoder=True (a causal BERT)")
        _problem(problems, c.add_cross_attention, "add_cross_attention=True (cross-attention blocks)")
        position_type = getattr(c, "position_embedding_type", "absolute")
        _problem(problems, position_type != "absolute",
                 f"position_embedding_type={position_type!r} (relative position scores)")
        if problems:
            raise ConversionError(f"The Blueprint cannot express this BERT: {'; '.join(problems)}.")
        return dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
            position_embedding_type="learned", scale_embeddings=False, embedding_norm=True, norm_type="layernorm",
            norm_position="post", layer_norm_eps=c.layer_norm_eps, ffn_type="mlp", hidden_act=c.hidden_act,
            attention_bias=True, mlp_bias=True, hidden_dropout_prob=c.hidden_dropout_prob,
            attention_dropout=c.attention_probs_dropout_prob, activation_dropout=0.0,
            classifier_dropout=c.classifier_dropout, add_pooling_layer=has_pooler, classifier_pooling="first",
        )

    def problems(self, config, head):
        problems = []
        _problem(problems, config.position_embedding_type != "learned",
                 f"position_embedding_type={config.position_embedding_type!r} (BERT has a learned position table)")
        _problem(problems, config.norm_type != "layernorm", f"norm_type={config.norm_type!r} (BERT: layernorm)")
        _problem(problems, config.norm_position != "post", f"norm_position={config.norm_position!r} (BERT: post)")
        _problem(problems, config.ffn_type != "mlp", f"ffn_type={config.ffn_type!r} (BERT: mlp)")
        _problem(problems, config.scale_embeddings, "scale_embeddings=True (BERT does not scale its embeddings)")
        _problem(problems, not config.embedding_norm, "embedding_norm=False (BERT always normalizes its embeddings)")
        _problem(problems, config.sliding_window is not None,
                 f"sliding_window={config.sliding_window} (BERT attends to the whole sequence)")
        problems += _shape_problems(config, "BERT")
        if head == SEQ_CLS:
            _problem(problems, not config.add_pooling_layer,
                     "add_pooling_layer=False (BertForSequenceClassification classifies the pooler output)")
        if head in (BASE, SEQ_CLS) and config.add_pooling_layer:
            _problem(problems, config.classifier_pooling != "first",
                     f"classifier_pooling={config.classifier_pooling!r} with add_pooling_layer=True (BERT's pooler "
                     f"reads the first token)")
        return problems

    def dropped_dropouts(self, config, head):
        return [f"activation_dropout={config.activation_dropout}"] if config.activation_dropout else []

    def native_config(self, config, head):
        return transformers.BertConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
            attention_probs_dropout_prob=config.attention_dropout,
            max_position_embeddings=config.max_position_embeddings,
            # BERT always has a token-type table; without token types, one all-zero row adds exactly nothing.
            type_vocab_size=max(1, config.type_vocab_size), layer_norm_eps=config.layer_norm_eps,
            classifier_dropout=config.classifier_dropout, **_common_fields(config, head),
        )

    def native_kwargs(self, config, head):
        return {"add_pooling_layer": config.add_pooling_layer} if head == BASE else {}

    def trunk_to_blueprint(self, sd, config):
        pairs = list(self._embedding_pairs)
        for i in range(config.num_hidden_layers):
            pairs += self._layer_pairs(i)
        return _rename(sd, pairs)

    def trunk_from_blueprint(self, sd, config):
        pairs = list(self._embedding_pairs)
        for i in range(config.num_hidden_layers):
            pairs += self._layer_pairs(i)
        out = _rename(sd, _invert(pairs))
        if config.type_vocab_size == 0:
            out["embeddings.token_type_embeddings.weight"] = out["embeddings.word_embeddings.weight"].new_zeros(
                1, config.hidden_size)
        return out

    def head_to_blueprint(self, sd, head):
        if head == MASKED_LM:
            # `cls.predictions.bias` is tied to the decoder's bias, which is the one the forward uses; untied
            # (tie_word_embeddings=False) it is an unused parameter.
            unused, used = sd.pop("cls.predictions.bias", None), sd["cls.predictions.decoder.bias"]
            if unused is not None and not torch.equal(unused, used):
                warnings.warn("cls.predictions.bias differs from cls.predictions.decoder.bias; BertForMaskedLM does "
                              "not use it (the decoder's bias is the one applied), so it is dropped.", stacklevel=3)
        return super().head_to_blueprint(sd, head)

    def head_from_blueprint(self, sd, head):
        out = super().head_from_blueprint(sd, head)
        if head == MASKED_LM:
            out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
        return out



class Llama(Architecture):
    name, family = "llama", DECODER
    prefix = "Llama"
    head_pairs = {CAUSAL_LM: [("lm_head", "lm_head")], SEQ_CLS: [("score", "classifier")]}

    @property
    def native_classes(self):
        return {BASE: f"{self.prefix}Model", CAUSAL_LM: f"{self.prefix}ForCausalLM",
                SEQ_CLS: f"{self.prefix}ForSequenceClassification"}

    def _rope_theta(self, c):
        rope = dict(getattr(c, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConversionError(
                f"The Blueprint cannot express this {self.prefix}: rope_parameters has rope_type={rope_type!r} "
                f"(RoPE frequency scaling); the Blueprint's rope is the default RoPE with rope_theta only."
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConversionError(f"The Blueprint cannot express this {self.prefix}: rope_parameters has "
                                  f"partial_rotary_factor={rope['partial_rotary_factor']} (RoPE on part of each head).")
        return float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))

    def _biases(self, c):
        return dict(attention_bias=bool(c.attention_bias), mlp_bias=bool(c.mlp_bias))

    def _sliding_window(self, c):
        return None

    def blueprint_fields(self, c, head, has_pooler):
        if getattr(c, "pretraining_tp", 1) not in (None, 1):
            warnings.warn(f"pretraining_tp={c.pretraining_tp} only splits the matmuls; ignored.", stacklevel=3)
        fields = dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
            type_vocab_size=0, position_embedding_type="rope", rope_theta=self._rope_theta(c),
            scale_embeddings=False, embedding_norm=False, norm_type="rmsnorm", norm_position="pre",
            layer_norm_eps=c.rms_norm_eps, ffn_type="glu", hidden_act=c.hidden_act, hidden_dropout_prob=0.0,
            attention_dropout=float(c.attention_dropout or 0.0), activation_dropout=0.0,
            sliding_window=self._sliding_window(c), **self._biases(c),
        )
        if head == SEQ_CLS:
            fields.update(classifier_pooling="last", classifier_dropout=0.0)
        return fields

    def problems(self, config, head):
        problems = []
        name = self.prefix
        _problem(problems, config.position_embedding_type != "rope",
                 f"position_embedding_type={config.position_embedding_type!r} ({name} uses rope)")
        _problem(problems, config.norm_type != "rmsnorm", f"norm_type={config.norm_type!r} ({name}: rmsnorm)")
        _problem(problems, config.norm_position != "pre", f"norm_position={config.norm_position!r} ({name}: pre)")
        _problem(problems, config.ffn_type != "glu", f"ffn_type={config.ffn_type!r} ({name}: glu)")
        _problem(problems, config.scale_embeddings, f"scale_embeddings=True ({name} does not scale its embeddings)")
        _problem(problems, config.embedding_norm, f"embedding_norm=True ({name} has no embedding norm)")
        _problem(problems, config.type_vocab_size > 0, f"type_vocab_size={config.type_vocab_size} ({name} has no "
                 f"token types)")
        problems += self._extra_problems(config)
        if head == SEQ_CLS:
            _problem(problems, config.classifier_pooling != "last",
                     f"classifier_pooling={config.classifier_pooling!r} ({name}ForSequenceClassification reads the "
                     f"last real token)")
        return problems

    def _extra_problems(self, config):
        problems = []
        _problem(problems, config.sliding_window is not None,
                 f"sliding_window={config.sliding_window} (Llama attends to the whole context; Mistral has a "
                 f"sliding window: architecture='mistral')")
        return problems

    def dropped_dropouts(self, config, head):
        dropped = [f"{field}={getattr(config, field)}" for field in ("hidden_dropout_prob", "activation_dropout")
                   if getattr(config, field)]
        if head == SEQ_CLS:
            rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
            if rate:
                dropped.append(f"classifier dropout {rate}")
        return dropped

    def _native_config_fields(self, config, head):
        return dict(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.layer_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            attention_dropout=config.attention_dropout, **_common_fields(config, head),
        )

    def native_config(self, config, head):
        return transformers.LlamaConfig(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
                                        **self._native_config_fields(config, head))

    @staticmethod
    def _pairs(config):
        pairs = [("embed_tokens", "embed_tokens"), ("norm", "norm")]
        for i in range(config.num_hidden_layers):
            n = f"layers.{i}"
            pairs += [(f"{n}.self_attn.{p}", f"{n}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            pairs += [(f"{n}.mlp.{p}", f"{n}.mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
            pairs += [(f"{n}.input_layernorm", f"{n}.self_attn_norm"),
                      (f"{n}.post_attention_layernorm", f"{n}.mlp_norm")]
        return pairs

    def trunk_to_blueprint(self, sd, config):
        return _rename(sd, self._pairs(config))

    def trunk_from_blueprint(self, sd, config):
        return _rename(sd, _invert(self._pairs(config)))

    def droppable_hint(self, key):
        if key == "score.bias":
            return f"{self.prefix}ForSequenceClassification's score layer has no bias"
        return super().droppable_hint(key)


class Mistral(Llama):
    name, prefix = "mistral", "Mistral"

    def _biases(self, c):
        return dict(attention_bias=False, mlp_bias=False)

    def _sliding_window(self, c):
        layer_types = getattr(c, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            raise ConversionError(f"The Blueprint cannot express this Mistral: layer_types={layer_types} mixes "
                                  f"sliding-window and full attention (one sliding_window for all layers).")
        return c.sliding_window

    def _extra_problems(self, config):
        problems = []
        _problem(problems, config.attention_bias, "attention_bias=True (Mistral's projections have no biases)")
        _problem(problems, config.mlp_bias, "mlp_bias=True (Mistral's projections have no biases)")
        return problems

    def native_config(self, config, head):
        return transformers.MistralConfig(sliding_window=config.sliding_window,
                                          **self._native_config_fields(config, head))


class Qwen2(Llama):
    name, prefix = "qwen2", "Qwen2"

    def _biases(self, c):
        # Qwen2 has biases on q, k and v only; the Blueprint's attention_bias also covers o_proj, which gets a
        # zero bias: exactly the same function.
        return dict(attention_bias=True, mlp_bias=False)

    def _sliding_window(self, c):
        kinds = set(c.layer_types)
        if len(kinds) > 1:
            raise ConversionError(
                f"The Blueprint cannot express this Qwen2: use_sliding_window=True with max_window_layers="
                f"{c.max_window_layers} gives sliding-window attention to some layers only (layer_types "
                f"{c.layer_types}); the Blueprint has one sliding_window for all layers.")
        return c.sliding_window if kinds == {"sliding_attention"} else None

    def _extra_problems(self, config):
        problems = []
        _problem(problems, not config.attention_bias,
                 "attention_bias=False (Qwen2 has q/k/v biases; use architecture='llama' or 'mistral')")
        _problem(problems, config.mlp_bias, "mlp_bias=True (Qwen2's feed-forward has no biases)")
        _problem(problems, config.head_dim * config.num_attention_heads != config.hidden_size,
                 f"head_dim={config.head_dim} (Qwen2 needs head_dim = hidden_size / num_attention_heads)")
        return problems

    def native_config(self, config, head):
        fields = self._native_config_fields(config, head)
        fields.pop("head_dim")
        return transformers.Qwen2Config(use_sliding_window=config.sliding_window is not None,
                                        sliding_window=config.sliding_window, max_window_layers=0, **fields)

    def droppable_hint(self, key):
        if key.endswith("self_attn.o_proj.bias"):
            return ("Qwen2 has no o_proj bias (the Blueprint's attention_bias=True puts one on o_proj as well; "
                    "architecture='llama' keeps it)")
        return super().droppable_hint(key)


ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (GPT2(), Bert(), Llama(), Mistral(), Qwen2())}


# ---------------------------------------------------------------------------------------------------------------------
# Loading, building, state-dict plumbing
# ---------------------------------------------------------------------------------------------------------------------


BLUEPRINT_MODEL_TYPES = (BlueprintEncoderConfig.model_type, BlueprintDecoderConfig.model_type)


def _is_blueprint_config(config) -> bool:
    return getattr(config, "model_type", "") in BLUEPRINT_MODEL_TYPES


def _supported_types() -> str:
    return (f"{', '.join(ARCHITECTURES)} (converted to the Blueprint) and {', '.join(BLUEPRINT_MODEL_TYPES)} "
            f"(converted back to transformers)")


def check_model_folder(folder) -> str:
    """The model_type of the model saved in `folder`, read from its config.json without loading anything; a
    ConversionError (FileNotFoundError for a missing folder) naming the file and what is wrong otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder" + ("." if folder.exists() else " (it does not exist)."))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ConversionError(f"{config_file} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file} is not a JSON object (it holds a {type(config).__name__}).")
    model_type = config.get("model_type")
    if model_type is None:
        raise ConversionError(f"{config_file} has no model_type; the converter reads {_supported_types()}.")
    if model_type not in ARCHITECTURES and model_type not in BLUEPRINT_MODEL_TYPES:
        raise ConversionError(f"{config_file}: model_type {model_type!r} is not supported; supported: "
                              f"{_supported_types()}.")
    return model_type


def _load(model_or_folder) -> PreTrainedModel:
    """A model object as is, or the model saved in a folder (its class read from config.json's architectures), in
    the dtype it was saved in: a conversion to another dtype first checks that the weights fit it."""
    if isinstance(model_or_folder, PreTrainedModel):
        return model_or_folder
    folder = Path(model_or_folder)
    check_model_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    names = list(getattr(config, "architectures", None) or [])
    kwargs = {"dtype": "auto"}
    if _is_blueprint_config(config):
        candidates = [name for name in names if name in _BLUEPRINT_HEADS and hasattr(modeling_blueprint, name)]
        family = ENCODER if config.model_type == BlueprintEncoderConfig.model_type else DECODER
        name = candidates[0] if candidates else BLUEPRINT_CLASSES[(family, BASE)]
        return getattr(modeling_blueprint, name).from_pretrained(folder, **kwargs)
    arch = _architecture(config)
    supported = list(arch.native_classes.values())
    candidates = [name for name in names if name in supported]
    if names and not candidates:
        raise ConversionError(f"{folder} holds a {names[0]}, which is not supported; convertible {arch.name} "
                              f"classes: {', '.join(supported)}.")
    name = candidates[0] if candidates else arch.native_classes[BASE]
    return getattr(transformers, name).from_pretrained(folder, **kwargs)


def _architecture(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConversionError(f"model_type {model_type!r} is not supported; supported: {_supported_types()}.")
    return ARCHITECTURES[model_type]


def _blueprint_head(model) -> tuple[str, str]:
    for cls in type(model).__mro__:
        if cls.__name__ in _BLUEPRINT_HEADS:
            family = DECODER if model.config.is_causal else ENCODER
            return family, _BLUEPRINT_HEADS[cls.__name__]
    raise ConversionError(f"{type(model).__name__} is not a Blueprint model class.")


def _split(model, state_dict) -> tuple[dict, dict]:
    """(base-model weights without their prefix, head weights) of a model with a base-model prefix."""
    prefix = model.base_model_prefix
    if not hasattr(model, prefix) or getattr(model, prefix) is model:
        return dict(state_dict), {}
    trunk, heads = {}, {}
    for key, value in state_dict.items():
        if key.startswith(prefix + "."):
            trunk[key[len(prefix) + 1:]] = value
        else:
            heads[key] = value
    return trunk, heads


def _build(cls, config, dtype, **kwargs) -> PreTrainedModel:
    """An instance without random initialization (every weight is loaded next)."""
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype, **kwargs)
    return model


def _load_weights(model, mapped: dict, source_name: str, hint=None):
    """Loads `mapped` into `model` strictly: a bias the target has and the source lacks is zero (exact); a weight the
    target lacks may be dropped only if `hint` explains why and it is all zeros (or, for a pooler, unused)."""
    expected = model.state_dict()
    unexpected = [key for key in mapped if key not in expected]
    dropped_unused = {}
    for key in unexpected:
        reason = hint(key) if hint else None
        if reason is None:
            raise ConversionError(f"{source_name}: weight {key} has no counterpart in {type(model).__name__}.")
        is_pooler = ".pooler." in f".{key}"
        if not is_pooler and bool(mapped[key].count_nonzero()):
            raise ConversionError(f"{source_name}: {key} is not zero, but {reason}.")
        if is_pooler:
            dropped_unused.setdefault(reason, []).append(key)
        del mapped[key]
    for reason, keys in dropped_unused.items():
        warnings.warn(f"Dropping {', '.join(keys)}: {reason}.", stacklevel=3)
    for key, tensor in expected.items():
        if key not in mapped:
            if key.endswith(".bias"):
                mapped[key] = torch.zeros_like(tensor)
            else:
                raise ConversionError(f"{source_name}: no weight for {key} of {type(model).__name__}.")
        elif tuple(mapped[key].shape) != tuple(tensor.shape):
            raise ConversionError(f"{source_name}: {key} has shape {tuple(mapped[key].shape)}, "
                                  f"{type(model).__name__} expects {tuple(tensor.shape)}.")
    model.load_state_dict(mapped, strict=True)
    model.tie_weights()


def _finish(target, source):
    """Carries over what is not a weight: the generation settings (decoders) and train/eval mode."""
    if getattr(source, "generation_config", None) is not None and getattr(target, "generation_config", None):
        target.generation_config = copy.deepcopy(source.generation_config)
    target.train(source.training)
    return target


def _dtype_of(model, dtype):
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return next(model.parameters()).dtype


def _check_representable(model, dtype, source_name: str):
    """Refuses weights that `dtype` cannot hold: casting them would turn them into inf without a word (and the
    converted model would then look like a diverged run)."""
    target = _dtype_of(model, dtype)
    if not target.is_floating_point:
        return
    largest = torch.finfo(target).max
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or torch.finfo(tensor.dtype).max <= largest:
            continue
        overflows = tensor.to(target).isinf() & tensor.isfinite()
        if overflows.any():
            magnitude = tensor[overflows].abs().max().item()
            raise ConversionError(
                f"{source_name}: weight {name} holds values up to {magnitude:.4g} in magnitude, beyond the largest "
                f"{str(target).removeprefix('torch.')} ({largest:.4g}); converting would turn them into inf. Keep a "
                f"dtype that holds them (float32)."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def to_blueprint_config(native_config, *, head: str = BASE, add_pooling_layer: bool = True) -> BlueprintConfig:
    """The Blueprint config of a transformers GPT-2 / BERT / Llama / Mistral / Qwen2 config (no weights involved).
    `head` is one of "base", "causal_lm", "masked_lm", "seq_cls", "token_cls"; `add_pooling_layer` says whether a
    BERT base model has its pooler. Raises a ConversionError naming what the Blueprint cannot express."""
    arch = _architecture(native_config)
    fields = arch.blueprint_fields(native_config, head, add_pooling_layer and arch.name == "bert")
    fields.update(_common_fields(native_config, head))
    config_class = BlueprintDecoderConfig if arch.family == DECODER else BlueprintEncoderConfig
    return config_class(**fields)


def from_transformers(model_or_folder, *, dtype=None, attn_implementation: str | None = None) -> PreTrainedModel:
    """A transformers GPT-2 / BERT / Llama / Mistral / Qwen2 model (object or folder) as the matching Blueprint model,
    computing the same outputs."""
    source = _load(model_or_folder)
    if _is_blueprint_config(source.config):
        raise ConversionError(f"{type(source).__name__} is already a Blueprint model; use to_transformers().")
    arch = _architecture(source.config)
    head = arch.head_of(source)
    _check_representable(source, dtype, type(source).__name__)
    state_dict = source.state_dict()
    trunk, heads = _split(source, state_dict)
    config = to_blueprint_config(source.config, head=head, add_pooling_layer="pooler.dense.weight" in trunk)

    mapped = arch.trunk_to_blueprint(trunk, source.config)
    mapped_heads = arch.head_to_blueprint(heads, head)
    leftover = sorted(trunk) + sorted(heads)
    if leftover:
        raise ConversionError(f"{type(source).__name__}: weights the converter does not know: {', '.join(leftover)}.")
    if head != BASE:
        mapped = {f"model.{key}": value for key, value in mapped.items()}
    mapped.update(mapped_heads)

    cls = getattr(modeling_blueprint, BLUEPRINT_CLASSES[(arch.family, head)])
    implementation = attn_implementation or source.config._attn_implementation
    target = _build(cls, config, _dtype_of(source, dtype), attn_implementation=implementation)
    _load_weights(target, mapped, type(source).__name__)
    return _finish(target, source)


def to_transformers(model_or_folder, *, architecture: str | None = None, dtype=None,
                    attn_implementation: str | None = None) -> PreTrainedModel:
    """A Blueprint model (object or folder) as the transformers model that computes the same outputs.

    `architecture` ("gpt2", "bert", "llama", "mistral", "qwen2") picks the target; by default an encoder becomes
    BERT, a decoder with learned positions GPT-2, one with RoPE Llama (Mistral with a sliding window). Raises a
    ConversionError naming every switch the target cannot express."""
    source = _load(model_or_folder)
    config = source.config
    if not _is_blueprint_config(config):
        raise ConversionError(f"{type(source).__name__} is not a Blueprint model; use from_transformers().")
    _check_representable(source, dtype, type(source).__name__)
    family, head = _blueprint_head(source)
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ConversionError(f"architecture={architecture!r} is not supported; choose one of "
                              f"{', '.join(ARCHITECTURES)}.")
    arch = ARCHITECTURES[architecture or _default_architecture(config, family)]
    if arch.family != family:
        raise ConversionError(f"{type(source).__name__} is a Blueprint {family}, but {arch.name} is an "
                              f"{arch.family} architecture.")
    native_class = arch.native_class(head)
    problems = arch.problems(config, head)
    if not config.residual_connections:
        problems.append("residual_connections=False (every native architecture adds each sub-layer to its input)")
    if config.attention_dilation != 1:
        problems.append(f"attention_dilation={config.attention_dilation} (native sliding windows are contiguous)")
    if config.global_attention_tokens:
        problems.append(f"global_attention_tokens={config.global_attention_tokens} (no native decoder has global "
                        f"tokens)")
    if problems:
        raise ConversionError(f"{native_class.__name__} cannot express this {type(source).__name__}: "
                              f"{'; '.join(problems)}.")
    # No native architecture has word dropout.
    word_dropout = [f"word_dropout_prob={config.word_dropout_prob}"] if config.word_dropout_prob else []
    _warn_dropped(arch.dropped_dropouts(config, head) + word_dropout, native_class.__name__)

    trunk, heads = _split(source, source.state_dict())
    mapped = arch.trunk_from_blueprint(trunk, config)
    mapped_heads = arch.head_from_blueprint(heads, head)
    leftover = {**{f"model.{k}" if head != BASE else k: v for k, v in trunk.items()}, **heads}
    native_config = arch.native_config(config, head)
    implementation = attn_implementation or config._attn_implementation
    target = _build(native_class, native_config, _dtype_of(source, dtype), attn_implementation=implementation,
                    **arch.native_kwargs(config, head))
    prefix = target.base_model_prefix if head != BASE else None
    if prefix:
        mapped = {f"{prefix}.{key}": value for key, value in mapped.items()}
    mapped.update(mapped_heads)
    # Blueprint weights nothing mapped: offered to the target under their own name, so that _load_weights drops
    # them only with a reason (a zero bias the target lacks, an unused pooler) and refuses anything else.
    for key, value in leftover.items():
        mapped[key] = value
    _load_weights(target, mapped, type(source).__name__, hint=arch.droppable_hint)
    return _finish(target, source)


def _default_architecture(config, family: str) -> str:
    if family == ENCODER:
        return "bert"
    if config.position_embedding_type == "learned":
        return "gpt2"
    if config.position_embedding_type == "rope":
        return "mistral" if config.sliding_window is not None else "llama"
    raise ConversionError(
        f"No transformers architecture has position_embedding_type={config.position_embedding_type!r}: GPT-2 needs "
        f"'learned', Llama/Mistral/Qwen2 need 'rope'."
    )


def tokenizer_files(source_folder) -> list[str]:
    """The tokenizer files of `source_folder` (and a sentence-transformers pipeline's own files and module folders),
    as paths relative to it, each checked to stay inside it (see `hf_blueprint.paths.safe_join`): a `modules.json`
    path that is absolute or steps out with `..`, and a link to a file outside the folder, are refused by name."""
    source_folder = Path(source_folder)
    found = []
    for name in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES:
        path = source_folder / name
        if path.is_file() or path.is_symlink():  # a link is checked (and refused if it leads out), not skipped
            safe_join(source_folder, name, f"{source_folder} (tokenizer files)")
            found.append(name)
    modules_file = source_folder / "modules.json"
    if "modules.json" in found:  # sentence-transformers: pooling / normalize / dense modules live in subfolders
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise ConversionError(f"{modules_file} is not valid JSON ({error}).") from None
        if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
            raise ConversionError(f"{modules_file} must hold a list of module objects, as sentence-transformers "
                                  f"writes it.")
        for index, module in enumerate(modules):
            path = module.get("path")
            if path in ("", None):  # the model itself, at the top of the folder
                continue
            where = f"{modules_file}, module {index} 'path'"
            if safe_join(source_folder, path, where).is_dir():
                found += files_in_folder(source_folder, path, where)
    return found


def copy_tokenizer(source_folder, output_folder) -> list[str]:
    """Copies the tokenizer files (and a sentence-transformers pipeline's own files) of `source_folder` into
    `output_folder`, checked as `tokenizer_files` says; returns their paths relative to the folders."""
    files = tokenizer_files(source_folder)
    for relative in files:
        copy_file(source_folder, relative, output_folder, f"{source_folder} (tokenizer files)")
    return files


def _check_output_folder(source, output_dir: Path, overwrite: bool):
    """Refuses, before anything is loaded, an output folder that would overwrite what the user did not offer."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"The output {output_dir} exists and is not a folder.")
    if overwrite:
        return
    hint = "pass --overwrite (overwrite=True) to write the converted model there anyway"
    if isinstance(source, (str, os.PathLike)):
        source_dir, output = Path(source).resolve(), output_dir.resolve()
        if output == source_dir:
            raise ConversionError(f"The output folder {output_dir} is the source folder: the converted model would "
                                  f"replace the source; {hint}.")
        if output.is_relative_to(source_dir):
            raise ConversionError(f"The output folder {output_dir} is inside the source folder {source}; {hint}.")
        if source_dir.is_relative_to(output):
            raise ConversionError(f"The source folder {source} is inside the output folder {output_dir}; {hint}.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise FileExistsError(f"The output folder {output_dir} is not empty; {hint} (files of the same name and an "
                              f"earlier model's weights are replaced, other files are kept).")


def _publish(staging: Path, output_dir: Path):
    """Moves the written model from `staging` into `output_dir`. A missing or empty output folder becomes it whole.
    Into a folder the user let us overwrite, each file replaces the entry of its name (a link there is replaced,
    never written through) and the weights files of an earlier model that the new one does not replace go."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    if not any(output_dir.iterdir()):
        output_dir.rmdir()
        os.replace(staging, output_dir)
        return
    for entry in output_dir.iterdir():
        if WEIGHTS_FILE.fullmatch(entry.name) and not (staging / entry.name).exists() and not entry.is_dir():
            entry.unlink()
    for current, folders, files in os.walk(staging):
        target = output_dir / Path(current).relative_to(staging)
        for name in folders:
            place = target / name
            if place.is_symlink() or (place.exists() and not place.is_dir()):
                place.unlink()
            place.mkdir(exist_ok=True)
        for name in files:
            place = target / name
            if place.is_dir() and not place.is_symlink():
                raise FileExistsError(f"{place} is a folder; the converted model has a file of that name there.")
            os.replace(Path(current) / name, place)  # replaces a link itself, not what it points to


def convert(source, output_dir, *, tokenizer=None, architecture: str | None = None, dtype=None,
            overwrite: bool = False) -> PreTrainedModel:
    """Converts `source` (a model object or folder; the direction follows its model_type) and saves the result in
    `output_dir` with the tokenizer: `tokenizer` (an object or a folder), else the source folder's tokenizer files.
    Returns the converted model.

    An output folder that is not empty, or that is (inside, or contains) the source folder, is refused unless
    `overwrite=True`; then the files written replace those of the same name and an earlier model's weights files,
    and other files stay. Everything is checked before any weight is loaded, and written next to the output folder
    first, so that a failure leaves the output folder as it was."""
    output_dir = Path(output_dir)
    if not isinstance(source, PreTrainedModel):
        check_model_folder(source)
    tokenizer_folder = None
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer_folder = Path(tokenizer)
        if not tokenizer_folder.is_dir():
            raise FileNotFoundError(f"The tokenizer folder {tokenizer_folder} does not exist.")
    elif tokenizer is None and not isinstance(source, PreTrainedModel):
        tokenizer_folder = Path(source)
    files = tokenizer_files(tokenizer_folder) if tokenizer_folder is not None else []
    if isinstance(tokenizer, (str, os.PathLike)) and not files:
        raise FileNotFoundError(f"The tokenizer folder {tokenizer_folder} holds no tokenizer file (none of "
                                f"{', '.join(TOKENIZER_FILES)}).")
    _check_output_folder(source, output_dir, overwrite)

    model = _load(source)
    if _is_blueprint_config(model.config):
        converted = to_transformers(model, architecture=architecture, dtype=dtype)
    else:
        if architecture is not None:
            raise ConversionError("`architecture` picks the target of a Blueprint -> transformers conversion; a "
                                  "transformers model converts to the Blueprint family of its own architecture.")
        converted = from_transformers(model, dtype=dtype)

    output_dir = output_dir.resolve()  # a link given as the output is where the user wants it: follow it once
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output folder (same file system, so that moving it into place is a rename), with the permissions
    # a new folder gets (tempfile.mkdtemp's would be owner-only).
    staging = output_dir.parent / f".{output_dir.name}.converting-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        converted.save_pretrained(staging)
        if tokenizer is not None and tokenizer_folder is None:
            tokenizer.save_pretrained(staging)
        for relative in files:
            copy_file(tokenizer_folder, relative, staging, f"{tokenizer_folder} (tokenizer files)")
        _publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return converted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_blueprint.convert",
        description="Convert a checkpoint folder between transformers' GPT-2 / BERT / Llama / Mistral / Qwen2 and the "
                    "Blueprint classes, exactly (same outputs). The direction follows the source's model_type; the "
                    "tokenizer files are copied along.",
        epilog="Examples: python -m hf_blueprint.convert ./bert-base-uncased ./blueprint-bert ; "
               "python -m hf_blueprint.convert ./blueprint-llama ./llama --architecture llama",
    )
    parser.add_argument("source", help="folder with config.json and the weights (transformers or Blueprint)")
    parser.add_argument("output", help="folder to write the converted model, its config and the tokenizer to (new or "
                                       "empty, unless --overwrite)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES),
                        help="target of a Blueprint -> transformers conversion (default: bert for an encoder; gpt2, "
                             "llama or mistral for a decoder, from its positions and sliding window)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the written weights (default: the source's); weights the dtype cannot hold "
                             "are refused, not turned into inf")
    parser.add_argument("--tokenizer", help="folder to copy the tokenizer from (default: the source folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an output folder that is not empty, or that is (inside, or holds) the "
                             "source folder: files of the same name and an earlier model's weights are replaced, "
                             "other files are kept")
    args = parser.parse_args(argv)
    try:
        model = convert(args.source, args.output, tokenizer=args.tokenizer, architecture=args.architecture,
                        dtype=args.dtype, overwrite=args.overwrite)
    except (ConversionError, UnsafePathError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {type(model).__name__} ({model.num_parameters():,} parameters) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
