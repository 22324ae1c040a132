"""Shared benchmark machinery for these noisy 2-core machines (see STYLE.md, "Benchmarks").

- one intra-op thread and the thread's CPU time (``time.thread_time``) as the clock;
- contenders run interleaved round-robin in one process, best of ``best_of`` calls per pass,
  median over ``passes`` passes;
- ratios against a floor measured in the same run;
- peak tensor memory from the profiler's allocator events (tensor storage only, like CUDA's
  ``max_memory_allocated``), measured above what was allocated before the call.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


def setup() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def time_interleaved(contenders: dict[str, Callable[[], None]], passes: int = 5, best_of: int = 3) -> dict[str, float]:
    """Median over passes of the best-of-``best_of`` thread CPU time, per contender (seconds)."""
    for fn in contenders.values():  # warm-up: first-call allocations and caches
        fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(passes):
        for name, fn in contenders.items():
            best = float("inf")
            for _ in range(best_of):
                start = time.thread_time()
                fn()
                best = min(best, time.thread_time() - start)
            samples[name].append(best)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory(fn: Callable[[], None]) -> int:
    """Peak bytes of tensor storage allocated during ``fn()`` (above the level before the call), after
    one warm-up call; the measurement ``deltatune train`` reports (deltatune.cli.measure)."""
    from deltatune.cli.measure import peak_tensor_bytes

    fn()  # warm-up outside the measurement
    return peak_tensor_bytes(fn)[1]


def mib(n: int) -> float:
    return n / 2**20


def write(name: str, rows: list[dict], columns: list[str], title: str) -> str:
    """Write rows as benchmarks/results/<name>.json and .md; return the Markdown table."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        pass
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    table = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(table)
    return table


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def layer_step(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """forward + backward of ``module`` on ``x`` (x requires grad; parameters as they are)."""

    def step() -> None:
        module(x).sum().backward()
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return step


def forward_only(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run
