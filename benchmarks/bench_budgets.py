"""Kernel-like ops and bytes saved for backward per adapted layer, counted on ``meta``: the CPU
kernels against the accelerator kernels (issue 17's budgets; tests/test_budgets.py asserts them).

    .venv/bin/python benchmarks/bench_budgets.py [--method randlora] [--quick]

Both columns run the same code on ``meta``: "cpu" with the kernel policy forced to the CPU's
(``methods._device.cache_sized`` patched to True: cache-sized loops, intermediates kept, i.e.
what a GPU ran before the device policy existed), "device" with ``meta``'s own policy (the one a
GPU takes). One layer, bf16 base, fp32 adapter at the method's defaults, forward + backward,
counted after a warm-up call. What is counted and what is not: see tests/test_budgets.py.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import harness  # noqa: E402
import test_budgets as tb  # noqa: E402

from deltatune.methods import _device  # noqa: E402


def count(method: str, shape: tuple[int, int], tokens: int, cpu_kernels: bool) -> tb.Cost:
    real = _device.cache_sized
    if cpu_kernels:
        _device.cache_sized = lambda device: True
    try:
        return tb.measure_adapted(tb.adapted_layer(method, *shape), tokens)
    finally:
        _device.cache_sized = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=sorted(tb.METHODS), action="append", help="default: all")
    ap.add_argument("--quick", action="store_true", help="first shape only")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    mib = 2**20
    rows = []
    for method in args.method or list(tb.METHODS):
        for shape in tb.SHAPES[:1] if args.quick else tb.SHAPES:
            for tokens in tb.TOKENS:
                start = time.perf_counter()
                before, after = (count(method, shape, tokens, cpu) for cpu in (True, False))
                budget = after.saved_budget
                rows.append({
                    "method": method, "out x in": f"{shape[0]}x{shape[1]}", "tokens": tokens,
                    "ops cpu": before.ops, "ops device": after.ops,
                    "saved MiB cpu": round(before.saved_bytes / mib, 1), "saved MiB device": round(after.saved_bytes / mib, 1),
                    "saved budget MiB": round(budget / mib, 1),
                    "within": after.ops <= tb.OP_BUDGET and after.saved_bytes <= budget,
                })
                print(rows[-1], f"({time.perf_counter() - start:.1f} s)", flush=True)
    cols = list(rows[0])
    print(harness.write("budgets", rows, cols, f"Kernel-like ops (budget {tb.OP_BUDGET}) and bytes saved for backward per layer, on meta"))


if __name__ == "__main__":
    main()
