"""The checks around the Blueprint models, kept out of the architecture file: every bad input gets a ValueError (or,
for a misspelled keyword, a TypeError) that names the argument and what was expected, before any arithmetic.

- `reject_unknown_kwargs`, `accepts_past_key_values`: the keywords a forward takes.
- `check_inputs`, `check_attention_mask_keys`, `check_positions`: ids, masks and positions of a forward.
- `check_label_values`, `has_targets`, `zero_loss`: labels of the heads, and a batch with nothing to predict.
- `GenerationChecks`: generate() arguments, checked before the first decoding step, and the caches the attention
  pattern needs.
- `CheckedLoading`: from_pretrained that names a damaged weights file and refuses NaN/inf weights.

Shipped as Hub remote code beside modeling_blueprint.py: it may import only torch, transformers and its siblings.
"""

import copy
import functools
import inspect
from collections.abc import Callable

import torch

from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
from transformers.utils import TransformersKwargs, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg


# -- keywords ----------------------------------------------------------------------------------------------------------

# Keywords transformers passes through a model's forward to its layers, attention implementation and loss, and the
# output switches its decorators read (`can_return_tuple`, `capture_outputs`).
PASS_THROUGH_KWARGS = frozenset().union(
    TransformersKwargs.__required_keys__, TransformersKwargs.__optional_keys__, FlashAttentionKwargs.__optional_keys__,
    {"num_items_in_batch", "ignore_index", "shift_labels"},  # the loss functions' keywords
    {"return_dict"},
)


def reject_unknown_kwargs(forward: Callable) -> Callable:
    """A forward takes its own arguments, those of the base model it passes its keywords on to, and transformers'
    pass-through keywords; anything else (a typo such as `atention_mask=`, an argument of another model) is a
    TypeError naming it, as for a plain Python function, instead of vanishing into **kwargs while the call runs
    without it."""
    parameters = frozenset(inspect.signature(forward).parameters)
    accepted_by_class = {}

    @functools.wraps(forward)
    def checked_forward(self, *args, **kwargs):
        accepted = accepted_by_class.get(type(self))
        if accepted is None:
            accepted = parameters | PASS_THROUGH_KWARGS
            base_model = getattr(self, "base_model", self)
            if base_model is not self:
                accepted |= frozenset(inspect.signature(base_model.forward).parameters)
            accepted_by_class[type(self)] = accepted
        for name in kwargs:
            if name not in accepted:
                raise TypeError(f"{type(self).__name__}.forward() got an unexpected keyword argument {name!r}")
        return forward(self, *args, **kwargs)

    return checked_forward


# transformers 5.x renamed the cache argument `past_key_values` -> `cache`; native models accept the old name (with a
# FutureWarning) until 5.40, and so do the Blueprint forwards that take a cache.
accepts_past_key_values = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")


# -- inputs of a forward -----------------------------------------------------------------------------------------------


