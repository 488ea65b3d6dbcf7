"""The Blueprint Transformer, readable top to bottom in the order of the paper's figure.

    token ids ──> token embedding (* sqrt(d_model)) + positional encoding ──> dropout
              ──> N x TransformerBlock:  x = x + Dropout(MultiHeadAttention(x)),  x = x + Dropout(FeedForward(x))
                                          with a norm after each add (Post-LN, the paper) or before each
                                          sub-layer plus one final norm (Pre-LN)
              ──> head: linear + softmax over the vocabulary, or a classifier

Sections: normalization, positional encodings, multi-head attention, feed-forward, the block, the trunk (embedding
stage, blocks, final norm), the heads, and the paper's encoder-decoder. One trunk serves every family;
`config.is_causal` is the only difference between the encoder (bidirectional attention) and the decoder (causal
attention with a key/value cache), and the encoder-decoder's decoder adds cross-attention to its blocks.

This file is architecture only. Input and generation checks live in `modeling_checks.py`, padding-free batches in
`packing.py`. All three are shipped as Hub remote code: they may import only torch, transformers and each other.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from transformers import AttentionInterface, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, is_torchdynamo_compiling

from .configuration_blueprint import (
    BlueprintConfig,
    BlueprintDecoderConfig,
    BlueprintEncoderConfig,
    BlueprintSeq2SeqConfig,
)
from .modeling_checks import (
    CheckedLoading,
    GenerationChecks,
    accepts_past_key_values,
    check_attention_mask_keys,
    check_inputs,
    check_label_values,
    check_pattern_implementation,
    check_positions,
    check_tensor_parallel,
    has_targets,
    reject_unknown_kwargs,
    zero_loss,
)
from .losses import causal_lm_loss, linear_cross_entropy, logits_are_computed
from .packing import PackedSequences, find_packed_sequences, pool_segments
from .sparse_attention import SparseAttentionPattern, sparse_attention_forward

try:  # internal to transformers: signatures move between minor versions (GUIDE section 2)
    from transformers.masking_utils import (
        AttentionMaskInterface,
        and_masks,
        create_bidirectional_mask,
        create_causal_mask,
        create_sliding_window_causal_mask,
        packed_sequence_mask_function,
        sdpa_mask,
    )
    from transformers.utils.output_capturing import OutputRecorder, capture_outputs
except ImportError as error:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "hf_blueprint needs transformers>=5.24,<6 (transformers.masking_utils with the `cache` argument); "
        "install it with: pip install 'transformers>=5.24,<6'"
    ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): LayerNorm without centring or bias."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        # The mean of squares is taken in fp32: in bf16/fp16 it loses too many bits.
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(config: BlueprintConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    if config.norm_type == "none":  # a research switch: the ablation of normalization
        return nn.Identity()
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.norm_bias)


# ---------------------------------------------------------------------------------------------------------------------
# Positional encodings
# ---------------------------------------------------------------------------------------------------------------------


class SinusoidalPositionalEncoding(nn.Module):
    """The paper's fixed table: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        self.num_positions, self.dim = num_positions, dim
        # Not persistent: it is a function of the config, so checkpoints don't store it; `_init_weights` refills it
        # after a meta-device `from_pretrained`.
        self.register_buffer("table", self.compute_table(num_positions, dim), persistent=False)

    @staticmethod
    def compute_table(num_positions: int, dim: int) -> torch.Tensor:
        position = torch.arange(num_positions, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(num_positions, dim)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
        return table

    def forward(self, position_ids: torch.LongTensor) -> torch.Tensor:
        return self.table[position_ids]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., 2021): rotates query/key pairs by a position-dependent angle, so that
    attention scores depend on relative distance only."""

    def __init__(self, config: BlueprintConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(self.head_dim, self.theta), persistent=False)

    @staticmethod
    def compute_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(query, key, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


class AlibiPositionalBias(nn.Module):
    """ALiBi (Press et al., 2022): no position embedding at all; each head h subtracts slope_h * distance from its
    attention scores, with geometric slopes so that heads see different ranges."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("slopes", self.compute_slopes(num_heads), persistent=False)

    @staticmethod
    def compute_slopes(num_heads: int) -> torch.Tensor:
        # For a power of two n: 2^(-8/n), 2^(-16/n), ...; otherwise the closest power of two plus every other slope
        # of the next one, as in the paper's reference implementation.
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = [2 ** (-8.0 * (i + 1) / closest) for i in range(closest)]
        if closest < num_heads:
            extra = [2 ** (-4.0 * (i + 1) / closest) for i in range(2 * closest)][0::2]
            slopes += extra[: num_heads - closest]
        return torch.tensor(slopes, dtype=torch.float32)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Positions of shape (q,) and (k,), or (batch, q) and (batch, k); returns (1 or batch, heads, q, k)."""
        distance = (query_positions[..., :, None] - key_positions[..., None, :]).abs().float()
        bias = -self.slopes[:, None, None] * distance.unsqueeze(-3)
        return (bias if bias.dim() == 4 else bias.unsqueeze(0)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------------------------------------------------


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim): each key/value head serves n_rep queries."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d_k) + bias) V, written out. Accepts the additive float masks of the eager interface and
    the boolean (or absent, meaning plain causal) masks of sdpa, so it can also serve `output_attentions=True`."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    # Scaled before the product, not after: in fp16 the unscaled dot products of wide heads overflow to inf.
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if position_bias is not None:
        scores = scores + position_bias

    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and module.is_causal and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    min_value = torch.finfo(scores.dtype).min
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, min_value)
    elif attention_mask is not None:
        # Clamped so that a fully masked row stays finite (uniform) instead of becoming -inf and then NaN.
        scores = (scores + attention_mask).clamp_min(min_value)

    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def bidirectional_window_overlay(sliding_window: int) -> Callable:
    """Local attention without direction: a query sees the keys less than `sliding_window` positions away."""

    def within_window(batch_idx, head_idx, q_idx, kv_idx):
        return abs(q_idx - kv_idx) < sliding_window

    return within_window


def sparse_pattern_overlay(window: int, dilation: int, causal: bool, global_tokens: torch.Tensor | None) -> Callable:
    """The dilated window with global tokens as a mask function of transformers' builders (True = attend), in the
    keys' absolute indices (a cache's included): the keys a step back in multiples of `dilation` and less than
    `window` steps away, and any key or query marked in `global_tokens` (batch, keys). The causal builder adds
    causality, so a global query never sees the future. `sparse_attention.pattern_mask_mod` is the same pattern."""

    def visible(batch_idx, head_idx, q_idx, kv_idx):
        distance = q_idx - kv_idx
        steps = distance // dilation
        in_window = ((steps >= 0) & (steps < window)) if causal else (abs(steps) < window)
        allowed = (distance % dilation == 0) & in_window
        if global_tokens is not None:
            allowed = allowed | global_tokens[batch_idx, kv_idx] | global_tokens[batch_idx, q_idx]
        return allowed

    return visible


def attention_with_patterns(module, query, key, value, attention_mask, **kwargs):
    """The `block_sparse` attention implementation: a SparseAttentionPattern runs the block path of
    sparse_attention.py, a dense mask (a decoding step with a cache) sdpa."""
    if isinstance(attention_mask, SparseAttentionPattern):
        return sparse_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# Under sdpa, local attention takes the block path from this many window spans and this length on: below either, the
# fused kernel with the window's dense mask is faster (docs/BENCHMARKS.md: about 8 spans at window 256; at 128-256
# tokens the block path is 1.5-9x slower at every window, at 512 even, from 1,024 on faster at 8 spans or more).
BLOCK_PATH_MIN_SPANS = 8
BLOCK_PATH_MIN_LENGTH = 1024

# Local and sparse attention as an attention implementation of its own (`attn_implementation="block_sparse"`): the
# block path wherever a step can take it, sdpa with the dense mask elsewhere (so its masks are sdpa's).
AttentionInterface.register("block_sparse", attention_with_patterns)
AttentionMaskInterface.register("block_sparse", sdpa_mask)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O with head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Self-attention takes Q, K and V from the same sequence; cross-attention (the encoder-decoder's second
    sub-layer) takes Q from the decoder and K, V from the encoder output. With fewer key/value heads than query
    heads this is grouped-query (or multi-query) attention. The score computation itself goes through
    transformers' attention interface (eager, sdpa, flash, flex)."""

    def __init__(self, config: BlueprintConfig, layer_idx: int, is_causal: bool, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal and not is_cross_attention  # read by the sdpa and flash integrations
        self.is_cross_attention = is_cross_attention
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        # Cross-attention reads the whole source, always: a window applies to self-attention only.
        self.sliding_window = None if is_cross_attention else config.sliding_window
        self.attention_dropout = config.attention_dropout

        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_bias: torch.Tensor | None = None,
        cache: Cache | None = None,
        key_value_states: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if self.is_cross_attention:
            key, value = self._cross_attention_key_value(key_value_states, cache)
        else:
            key = self.k_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
            value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
            if position_embeddings is not None:
                query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)

        implementation = self.config._attn_implementation
        if kwargs.get("output_attentions", self.config.output_attentions) or implementation == "eager":
            # Only the eager path materializes the weights; it understands sdpa's masks too.
            attention_interface: Callable = eager_attention_forward
        elif isinstance(attention_mask, SparseAttentionPattern) or (
            isinstance(attention_mask, PackedSequences) and isinstance(attention_mask.attention_mask,
                                                                       SparseAttentionPattern)
        ):
            attention_interface = sparse_attention_forward  # the trunk chose the block path for this step
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)

        if position_bias is not None and position_bias.shape[1] != query.shape[1]:
            position_bias = self.heads_of_this_rank(position_bias, query.shape[1])
        packed = attention_mask if isinstance(attention_mask, PackedSequences) else None
        if packed is not None:  # a padding-free row: each sequence attends within itself, gathered into a padded batch
            query, key, value = packed.pad(query), packed.pad(key), packed.pad(value)
            attention_mask = packed.attention_mask
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            position_bias=position_bias,
            **kwargs,
        )
        if packed is not None:
            attn_output = packed.unpad(attn_output, input_shape[0])
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights

    def heads_of_this_rank(self, position_bias: torch.Tensor, local_heads: int) -> torch.Tensor:
        """Under tensor parallelism each rank holds a contiguous block of heads (q_proj split by output columns):
        ALiBi's per-head bias, built for every head, is cut to this rank's block."""
        weight = self.q_proj.weight
        mesh = getattr(weight, "device_mesh", None)
        if mesh is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        else:
            rank = mesh.get_local_rank("tp" if mesh.mesh_dim_names and "tp" in mesh.mesh_dim_names else None)
        return position_bias[:, rank * local_heads:(rank + 1) * local_heads]

    def _cross_attention_key_value(self, encoder_states, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the encoder output: projected once, then read from the cache at every decoding step."""
        if isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        shape = (*encoder_states.shape[:-1], -1, self.head_dim)
        key = self.k_proj(encoder_states).view(shape).transpose(1, 2)
        value = self.v_proj(encoder_states).view(shape).transpose(1, 2)
        if isinstance(cache, EncoderDecoderCache):
            key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
            cache.is_updated[self.layer_idx] = True
        return key, value


# ---------------------------------------------------------------------------------------------------------------------
# Position-wise feed-forward network
# ---------------------------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """FFN(x) = down(act(up(x))) applied at every position (the paper: max(0, x W1 + b1) W2 + b2), or the gated
    variant down(act(gate(x)) * up(x)) of Shazeer (2020): SwiGLU, GeGLU."""

    def __init__(self, config: BlueprintConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias) if config.ffn_type == "glu" else None
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            inner = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        else:
            inner = self.act_fn(self.up_proj(x))
        if self.training:  # dropout is the identity in eval; skipping the call saves its overhead per decoding step
            inner = self.dropout(inner)
        return self.down_proj(inner)


# ---------------------------------------------------------------------------------------------------------------------
# The block: two residual sub-layers
# ---------------------------------------------------------------------------------------------------------------------


class TransformerBlock(GradientCheckpointingLayer):
    """Residual sub-layers: self-attention, then (in the encoder-decoder's decoder) cross-attention over the
    encoder output, then the feed-forward network. Each is wrapped as LayerNorm(x + Dropout(Sublayer(x))) in
    Post-LN (the paper) or as x + Dropout(Sublayer(Norm(x))) in Pre-LN."""

    def __init__(self, config: BlueprintConfig, layer_idx: int, is_causal: bool, has_cross_attention: bool = False):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.residual = config.residual_connections
        self.self_attn = MultiHeadAttention(config, layer_idx, is_causal)
        self.self_attn_norm = build_norm(config)
        self.cross_attn = MultiHeadAttention(config, layer_idx, is_causal, True) if has_cross_attention else None
        self.cross_attn_norm = build_norm(config) if has_cross_attention else None
        self.mlp = FeedForward(config)
        self.mlp_norm = build_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def sublayer_input(self, hidden_states: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        return norm(hidden_states) if self.pre_norm else hidden_states

    def add_residual(self, residual: torch.Tensor, sublayer_output: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        if self.training:  # the identity in eval (skipped: a decoding step would pay two module calls per block)
            sublayer_output = self.dropout(sublayer_output)
        hidden_states = residual + sublayer_output if self.residual else sublayer_output
        return hidden_states if self.pre_norm else norm(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_bias: torch.Tensor | None = None,
        cache: Cache | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        # Both inputs that carry gradients come positionally: reentrant gradient checkpointing only propagates
        # gradients to positional tensors (GradientCheckpointingLayer).
        attn_output, _ = self.self_attn(
            self.sublayer_input(hidden_states, self.self_attn_norm),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            position_bias=position_bias,
            cache=cache,
            **kwargs,
        )
        hidden_states = self.add_residual(hidden_states, attn_output, self.self_attn_norm)

        if self.cross_attn is not None:
            attn_output, _ = self.cross_attn(
                self.sublayer_input(hidden_states, self.cross_attn_norm),
                attention_mask=encoder_attention_mask,
                cache=cache,
                key_value_states=encoder_hidden_states,
                **kwargs,
            )
            hidden_states = self.add_residual(hidden_states, attn_output, self.cross_attn_norm)

        mlp_output = self.mlp(self.sublayer_input(hidden_states, self.mlp_norm))
        return self.add_residual(hidden_states, mlp_output, self.mlp_norm)


# ---------------------------------------------------------------------------------------------------------------------
# The trunk shared by every family: embedding stage, N blocks, the final norm of Pre-LN
# ---------------------------------------------------------------------------------------------------------------------


def _names_module(rule: list[str], name: list[str]) -> bool:
    """Whether a parallel-plan rule ("layers.*.mlp.up_proj", split on dots) names the module `name` (split too)."""
    return len(rule) == len(name) and all(r == n or (r == "*" and n.isdigit()) for r, n in zip(rule, name))


class BlueprintPreTrainedModel(CheckedLoading, PreTrainedModel):
    config_class = BlueprintConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # tests/test_compile.py: training step and static-cache generation, fullgraph
    # What `output_hidden_states` / `output_attentions` collect (transformers' capture_outputs): each block's output,
    # and the weights each self-attention returns.
    _can_record_outputs = {
        "hidden_states": TransformerBlock,
        "attentions": OutputRecorder(MultiHeadAttention, index=1, layer_name="self_attn"),
    }

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # Scaled token embeddings start at std d^-0.5 so that after the sqrt(d) scale they have unit variance,
            # the magnitude of the sinusoidal table they are added to (as in tensor2tensor and fairseq).
            is_scaled = self.config.scale_embeddings and module is self.get_input_embeddings()
            init.normal_(module.weight, mean=0.0, std=self.config.hidden_size**-0.5 if is_scaled else std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, SinusoidalPositionalEncoding):
            init.copy_(module.table, module.compute_table(module.num_positions, module.dim))
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.head_dim, module.theta))
        elif isinstance(module, AlibiPositionalBias):
            init.copy_(module.slopes, module.compute_slopes(module.num_heads))
        elif isinstance(module, BlueprintForMaskedLM):
            init.zeros_(module.lm_head.bias)

    def init_parallel_plans(self):
        # One tensor-parallel plan serves every stack of a family: keep the rules that name a module of this model
        # (the encoder of the encoder-decoder has no cross-attention; the encoder-decoder holds its blocks one level
        # down, in its two stacks, which bring their own rules).
        super().init_parallel_plans()
        check_tensor_parallel(self.config)
        if self._tp_plan:
            names = [name.split(".") for name, _ in self.named_modules()]
            self._tp_plan = {rule: style for rule, style in self._tp_plan.items()
                             if any(_names_module(rule.split("."), name) for name in names)}

    def _resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=None, mean_resizing=True):
        """transformers resizes the input embedding (the encoder's) and the output layer; an encoder-decoder with
        untied embeddings has a third matrix, the decoder's, which must grow with them."""
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if getattr(self.config, "is_encoder_decoder", False):
            decoder = self.get_decoder()
            new_size = embeddings.weight.shape[0]
            if decoder.embed_tokens.weight.shape[0] != new_size:
                decoder.set_input_embeddings(
                    self._get_resized_embeddings(decoder.embed_tokens, new_size, mean_resizing=mean_resizing)
                )
        return embeddings


class BlueprintModel(BlueprintPreTrainedModel):
    """Embedding stage, the stack of blocks, and the final norm of Pre-LN.

    Causal or bidirectional comes from the config of the family (`config.is_causal`); the encoder-decoder builds
    one stack of each kind explicitly (its decoder is `BlueprintSeq2SeqDecoder`, whose blocks add cross-attention).

    The embedding stage (token embedding, * sqrt(d_model), token types, positional encoding, word dropout, norm,
    dropout) is `embed()` over the tables built first in `__init__`. Its tables sit on the trunk itself, not in an
    embeddings sub-module: their checkpoint names (`embed_tokens`, `embed_positions`, ...) are those of every saved
    folder and Hub repo, and a sub-module would prefix them."""

    has_cross_attention = False

    def __init__(
        self,
        config: BlueprintConfig,
        is_causal: bool | None = None,
        num_layers: int | None = None,
        add_pooling_layer: bool | None = None,
    ):
        if is_causal is None and getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(self).__name__} is one stack of blocks, but this is an encoder-decoder config "
                f"({config.model_type!r}): none of its encoder.* / decoder.* weights would load. Use "
                f"BlueprintSeq2SeqModel or BlueprintForConditionalGeneration (AutoModel / AutoModelForSeq2SeqLM); "
                f"their get_encoder() and get_decoder() return the two stacks."
            )
        super().__init__(config)
        self.is_causal = config.is_causal if is_causal is None else is_causal

        # The embedding stage.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.embedding_scale = math.sqrt(config.hidden_size) if config.scale_embeddings else 1.0
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        position_type = config.position_embedding_type
        self.embed_positions = None
        if position_type == "sinusoidal":
            self.embed_positions = SinusoidalPositionalEncoding(config.max_position_embeddings, config.hidden_size)
        elif position_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embedding_norm = build_norm(config) if config.embedding_norm else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Positions that act inside attention instead.
        self.rotary_emb = RotaryEmbedding(config) if position_type == "rope" else None
        self.alibi = AlibiPositionalBias(config.num_attention_heads) if position_type == "alibi" else None

        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        self.layers = nn.ModuleList(
            TransformerBlock(config, i, self.is_causal, self.has_cross_attention) for i in range(num_layers)
        )
        self.norm = build_norm(config) if config.norm_position == "pre" else None
        add_pooling_layer = config.add_pooling_layer if add_pooling_layer is None else add_pooling_layer
        self.pooler = Pooler(config) if add_pooling_layer else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    @accepts_past_key_values
    @reject_unknown_kwargs
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast | BaseModelOutputWithPooling | BaseModelOutputWithPastAndCrossAttentions:
        check_inputs(self, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, cache,
                     encoder_hidden_states)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        # A padding-free batch (several sequences in a row, position_ids restarting at 0) keeps no cache.
        packed_sequences = find_packed_sequences(position_ids, attention_mask, batch_size) if cache is None else None
        use_cache = self.is_causal and packed_sequences is None and (
            self.config.use_cache if use_cache is None else use_cache
        )
        if use_cache and cache is None:
            cache = self.new_cache()
        past_length = cache.get_seq_length() if cache is not None else 0
        check_attention_mask_keys(self, attention_mask, cache, past_length, seq_len, batch_size)
        if position_ids is None:
            position_ids = self.default_position_ids(attention_mask, past_length, seq_len, inputs_embeds.device)
        check_positions(self, position_ids)

        hidden_states = self.embed(inputs_embeds, token_type_ids, position_ids)
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        self_attention_mask, position_bias = self.self_attention_inputs(
            hidden_states, attention_mask, cache, past_length, position_ids, packed_sequences, output_attentions,
            global_attention_mask,
        )
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None
        if self.has_cross_attention:
            encoder_attention_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden_states,
                attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )

        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                encoder_hidden_states,
                attention_mask=self_attention_mask,
                position_embeddings=position_embeddings,
                position_bias=position_bias,
                cache=cache,
                encoder_attention_mask=encoder_attention_mask,
                **kwargs,
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return self.output(hidden_states, cache if use_cache else None, attention_mask, packed_sequences)

    def embed(self, inputs_embeds, token_type_ids, position_ids) -> torch.Tensor:
        """Token embedding * sqrt(d_model) (+ token types) + positional encoding, then dropout."""
        hidden_states = inputs_embeds * self.embedding_scale if self.embedding_scale != 1.0 else inputs_embeds
        if self.training and self.config.word_dropout_prob > 0:
            keep_probability = 1.0 - self.config.word_dropout_prob
            keep = torch.bernoulli(hidden_states.new_full((*hidden_states.shape[:-1], 1), keep_probability))
            hidden_states = hidden_states * keep / keep_probability
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
            hidden_states = hidden_states + self.token_type_embeddings(token_type_ids)
        if self.embed_positions is not None:
            hidden_states = hidden_states + self.embed_positions(position_ids).to(hidden_states.dtype)
        if self.embedding_norm is not None:
            hidden_states = self.embedding_norm(hidden_states)
        return self.dropout(hidden_states) if self.training else hidden_states

    def new_cache(self) -> Cache:
        if self.config.attention_dilation > 1 or self.config.global_attention_tokens > 0:
            return DynamicCache()  # full layers: the pattern reaches past the last `sliding_window` keys
        return DynamicCache(config=self.config.get_text_config(decoder=True))  # sized for this stack's depth

    @staticmethod
    def default_position_ids(attention_mask, past_length, seq_len, device) -> torch.LongTensor:
        """Positions count real tokens only, so a left-padded sequence gets the same positions as unpadded."""
        if attention_mask is not None and attention_mask.dim() == 2:
            positions = attention_mask.long().cumsum(-1) - 1
            return positions.clamp_min(0)[:, -seq_len:]
        # arange(T) + past rather than arange(past, past + T): with a static cache `past_length` is a tensor, and
        # torch.export / torch.compile cannot trace an arange whose bounds are data.
        return (torch.arange(seq_len, device=device) + past_length).unsqueeze(0)

    def self_attention_inputs(self, hidden_states, attention_mask, cache, past_length, position_ids,
                              packed_sequences, output_attentions, global_attention_mask):
        """The self-attention mask of this step and ALiBi's distance bias (None without ALiBi). The mask is a
        SparseAttentionPattern where local attention takes its block path, else a mask in the attention
        implementation's format (None when nothing is masked)."""
        config = self.config
        seq_len = hidden_states.shape[1]
        global_tokens = self.global_tokens(attention_mask, past_length, position_ids, global_attention_mask)
        check_pattern_implementation(self, global_tokens is not None)
        blocks = self.takes_block_path(seq_len, past_length, output_attentions)
        if packed_sequences is not None and config._attn_implementation in ("sdpa", "eager", "block_sparse") \
                and not output_attentions and not is_torchdynamo_compiling():
            # Attention per packed sequence (PackedSequences) instead of over the whole row with a block-diagonal
            # mask; output_attentions keeps the row's (query, key) layout, torch.compile the static shapes of the mask.
            packed = PackedSequences(packed_sequences)
            if global_tokens is not None:
                global_tokens = global_tokens.expand(hidden_states.shape[0], -1).reshape(-1)[packed.token_index]
                global_tokens = global_tokens & packed.is_token
            if blocks:
                packed.attention_mask = self.sparse_pattern(packed.is_token, packed.positions, global_tokens)
                return packed, None
            packed.attention_mask = self.build_attention_mask(
                hidden_states.new_empty(*packed.is_token.shape, 0), packed.is_token, None, packed.positions, None,
                global_tokens,
            )
            bias = None if self.alibi is None else self.alibi(packed.positions, packed.positions, hidden_states.dtype)
            return packed, bias
        if blocks:
            padding = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
            if global_tokens is not None:
                global_tokens = global_tokens.expand(hidden_states.shape[0], -1)
            return self.sparse_pattern(padding, position_ids, global_tokens), None
        mask = self.build_attention_mask(hidden_states, attention_mask, cache, position_ids, packed_sequences,
                                         global_tokens)
        bias = self.alibi_bias(cache, position_ids, hidden_states) if self.alibi is not None else None
        return mask, bias

    def takes_block_path(self, seq_len, past_length, output_attentions) -> bool:
        """Local attention runs block by block (sparse_attention.py: time and memory linear in the length) when
        asked for (`attn_implementation="block_sparse"`), or under sdpa once the sequence is long enough to gain
        (BLOCK_PATH_MIN_SPANS windows and BLOCK_PATH_MIN_LENGTH tokens); never for a decoding step (a cache already holds keys), for
        output_attentions (which needs the dense weights) or under torch.compile (the block path is not traceable)."""
        config = self.config
        if config.sliding_window is None or output_attentions or is_torchdynamo_compiling() or past_length != 0:
            return False
        span = config.sliding_window * config.attention_dilation
        implementation = config._attn_implementation
        long_enough = seq_len >= max(BLOCK_PATH_MIN_SPANS * span, BLOCK_PATH_MIN_LENGTH)
        return implementation == "block_sparse" or (implementation == "sdpa" and long_enough)

    def sparse_pattern(self, key_padding_mask, positions, global_tokens) -> SparseAttentionPattern:
        config = self.config
        return SparseAttentionPattern(
            window=config.sliding_window, causal=self.is_causal, dilation=config.attention_dilation,
            global_mask=global_tokens, key_padding_mask=key_padding_mask,
            positions=positions if self.alibi is not None else None,
            alibi_slopes=self.alibi.slopes if self.alibi is not None else None,
        )

    def global_tokens(self, attention_mask, past_length, position_ids, global_attention_mask):
        """Which tokens are global, (batch or 1, keys so far): the first `global_attention_tokens` of each sequence
        (by position, so left padding does not shift them) and those `global_attention_mask` marks. None without."""
        first = self.config.global_attention_tokens
        if global_attention_mask is not None:
            if self.config.sliding_window is None:
                raise ValueError(f"{type(self).__name__}: `global_attention_mask` marks the global tokens of a sparse "
                                 f"pattern, but this model has no sliding_window: every token already sees all.")
            if past_length != 0:
                raise ValueError(f"{type(self).__name__}: `global_attention_mask` is for a forward without cached "
                                 f"keys; a decoding step with a cache takes `global_attention_tokens` (the first "
                                 f"tokens of each sequence) only.")
        if first == 0:
            return None if global_attention_mask is None else global_attention_mask.bool()
        if past_length != 0 and attention_mask is not None and attention_mask.dim() == 2:
            positions = attention_mask.long().cumsum(-1) - 1  # every key so far, cached ones included
        elif past_length != 0:
            positions = torch.arange(past_length + position_ids.shape[-1], device=position_ids.device)[None]
        else:
            positions = position_ids
        tokens = positions < first
        if attention_mask is not None and attention_mask.dim() == 2:
            tokens = tokens & attention_mask.bool()
        return tokens if global_attention_mask is None else tokens | global_attention_mask.bool()

    def build_attention_mask(self, hidden_states, attention_mask, cache, position_ids, packed_sequences,
                             global_tokens=None):
        """The mask in the format of the configured attention implementation; None when nothing is masked."""
        config = self.config
        pattern = None
        if config.sliding_window is not None and (config.attention_dilation > 1 or global_tokens is not None):
            if global_tokens is not None:
                global_tokens = global_tokens.expand(hidden_states.shape[0], -1)
            pattern = sparse_pattern_overlay(config.sliding_window, config.attention_dilation, self.is_causal,
                                             global_tokens)
        if self.is_causal:
            if pattern is not None:  # the dilated window / global tokens, over the keys of a full cache
                return create_causal_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                          cache=cache, position_ids=position_ids, and_mask_function=pattern)
            build = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
            return build(
                config=config,
                inputs_embeds=hidden_states,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
        # The causal builders detect packed rows from position_ids themselves; the bidirectional ones need telling.
        restrictions = []
        if packed_sequences is not None:
            restrictions.append(packed_sequence_mask_function(packed_sequences))
        if pattern is not None:
            restrictions.append(pattern)
        elif config.sliding_window is not None:
            # transformers' bidirectional window builder keeps distances <= W (2W + 1 keys); the Blueprint's window is
            # one meaning in every family, distance < W (W keys causal, 2W - 1 bidirectional), as flash-attention's.
            restrictions.append(bidirectional_window_overlay(config.sliding_window))
        return create_bidirectional_mask(
            config=config, inputs_embeds=hidden_states, attention_mask=attention_mask,
            and_mask_function=and_masks(*restrictions) if restrictions else None,
        )

    def alibi_bias(self, cache, position_ids, hidden_states) -> torch.Tensor:
        implementation = self.config._attn_implementation
        if implementation not in ("eager", "sdpa", "block_sparse"):
            raise ValueError(
                f"position_embedding_type='alibi' adds a bias to the attention scores, which the "
                f"'{implementation}' attention implementation cannot take; use attn_implementation='sdpa' or 'eager'."
            )
        if cache is None:
            # Distances between the tokens' own positions: right for padded and for packed rows alike.
            positions = position_ids.expand(hidden_states.shape[0], -1)
            return self.alibi(positions, positions, hidden_states.dtype)
        # With a cache, key positions as the cache returns them (a sliding-window cache keeps only the latest keys),
        # taken from the cache's own offsets as the mask builders do (a tensor for static caches: no graph break).
        seq_len = hidden_states.shape[1]
        kv_length, kv_offset = cache.get_mask_sizes(seq_len, 0)
        device = hidden_states.device
        query_positions = torch.arange(seq_len, device=device) + cache.get_query_offset(0)
        key_positions = torch.arange(kv_length, device=device) + kv_offset
        return self.alibi(query_positions, key_positions, hidden_states.dtype)

    def output(self, hidden_states, cache, attention_mask, packed_sequences) -> ModelOutput:
        """The family's output class; capture_outputs adds the hidden states and attention weights asked for."""
        if self.has_cross_attention:
            return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)
        if self.is_causal:
            return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)
        pooled = None
        if self.pooler is not None:
            token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            pooled = self.pooler(hidden_states, token_mask, packed_sequences)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


