"""Configuration of the Blueprint Transformer.

One config object documents every architectural choice of "The Transformer Blueprint". Each field below is a
switch; the defaults reproduce the base model of "Attention Is All You Need" (Vaswani et al., 2017): 6 layers,
d_model 512, 8 heads, d_ff 2048, Post-LN, sinusoidal positions, ReLU, dropout 0.1, embeddings scaled by
sqrt(d_model) and tied with the output projection.

`BlueprintEncoderConfig` (bidirectional attention), `BlueprintDecoderConfig` (causal attention) and
`BlueprintSeq2SeqConfig` (the paper's encoder-decoder) share all of them; they differ only in `is_causal`, a few
head defaults, and the encoder-decoder's decoder depth and start token.

This file is also shipped as Hub remote code: it may import only torch, transformers and its sibling files.
"""

import math
from typing import ClassVar, Literal, get_args, get_origin

from transformers import PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)


# The choices of the string switches, declared as the fields' types (as transformers' own configs do).
PositionEmbeddingType = Literal["sinusoidal", "learned", "rope", "alibi", "none"]
NormType = Literal["layernorm", "rmsnorm", "none"]
NormPosition = Literal["post", "pre"]
FFNType = Literal["mlp", "glu"]
ClassifierPooling = Literal["first", "mean", "last", "max"]
POSITION_EMBEDDING_TYPES = get_args(PositionEmbeddingType)
NORM_TYPES = get_args(NormType)
NORM_POSITIONS = get_args(NormPosition)
FFN_TYPES = get_args(FFNType)
CLASSIFIER_POOLINGS = get_args(ClassifierPooling)


def _positive_int(value, optional=False) -> str | None:
    if (value is None and optional) or (not isinstance(value, bool) and isinstance(value, int) and value >= 1):
        return None
    return "must be a positive integer"


def _probability(value, optional=False) -> str | None:
    if (value is None and optional) or (not isinstance(value, bool) and isinstance(value, (int, float))
                                        and 0.0 <= value < 1.0):
        return None
    return "must be a probability in [0, 1)"


def _finite_positive(value) -> str | None:
    if not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < math.inf:
        return None
    return "must be a finite positive number"


def _count(value) -> str | None:
    if not isinstance(value, bool) and isinstance(value, int) and value >= 0:
        return None
    return "must be an integer >= 0 (0 disables token types)"


# Every rule about one field alone, in one place; each returns what is wrong, or None. Rules across fields are in
# `validate_architecture`.
SINGLE_FIELD_RULES = {
    **{field: _positive_int for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                          "intermediate_size", "max_position_embeddings")},
    **{field: lambda value: _positive_int(value, optional=True)
       for field in ("num_key_value_heads", "head_dim", "sliding_window")},
    "type_vocab_size": _count,
    "attention_dilation": _positive_int,
    "global_attention_tokens": lambda value: None if _count(value) is None else "must be an integer >= 0",
    **{field: _probability for field in ("hidden_dropout_prob", "attention_dropout", "activation_dropout",
                                         "word_dropout_prob")},
    "classifier_dropout": lambda value: _probability(value, optional=True),
    **{field: _finite_positive for field in ("layer_norm_eps", "rope_theta", "initializer_range")},
}


def _known_activations() -> list[str]:
    from transformers.activations import ACT2FN

    return sorted(ACT2FN.keys())


