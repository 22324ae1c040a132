"""PEFT's helper functions, with PEFT 0.21.2's signatures, defaults and return values.

``inject_adapter_in_model``, ``get_layer_status``/``get_model_status``, ``load_peft_weights``,
``get_peft_config``, ``set_requires_grad``, ``get_base_model_state_dict``/
``set_base_model_state_dict`` and the ``AutoPeftModel*`` loaders. Each works through the same
tuner, layer and IO code as :class:`~deltatune.PeftModel`; nothing here is a second
implementation of the adapter lifecycle.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from .config import PeftConfig, TunerConfig, config_class_for
from .core.layer import AdapterLayer
from .core.modules_to_save import ModulesToSaveWrapper
from .core.registry import method_for
from .core.tuner import AdapterModel, adapter_modules, adapter_parts, set_requires_grad  # noqa: F401 (PEFT's name)
from .io.files import checkpoint_files, load_weights_file, resolve_local_dir
from .io.state_dict import TUNER_ATTR, tuner_of

Irregular = Literal["irregular"]


# ------------------------------------------------------------------------------------ configs


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config a dict describes (it must name its ``peft_type``), as PEFT's ``get_peft_config``."""
    if "peft_type" not in config_dict:
        raise ValueError(f"get_peft_config needs a `peft_type` key; got the keys {sorted(config_dict)}")
    return config_class_for(config_dict["peft_type"])(**config_dict)


# ------------------------------------------------------------------------------------ injection


def inject_adapter_in_model(
    peft_config: TunerConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """Add an adapter's layers to ``model`` in place and return ``model`` (no PeftModel around it).

    The adapters' parameters are named as in PEFT; ``get_peft_model_state_dict(model)`` then gives
    keys without ``base_model.model.``, as PEFT's do. A second call adds another adapter of the
    same method."""
    if state_dict is not None:
        raise NotImplementedError(
            "inject_adapter_in_model(state_dict=...) (targets taken from a state dict's keys) is not supported by "
            "deltatune: pass the config's target_modules, then set_peft_model_state_dict(model, state_dict)"
        )
    if getattr(peft_config, "is_prompt_learning", False):
        raise ValueError("inject_adapter_in_model does not support prompt learning and adaption prompt yet.")
    tuner = model.__dict__.get(TUNER_ATTR)
    if isinstance(tuner, AdapterModel):
        if not isinstance(peft_config, tuner.config_cls):
            raise ValueError(
                f"The model already holds {type(tuner).__name__} adapters; a {type(peft_config).__name__} cannot be added"
            )
        tuner.inject_adapter(model, adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        return model
    tuner = method_for(peft_config.peft_type).model_cls(
        model, {adapter_name: peft_config}, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage
    )
    # the tuner stays reachable from the model (for the state-dict helpers) without being a submodule
    model.__dict__[TUNER_ATTR] = tuner
    return model


# ------------------------------------------------------------------------------------ trainability


# ------------------------------------------------------------------------------------ status


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str] = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular] = None


def _all_or_irregular(values: list[bool]) -> Union[bool, Irregular]:
    return True if all(values) else False if not any(values) else "irregular"


