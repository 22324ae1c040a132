"""Adapter state dicts in PEFT's key format — a pure mapping between in-memory and checkpoint keys.

    in memory:   <path>.adapters.<adapter>.<tensor>           (a Delta's own state dict)
                 <path>.modules_to_save.<adapter>.<tensor>    (modules_to_save copies)
    checkpoint:  base_model.model.<path>.<tensor>

Loading inverts the same table, checks every key and shape first, and only then writes, so a bad
checkpoint leaves the model exactly as it was.
"""

from __future__ import annotations

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
    config = tuner.peft_config[adapter_name]
    slots: Slots = {}
    for path, module in tuner.model.named_modules():
        prefix = f"{MODEL_PREFIX}{path}."
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters:
            slots.update(_module_slots(prefix, module.adapters[adapter_name]))
            if config.bias.endswith("_only") and module.base_layer.bias is not None:
                slots[prefix + "base_layer.bias"] = (module.base_layer, "bias")
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            slots.update(_module_slots(prefix, module.modules_to_save[adapter_name]))
    if config.bias == "all":
        for name, _ in tuner.model.named_parameters():
            frozen_copy = any(part in name for part in (".adapters.", ".modules_to_save.", ".original_module."))
            if (name == "bias" or name.endswith(".bias")) and not frozen_copy:
                owner, _, attr = name.rpartition(".")
                slots[MODEL_PREFIX + name] = (tuner.model.get_submodule(owner), attr)
    slots.update(tuner.extra_tensor_slots(adapter_name))
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
    problems: list[str] = []
    if missing:
        problems.append(f"missing keys {_show(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_show(unexpected)}")
    for key in sorted(set(slots) & set(state_dict)):
        owner, attr = slots[key]
        want = tuple(getattr(owner, attr).shape)
        got = tuple(state_dict[key].shape)
        if want != got:
            problems.append(
                f"shape mismatch for {key}: checkpoint {got}, model {want} (a different base model, or a config "
                "that differs from the one the checkpoint was trained with, e.g. r or rank_pattern)"
            )
    if problems:
        raise CheckpointError(f"Cannot load adapter '{adapter_name}': " + "; ".join(problems))
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


def _show(keys: list[str], limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more
