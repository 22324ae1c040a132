"""Benchmark the FourierFT kernels against a frozen base layer and PEFT's dense formula.

Contenders (one forward + backward each, the base weight frozen, ``x`` requiring grad):

  (a) base          ``F.linear(x, W)``                                   -> grad x
  (b) fft path      ``F.linear(x, W) + fourier_linear(x, c, ...)``       -> grad x, grad c
  (c) PEFT formula  ``F.linear(x, W) + F.linear(x, Re(ifft2(S)) * s)``   -> grad x, grad c
                    (dense spectrum ``S`` scattered from ``c`` on every call, as PEFT 0.21.2 does)

Timing: one thread (``torch.set_num_threads(1)``), ``time.thread_time()``; contenders are run
round-robin inside each pass, each pass keeps the best of ``--reps`` runs per contender and the
report is the median over ``--passes`` passes.  The cost of (c) does not depend on ``n`` (the
dense 2-D transform dominates), so by default it is timed once per (layer, tokens) with the first
``n`` and reported for every ``n`` (``--peft-per-n`` times it separately for each ``n``), and only
in the first ``--peft-passes`` passes (default 1) since it is 3-7x slower than the base and only
there for reference.  Full default run: about 5 minutes of CPU time.

Memory: peak of the CPU allocator (allocations minus frees, in time order) during one forward +
backward, from ``torch.profiler.profile(profile_memory=True)`` allocator events, relative to the
start of the region (inputs, weights and the upstream gradient are allocated beforehand).  MKL's
internal FFT scratch is not allocated through torch and is not counted.

Usage::

    python benchmarks/bench_fourier_ops.py                 # full table (a few minutes)
    python benchmarks/bench_fourier_ops.py --quick         # 4096x4096 only, 1 pass
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    from deltatune.methods._fourier_ops import FourierPlan, fourier_linear, peft_positions
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from deltatune.methods._fourier_ops import FourierPlan, fourier_linear, peft_positions

SCALING = 150.0
SEED = 777


def _peft_delta(spectrum, indices, out_f, in_f):
    dense = torch.zeros(out_f, in_f)
    dense[indices[0, :], indices[1, :]] = spectrum.float()
    return torch.fft.ifft2(dense).real * SCALING


def make_contenders(out_f, in_f, tokens, ns, peft_per_n):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    x = torch.randn(tokens, in_f, generator=gen).requires_grad_()
    grad_y = torch.randn(tokens, out_f, generator=gen)

    def base():
        y = F.linear(x, weight)
        y.backward(grad_y)
        x.grad = None

    contenders = {"a": base}
    for i, n in enumerate(ns):
        indices = peft_positions(out_f, in_f, n, SEED)
        plan = FourierPlan(indices[0], indices[1], out_f, in_f)
        spectrum = torch.randn(n, generator=gen).requires_grad_()

        def fft_path(indices=indices, plan=plan, spectrum=spectrum):
            y = F.linear(x, weight) + fourier_linear(
                x, spectrum, indices[0], indices[1], out_f, SCALING, plan=plan
            )
            y.backward(grad_y)
            x.grad = None
            spectrum.grad = None

        def peft_path(indices=indices, spectrum=spectrum):
            y = F.linear(x, weight) + F.linear(x, _peft_delta(spectrum, indices, out_f, in_f))
            y.backward(grad_y)
            x.grad = None
            spectrum.grad = None

        contenders[f"b{n}"] = fft_path
        if peft_per_n or i == 0:
            contenders[f"c{n}"] = peft_path
    return contenders


def time_round_robin(contenders, passes, reps, peft_passes):
    for fn in contenders.values():  # warm-up (allocator, MKL descriptors, plan caches)
        fn()
    per_pass = {name: [] for name in contenders}
    for p in range(passes):
        # PEFT's formula (3-7x the base cost) only joins the first ``peft_passes`` passes
        names = [k for k in contenders if not k.startswith("c") or p < peft_passes]
        order = names[p % len(names) :] + names[: p % len(names)]  # rotate who goes first
        best = {name: float("inf") for name in names}
        for _ in range(reps):
            for name in order:
                t0 = time.thread_time()
                contenders[name]()
                best[name] = min(best[name], time.thread_time() - t0)
        for name in names:
            per_pass[name].append(best[name])
    return {name: statistics.median(v) for name, v in per_pass.items()}


def peak_memory(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4096x4096 only, one pass")
    parser.add_argument("--peft-per-n", action="store_true", help="time PEFT's formula for every n")
    parser.add_argument(
        "--peft-passes", type=int, default=1, help="passes that include PEFT's formula (default 1)"
    )
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    layers = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008)]
    passes = 1 if args.quick else args.passes
    tokens_list = (256, 2048)
    ns = (1000, 10000)

    peft_passes = max(1, min(args.peft_passes, passes))
    print(
        f"torch {torch.__version__}, 1 thread, thread_time, best of {args.reps} per pass, median of"
        f" {passes} passes; (c) in {peft_passes} pass(es)"
        + ("" if args.peft_per_n else f", timed at n={ns[0]} (cost independent of n)")
    )
    header = (
        f"{'layer':>11} {'tokens':>6} {'n':>6} | {'(a) ms':>8} {'(b)/(a)':>8} {'(c)/(a)':>8} |"
        f" {'mem a MB':>8} {'mem b MB':>8} {'mem c MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for out_f, in_f in layers:
        for tokens in tokens_list:
            contenders = make_contenders(out_f, in_f, tokens, ns, args.peft_per_n)
            times = time_round_robin(contenders, passes, args.reps, peft_passes)
            mems = {}
            if not args.no_memory:
                mems = {name: peak_memory(fn) / 2**20 for name, fn in contenders.items()}
            base = times["a"]
            for n in ns:
                c_key = f"c{n}" if f"c{n}" in times else f"c{ns[0]}"
                mem_txt = (
                    f" {mems['a']:8.1f} {mems[f'b{n}']:8.1f} {mems[c_key]:8.1f}"
                    if mems
                    else f" {'-':>8} {'-':>8} {'-':>8}"
                )
                print(
                    f"{out_f:>5}x{in_f:<5} {tokens:>6} {n:>6} | {base * 1e3:8.1f}"
                    f" {times[f'b{n}'] / base:8.3f} {times[c_key] / base:8.3f} |" + mem_txt,
                    flush=True,
                )
            del contenders


if __name__ == "__main__":
    main()