def check_inputs(model, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, cache,
                 encoder_hidden_states):
    """Shapes, dtypes and value ranges of a trunk's inputs: a clear error instead of an index error deep in torch."""
    name = type(model).__name__
    config = model.config
    if not model.is_causal and cache is not None:
        raise ValueError(f"{name} attends bidirectionally and keeps no cache; got `cache`.")
    if model.has_cross_attention and encoder_hidden_states is None:
        raise ValueError(f"{name}: this decoder attends over an encoder; pass `encoder_hidden_states`.")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"{name}: pass exactly one of `input_ids` or `inputs_embeds`.")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"{name}: `input_ids` must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
        if input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"{name}: `input_ids` must be an integer tensor of dtype torch.long (or torch.int), got "
                             f"dtype {input_ids.dtype}; convert it with .long().")
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size
                                      or not inputs_embeds.is_floating_point()):
        raise ValueError(f"{name}: `inputs_embeds` must be a float tensor of shape (batch, sequence, hidden_size="
                         f"{config.hidden_size}), got {tuple(inputs_embeds.shape)} of dtype {inputs_embeds.dtype}.")
    shape = tuple(input_ids.shape) if input_ids is not None else tuple(inputs_embeds.shape[:2])
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name}: the inputs have shape {shape}; expected at least one sequence of at least one "
                         f"token.")
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[0] != shape[0]:
            raise ValueError(
                f"{name}: `attention_mask` has shape {tuple(attention_mask.shape)} but the inputs have shape "
                f"{shape}; the batch sizes differ."
            )
    elif attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            f"{name}: `attention_mask` must be 2D (batch, sequence) or 4D (batch, 1, query, key), "
            f"got shape {tuple(attention_mask.shape)}."
        )
    if token_type_ids is not None and tuple(token_type_ids.shape) != shape:
        raise ValueError(f"{name}: `token_type_ids` has shape {tuple(token_type_ids.shape)}, expected {shape}.")
    if position_ids is not None:
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise ValueError(f"{name}: `position_ids` must be an integer tensor, got dtype {position_ids.dtype}.")
        if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != shape[1] or (
            position_ids.dim() == 2 and position_ids.shape[0] not in (1, shape[0])
        ):
            raise ValueError(f"{name}: `position_ids` must have shape (batch or 1, sequence={shape[1]}), got "
                             f"{tuple(position_ids.shape)}.")
    if is_torchdynamo_compiling():  # the value checks below need a device sync
        return
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype != torch.bool \
            and attention_mask.numel() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        found = sorted({float(v) for v in attention_mask.unique()[:6].tolist()})
        raise ValueError(
            f"{name}: a 2D `attention_mask` holds 1 for tokens to attend to and 0 for padding, found values {found}. "
            f"An additive mask (0 / -inf) or a 4D mask must be passed with shape (batch, 1, query, key)."
        )
    if input_ids is not None and input_ids.numel() > 0:
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"{name}: `input_ids` must lie in [0, vocab_size={config.vocab_size}), found values from "
                f"{int(low)} to {int(high)}. Is the tokenizer's vocabulary larger than the model's?"
            )
    if token_type_ids is not None and token_type_ids.numel() > 0:
        low, high = torch.aminmax(token_type_ids)
        if low < 0 or high >= config.type_vocab_size:
            raise ValueError(
                f"{name}: `token_type_ids` must lie in [0, type_vocab_size={config.type_vocab_size}), "
                f"found values from {int(low)} to {int(high)}."
            )


def check_attention_mask_keys(model, attention_mask, cache, past_length, seq_len, batch_size):
    """A mask covers the cached keys plus the new ones: a 2D mask exactly, a 4D mask at least the keys the cache
    returns (a sliding-window cache keeps only the window)."""
    name = type(model).__name__
    if attention_mask is None:
        return
    if attention_mask.dim() == 2 and attention_mask.shape[1] != past_length + seq_len:
        raise ValueError(
            f"{name}: `attention_mask` covers {attention_mask.shape[1]} positions, expected "
            f"past ({past_length}) + sequence ({seq_len}) = {past_length + seq_len}."
        )
    if attention_mask.dim() == 4:
        key_length = cache.get_mask_sizes(seq_len, 0)[0] if cache is not None else seq_len
        if attention_mask.shape[0] not in (1, batch_size) or attention_mask.shape[1] not in (
            1, model.config.num_attention_heads
        ) or attention_mask.shape[2] != seq_len or (
            not is_torchdynamo_compiling() and attention_mask.shape[3] < key_length
        ):
            raise ValueError(
                f"{name}: a 4D `attention_mask` must have shape (batch or 1, 1 or heads, "
                f"query={seq_len}, key>={key_length}), got {tuple(attention_mask.shape)}."
            )