class BlueprintConfig(PretrainedConfig):
    r"""
    Shared base of the Blueprint configurations. Every field is one architectural switch.

    Sizes:
        vocab_size: number of token ids the embedding and output layers cover.
        hidden_size: d_model, the width of the residual stream.
        num_hidden_layers: number of Transformer blocks.
        num_attention_heads: h, the number of query heads.
        num_key_value_heads: key/value heads. Equal to `num_attention_heads` (default, `None`) is multi-head
            attention, 1 is multi-query attention, anything in between that divides the heads is grouped-query.
        head_dim: width of one head. Defaults to `hidden_size // num_attention_heads` (which must then divide
            evenly); set it explicitly to decouple the two.
        intermediate_size: d_ff, the inner width of the position-wise feed-forward network.
        max_position_embeddings: longest sequence the model accepts with `learned` or `sinusoidal` positions (the
            table size). `rope`, `alibi` and `none` have no table and no such limit.
        type_vocab_size: number of token types (segments, BERT's sentence A/B). 0 disables token-type embeddings.

    Positions:
        position_embedding_type: how the model knows token order.
            `"sinusoidal"` fixed sin/cos table added to the embeddings (the paper);
            `"learned"` a trained table added to the embeddings (BERT, GPT-2);
            `"rope"` rotary embeddings applied to queries and keys (RoFormer, Llama), see `rope_theta`;
            `"alibi"` a per-head linear distance penalty on attention scores (Press et al., 2022);
            `"none"` no position signal at all: the encoder is then permutation-equivariant.
        rope_theta: base of the rotary frequencies.

    Embeddings:
        scale_embeddings: multiply token embeddings by sqrt(hidden_size) before adding positions (the paper).
        embedding_norm: normalize the summed embeddings (BERT's embedding LayerNorm).
        tie_word_embeddings: share the token embedding matrix with the output projection (the paper).

    Blocks:
        norm_type: `"layernorm"` (the paper, BERT, GPT-2) or `"rmsnorm"` (T5, Llama); `"none"` is a research switch
            (below).
        norm_position: `"post"` normalizes after each residual addition (the paper, BERT); `"pre"` normalizes each
            sub-layer's input and adds a final norm after the last block (GPT-2, Llama).
        layer_norm_eps: epsilon of every normalization layer (also readable as `rms_norm_eps`).
        norm_bias: LayerNorm with a learned bias (the paper, BERT, GPT-2); nanoGPT's bias-free variant sets False.
        ffn_type: `"mlp"` is `down(act(up(x)))` (the paper); `"glu"` is the gated `down(act(gate(x)) * up(x))`
            (SwiGLU with `hidden_act="silu"`, GeGLU with `"gelu"`).
        hidden_act: activation of the feed-forward network, any name transformers' `ACT2FN` knows.
        attention_bias: biases on the q/k/v/o projections (the paper's equations have none; BERT, GPT-2 do).
        mlp_bias: biases on the feed-forward projections (the paper's FFN has b1 and b2).
        sliding_window: local attention. If set to W, a token attends only to the tokens less than W positions
            away, in every family: itself and the W - 1 before it in a causal stack (W keys, Mistral's meaning), W - 1
            on each side in a bidirectional one (2W - 1 keys). The encoder-decoder's cross-attention always sees the
            whole source. Long inputs take a block-sparse path whose time and memory grow linearly with the length
            (`attn_implementation="block_sparse"` always; under sdpa from 8 window spans and 1,024 tokens on).
        attention_dilation: d > 1 spreads the window's W keys d positions apart (a span of W * d): the dilated
            window of Longformer (Beltagy et al., 2020) and the strided pattern of the Sparse Transformer (Child et
            al., 2019). Needs `sliding_window`. Decoding keeps every key (a cache of full layers).
        global_attention_tokens: the first k tokens of each sequence attend to, and are attended by, every position
            (causal: every later one), as Longformer's and BigBird's global tokens; the forward's
            `global_attention_mask` (batch, sequence) marks more. Needs `sliding_window`. Decoding keeps every key.

    Regularization and init:
        hidden_dropout_prob: dropout on embeddings and on each sub-layer output before the residual add (P_drop).
        attention_dropout: dropout on the attention probabilities.
        activation_dropout: dropout inside the feed-forward network, after the activation.
        word_dropout_prob: probability that a token's whole embedding vector is zeroed in training (its position
            signal stays), the survivors scaled by 1 / (1 - p): word dropout (Iyyer et al., 2015; Sennrich et al.,
            2016). It teaches a model trained on little data not to lean on single words it may never see again.
        classifier_dropout: dropout before classification heads; `None` uses `hidden_dropout_prob`.
        initializer_range: std of the normal init of linear layers (and of embeddings when they are not scaled;
            scaled embeddings use hidden_size**-0.5 so that the scaled vectors have unit variance).

    Research switches (they exist to measure the blueprint's claims: no production model turns them off):
        residual_connections: `False` drops the identity path around every sub-layer (x_{l+1} = Sublayer(x_l)
            instead of x_l + Sublayer(x_l)), the ablation of "residual connections stabilize and speed up training".
        norm_type `"none"`: every normalization (the blocks', Pre-LN's final one, the embedding and masked-LM ones)
            is the identity, the ablation of "layer normalization speeds up training".

    Heads:
        classifier_pooling: how sequence classification reduces the sequence: `"first"` token ([CLS], BERT),
            `"mean"` over real tokens, `"last"` real token (GPT-2, Llama; the decoder default), or the element-wise
            `"max"` over real tokens (max-over-time, the pooling of Kim's 2014 CNN sentence classifiers).
        add_pooling_layer: BERT's pooler, a dense layer + tanh over the pooled vector, in the base model
            (`pooler_output`); encoder family only.
    """

    is_causal: ClassVar[bool] = False

    # Pipeline parallelism: the stages a pipeline engine may cut the trunk into.
    base_model_pp_plan: ClassVar[dict[str, tuple[list[str], list[str]]]] = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    attribute_map: ClassVar[dict[str, str]] = {
        "rms_norm_eps": "layer_norm_eps",
        "d_model": "hidden_size",
        "n_layer": "num_hidden_layers",
        "n_head": "num_attention_heads",
    }

    vocab_size: int = 37000
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 2048
    max_position_embeddings: int = 512
    type_vocab_size: int = 0

    position_embedding_type: PositionEmbeddingType = "sinusoidal"
    rope_theta: float = 10000.0

    scale_embeddings: bool = True
    embedding_norm: bool = False
    tie_word_embeddings: bool = True

    norm_type: NormType = "layernorm"
    norm_position: NormPosition = "post"
    layer_norm_eps: float = 1e-5
    norm_bias: bool = True
    ffn_type: FFNType = "mlp"
    hidden_act: str = "relu"
    attention_bias: bool = False
    mlp_bias: bool = True
    sliding_window: int | None = None
    attention_dilation: int = 1
    global_attention_tokens: int = 0
    residual_connections: bool = True

    hidden_dropout_prob: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    word_dropout_prob: float = 0.0
    classifier_dropout: float | None = None
    initializer_range: float = 0.02

    classifier_pooling: ClassifierPooling = "mean"
    add_pooling_layer: bool = False

    use_cache: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # Written into every saved config.json so that the folder loads through each Auto class with
    # trust_remote_code=True on a machine without hf_blueprint (the code files are copied beside it).
    family_auto_map: ClassVar[dict[str, str]] = {}

    def __post_init__(self, **kwargs):
        self._check_fields()
        if self.family_auto_map and not kwargs.get("auto_map"):
            kwargs["auto_map"] = dict(self.family_auto_map)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}), or set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun, vLLM): each attention head and
        each feed-forward column lives on one rank. The input projections split their outputs (colwise), the output
        projections their inputs (rowwise, then an all-reduce); transformers adds the vocabulary split of
        `embed_tokens`. Norms, positional encodings and the classifiers are replicated, and ALiBi's per-head slopes
        follow their heads (MultiHeadAttention takes its rank's share of the bias). Only the modules this config
        builds are named."""
        attentions = ["self_attn", "cross_attn"] if self.is_encoder_decoder else ["self_attn"]
        plan = {}
        for attention in attentions:
            plan.update({f"layers.*.{attention}.{name}": "colwise" for name in ("q_proj", "k_proj", "v_proj")})
            plan[f"layers.*.{attention}.o_proj"] = "rowwise"
        feed_forward = ["gate_proj", "up_proj"] if self.ffn_type == "glu" else ["up_proj"]
        plan.update({f"layers.*.mlp.{name}": "colwise" for name in feed_forward})
        plan["layers.*.mlp.down_proj"] = "rowwise"
        return plan

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "BlueprintConfig":
        # Passed on so that from_dict can say which checkpoint a bad config.json belongs to; not stored in the config,
        # whose to_dict() must survive a save and a load unchanged (as a native config's does).
        kwargs.setdefault("_source_for_errors", str(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "BlueprintConfig":
        """As transformers' `from_dict`, plus the checks of a config read from a file: a config.json of another
        Blueprint family is refused (the weights would run with the wrong attention), unknown keys (a newer version?)
        and missing switches (an older or hand-written file?) are logged, and a bad field names the file."""
        source = kwargs.pop("_source_for_errors", None) or kwargs.get("name_or_path") or \
            config_dict.get("_name_or_path") or ""
        where = f"the config.json of {source!r}" if source else "the config dict"
        found = config_dict.get("model_type")
        family = {family.model_type: family for family in BlueprintConfig.__subclasses__()}.get(found)
        if cls is BlueprintConfig and family is not None:
            # The shared base describes no family: read the file with its own class, as AutoConfig would (the
            # generic class would take a decoder's config for a bidirectional one).
            return family.from_dict(config_dict, _source_for_errors=source, **kwargs)
        if cls.model_type and isinstance(found, str) and found.startswith("blueprint_") and found != cls.model_type:
            raise ValueError(
                f"{where} has model_type {found!r}, but {cls.__name__} reads {cls.model_type!r}: the families differ in "
                f"their attention (bidirectional, causal, encoder-decoder). Load it with the classes of {found!r} "
                f"(or the Auto classes)."
            )
        if source:
            known = cls._known_keys()
            unknown = sorted(key for key in config_dict if key not in known)
            if unknown:
                logger.warning(f"{where} has keys this version of hf_blueprint does not know: {unknown}; they are kept "
                               f"as attributes but nothing reads them (was it saved by a newer version?).")
            switches = cls._switch_defaults()
            missing = sorted(field for field in switches if field not in config_dict)
            if missing:
                defaults = {field: switches[field] for field in missing}
                logger.warning(f"{where} does not set {missing}; using the defaults {defaults} (was it written by "
                               f"hand, or by an older version?).")
        try:
            return super().from_dict(config_dict, **kwargs)
        except ValueError as error:
            if not source:
                raise
            raise ValueError(f"{error} (in {where})") from error

    @classmethod
    def _switch_defaults(cls) -> dict:
        """The fields the Blueprint configs declare (every architectural switch), with their class defaults."""
        return {name: field.default for name, field in cls._declared_fields().items()}

    @classmethod
    def _known_keys(cls) -> set:
        from transformers import GenerationConfig

        keys = set(cls.__dataclass_fields__) | set(cls.attribute_map)
        keys |= {"model_type", "auto_map", "name_or_path", "_name_or_path", "num_labels", "torch_dtype",
                 "attn_implementation", "experts_implementation", "output_attentions", "_commit_hash",
                 "quantization_config", "tokenizer_class", "task_specific_params", "finetuning_task", "prefix",
                 "per_layer_config", "_attn_implementation_internal", "_experts_implementation_internal"}
        try:  # generation settings that older configs carry; transformers drops them itself
            keys |= set(GenerationConfig._get_default_generation_params())
        except AttributeError:  # pragma: no cover - internal API
            pass
        return keys

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BlueprintConfig":
        """A named classic architecture (`list_presets()` shows them all), with any field overridden:
        `BlueprintDecoderConfig.from_preset("gpt2", num_hidden_layers=6)`."""
        from .presets import preset_fields

        return cls(**{**preset_fields(name, cls.model_type), **overrides})

    # -- validation -------------------------------------------------------------------------------------------------
    # Each error names the field, the value given and what is allowed, before any module is built.

    def _check_fields(self):
        name = type(self).__name__
        for field, rule in SINGLE_FIELD_RULES.items():
            problem = rule(getattr(self, field))
            if problem:
                raise ValueError(f"{name}.{field} {problem}, got {getattr(self, field)!r}.")

        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            raise ValueError(f"{name}.pad_token_id must be None or an id in [0, vocab_size={self.vocab_size}), "
                             f"got {pad!r}.")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _known_activations():
            raise ValueError(f"{name}.hidden_act={self.hidden_act!r} is not an activation transformers knows; "
                             f"choose one of {_known_activations()}.")
        for field, declared in self._declared_fields().items():
            value = getattr(self, field)
            if get_origin(declared.type) is Literal and value not in get_args(declared.type):
                raise ValueError(f"{name}.{field}={value!r} is not supported; choose one of "
                                 f"{list(get_args(declared.type))}.")
            if declared.type is bool and not isinstance(value, bool):
                raise ValueError(f"{name}.{field} must be True or False, got {value!r}.")

    @classmethod
    def _declared_fields(cls) -> dict:
        """The dataclass fields the Blueprint configs declare (every architectural switch)."""
        declared = set()
        for klass in cls.__mro__:
            if isinstance(klass, type) and issubclass(klass, BlueprintConfig):
                declared |= {name for name, annotation in vars(klass).get("__annotations__", {}).items()
                             if get_origin(annotation) is not ClassVar}  # class constants are never saved
        return {name: field for name, field in cls.__dataclass_fields__.items() if name in declared}

    def validate_architecture(self):
        """Cross-field rules; also run by transformers' strict validation when the config is saved."""
        name = type(self).__name__
        if self.head_dim is None or self.num_key_value_heads is None:  # not resolved yet
            return
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"{name}.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}): each key/value head serves a whole group of "
                f"query heads."
            )
        if self.add_pooling_layer and self.is_causal:
            raise ValueError(
                f"{name}.add_pooling_layer=True: the pooler is BERT's, for the encoder family; a decoder's sequence "
                f"classifier pools with classifier_pooling instead."
            )
        for field, value, neutral in (("attention_dilation", self.attention_dilation, 1),
                                      ("global_attention_tokens", self.global_attention_tokens, 0)):
            if value != neutral and self.sliding_window is None:
                raise ValueError(
                    f"{name}.{field}={value} shapes a local attention pattern, but sliding_window is None (every "
                    f"token sees every other one already); set sliding_window too."
                )
        if self.position_embedding_type == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"{name}.head_dim is {self.head_dim}, but position_embedding_type='rope' rotates pairs of "
                f"dimensions and needs an even head_dim."
            )


