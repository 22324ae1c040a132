"""The LoRA fields PEFT's ``AdaLoraConfig`` inherits from ``LoraConfig`` and AdaLoRA does not use.

They exist so that PEFT's calls (``AdaLoraConfig(r=...)``, ``dataclasses.replace``) and the
adapter_config.json files PEFT writes work here. Defaults are PEFT 0.21.2's. Set to anything but
the default, a field is ignored with a warning, or refused where it would change what PEFT builds
(DoRA, LoftQ, layer replication, ...). :func:`without_default_lora_fields` leaves the defaults out of
a saved config, so the file is the same as without these fields.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import field
from typing import Any, Optional, Union

from ..config import TunerConfig

LORA_FIELDS: dict[str, tuple[Any, Any]] = {  # name: (annotation, PEFT's default)
    "r": (int, 8), "use_rslora": (bool, False), "alpha_pattern": (Optional[dict], {}), "lora_bias": (bool, False),
    "use_qalora": (bool, False), "qalora_group_size": (int, 16), "megatron_config": (Optional[dict], None),
    "megatron_core": (Optional[str], "megatron.core"), "ensure_weight_tying": (bool, False),
    **{name: (Optional[dict], None) for name in ("eva_config", "corda_config", "lora_ga_config", "kasa_config",
                                                 "monteclora_config", "velora_config", "arrow_config", "use_bdlora")},
    "use_dora": (bool, False), "loftq_config": (dict, {}), "layer_replication": (Optional[list], None),
    "target_parameters": (Optional[list[str]], None), "alora_invocation_tokens": (Optional[list[int]], None),
    "trainable_token_indices": (Optional[Union[list[int], dict]], None),
}
# set to anything but their default, these would change what PEFT builds: refused
REFUSED = ("use_dora", "loftq_config", "layer_replication", "target_parameters", "alora_invocation_tokens",
           "trainable_token_indices")
_EMPTY = (None, {}, [], ())

LoraFields = dataclasses.make_dataclass("LoraFields", [
    (name, hint, field(default_factory=dict) if default == {} else field(default=default))
    for name, (hint, default) in LORA_FIELDS.items()
], bases=(TunerConfig,))
LoraFields.__doc__ = "A TunerConfig with PEFT's LoraConfig fields (see the module docstring)."


def _is_default(name: str, value: Any) -> bool:
    default = LORA_FIELDS[name][1]
    return value == default or (value in _EMPTY and default in _EMPTY)


def check_lora_fields(config: Any) -> None:
    """Warn about every LoRA field set off its default; refuse those in :data:`REFUSED`."""
    cls = type(config).__name__
    for name in [n for n in LORA_FIELDS if not _is_default(n, getattr(config, n))]:
        value = getattr(config, name)
        if name in REFUSED:  # PEFT's words first (its tests match them), then what to do
            lead = {"use_dora": "ADALORA does not support DoRA. ", "loftq_config": "ADALORA does not support LOFTQ. "}
            raise ValueError(f"{lead.get(name, '')}{cls}: {name}={value!r} is not supported: AdaLoRA has no DoRA, "
                             f"LoftQ or other LoRA build option; leave it at {LORA_FIELDS[name][1]!r}")
        if name == "r":
            warnings.warn(f"Note that `r` is not used in AdaLora and will be ignored. {cls} ignores r={value!r}: the "
                          f"initial rank of every module is `init_r` ({config.init_r})")
        else:
            warnings.warn(f"{cls} ignores {name}={value!r}: AdaLoRA does not use it (nor does PEFT's)")


def without_default_lora_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in LORA_FIELDS or not _is_default(k, v)}
