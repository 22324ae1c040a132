"""TEMPORARY: CLI presets of methods whose config class does not declare one yet.

AdaLoRA's file is being rewritten elsewhere; until its ``AdaLoraConfig`` carries ``CLI_PRESET`` and
``cli_derived`` (the same two members as Bone's, FourierFT's and RandLoRA's configs), its preset
lives here. Delete the entry -- and this module, once empty -- when the config declares it:
:func:`deltatune.cli.options.preset_of` prefers the class's own declaration anyway.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional


def _adalora_derived(values: dict[str, Any], steps: Optional[int] = None) -> dict[str, Any]:
    """AdaLoRA's budget schedule for ``steps`` optimizer steps.

    The rank budget stays at init_r for the first ``tinit`` steps (10 %), shrinks cubically to
    target_r until ``total_step − tfinal`` (the last 30 % keep the final pattern and fine-tune),
    re-allocating every ``deltaT`` steps (about 20 re-allocations).
    """
    if not steps:
        return {}
    if values.get("total_step") not in (None, steps):
        warnings.warn(f"AdaLoRA total_step={values['total_step']} differs from the {steps} training steps")
    steps = max(int(steps), 1)
    tinit = steps // 10
    tfinal = (3 * steps) // 10
    if steps - tfinal - tinit < 2:  # too short to budget: prune once at the end of warm-up
        tinit, tfinal = 0, 0
    return {"total_step": steps, "tinit": tinit, "tfinal": tfinal, "deltaT": max(1, (steps - tinit - tfinal) // 20)}


PENDING: dict[str, tuple[dict[str, Any], Callable[..., dict[str, Any]]]] = {
    "ADALORA": (
        {
            "fields": {"init_r": 12, "target_r": 8},
            "lr": 1e-2,
            "why": "ΔW = B·diag(E)·A·lora_alpha/ranknum; rank budget 12 → 8 per module, pruned between "
            "tinit and total_step − tfinal (set from --steps)",
        },
        _adalora_derived,
    ),
}