class BlueprintEncoderConfig(BlueprintConfig):
    """Encoder-only Blueprint (BERT-like): bidirectional self-attention, no cache."""

    model_type = "blueprint_encoder"
    is_causal: ClassVar[bool] = False
    family_auto_map: ClassVar[dict[str, str]] = {
        "AutoConfig": "configuration_blueprint.BlueprintEncoderConfig",
        "AutoModel": "modeling_blueprint.BlueprintEncoderModel",
        "AutoModelForMaskedLM": "modeling_blueprint.BlueprintEncoderForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_blueprint.BlueprintEncoderForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_blueprint.BlueprintEncoderForTokenClassification",
    }


class BlueprintDecoderConfig(BlueprintConfig):
    """Decoder-only Blueprint (GPT-like): causal self-attention with a key/value cache for generation."""

    model_type = "blueprint_decoder"
    is_causal: ClassVar[bool] = True
    family_auto_map: ClassVar[dict[str, str]] = {
        "AutoConfig": "configuration_blueprint.BlueprintDecoderConfig",
        "AutoModel": "modeling_blueprint.BlueprintDecoderModel",
        "AutoModelForCausalLM": "modeling_blueprint.BlueprintDecoderForCausalLM",
        "AutoModelForSequenceClassification": "modeling_blueprint.BlueprintDecoderForSequenceClassification",
    }
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache"]

    classifier_pooling: ClassifierPooling = "last"
    use_cache: bool = True