def _base_of(model: nn.Module) -> nn.Module:
    from .peft_model import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """One :class:`TunerLayerStatus` per adapter layer and modules_to_save wrapper, as in PEFT."""
    from .peft_model import PeftModel

    statuses = []
    # names relative to the tuner for a PeftModel (``model.lin0``), as PEFT reports them
    for name, module in adapter_modules(model.base_model if isinstance(model, PeftModel) else model):
        parts = adapter_parts(module)
        grads = {k: _all_or_irregular([p.requires_grad for p in part.parameters()]) for k, part in parts.items()
                 if any(True for _ in part.parameters())}
        devices = {k: sorted({t.device.type for t in [*part.parameters(), *part.buffers()]}) for k, part in parts.items()}
        if isinstance(module, AdapterLayer):
            active, merged, kind = list(module.active_adapters), list(module.merged_adapters), type(module.base_layer).__name__
        else:
            active = [module.active_adapter] if module.active_adapter else []
            merged, kind = [], "ModulesToSaveWrapper"
        statuses.append(TunerLayerStatus(
            name=name, module_type=kind, enabled=not module.disable_adapters, active_adapters=active,
            merged_adapters=merged, requires_grad=grads, available_adapters=sorted(parts), devices=devices,
        ))
    if not statuses:
        raise ValueError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT adapters "
            "injected in the model."
        )
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """A model-wide summary of :func:`get_layer_status`; inconsistent layers read ``"irregular"``."""
    from .peft_model import PeftModel

    params = list(model.parameters())
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    if isinstance(model, PeftModel):
        base_type = type(model.get_base_model()).__name__
        adapter_type = type(model.base_model).__name__
        peft_types = {k: str(c.peft_type) for k, c in model.peft_config.items()}
    else:
        tuner = model.__dict__.get(TUNER_ATTR)
        is_pretrained = any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)
        base_type = type(model).__name__ if is_pretrained else "other"
        adapter_type = "None"
        peft_types = {}
        if isinstance(tuner, AdapterModel):
            peft_types = {k: str(c.peft_type) for k, c in tuner.peft_config.items()}
    layers = get_layer_status(model)
    enabled_set = {s.enabled for s in layers}
    enabled: Union[bool, Irregular] = enabled_set.pop() if len(enabled_set) == 1 else "irregular"
    available = sorted(set().union(*(s.available_adapters for s in layers)))
    actives = {tuple(s.active_adapters) for s in layers if isinstance(s, TunerLayerStatus) and s.module_type != "ModulesToSaveWrapper"}
    active: Union[list[str], Irregular] = list(actives.pop()) if len(actives) == 1 else [] if not actives else "irregular"
    merged_any = set().union(*(s.merged_adapters for s in layers))
    merged: Union[list[str], Irregular] = sorted(merged_any)
    for s in layers:
        if s.module_type == "ModulesToSaveWrapper":
            continue
        if (set(s.available_adapters) - set(s.merged_adapters)) & merged_any:
            merged = "irregular"
            break
    grads: dict[str, list] = {}
    for s in layers:
        for k, v in s.requires_grad.items():
            grads.setdefault(k, []).append(v)
    requires_grad = {k: (v[0] if len(set(v)) == 1 else "irregular") for k, v in grads.items()}
    devices: dict[str, set] = {}
    for s in layers:
        for k, v in s.devices.items():
            devices.setdefault(k, set()).update(v)
    return TunerModelStatus(
        base_model_type=base_type, adapter_model_type=adapter_type, peft_types=peft_types,
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers), enabled=enabled,
        active_adapters=active, merged_adapters=merged, requires_grad=requires_grad, available_adapters=available,
        devices={k: sorted(v) for k, v in devices.items()},
    )


# ------------------------------------------------------------------------------------ weights


