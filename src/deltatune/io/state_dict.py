"""Adapter state dicts in PEFT's key format — a pure mapping between in-memory and checkpoint keys.

    in memory:   <path>.adapters.<adapter>.<tensor>           (a Delta's own state dict)
                 <path>.modules_to_save.<adapter>.<tensor>    (modules_to_save copies)
    checkpoint:  base_model.model.<path>.<tensor>

Loading inverts the same table, checks every key and shape first, and only then writes, so a bad
checkpoint leaves the model exactly as it was.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..core.layer import AdapterLayer
from ..core.modules_to_save import ModulesToSaveWrapper
from .files import CheckpointError

if TYPE_CHECKING:
    from ..core.tuner import AdapterModel

MODEL_PREFIX = "base_model.model."

Slots = dict[str, tuple[nn.Module, str]]  # checkpoint key -> (owner module, attribute name)


def _module_slots(prefix: str, module: nn.Module) -> Slots:
    slots: Slots = {}
    for key in module.state_dict(keep_vars=True):
        owner_path, _, attr = key.rpartition(".")
        slots[prefix + key] = (module.get_submodule(owner_path) if owner_path else module, attr)
    return slots


def adapter_slots(tuner: "AdapterModel", adapter_name: str) -> Slots:
    """Every tensor the checkpoint of ``adapter_name`` holds, keyed as PEFT keys it."""
    slots: Slots = {}
    for path, module in tuner.model.named_modules():
        prefix = f"{MODEL_PREFIX}{path}."
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            slots.update(_module_slots(prefix, module.adapters[adapter_name]))
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            slots.update(_module_slots(prefix, module.modules_to_save[adapter_name]))
    slots.update(bias_slots(tuner, adapter_name))
    slots.update(tuner.extra_tensor_slots(adapter_name))
    return slots


def bias_slots(tuner: "AdapterModel", adapter_name: str) -> Slots:
    """The base biases an adapter trains (``bias="all"`` or ``"<method>_only"``)."""
    config = tuner.peft_config[adapter_name]
    slots: Slots = {}
    if config.bias.endswith("_only"):
        for path, module in tuner.model.named_modules():
            if isinstance(module, AdapterLayer) and adapter_name in module.adapters and module.base_layer.bias is not None:
                slots[f"{MODEL_PREFIX}{path}.base_layer.bias"] = (module.base_layer, "bias")
    elif config.bias == "all":
        for name, _ in tuner.model.named_parameters():
            frozen_copy = any(part in name for part in (".adapters.", ".modules_to_save.", ".original_module."))
            if (name == "bias" or name.endswith(".bias")) and not frozen_copy:
                owner, _, attr = name.rpartition(".")
                slots[MODEL_PREFIX + name] = (tuner.model.get_submodule(owner), attr)
    return slots


def get_peft_model_state_dict(tuner: "AdapterModel", adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The checkpoint of ``adapter_name``: PEFT's keys and, after the method's save hook, PEFT's tensors."""
    state = {key: getattr(owner, attr).detach() for key, (owner, attr) in adapter_slots(tuner, adapter_name).items()}
    return tuner.prepare_state_dict_for_save(state, adapter_name)


def set_peft_model_state_dict(
    tuner: "AdapterModel", state_dict: dict[str, torch.Tensor], adapter_name: str = "default", assign: bool = False
) -> None:
    """Load a PEFT-format adapter state dict into ``adapter_name``; all-or-nothing."""
    state_dict = tuner.prepare_state_dict_for_load(dict(state_dict), adapter_name)
    slots = adapter_slots(tuner, adapter_name)
    unexpected = sorted(set(state_dict) - set(slots))
    missing = sorted(set(slots) - set(state_dict))
    # PEFT saves trained biases only for LoRA-family methods: its Bone/FourierFT/RandLoRA files lack them
    no_bias = [k for k in missing if k in bias_slots(tuner, adapter_name)]
    if no_bias:
        warnings.warn(
            f"The checkpoint of adapter '{adapter_name}' holds no biases although its config says bias="
            f"{tuner.peft_config[adapter_name].bias!r} (PEFT does not save them for this method); the base "
            f"model's biases are kept for {_show(no_bias)}"
        )
        missing = [k for k in missing if k not in no_bias]
        slots = {k: v for k, v in slots.items() if k not in no_bias}
    problems: list[str] = []
    if missing:
        problems.append(
            f"missing keys {_show(missing)} (the checkpoint was saved for other target modules or another base model, "
            "or the file is incomplete)"
        )
    if unexpected:
        problems.append(
            f"unexpected keys {_show(unexpected)} (the checkpoint was saved for other target modules, another base "
            "model or another method)"
        )
    for key in sorted(set(slots) & set(state_dict)):
        owner, attr = slots[key]
        current, value = getattr(owner, attr), state_dict[key]
        want = tuple(current.shape)
        got = tuple(value.shape)
        if want != got:
            problems.append(
                f"shape mismatch for {key}: checkpoint {got}, model {want} (a different base model, or a config "
                "that differs from the one the checkpoint was trained with, e.g. r or rank_pattern)"
            )
        elif _kind(value) != _kind(current):
            problems.append(f"dtype mismatch for {key}: checkpoint {value.dtype}, model {current.dtype}")
    if problems:
        raise CheckpointError(f"Cannot load adapter '{adapter_name}': " + "; ".join(problems))
    nonfinite = [k for k in sorted(slots) if state_dict[k].is_floating_point() and not torch.isfinite(state_dict[k]).all()]
    if nonfinite:
        warnings.warn(
            f"The checkpoint of adapter '{adapter_name}' holds NaN or inf in {_show(nonfinite)}: its outputs will be "
            "NaN/inf too, and merge_adapter(safe_merge=True) will refuse it"
        )
    with torch.no_grad():
        for key, (owner, attr) in slots.items():
            current = getattr(owner, attr)
            value = state_dict[key]
            if current.device.type == "meta" or assign:
                device = value.device if current.device.type == "meta" else current.device
                new = value.to(device=device, dtype=current.dtype)
                if isinstance(current, nn.Parameter):
                    setattr(owner, attr, nn.Parameter(new, requires_grad=current.requires_grad))
                else:
                    setattr(owner, attr, new)
            else:
                current.copy_(value.to(current.dtype))


def _kind(t: torch.Tensor) -> str:
    """Floating, complex or integer/bool: a value of another kind cannot stand for the tensor."""
    return "complex" if t.is_complex() else "float" if t.is_floating_point() else "int"


def _show(keys: list[str], limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more
