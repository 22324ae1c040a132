"""Adapter state dicts in PEFT's key format — a pure mapping between in-memory and checkpoint keys.

    in memory:   <path>.adapters.<adapter>.<tensor>           (a Delta's own state dict)
                 <path>.modules_to_save.<adapter>.<tensor>    (modules_to_save copies)
    checkpoint:  base_model.model.<path>.<tensor>
                 base_model.<tensor>                          (model-level tensors: RandLoRA's shared bases)

Loading inverts the same table, checks every key and shape first, and only then writes, so a bad
checkpoint leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn as nn

from ..core.layer import AdapterLayer, is_adapter_parameter
from ..core.modules_to_save import ModulesToSaveWrapper
from ..core.tuner import AdapterModel, peel
from .files import CheckpointError
from .formats import collapse_shared_tensors, default_tensor_format, native_tensor_names

MODEL_PREFIX = "base_model.model."  # a module's tensors: base_model.model.<path>.<name>
MODEL_LEVEL_PREFIX = "base_model."  # model-level tensors: base_model.<name>

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
    slots.update({MODEL_LEVEL_PREFIX + name: slot for name, slot in tuner.model_tensors(adapter_name).items()})
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
            frozen_copy = is_adapter_parameter(name) or ".original_module." in name
            if (name == "bias" or name.endswith(".bias")) and not frozen_copy:
                owner, _, attr = name.rpartition(".")
                slots[MODEL_PREFIX + name] = (tuner.model.get_submodule(owner), attr)
    return slots


def _base_bias_slots(tuner: "AdapterModel", keys: set[str]) -> Slots:
    """The checkpoint keys among ``keys`` that name a bias of the base model."""
    slots: Slots = {}
    for key in keys:
        name = key[len(MODEL_PREFIX):]
        owner_path, _, attr = name.rpartition(".")
        if not key.startswith(MODEL_PREFIX) or attr != "bias" or is_adapter_parameter(name):
            continue
        try:
            owner = tuner.model.get_submodule(owner_path)
        except AttributeError:
            continue
        if isinstance(owner._parameters.get("bias"), nn.Parameter):
            slots[key] = (owner, "bias")
    return slots


class LoadResult(NamedTuple):
    """What :func:`set_peft_model_state_dict` did not load, as checkpoint keys."""

    missing_keys: list[str]
    unexpected_keys: list[str]


# a plain model that inject_adapter_in_model changed keeps its tuner here (not a submodule)
TUNER_ATTR = "_deltatune_tuner"


def tuner_of(model: Any, caller: str = "get_peft_model_state_dict") -> tuple["AdapterModel", str]:
    """The tuner behind ``model`` (a PeftModel, a ``<Method>Model`` or a model changed by
    inject_adapter_in_model) and the prefix its checkpoint keys carry in that namespace."""
    for inner in peel(model):  # DDP / FSDP / accelerate / torch.compile wrappers, then a PeftModel's base_model
        if isinstance(inner, AdapterModel):
            return inner, MODEL_PREFIX
        tuner = getattr(inner, "__dict__", {}).get(TUNER_ATTR)
        if isinstance(tuner, AdapterModel):
            return tuner, ""
    raise TypeError(
        f"{caller} needs a deltatune PeftModel, a <Method>Model or a model changed by inject_adapter_in_model; "
        f"got a {type(model).__name__} without adapters"
    )


def _rebase(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint keys (``base_model.model.``…) in the namespace of a model with ``prefix``."""
    if prefix == MODEL_PREFIX:
        return state
    return {(k[len(MODEL_PREFIX):] if k.startswith(MODEL_PREFIX) else k): v for k, v in state.items()}