class BlueprintEncoderModel(BlueprintModel):
    config_class = BlueprintEncoderConfig


class BlueprintDecoderModel(BlueprintModel):
    config_class = BlueprintDecoderConfig


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


class BlueprintForCausalLM(BlueprintPreTrainedModel, GenerationChecks, GenerationMixin):
    """Decoder + linear + softmax over the vocabulary: next-token prediction and `generate()`."""

    base_model_class = BlueprintDecoderModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # each rank projects onto its share of the vocabulary
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: BlueprintConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    @accepts_past_key_values
    @reject_unknown_kwargs
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cache=cache,
                             use_cache=use_cache, return_dict=True, **kwargs)
        # Generation only needs the last position's logits: skip the vocabulary projection for the others.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, keep, :]
        loss = logits = None
        if labels is not None:
            scores_shape = (*hidden_states.shape[:-1], self.config.vocab_size)
            scored = has_targets(self, labels, scores_shape, shifted=kwargs.get("shift_labels") is None)
        if not logits_are_computed(self, labels, return_logits):  # a training step: the loss, block by block
            loss = causal_lm_loss(hidden_states, self.lm_head, labels, **kwargs)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                          **kwargs) if scored else zero_loss(logits)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class MaskedLMTransform(nn.Module):
    """BERT's prediction-head transform before the vocabulary projection: dense + activation + norm."""

    def __init__(self, config: BlueprintConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]
        self.norm = build_norm(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act_fn(self.dense(hidden_states)))


