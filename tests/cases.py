"""One table of method cases; every lifecycle invariant in test_lifecycle.py runs over all of it.

A method joins by appending its cases here. ``identity`` says whether a fresh adapter leaves the
outputs unchanged (PEFT's promise for that init).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import deltatune as dt


@dataclass
class Case:
    id: str
    config: Callable[[], Any]
    model: str = "mlp"  # key of MODEL_BUILDERS in conftest
    identity: bool = True
    merge_atol: float = 1e-5
    extra: dict = field(default_factory=dict)


BONE_CASES: list[Case] = [
    Case("bone-lin0", lambda: dt.BoneConfig(r=2, target_modules=["lin0"])),
    Case("bone-both", lambda: dt.BoneConfig(r=3, target_modules=["lin0", "lin1"])),
    Case("bone-kaiming", lambda: dt.BoneConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False), identity=False),
    Case("bone-r>in", lambda: dt.BoneConfig(r=16, target_modules=["lin0"])),
    Case("bone-mts", lambda: dt.BoneConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"])),
    Case("bone-bias", lambda: dt.BoneConfig(r=2, target_modules=["lin0"], bias="bone_only")),
    Case("bat-lin1", lambda: dt.BoneConfig(r=4, target_modules=["lin1"], init_weights="bat")),
    Case("bat-both", lambda: dt.BoneConfig(r=2, target_modules=["lin0", "lin1"], init_weights="bat")),
    Case("bone-gpt2", lambda: dt.BoneConfig(r=4, target_modules=["c_attn", "c_proj"]), model="gpt2"),
    Case("bat-gpt2", lambda: dt.BoneConfig(r=4, target_modules=["c_fc"], init_weights="bat"), model="gpt2"),
    Case("bone-llama-all-linear", lambda: dt.BoneConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"), model="llama"),
    Case("bat-llama", lambda: dt.BoneConfig(r=8, init_weights="bat", task_type="CAUSAL_LM"), model="llama"),
]


def _collect() -> list[Case]:
    """Bone's cases plus every ``CASES`` list in tests/cases_<method>.py (one file per method)."""
    import importlib
    import pathlib

    cases = list(BONE_CASES)
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        cases.extend(importlib.import_module(path.stem).CASES)
    return cases


CASES = _collect()