def check_positions(model, position_ids):
    """Positions index the table of `sinusoidal` and `learned` encodings: each must lie inside it."""
    config = model.config
    if config.position_embedding_type not in ("sinusoidal", "learned") or is_torchdynamo_compiling() \
            or position_ids.numel() == 0:
        return
    limit = config.max_position_embeddings
    if int(position_ids.min()) < 0:
        raise ValueError(
            f"{type(model).__name__}: `position_ids` must be >= 0 for the '{config.position_embedding_type}' "
            f"position table, found {int(position_ids.min())}."
        )
    if int(position_ids.max()) >= limit:
        raise ValueError(
            f"{type(model).__name__}: position {int(position_ids.max())} is past max_position_embeddings={limit} "
            f"of the '{config.position_embedding_type}' position table; truncate inputs to {limit} tokens "
            f"or build the model with a larger max_position_embeddings."
        )


# The attention implementations that apply a mask function the model builds (flex through its block mask): the only ones
# that can run a dilated window or global tokens, which no `sliding_window` keyword describes.
PATTERN_IMPLEMENTATIONS = ("eager", "sdpa", "block_sparse", "flex_attention")


def check_pattern_implementation(model, has_global_tokens: bool):
    """A dilated window or global tokens need an implementation that applies the model's mask; others (flash
    attention, vLLM's paged attention) would run a plain window and compute something else."""
    config = model.config
    implementation = config._attn_implementation
    if (config.attention_dilation > 1 or has_global_tokens) and implementation not in PATTERN_IMPLEMENTATIONS:
        raise ValueError(
            f"{type(model).__name__}: attention_dilation={config.attention_dilation} / global tokens need an attention "
            f"implementation that applies the model's mask ({', '.join(PATTERN_IMPLEMENTATIONS)}); "
            f"'{implementation}' would attend to a plain window instead."
        )


def check_tensor_parallel(config):
    """Under tensor parallelism (from_pretrained(tp_plan=...), which puts a `distributed_config` on the config before
    the model is built) every rank holds whole heads and an equal share of the feed-forward columns: refuse a degree
    that does not divide them, before any weight is loaded."""
    degree = getattr(getattr(config, "distributed_config", None), "tp_size", None) or 1
    if degree <= 1:
        return
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, field)
        if value % degree:
            raise ValueError(
                f"{type(config).__name__}.{field}={value} does not divide over tp_size={degree} tensor-parallel ranks: "
                f"each rank must hold whole heads and an equal share of the feed-forward columns. Use a tp_size that "
                f"divides num_attention_heads, num_key_value_heads and intermediate_size."
            )


# -- labels ------------------------------------------------------------------------------------------------------------


def check_label_values(model, labels: torch.Tensor, num_classes: int):
    """Class-id labels are integers in [0, num_classes), or -100 where nothing is scored; anything else would fail
    inside cross_entropy with an IndexError that names neither the argument nor the range."""
    name = type(model).__name__
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: `labels` must be an integer tensor of class ids (-100 to ignore), got dtype "
                         f"{labels.dtype}.")
    if is_torchdynamo_compiling():
        return
    scored = labels[labels != -100]
    if scored.numel():
        low, high = torch.aminmax(scored)
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name}: `labels` must be -100 (ignored) or an id in [0, {num_classes}), found values "
                             f"from {int(low)} to {int(high)}.")


def has_targets(model, labels: torch.Tensor, scores_shape: tuple, shifted: bool = False) -> bool:
    """Check that there is one label per token of the (..., classes) scores (the logits, whether computed or not),
    and whether any is scored (not -100; after the shift of next-token prediction). With none, heads return
    `zero_loss` instead of the NaN of an empty mean, so a batch with nothing to predict neither poisons a running
    average nor the weights."""
    if tuple(labels.shape) != tuple(scores_shape[:-1]):
        raise ValueError(
            f"{type(model).__name__}: `labels` has shape {tuple(labels.shape)}, expected {tuple(scores_shape[:-1])}"
            f" (one label per token; -100 marks tokens to ignore)."
        )
    check_label_values(model, labels, scores_shape[-1])
    if is_torchdynamo_compiling():
        return True
    scored = labels[..., 1:] if shifted else labels
    return bool((scored != -100).any())


def zero_loss(logits: torch.Tensor) -> torch.Tensor:
    """A loss of exactly 0, connected to the graph so that backward() works (+ 0.0 turns -0.0 into 0.0)."""
    return logits.sum() * 0.0 + 0.0