class BlueprintForMaskedLM(BlueprintPreTrainedModel):
    """Encoder + transform + linear over the vocabulary, predicting the masked tokens."""

    base_model_class = BlueprintEncoderModel
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # each rank projects onto its share of the vocabulary
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: BlueprintConfig):
        super().__init__(config)
        # No pooler, as in BertForMaskedLM: its output would be unused (and DDP would wait for its gradients).
        self.model = self.base_model_class(config, add_pooling_layer=False)
        self.mlm_transform = MaskedLMTransform(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    @reject_unknown_kwargs
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        outputs = self.model(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True,
                             **kwargs)
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            scored = has_targets(self, labels, (*hidden_states.shape[:-1], self.config.vocab_size))
        if not logits_are_computed(self, labels, return_logits):
            # A training step: only the masked tokens go through the transform and the vocabulary projection.
            is_masked = labels != kwargs.get("ignore_index", -100)
            loss = linear_cross_entropy(self.mlm_transform(hidden_states[is_masked]), self.lm_head.weight,
                                        self.lm_head.bias, labels[is_masked],
                                        num_items_in_batch=kwargs.get("num_items_in_batch"))
        else:
            logits = self.lm_head(self.mlm_transform(hidden_states))
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                          **kwargs) if scored else zero_loss(logits)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                              attentions=outputs.attentions)


