"""deltatune: parameter-efficient fine-tuning (FourierFT, RandLoRA, AdaLoRA, Bone/BAT), checkpoint-compatible with PEFT."""

__version__ = "0.1.0"

from .config import PeftConfig, TunerConfig  # noqa: E402
from .core.layer import AdapterLayer, Delta  # noqa: E402
from .core.modules_to_save import ModulesToSaveWrapper  # noqa: E402
from .core.targeting import NoMatchingModuleError  # noqa: E402
from .core.tuner import AdapterModel, UnsupportedModuleError  # noqa: E402
from .io.files import CheckpointError  # noqa: E402
from .io.state_dict import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from .methods.adalora import AdaLoraConfig, AdaLoraModel, orthogonal_regularization  # noqa: E402
from .methods.bone import BoneConfig, BoneModel  # noqa: E402
from .methods.fourierft import FourierFTConfig, FourierFTModel  # noqa: E402
from .methods.randlora import RandLoraConfig, RandLoraModel  # noqa: E402
from .peft_model import (  # noqa: E402
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
    "AdaLoraConfig", "AdaLoraModel", "orthogonal_regularization",
    "AdapterLayer", "AdapterModel", "BoneConfig", "BoneModel", "CheckpointError", "Delta", "FourierFTConfig", "FourierFTModel", "RandLoraConfig", "RandLoraModel", "ModulesToSaveWrapper",
    "NoMatchingModuleError", "PeftConfig", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "TunerConfig", "UnsupportedModuleError", "get_peft_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict",
]
