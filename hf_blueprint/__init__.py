"""hf_blueprint: the Transformer of "The Transformer Blueprint" as first-class Hugging Face models."""

from .configuration_blueprint import (
    BlueprintConfig,
    BlueprintDecoderConfig,
    BlueprintEncoderConfig,
    BlueprintSeq2SeqConfig,
)

__version__ = "0.1.0"
from .modeling_blueprint import (
    BlueprintDecoderForCausalLM,
    BlueprintDecoderForSequenceClassification,
    BlueprintDecoderModel,
    BlueprintEncoderForMaskedLM,
    BlueprintEncoderForSequenceClassification,
    BlueprintEncoderForTokenClassification,
    BlueprintEncoderModel,
    BlueprintForConditionalGeneration,
    BlueprintPreTrainedModel,
    BlueprintSeq2SeqModel,
)


def _register_with_auto_classes():
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    families = {
        BlueprintEncoderConfig: {
            AutoModel: BlueprintEncoderModel,
            AutoModelForMaskedLM: BlueprintEncoderForMaskedLM,
            AutoModelForSequenceClassification: BlueprintEncoderForSequenceClassification,
            AutoModelForTokenClassification: BlueprintEncoderForTokenClassification,
        },
        BlueprintDecoderConfig: {
            AutoModel: BlueprintDecoderModel,
            AutoModelForCausalLM: BlueprintDecoderForCausalLM,
            AutoModelForSequenceClassification: BlueprintDecoderForSequenceClassification,
        },
        BlueprintSeq2SeqConfig: {
            AutoModel: BlueprintSeq2SeqModel,
            AutoModelForSeq2SeqLM: BlueprintForConditionalGeneration,
        },
    }
    for config_class, heads in families.items():
        # exist_ok: importing the package twice (or a remote-code copy of it) must not fail.
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        # register_for_auto_class makes save_pretrained copy the code files beside the weights (Hub remote code).
        config_class.register_for_auto_class()
        for auto_class, model_class in heads.items():
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)
        assert set(config_class.family_auto_map) == {"AutoConfig", *(auto.__name__ for auto in heads)}


_register_with_auto_classes()


def _register_peft_default_target_modules():
    """PEFT picks the modules an adapter wraps, when the config names none (`LoraConfig()`), from tables keyed by
    model_type in `peft.utils.constants`; a model_type missing there makes it raise. The Blueprint modules carry
    Llama's names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), so each table's Llama entry is
    the Blueprint default too (LoRA: the attention projections q_proj and v_proj), except for the norms (LN tuning),
    which have names of their own. Entries a user or PEFT itself already made are kept."""
    try:
        from peft.utils import constants
    except ImportError:  # PEFT is optional
        return
    blueprint_norms = ["self_attn_norm", "cross_attn_norm", "mlp_norm", "norm"]
    model_types = [config.model_type for config in (BlueprintEncoderConfig, BlueprintDecoderConfig,
                                                    BlueprintSeq2SeqConfig)]
    for name, table in vars(constants).items():
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict) and "llama" in table):
            continue
        is_norm_table = name == "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING"
        modules = blueprint_norms if is_norm_table else table["llama"]
        for model_type in model_types:
            table.setdefault(model_type, list(modules))


_register_peft_default_target_modules()
