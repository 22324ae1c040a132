"""Checkpoint layouts that differ from the one deltatune writes, as pure mappings of config dicts and keys.

- Model-level tensors some writers keep under every layer (RandLoRA's shared bases: PEFT writes them
  once at model level, older files under each adapted layer): :func:`collapse_shared_tensors`.
- One method under two PEFT names, Bone (PEFT ≤ 0.18.1) and MiSS (PEFT ≥ 0.19), below.

Bone and MiSS:

The two are one method: MiSS's ``init_weights`` True/False/"bat" are Bone's, its tensor
``miss_block`` is Bone's ``bone_block``; MiSS adds ``miss_dropout`` (training only) and the
``"mini"`` variant, which Bone cannot express. A saved adapter is converted here, as a pure
mapping of the config dict and the tensor keys, to the format asked for:

- by default a Bone adapter is written as MiSS, the only name today's PEFT loads;
- ``save_pretrained(..., peft_format="BONE")`` writes PEFT 0.18.1's Bone format.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from .._version import BONE_FORMAT_VERSION, PEFT_FORMAT_VERSION

def collapse_shared_tensors(
    tensors: dict[str, torch.Tensor], names: tuple[str, ...], prefix: str, keep: set[str]
) -> dict[str, torch.Tensor]:
    """A checkpoint with each model-level tensor ``names`` once, at ``prefix + name``: copies stored
    under layers (``...<layer>.<name>``) are folded into it (they must be equal). Model-level keys
    not in ``keep`` are dropped: the adapter re-derives them (RandLoRA without ``save_projection``)."""
    out: dict[str, torch.Tensor] = {}
    per_layer: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.rsplit(".", 1)[-1]
        if name in names and key != prefix + name:
            if name in per_layer and not torch.equal(per_layer[name], value):
                raise ValueError(f"The checkpoint holds different {name} copies under different layers (e.g. {key})")
            per_layer[name] = value
        else:
            out[key] = value
    for name, value in per_layer.items():
        out.setdefault(prefix + name, value)
    dropped = {prefix + name for name in names} - keep
    return {k: v for k, v in out.items() if k not in dropped}


# the format a method's adapters are written in unless the caller asks for another
DEFAULT_FORMAT = {"BONE": "MISS"}

_BLOCK = {"BONE": "bone_block", "MISS": "miss_block"}
_MISS_ONLY_FIELDS = {"miss_dropout": 0.0, "mini_r": 1}  # MissConfig's fields Bone lacks, with PEFT's defaults


def _rename_block(tensors: dict[str, torch.Tensor], target: str) -> dict[str, torch.Tensor]:
    new = "." + _BLOCK[target]
    old = "." + _BLOCK["BONE" if target == "MISS" else "MISS"]
    return {(k[: -len(old)] + new if k.endswith(old) else k): v for k, v in tensors.items()}


def default_tensor_format(tensors: dict[str, torch.Tensor], peft_type: Any) -> dict[str, torch.Tensor]:
    """An adapter's state dict under the tensor names of its default checkpoint format (a Bone
    adapter's ``bone_block`` as ``miss_block``), so that a state dict equals what is saved."""
    source = str(getattr(peft_type, "value", peft_type))
    target = DEFAULT_FORMAT.get(source, source)
    return tensors if target == source else _rename_block(tensors, target)


def native_tensor_names(tensors: dict[str, torch.Tensor], peft_type: Any) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the names a ``peft_type`` adapter holds them in memory (a Bone
    adapter reading a MiSS file: ``miss_block`` as ``bone_block``, and the reverse)."""
    target = str(getattr(peft_type, "value", peft_type))
    return _rename_block(tensors, target) if target in _BLOCK else tensors


def as_method(config: dict[str, Any], peft_type: Any) -> dict[str, Any]:
    """A config dict of one of Bone/MiSS as the other (for loading a file of either into a model
    of the other); other configs are returned as they are."""
    source = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    target = str(getattr(peft_type, "value", peft_type))
    if source == target or {source, target} != {"BONE", "MISS"}:
        return config
    if target == "BONE" and config.get("init_weights") == "mini":
        raise ValueError(
            "A MiSS adapter with init_weights='mini' cannot be added to a Bone model (Bone has no 'mini' variant); "
            "load it into a MiSS model"
        )
    return export_checkpoint(config, {}, target)[0]


def export_checkpoint(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], peft_format: Optional[str] = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config dict, tensors)`` in the checkpoint format ``peft_format`` (a peft_type; None: the
    method's default format, see :data:`DEFAULT_FORMAT`)."""
    source = str(getattr(config["peft_type"], "value", config["peft_type"]))
    target = str(getattr(peft_format, "value", peft_format)).upper() if peft_format is not None else DEFAULT_FORMAT.get(source, source)
    if target == source:
        return _record_format(config, target), (_rename_block(tensors, target) if target in _BLOCK else tensors)
    if {source, target} != {"BONE", "MISS"}:
        raise ValueError(
            f"peft_format={peft_format!r} cannot be written for a {source} adapter: only Bone and MiSS adapters "
            "convert (to 'BONE' or 'MISS')"
        )
    config = dict(config)
    if target == "MISS":
        for key, default in _MISS_ONLY_FIELDS.items():
            config.setdefault(key, default)
    else:
        if config.get("init_weights") == "mini":
            raise ValueError(
                "A MiSS adapter with init_weights='mini' has no Bone equivalent: it cannot be saved with "
                "peft_format='BONE' (PEFT 0.18.1 cannot load it); save it as MiSS"
            )
        if config.get("miss_dropout"):
            warnings.warn(
                f"miss_dropout={config['miss_dropout']} is not written in PEFT 0.18.1's Bone format, which has no "
                "dropout (outputs in eval mode are the same; further training there runs without dropout)"
            )
        for key in _MISS_ONLY_FIELDS:
            config.pop(key, None)
    config["peft_type"] = target
    return _record_format(config, target), _rename_block(tensors, target)


def _record_format(config: dict[str, Any], peft_type: str) -> dict[str, Any]:
    """A config written by deltatune names the PEFT release of its format in ``peft_version``."""
    version = str(config.get("peft_version", ""))
    if "@deltatune-" not in version:  # a file from PEFT keeps what it says
        return config
    release = BONE_FORMAT_VERSION if peft_type == "BONE" else PEFT_FORMAT_VERSION
    return {**config, "peft_version": release + version[version.index("@"):]}