def _unrebase(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if prefix == MODEL_PREFIX:
        return state
    return {(k if k.startswith("base_model.") else MODEL_PREFIX + k): v for k, v in state.items()}


def get_peft_model_state_dict(
    model: Any,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: Union[bool, str] = "auto",
) -> dict[str, torch.Tensor]:
    """The checkpoint of ``adapter_name``: PEFT's keys and, after the method's save hook, PEFT's tensors.

    ``model``: a PeftModel, a ``<Method>Model`` or a model changed by inject_adapter_in_model (keys
    then lack ``base_model.model.``, as in PEFT). ``state_dict``: take the tensors from this state
    dict of ``model`` instead of its live parameters. ``unwrap_compiled`` is accepted for PEFT's
    signature (compiled models are always unwrapped); ``save_embedding_layers`` is ignored: no
    method here adapts embeddings. deltatune's older call ``(model, adapter_name)`` still works.
    """
    if isinstance(state_dict, str):  # deltatune < 0.2: get_peft_model_state_dict(tuner, adapter_name)
        state_dict, adapter_name = None, state_dict
    tuner, prefix = tuner_of(model)
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; known adapters: {sorted(tuner.peft_config)}")
    slots = adapter_slots(tuner, adapter_name)
    if state_dict is None:
        state = {key: getattr(owner, attr).detach() for key, (owner, attr) in slots.items()}
    else:
        names = _memory_names(model)
        state = {}
        for key, (owner, attr) in slots.items():
            name = names.get((id(owner), attr))
            if name is None or name not in state_dict:
                raise KeyError(f"get_peft_model_state_dict: the state_dict passed has no {name or key!r} (for {key})")
            state[key] = state_dict[name]
    state = _fragments_for_save(tuner, state, adapter_name)
    return _rebase(default_tensor_format(state, tuner.peft_config[adapter_name].peft_type), prefix)


def _fragments_for_save(tuner: "AdapterModel", state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """``state`` after the method's save hook, which sees ``{module path: {tensor name: tensor}}``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(MODEL_PREFIX):
            path, _, name = key[len(MODEL_PREFIX):].rpartition(".")
            modules.setdefault(path, {})[name] = tensor
    saved = tuner.fragments_for_save(modules, adapter_name)
    return {**state, **{f"{MODEL_PREFIX}{path}.{name}": t for path, frag in saved.items() for name, t in frag.items()}}


def _memory_names(model: nn.Module) -> dict[tuple[int, str], str]:
    """(id(owner module), attribute) -> the tensor's name in ``model.state_dict()``."""
    names: dict[tuple[int, str], str] = {}
    for path, module in getattr(model, "_orig_mod", model).named_modules(remove_duplicate=False):
        for attr in list(module._parameters) + list(module._buffers):
            names.setdefault((id(module), attr), f"{path}.{attr}" if path else attr)
    return names


def set_peft_model_state_dict(
    model: Any,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load a PEFT-format adapter state dict into ``adapter_name``, as PEFT does: keys that match are
    loaded and the others returned as ``(missing_keys, unexpected_keys)`` (checkpoint keys; PEFT's
    own ``missing_keys`` also list every base-model weight). A shape mismatch raises unless
    ``ignore_mismatched_sizes`` (then the tensor is skipped with a warning). Nothing is written
    unless every tensor that will be written checks out. ``low_cpu_mem_usage``: assign the tensors
    instead of copying (adapters created on ``meta``)."""
    tuner, prefix = tuner_of(model, "set_peft_model_state_dict")
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} not found; known adapters: {sorted(tuner.peft_config)}")
    state = _unrebase(dict(peft_model_state_dict), prefix)
    missing, unexpected = load_adapter_state(
        tuner, state, adapter_name, assign=low_cpu_mem_usage, strict=False, ignore_mismatched_sizes=ignore_mismatched_sizes
    )
    return LoadResult([_rebase({k: None}, prefix).popitem()[0] for k in missing],
                      [_rebase({k: None}, prefix).popitem()[0] for k in unexpected])


def load_adapter_state(
    tuner: "AdapterModel",
    state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    assign: bool = False,
    strict: bool = True,
    ignore_mismatched_sizes: bool = False,
) -> tuple[list[str], list[str]]:
    """Load a PEFT-format adapter state dict into ``adapter_name``; all-or-nothing. ``strict``: a
    missing or unexpected key is an error (checkpoint files); otherwise they are returned."""
    state_dict = native_tensor_names(dict(state_dict), tuner.peft_config[adapter_name].peft_type)
    state_dict = collapse_shared_tensors(
        state_dict, tuner.shared_tensor_names, MODEL_LEVEL_PREFIX,
        keep={MODEL_LEVEL_PREFIX + name for name in tuner.model_tensors(adapter_name)},
    )
    tuner.before_load(adapter_name)
    slots = adapter_slots(tuner, adapter_name)
    if not strict:  # as PEFT's set_peft_model_state_dict: base biases in the dict load even if the config trains none
        slots.update(_base_bias_slots(tuner, set(state_dict) - set(slots)))
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
    slots = {k: v for k, v in slots.items() if k in state_dict}
    problems: list[str] = []
    if strict and missing:
        problems.append(
            f"missing keys {_show(missing)} (the checkpoint was saved for other target modules or another base model, "
            "or the file is incomplete)"
        )
    if strict and unexpected:
        problems.append(
            f"unexpected keys {_show(unexpected)} (the checkpoint was saved for other target modules, another base "
            "model or another method)"
        )
    skipped: list[str] = []
    for key in sorted(slots):
        owner, attr = slots[key]
        current, value = getattr(owner, attr), state_dict[key]
        want = tuple(current.shape)
        got = tuple(value.shape)
        if want != got:
            if ignore_mismatched_sizes:
                skipped.append(f"{key}: checkpoint {got}, model {want}")
                continue
            problems.append(
                f"shape mismatch for {key}: checkpoint {got}, model {want} (a different base model, or a config "
                "that differs from the one the checkpoint was trained with, e.g. r or rank_pattern)"
            )
        elif _kind(value) != _kind(current):
            problems.append(f"dtype mismatch for {key}: checkpoint {value.dtype}, model {current.dtype}")
    if problems:
        raise CheckpointError(f"Cannot load adapter '{adapter_name}': " + "; ".join(problems))
    if skipped:
        warnings.warn(
            f"Some weights of adapter '{adapter_name}' were not loaded because their shapes differ and "
            f"ignore_mismatched_sizes=True: {'; '.join(skipped)}"
        )
        slots = {k: v for k, v in slots.items() if not any(s.startswith(k + ":") for s in skipped)}
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
    return missing, unexpected


# safetensors metadata key: JSON {layer path: weight shape} of the layers an adapter was made for.
# FourierFT's coefficients and RandLoRA's lambda/gamma (without saved bases) do not determine the
# layer's shape, so without this record a file would load silently into layers of another shape.
LAYER_SHAPES_KEY = "deltatune_layer_shapes"


def layer_shapes(tuner: "AdapterModel", adapter_name: str) -> dict[str, list[int]]:
    """``{checkpoint path of each adapted layer: its weight shape}`` for ``adapter_name``."""
    return {
        f"{MODEL_PREFIX}{path}": list(module.spec.weight_shape)
        for path, module in tuner.model.named_modules()
        if isinstance(module, AdapterLayer) and adapter_name in module.adapters
    }


def check_layer_shapes(tuner: "AdapterModel", adapter_name: str, recorded: Optional[str], source: str) -> None:
    """Refuse a checkpoint whose recorded layer shapes (metadata, absent in PEFT's files) differ
    from the layers it is being loaded into."""
    if not recorded:
        return
    try:
        saved = json.loads(recorded)
    except ValueError:
        return  # not ours to judge: the tensors are still checked key by key
    if not isinstance(saved, dict):
        return
    here = layer_shapes(tuner, adapter_name)
    wrong = [
        f"{path}: made for {tuple(saved[path])}, this model's is {tuple(shape)}"
        for path, shape in here.items() if path in saved and list(saved[path]) != shape
    ]
    if wrong:
        raise CheckpointError(
            f"Cannot load adapter '{adapter_name}' from {source}: it was made for layers of other shapes "
            f"({_show(wrong)}); its tensors would load but mean nothing here (another base model?)"
        )


def _kind(t: torch.Tensor) -> str:
    """Floating, complex or integer/bool: a value of another kind cannot stand for the tensor."""
    return "complex" if t.is_complex() else "float" if t.is_floating_point() else "int"


def _show(keys: list[str], limit: int = 8) -> str:
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more