# -- generate() --------------------------------------------------------------------------------------------------------


class GenerationChecks:
    """generate() arguments checked before any decoding step: a clear ValueError instead of a ZeroDivisionError from
    num_beams=0, an IndexError from an empty prompt, or a position-table error after tokens were already decoded.
    Listed before GenerationMixin in the heads' bases; overrides internal GenerationMixin hooks (transformers 5.24).

    Also stores each head's `forward` signature: for custom-code models generate() calls inspect.signature(forward)
    at every decoding step (looking for a `cache_position` argument), ~36 µs a token on a CPU; with
    `__signature__` set, inspect returns it at once."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward.__signature__ = inspect.signature(cls.forward)

    def _prepare_generation_config(self, generation_config, *args, **kwargs):
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, *args, **kwargs)
        for field in ("num_beams", "num_return_sequences"):
            value = getattr(generation_config, field, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"generate(): `{field}` must be a positive integer, got {value!r}.")
        vocab_size = self.config.vocab_size
        for field in ("eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(generation_config, field, None)
            ids = value.tolist() if isinstance(value, torch.Tensor) else value
            ids = ids if isinstance(ids, (list, tuple)) else [ids]
            if field == "eos_token_id":  # a negative id means "never stop" to transformers (it warns itself)
                ids = [i for i in ids if i is None or int(i) >= 0]
            if any(i is not None and not 0 <= int(i) < vocab_size for i in ids):
                raise ValueError(f"generate(): `{field}`={value!r} lies outside the vocabulary [0, vocab_size="
                                 f"{vocab_size}): the model can never produce it (a preset's ids with a smaller "
                                 f"vocabulary?). Set model.generation_config.{field} to an id of this vocabulary.")
        return generation_config, model_kwargs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds its caches from the decoder config, whose `sliding_window` gives sliding layers that keep
        the last W - 1 keys. Two attentions need more: cross-attention reads the whole source (full layers, as
        transformers' T5Gemma does), and a dilated window or global tokens reach past the last W keys (full layers
        for self-attention; a static cache, sized for the window, is refused)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        config, cache = self.config, model_kwargs.get("cache")
        if config.sliding_window is None or cache is None:
            return
        if isinstance(cache, EncoderDecoderCache) and any(cache.is_updated.values()):
            return  # in use already
        reaches_far = config.attention_dilation > 1 or config.global_attention_tokens > 0
        self_attention = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        if reaches_far and isinstance(self_attention, StaticCache):
            raise ValueError(
                f"generate(): a static cache keeps the last sliding_window={config.sliding_window} keys, but "
                f"attention_dilation={config.attention_dilation} / global_attention_tokens="
                f"{config.global_attention_tokens} reach further back; use the dynamic cache (the default)."
            )
        if reaches_far and self_attention.get_seq_length() == 0:
            self_attention = DynamicCache()
        if isinstance(cache, EncoderDecoderCache):
            cross_attention = cache.cross_attention_cache
            if isinstance(cross_attention, StaticCache):
                full_attention = copy.deepcopy(config.get_text_config(decoder=True))
                full_attention.sliding_window = None
                source_length = model_kwargs["encoder_outputs"][0].shape[1]
                cross_attention = StaticCache(config=full_attention, max_cache_len=source_length)
            else:
                cross_attention = DynamicCache()
            model_kwargs["cache"] = EncoderDecoderCache(self_attention, cross_attention)
        else:
            model_kwargs["cache"] = self_attention

    def _prepare_text_encoder_decoder_kwargs_for_generation(self, inputs_tensor, model_kwargs, *args, **kwargs):
        """generate() hands an encoder that takes **kwargs (the Blueprint stacks do, to pass attention keywords on)
        every model keyword that is not the decoder's, `labels` included (Seq2SeqTrainer passes them). The encoder
        refuses keywords it does not read, so it gets the ones it reads; the others stay for the rest of generate()."""
        reads = set(inspect.signature(self.get_encoder().forward).parameters) | PASS_THROUGH_KWARGS
        decoder_side = ("decoder_", "cross_attn", "use_cache", "cache")  # generate() keeps these from the encoder
        held_back = {name: model_kwargs.pop(name) for name in list(model_kwargs)
                     if name not in reads and not name.startswith(decoder_side)}
        model_kwargs = super()._prepare_text_encoder_decoder_kwargs_for_generation(
            inputs_tensor, model_kwargs, *args, **kwargs
        )
        model_kwargs.update(held_back)
        return model_kwargs

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # generate(tokenizer=...) (stop strings; transformers' server passes it) keeps the tokenizers among the model
        # keywords and would hand them to forward, which refuses keywords it does not read.
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        for name in ("tokenizer", "assistant_tokenizer"):
            inputs.pop(name, None)
        return inputs

    def _prepare_model_inputs(self, *args, **kwargs):
        inputs_tensor, input_name, model_kwargs = super()._prepare_model_inputs(*args, **kwargs)
        if input_name == "input_ids" and inputs_tensor is not None and inputs_tensor.dim() == 2 \
                and 0 in tuple(inputs_tensor.shape):
            raise ValueError(f"generate(): the prompt `input_ids` has shape {tuple(inputs_tensor.shape)}; expected at "
                             f"least one sequence of at least one token.")
        return inputs_tensor, input_name, model_kwargs

    def _prepare_generated_length(self, generation_config, has_default_max_length, has_default_min_length,
                                  model_input_name, input_ids_length, inputs_tensor):
        generation_config = super()._prepare_generated_length(
            generation_config, has_default_max_length, has_default_min_length, model_input_name, input_ids_length,
            inputs_tensor,
        )
        config = self.config
        limit = config.max_position_embeddings
        if config.position_embedding_type in ("sinusoidal", "learned") and generation_config.max_length > limit:
            raise ValueError(
                f"generate(): the prompt ({input_ids_length} tokens) plus up to "
                f"{generation_config.max_length - input_ids_length} new tokens would reach position "
                f"{generation_config.max_length - 1}, past max_position_embeddings={limit} of the "
                f"'{config.position_embedding_type}' position table. Ask for at most "
                f"{max(limit - input_ids_length, 0)} new tokens, or shorten the prompt."
            )
        return generation_config


# -- from_pretrained ---------------------------------------------------------------------------------------------------


class CheckedLoading:
    """transformers' from_pretrained, plus: a damaged weights file is named (safetensors' own error does not say which
    file), and a checkpoint holding NaN/inf weights (saved from a diverged run) is refused;
    `check_finite_weights=False` loads it anyway, to inspect it. Listed before PreTrainedModel in the bases."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, check_finite_weights: bool = True, **kwargs):
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): "
                          f"{unreadable_weights(pretrained_model_name_or_path)} ({error}).") from error
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        if check_finite_weights:
            bad = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point()
                   and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all())]
            if bad:
                raise ValueError(
                    f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): the checkpoint holds "
                    f"non-finite (NaN/inf) weights in {len(bad)} tensor(s), e.g. {bad[:4]}; it was probably saved from "
                    f"a run that diverged. Load an earlier checkpoint, or pass check_finite_weights=False to inspect it."
                )
        return loaded


def unreadable_weights(path) -> str:
    """What to tell about a weights file safetensors could not read (remote code: no os/json imports here)."""
    from transformers.modeling_utils import safe_open

    single = f"{path}/model.safetensors"
    try:
        with safe_open(single, framework="pt") as f:
            f.keys()
    except FileNotFoundError:  # sharded, or not a local folder
        return f"a .safetensors weights file of {str(path)!r} is truncated or corrupted (re-save or re-download it)"
    except Exception:  # noqa: BLE001 - SafetensorError or OSError, depending on the damage
        return f"{single} is truncated or corrupted (not a whole safetensors file)"
    return f"a .safetensors shard of {str(path)!r} is truncated or corrupted (re-save or re-download it)"
