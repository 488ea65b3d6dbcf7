"""hf_blueprint: the Transformer of "The Transformer Blueprint" as first-class Hugging Face models."""

from .configuration_blueprint import BlueprintConfig, BlueprintDecoderConfig, BlueprintEncoderConfig

__version__ = "0.1.0"
from .modeling_blueprint import (
    BlueprintDecoderForCausalLM,
    BlueprintDecoderForSequenceClassification,
    BlueprintDecoderModel,
    BlueprintEncoderForMaskedLM,
    BlueprintEncoderForSequenceClassification,
    BlueprintEncoderForTokenClassification,
    BlueprintEncoderModel,
    BlueprintPreTrainedModel,
)


def _register_with_auto_classes():
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
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
    }
    for config_class, heads in families.items():
        # exist_ok: importing the package twice (or a remote-code copy of it) must not fail.
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class, model_class in heads.items():
            auto_class.register(config_class, model_class, exist_ok=True)


_register_with_auto_classes()
