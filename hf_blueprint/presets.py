"""Named classic architectures as points of the Blueprint design space.

    BlueprintEncoderConfig.from_preset("bert-base")
    BlueprintDecoderConfig.from_preset("gpt2", num_hidden_layers=6)     # any field can be overridden
    list_presets()                                                       # names, families, parameter counts

Each preset fixes every switch that matters for its architecture (not only the sizes), so that it does not change
when a Blueprint default changes. The BERT, GPT-2 and Llama presets are the configurations that
`hf_blueprint.convert` produces from the corresponding transformers checkpoints; the parameter counts are those of
the published models (BertModel with pooler, GPT2LMHeadModel, LlamaForCausalLM).

This file is also shipped as Hub remote code beside the configuration file: it may import only torch,
transformers and its sibling files.
"""

import torch


ENCODER, DECODER, SEQ2SEQ = "encoder", "decoder", "seq2seq"
_FAMILY_OF_MODEL_TYPE = {"blueprint_encoder": ENCODER, "blueprint_decoder": DECODER, "blueprint_seq2seq": SEQ2SEQ,
                         ENCODER: ENCODER, DECODER: DECODER, SEQ2SEQ: SEQ2SEQ}
_CONFIG_CLASS = {ENCODER: "BlueprintEncoderConfig", DECODER: "BlueprintDecoderConfig",
                 SEQ2SEQ: "BlueprintSeq2SeqConfig"}


def _paper(hidden_size, num_attention_heads, intermediate_size, dropout):
    # "Attention Is All You Need", Table 3: Post-LN, sinusoidal positions, ReLU, embeddings scaled by sqrt(d_model)
    # and shared with the output projection, residual dropout P_drop, shared BPE vocabulary of ~37000 (en-de).
    return dict(
        vocab_size=37000, hidden_size=hidden_size, num_hidden_layers=6, num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size, max_position_embeddings=512, type_vocab_size=0,
        position_embedding_type="sinusoidal", scale_embeddings=True, embedding_norm=False, tie_word_embeddings=True,
        norm_type="layernorm", norm_position="post", layer_norm_eps=1e-5, ffn_type="mlp", hidden_act="relu",
        attention_bias=False, mlp_bias=True,
        hidden_dropout_prob=dropout, attention_dropout=0.0, activation_dropout=0.0,
    )


def _bert(num_hidden_layers, hidden_size, num_attention_heads):
    # BERT (Devlin et al., 2019); the small sizes are Google's "Well-Read Students" BERT-Tiny/Mini (Turc et al.,
    # 2019). Post-LN with an embedding LayerNorm, learned positions, exact GELU, segment embeddings, biases
    # everywhere, and the dense+tanh pooler over [CLS] that sequence classification reads.
    return dict(
        vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, intermediate_size=4 * hidden_size, max_position_embeddings=512,
        type_vocab_size=2, position_embedding_type="learned", scale_embeddings=False, embedding_norm=True,
        tie_word_embeddings=True, norm_type="layernorm", norm_position="post", layer_norm_eps=1e-12,
        ffn_type="mlp", hidden_act="gelu", attention_bias=True, mlp_bias=True,
        hidden_dropout_prob=0.1, attention_dropout=0.1, activation_dropout=0.0, initializer_range=0.02,
        add_pooling_layer=True, classifier_pooling="first", pad_token_id=0,
    )


def _llama(vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
           rope_theta, layer_norm_eps, tie_word_embeddings, max_position_embeddings, bos_token_id, eos_token_id):
    # Llama: Pre-RMSNorm, rotary positions, SwiGLU feed-forward, grouped-query attention, no biases, no dropout.
    return dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings, type_vocab_size=0,
        position_embedding_type="rope", rope_theta=rope_theta, scale_embeddings=False, embedding_norm=False,
        tie_word_embeddings=tie_word_embeddings, norm_type="rmsnorm", norm_position="pre",
        layer_norm_eps=layer_norm_eps, ffn_type="glu", hidden_act="silu", attention_bias=False, mlp_bias=False,
        hidden_dropout_prob=0.0, attention_dropout=0.0, activation_dropout=0.0, initializer_range=0.02,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )


# name -> (families it is valid for, one-line description, config fields)
PRESETS: dict[str, tuple[tuple[str, ...], str, dict]] = {
    "transformer-base": (
        (SEQ2SEQ, ENCODER, DECODER),
        "the paper's base model (d_model 512, 6 layers, 8 heads, d_ff 2048, P_drop 0.1); the paper counts 65M "
        "for encoder + decoder",
        _paper(hidden_size=512, num_attention_heads=8, intermediate_size=2048, dropout=0.1),
    ),
    "transformer-big": (
        (SEQ2SEQ, ENCODER, DECODER),
        "the paper's big model (d_model 1024, 6 layers, 16 heads, d_ff 4096, P_drop 0.3); the paper counts 213M "
        "for encoder + decoder",
        _paper(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, dropout=0.3),
    ),
    "bert-tiny": ((ENCODER,), "BERT-Tiny (L=2, H=128, A=2)", _bert(2, 128, 2)),
    "bert-mini": ((ENCODER,), "BERT-Mini (L=4, H=256, A=4)", _bert(4, 256, 4)),
    "bert-base": ((ENCODER,), "BERT-Base (L=12, H=768, A=12)", _bert(12, 768, 12)),
    "gpt2": (
        (DECODER,),
        "GPT-2 small (124M): Pre-LN, learned positions, tanh-approximated GELU, tied embeddings",
        dict(
            vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=1024, type_vocab_size=0, position_embedding_type="learned",
            scale_embeddings=False, embedding_norm=False, tie_word_embeddings=True, norm_type="layernorm",
            norm_position="pre", layer_norm_eps=1e-5, ffn_type="mlp", hidden_act="gelu_new", attention_bias=True,
            mlp_bias=True, hidden_dropout_prob=0.1, attention_dropout=0.1, activation_dropout=0.0,
            initializer_range=0.02, bos_token_id=50256, eos_token_id=50256,
        ),
    ),
    "llama-135m": (
        (DECODER,),
        "small Llama (the SmolLM-135M shape: 30 layers, 9 heads, 3 key/value heads, tied embeddings)",
        _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, rope_theta=10000.0, layer_norm_eps=1e-5, tie_word_embeddings=True,
               max_position_embeddings=2048, bos_token_id=0, eos_token_id=0),
    ),
    "llama-1b": (
        (DECODER,),
        "1B-class Llama (the Llama-3.2-1B shape, plain RoPE without its llama3 frequency scaling)",
        _llama(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, layer_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001),
    ),
    "nanogpt-shakespeare": (
        (DECODER,),
        "nanoGPT's character-level Shakespeare model (6 layers, 6 heads, d 384, context 256, dropout 0.2, no "
        "biases in linear layers or LayerNorms)",
        dict(
            vocab_size=65, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
            max_position_embeddings=256, type_vocab_size=0, position_embedding_type="learned",
            scale_embeddings=False, embedding_norm=False, tie_word_embeddings=True, norm_type="layernorm",
            norm_position="pre", layer_norm_eps=1e-5, norm_bias=False, ffn_type="mlp", hidden_act="gelu",
            attention_bias=False, mlp_bias=False, hidden_dropout_prob=0.2, attention_dropout=0.2, activation_dropout=0.0,
            initializer_range=0.02,
        ),
    ),
}


def _family(model_type: str) -> str:
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"Presets are defined per family; call from_preset on {', '.join(_CONFIG_CLASS.values())} (got "
            f"model_type {model_type!r})."
        )
    return _FAMILY_OF_MODEL_TYPE[model_type]


def preset_names(family: str | None = None) -> list[str]:
    """Names of the presets, all or those of one family ("encoder" / "decoder" or a Blueprint model_type)."""
    if family is None:
        return list(PRESETS)
    family = _family(family)
    return [name for name, (families, _, _) in PRESETS.items() if family in families]


def preset_fields(name: str, model_type: str) -> dict:
    """The config fields of preset `name` for the family of `model_type` (a fresh dict, safe to modify)."""
    family = _family(model_type)
    if name not in PRESETS:
        listing = ", ".join(f"{n} ({'/'.join(PRESETS[n][0])})" for n in PRESETS)
        raise ValueError(f"Unknown preset {name!r}; valid presets: {listing}.")
    families, _, fields = PRESETS[name]
    if family not in families:
        raise ValueError(
            f"Preset {name!r} belongs to the {'/'.join(families)} family; use {_CONFIG_CLASS[families[0]]}.from_preset"
            f"({name!r}). Valid {family} presets: {', '.join(preset_names(family))}."
        )
    return dict(fields)


def _classes(family: str):
    """(config class, model class whose parameters a preset's count is) of a family; flat sibling imports only, as
    Hub remote code needs."""
    if family == ENCODER:
        from .configuration_blueprint import BlueprintEncoderConfig
        from .modeling_blueprint import BlueprintEncoderModel

        return BlueprintEncoderConfig, BlueprintEncoderModel
    if family == DECODER:
        from .configuration_blueprint import BlueprintDecoderConfig
        from .modeling_blueprint import BlueprintDecoderForCausalLM

        return BlueprintDecoderConfig, BlueprintDecoderForCausalLM
    from .configuration_blueprint import BlueprintSeq2SeqConfig
    from .modeling_blueprint import BlueprintForConditionalGeneration

    return BlueprintSeq2SeqConfig, BlueprintForConditionalGeneration


def count_parameters(name: str, family: str) -> int:
    """Parameters of the model a preset describes, built on the meta device (no memory, no time). Encoders count
    the base model (with BERT's pooler where the preset has one, as BERT's published sizes do), decoders the
    causal LM and seq2seq the full encoder-decoder with its LM head (a tied output projection counts once)."""
    config_class, model_class = _classes(_family(family))
    config = config_class.from_preset(name)
    with torch.device("meta"):
        model = model_class(config)
    return sum(parameter.numel() for parameter in model.parameters())


def list_presets() -> list[tuple[str, str, int]]:
    """(name, family, parameter count) for every preset and family it is valid for."""
    rows = []
    for name, (families, _, _) in PRESETS.items():
        for family in families:
            try:
                _classes(family)
            except ImportError:  # a family this copy of the model code does not have
                continue
            rows.append((name, family, count_parameters(name, family)))
    return rows


def presets_table() -> str:
    """The presets as a Markdown table (the README's)."""
    rows = ["| preset | family | parameters | what it is |", "|---|---|---:|---|"]
    for name, family, count in list_presets():
        rows.append(f"| `{name}` | {family} | {count / 1e6:,.1f}M | {PRESETS[name][1]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(presets_table())
