"""deltatune: parameter-efficient fine-tuning (FourierFT, RandLoRA, AdaLoRA, Bone/BAT), checkpoint-compatible with PEFT."""

from ._version import __version__  # noqa: F401

from .config import PeftConfig, PeftType, TaskType, TunerConfig  # noqa: E402
from .core.layer import AdapterLayer, Delta  # noqa: E402
from .core.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from .core.targeting import NoMatchingModuleError  # noqa: E402
from .core.tuner import AdapterModel, UnsupportedModuleError  # noqa: E402
from .integrations.kbit import prepare_model_for_kbit_training  # noqa: E402
from .io.files import CheckpointError  # noqa: E402
from .io.state_dict import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from .api import (  # noqa: E402
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    TunerLayerStatus,
    TunerModelStatus,
    get_base_model_state_dict,
    get_layer_status,
    get_model_status,
    get_peft_config,
    inject_adapter_in_model,
    load_peft_weights,
    set_base_model_state_dict,
    set_requires_grad,
)
from .methods.adalora import AdaLoraConfig, AdaLoraModel, orthogonal_regularization  # noqa: E402
from .methods.bone import BoneConfig, BoneModel  # noqa: E402
from .methods.miss import MissConfig, MissModel  # noqa: E402
from .methods.fourierft import FourierFTConfig, FourierFTModel  # noqa: E402
from .methods.randlora import RandLoraConfig, RandLoraModel  # noqa: E402
from .peft_model import (  # noqa: E402
    PeftMixedModel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__all__ = [
    "prepare_model_for_kbit_training",
    "AdaLoraConfig", "AdaLoraModel", "orthogonal_regularization",
    "AdapterLayer", "AdapterModel", "BoneConfig", "BoneModel", "CheckpointError", "Delta", "FourierFTConfig", "FourierFTModel", "RandLoraConfig", "RandLoraModel", "ModulesToSaveWrapper",
    "NoMatchingModuleError", "PeftConfig", "PeftMixedModel",
    "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "TunerConfig", "UnsupportedModuleError", "get_peft_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict",
    "MissConfig", "MissModel", "PeftType", "TaskType", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification", "TunerLayerStatus",
    "TunerModelStatus", "get_base_model_state_dict", "get_layer_status", "get_model_status", "get_peft_config",
    "inject_adapter_in_model", "load_peft_weights", "set_base_model_state_dict", "set_requires_grad",
]
