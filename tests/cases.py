"""One table of method cases; every lifecycle invariant in test_lifecycle.py runs over all of it.

Each method keeps its cases in tests/cases_<method>.py (a ``CASES`` list of :class:`Case`); this
file only assembles them, so a method joins by adding its file. ``identity`` says whether a fresh
adapter leaves the outputs unchanged (PEFT's promise for that init).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Case:
    id: str
    config: Callable[[], Any]
    model: str = "mlp"  # key of MODEL_BUILDERS in conftest
    identity: bool = True
    merge_atol: float = 1e-5
    extra: dict = field(default_factory=dict)


def _collect() -> list[Case]:
    """Every ``CASES`` list in tests/cases_<method>.py (one file per method), in file name order."""
    import importlib
    import pathlib

    cases: list[Case] = []
    for path in sorted(pathlib.Path(__file__).parent.glob("cases_*.py")):
        cases.extend(importlib.import_module(path.stem).CASES)
    return cases


CASES = _collect()