class BlueprintSeq2SeqConfig(BlueprintConfig):
    """The full Transformer of the paper: a bidirectional encoder and a causal decoder whose blocks add
    cross-attention over the encoder output.

    Every switch above applies to both stacks. In addition:
        num_hidden_layers: depth of the encoder.
        decoder_layers: depth of the decoder (`None`: the same as the encoder). BART's name, which transformers'
            generation reads to size the decoder's caches.
        tie_word_embeddings: share one matrix between the source embeddings, the target embeddings and the
            pre-softmax projection (the paper, with its shared source/target BPE vocabulary); `False` gives the
            source, target and output layers their own matrices.
        decoder_start_token_id: the token the decoder starts from; labels are shifted right behind it.
    """

    model_type = "blueprint_seq2seq"
    is_causal: ClassVar[bool] = True  # the decoder's self-attention, which transformers' mask builders ask about
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "encoder_last_hidden_state"]
    family_auto_map: ClassVar[dict[str, str]] = {
        "AutoConfig": "configuration_blueprint.BlueprintSeq2SeqConfig",
        "AutoModel": "modeling_blueprint.BlueprintSeq2SeqModel",
        "AutoModelForSeq2SeqLM": "modeling_blueprint.BlueprintForConditionalGeneration",
    }

    decoder_layers: int | None = None
    decoder_start_token_id: int | None = None
    is_encoder_decoder: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        value = self.decoder_layers
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{type(self).__name__}.decoder_layers must be a positive integer, got {value!r}.")
        if value is None and isinstance(self.num_hidden_layers, int) and not isinstance(self.num_hidden_layers, bool):
            # Only a valid depth is copied; a bad one is reported under its own name by the base checks.
            self.decoder_layers = self.num_hidden_layers if self.num_hidden_layers >= 1 else None
        start = self.decoder_start_token_id
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)
                                  or not 0 <= start < self.vocab_size):
            raise ValueError(f"{type(self).__name__}.decoder_start_token_id must be None or an id in "
                             f"[0, vocab_size={self.vocab_size}), got {start!r}.")
        super().__post_init__(**kwargs)