def pool_sequence(hidden_states: torch.Tensor, token_mask: torch.Tensor | None, strategy: str) -> torch.Tensor:
    """Reduce (batch, seq, hidden) to (batch, hidden): the `first` real token ([CLS]), the `mean` of real tokens, the
    `last` real token, or the element-wise `max` over real tokens. Real tokens come from the mask, so left and right
    padding both work."""
    if token_mask is None:
        if strategy == "mean":
            return hidden_states.mean(dim=1)
        if strategy == "max":
            return hidden_states.amax(dim=1)
        return hidden_states[:, 0] if strategy == "first" else hidden_states[:, -1]
    if strategy == "max":
        is_real = token_mask.bool()
        pooled = hidden_states.masked_fill(~is_real[..., None], torch.finfo(hidden_states.dtype).min).amax(dim=1)
        return pooled.masked_fill(~is_real.any(dim=1, keepdim=True), 0.0)  # a row of pads pools to zeros, not -3e38
    if strategy == "mean":
        token_mask = token_mask.to(hidden_states.dtype)
        summed = (hidden_states * token_mask[..., None]).sum(dim=1)
        return summed / token_mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    is_real = token_mask.long()  # integer arithmetic: bf16 cannot count past 256
    positions = torch.arange(is_real.shape[1], device=hidden_states.device)
    if strategy == "first":  # the real token with the largest score (seq - position) is the first one
        index = ((is_real.shape[1] - positions) * is_real).argmax(dim=-1)
    else:
        index = (positions * is_real).argmax(dim=-1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), index]


