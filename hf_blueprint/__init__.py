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