def load_peft_weights(
    model_id: str, device: Optional[str] = None, key_mapping: Optional[dict[str, str]] = None, **hf_hub_download_kwargs: Any
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (safetensors, else ``.bin`` through the restricted unpickler).
    ``key_mapping``: ``{regex: replacement}`` applied to every key (first match wins), as in PEFT."""
    folder = resolve_local_dir(model_id, hf_hub_download_kwargs.pop("subfolder", None))
    files = checkpoint_files(folder)
    if files.weights is None:
        raise FileNotFoundError(f"No adapter_model.safetensors or adapter_model.bin found in {folder}")
    tensors = load_weights_file(files.weights, device=device or "cpu")
    if key_mapping:
        renamed = {}
        for key, value in tensors.items():
            for pattern, replacement in key_mapping.items():
                new, n = re.subn(pattern, replacement, key)
                if n:
                    key = new
                    break
            renamed[key] = value
        tensors = renamed
    return tensors


def _original_key(key: str) -> Optional[str]:
    """A base-model key as the unwrapped model names it; None for an adapter's own tensor."""
    parts = key.split(".")
    if "adapters" in parts or "modules_to_save" in parts:
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "original_module"))


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict under the keys the model had before adapters were added."""
    base = _base_of(model)
    out = {}
    for key, value in base.state_dict().items():
        original = _original_key(key)
        if original is not None:
            out[original] = value
    return out


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def set_base_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> IncompatibleKeys:
    """Load a state dict keyed as the unwrapped model into the wrapped base model (adapters untouched)."""
    base = _base_of(model)
    to_memory = {}
    for key in base.state_dict():
        original = _original_key(key)
        if original is not None:
            to_memory[original] = key
    unexpected = [k for k in state_dict if k not in to_memory]
    missing = [k for k in to_memory if k not in state_dict]
    if strict and (missing or unexpected):
        msgs = []
        if missing:
            msgs.append(f"Missing key(s) in state_dict: {missing}")
        if unexpected:
            msgs.append(f"Unexpected key(s) in state_dict: {unexpected}")
        raise RuntimeError(f"Error(s) in loading state_dict for {type(base).__name__}:\n\t" + "\n\t".join(msgs))
    base.load_state_dict({to_memory[k]: v for k, v in state_dict.items() if k in to_memory}, strict=False)
    return IncompatibleKeys(missing, unexpected)


# ------------------------------------------------------------------------------------ AutoPeftModel


class _BaseAutoPeftModel:
    """Loads the base model an adapter names (``base_model_name_or_path``) with transformers, then
    the adapter. Use the ``from_pretrained`` class method; these classes are never instantiated."""

    _target_class: Optional[str] = None  # transformers' Auto class; None: from the config's auto_mapping
    _task_type: Optional[str] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(
            f"{type(self).__name__} is designed to be instantiated using "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)`"
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        revision: Optional[str] = None,
        import_allowlist: Optional[list[str]] = None,
        **kwargs: Any,
    ):
        import importlib

        import transformers

        from .peft_model import TASK_WRAPPERS, PeftModel

        folder = resolve_local_dir(pretrained_model_name_or_path, kwargs.get("subfolder"))
        peft_config = config or PeftConfig.from_pretrained(folder)
        base_name = peft_config.base_model_name_or_path
        if not base_name:
            raise ValueError(f"The adapter config in {folder} names no base_model_name_or_path to load")
        task = peft_config.task_type
        if cls._task_type is not None and task is not None and str(task) != cls._task_type:
            raise ValueError(
                f"Expected target PEFT class: {TASK_WRAPPERS[cls._task_type].__name__}, but you have asked for: "
                f"{TASK_WRAPPERS[str(task)].__name__} make sure that you are loading the correct model for your task type."
            )
        if cls._target_class is not None:
            target = getattr(transformers, cls._target_class)
        elif task is not None and str(task) in _AUTO_CLASSES:
            target = getattr(transformers, _AUTO_CLASSES[str(task)])
        elif peft_config.auto_mapping:
            library = peft_config.auto_mapping.get("parent_library", "")
            allow = import_allowlist if import_allowlist is not None else ["transformers"]
            if not any(library == a or library.startswith(a + ".") for a in allow):
                raise ValueError(
                    f"The adapter's auto_mapping names the library {library!r}, which is not in import_allowlist {allow}"
                )
            target = getattr(importlib.import_module(library), peft_config.auto_mapping["base_model_class"])
        else:
            target = transformers.AutoModel
        loader_kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder", "torch_device", "low_cpu_mem_usage")}
        base = target.from_pretrained(base_name, revision=revision or peft_config.revision, **loader_kwargs)
        peft_cls = TASK_WRAPPERS.get(str(task), PeftModel) if cls._task_type is None else TASK_WRAPPERS[cls._task_type]
        return peft_cls.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=is_trainable, config=config)


_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class AutoPeftModel(_BaseAutoPeftModel):
    pass


def _auto(task: str) -> type:
    return type(f"AutoPeftModelFor{_TASK_NAMES[task]}", (_BaseAutoPeftModel,),
                {"_target_class": _AUTO_CLASSES[task], "_task_type": task, "__module__": __name__})


_TASK_NAMES = {"CAUSAL_LM": "CausalLM", "SEQ_2_SEQ_LM": "Seq2SeqLM", "SEQ_CLS": "SequenceClassification",
               "TOKEN_CLS": "TokenClassification", "QUESTION_ANS": "QuestionAnswering",
               "FEATURE_EXTRACTION": "FeatureExtraction"}
AutoPeftModelForCausalLM = _auto("CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _auto("SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _auto("SEQ_CLS")
AutoPeftModelForTokenClassification = _auto("TOKEN_CLS")
AutoPeftModelForQuestionAnswering = _auto("QUESTION_ANS")
AutoPeftModelForFeatureExtraction = _auto("FEATURE_EXTRACTION")