class Pooler(nn.Module):
    """BERT's pooler: tanh(W pooled + b), producing `pooler_output`."""

    def __init__(self, config: BlueprintConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()
        self.strategy = config.classifier_pooling

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None, sequence_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if sequence_ids is not None:  # a padding-free batch: one pooled row per packed sequence
            return self.activation(self.dense(pool_segments(hidden_states, sequence_ids, self.strategy)))
        return self.activation(self.dense(pool_sequence(hidden_states, token_mask, self.strategy)))


class BlueprintForSequenceClassification(BlueprintPreTrainedModel):
    """Pools the sequence (`config.classifier_pooling`: first / mean / last real token / max over real tokens) and
    classifies it. With `add_pooling_layer` the base model's dense+tanh pooler output is classified instead (BERT).

    A padding-free batch (several sequences end to end in a row, `position_ids` restarting at 0 for each, no
    `attention_mask`: `hf_blueprint.data.DataCollatorForPaddingFreeClassification`) gets one logits row per packed
    sequence, pooled within that sequence, and takes `labels` of shape (number of sequences,)."""

    base_model_class = BlueprintModel
    # Its loss is a mean over this batch, not a sum divided by the Trainer's `num_items_in_batch`: without this, the
    # Trainer (which sees **kwargs in forward) multiplies it by the number of ranks and of accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: BlueprintConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @accepts_past_key_values
    @reject_unknown_kwargs
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        outputs = self.model(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cache=cache,
                             use_cache=bool(use_cache), return_dict=True, **kwargs)  # no cache unless asked for
        hidden_states = outputs.last_hidden_state
        packed_sequences = find_packed_sequences(position_ids, attention_mask, hidden_states.shape[0])
        if getattr(outputs, "pooler_output", None) is not None:
            pooled = outputs.pooler_output  # per packed sequence too: the trunk's pooler detects packing the same way
        elif packed_sequences is not None:
            pooled = pool_segments(hidden_states, packed_sequences, self.config.classifier_pooling)
        else:
            pooled = pool_sequence(hidden_states, self.token_mask(input_ids, attention_mask),
                                   self.config.classifier_pooling)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if labels.shape[0] != logits.shape[0]:
                layout = (f"{logits.shape[0]} sequences packed into {hidden_states.shape[0]} row(s) (position_ids "
                          f"restart at 0 for each)" if packed_sequences is not None else f"a batch of "
                          f"{logits.shape[0]} sequences")
                raise ValueError(f"{type(self).__name__}: `labels` has {labels.shape[0]} rows for {layout}; expected "
                                 f"one label per sequence.")
            if self.is_single_label(labels):
                check_label_values(self, labels, self.num_labels)
                if not is_torchdynamo_compiling() and not bool((labels != -100).any()):
                    loss = zero_loss(logits)  # nothing to score: 0, not the NaN of an empty mean
            if loss is None:
                loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)

    def is_single_label(self, labels: torch.Tensor) -> bool:
        """transformers' rule (ForSequenceClassification loss): integer labels over several classes are class ids."""
        problem_type = self.config.problem_type
        if problem_type is not None:
            return problem_type == "single_label_classification"
        return self.num_labels > 1 and labels.dtype in (torch.long, torch.int)

    def token_mask(self, input_ids, attention_mask) -> torch.Tensor | None:
        """Which positions hold real tokens: the 2D attention mask, else the non-pad ids (like GPT-2 and Llama)."""
        if attention_mask is not None and attention_mask.dim() == 2:
            return attention_mask
        if input_ids is not None and self.config.pad_token_id is not None:
            return (input_ids != self.config.pad_token_id).long()
        return None


class BlueprintForTokenClassification(BlueprintPreTrainedModel):
    """A classifier on every position (NER, tagging)."""

    base_model_class = BlueprintEncoderModel
    # Its loss is a mean over this batch, not a sum divided by the Trainer's `num_items_in_batch`: without this, the
    # Trainer (which sees **kwargs in forward) multiplies it by the number of ranks and of accumulation steps.
    accepts_loss_kwargs = False

    def __init__(self, config: BlueprintConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config, add_pooling_layer=False)  # no pooler, as in BERT's token head
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @reject_unknown_kwargs
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        outputs = self.model(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, return_dict=True,
                             **kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config) if has_targets(self, labels, logits.shape) \
                else zero_loss(logits)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


# ---------------------------------------------------------------------------------------------------------------------
# The encoder-decoder of the paper
# ---------------------------------------------------------------------------------------------------------------------


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher forcing: the decoder reads the target shifted right behind the start token and predicts `labels`."""
    shifted = labels.new_full(labels.shape, decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    if pad_token_id is not None:
        shifted = shifted.masked_fill(shifted == -100, pad_token_id)  # ignored label positions read as padding
    return shifted


class BlueprintSeq2SeqDecoder(BlueprintModel):
    """The encoder-decoder's decoder stack: each block attends causally to the target, then (cross-attention) to the
    whole encoder output, then applies its feed-forward network."""

    config_class = BlueprintSeq2SeqConfig
    has_cross_attention = True
    _can_record_outputs = {
        **BlueprintModel._can_record_outputs,
        "cross_attentions": OutputRecorder(MultiHeadAttention, index=1, layer_name="cross_attn"),
    }

    def __init__(self, config: BlueprintSeq2SeqConfig):
        super().__init__(config, is_causal=True, num_layers=config.decoder_layers)

    def new_cache(self) -> Cache:
        # Cross-attention's layers are full ones whatever the decoder's window: it sees every source key.
        return EncoderDecoderCache(super().new_cache(), DynamicCache())


class BlueprintSeq2SeqModel(BlueprintPreTrainedModel):
    """Encoder (bidirectional) and decoder (causal, with cross-attention over the encoder output)."""

    config_class = BlueprintSeq2SeqConfig
    _tied_weights_keys = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: BlueprintSeq2SeqConfig):
        super().__init__(config)
        self.encoder = BlueprintModel(config, is_causal=False)
        self.decoder = BlueprintSeq2SeqDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.encoder.embed_tokens = value
        if self.config.tie_word_embeddings:
            self.decoder.embed_tokens = value

    def get_encoder(self) -> BlueprintModel:
        return self.encoder

    def get_decoder(self) -> BlueprintSeq2SeqDecoder:
        return self.decoder

    @accepts_past_key_values
    @reject_unknown_kwargs
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        if encoder_outputs is None:
            # The encoder takes the output switches only: the other keywords (flash-attention's packed lengths, say)
            # describe the decoder's sequence.
            switches = {name: kwargs[name] for name in ("output_attentions", "output_hidden_states") if name in kwargs}
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                           inputs_embeds=inputs_embeds, return_dict=True, **switches)
        elif not isinstance(encoder_outputs, ModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            return_dict=True,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class BlueprintForConditionalGeneration(BlueprintPreTrainedModel, GenerationChecks, GenerationMixin):
    """The encoder-decoder with the linear + softmax head: translation, summarization, `generate()`."""

    config_class = BlueprintSeq2SeqConfig
    # Its loss is a mean over this batch, not a sum divided by the Trainer's `num_items_in_batch`: without this, the
    # Trainer (which sees **kwargs in forward) multiplies it by the number of ranks and of accumulation steps.
    accepts_loss_kwargs = False
    _tied_weights_keys = {
        "lm_head.weight": "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight": "model.encoder.embed_tokens.weight",
    }
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: BlueprintSeq2SeqConfig):
        super().__init__(config)
        self.model = BlueprintSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    def get_encoder(self) -> BlueprintModel:
        return self.model.encoder

    def get_decoder(self) -> BlueprintSeq2SeqDecoder:
        return self.model.decoder

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Used by DataCollatorForSeq2Seq to build `decoder_input_ids` in the collator."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.decoder_start_token_id())

    def decoder_start_token_id(self) -> int:
        start = self.config.decoder_start_token_id
        if start is None:
            start = self.config.bos_token_id
        if start is None:
            raise ValueError(
                f"{type(self).__name__}: training from `labels` needs config.decoder_start_token_id (or "
                f"bos_token_id) to shift the labels into decoder inputs; both are None."
            )
        return start

    @accepts_past_key_values
    @reject_unknown_kwargs
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: tuple | BaseModelOutput | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        if labels is not None:
            check_label_values(self, labels, self.config.vocab_size)  # before the shift turns them into inputs
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        # Labels are already aligned with the decoder outputs (the shift happened on the input side).
        if labels is not None:
            scored = has_targets(self, labels, (*hidden_states.shape[:-1], self.config.vocab_size))
        if not logits_are_computed(self, labels, return_logits):  # a training step: the loss, block by block
            loss = linear_cross_entropy(hidden_states, self.lm_head.weight, self.lm_head.bias, labels)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None and scored:
                loss = nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), ignore_index=-100
                )
            elif labels is not None:
                loss = zero_loss(logits)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )


# ---------------------------------------------------------------------------------------------------------------------
# The families: the same classes bound to their config and trunk
# ---------------------------------------------------------------------------------------------------------------------


class BlueprintEncoderForMaskedLM(BlueprintForMaskedLM):
    config_class = BlueprintEncoderConfig


class BlueprintEncoderForSequenceClassification(BlueprintForSequenceClassification):
    config_class = BlueprintEncoderConfig
    base_model_class = BlueprintEncoderModel


class BlueprintEncoderForTokenClassification(BlueprintForTokenClassification):
    config_class = BlueprintEncoderConfig


class BlueprintDecoderForCausalLM(BlueprintForCausalLM, GenerationMixin):  # transformers looks in the direct bases
    config_class = BlueprintDecoderConfig


class BlueprintDecoderForSequenceClassification(BlueprintForSequenceClassification):
    config_class = BlueprintDecoderConfig
    base_model_class = BlueprintDecoderModel
