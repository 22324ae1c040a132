"""RandLoRA kernels vs PEFT 0.21.2's RandLoRA layer: forward + backward time and peak memory.

Single-threaded CPU (``torch.set_num_threads(1)``), CPU time from ``time.thread_time()``.
Three contenders per configuration, run round-robin in this one process:

* ``frozen``: the base ``nn.Linear`` alone, gradient w.r.t. the input only;
* ``ours``:   ``randlora_linear(..., base_weight=W, base_bias=b)`` (base folded in, auto path);
* ``peft``:   PEFT's ``randlora.Linear`` (built with ``get_peft_model``), same bases / lambda / gamma.

Timing: every pass runs each contender 3 times round-robin and keeps its best; the table shows
the median over passes.  Heavy configurations get fewer passes (``--budget`` seconds each, at
least one pass).  Peak memory: one fwd+bwd per contender under
``torch.profiler.profile(profile_memory=True)``; the allocator events are replayed in time order
and the highest running total (bytes allocated during the step, net of frees) is reported.

Usage::

    python benchmarks/bench_randlora_ops.py                # all configurations (a few minutes)
    python benchmarks/bench_randlora_ops.py --configs 4096x4096@256 1024x1024@4096
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from deltatune.methods._randlora_ops import choose_path, make_bases, randlora_linear  # noqa: E402

DEFAULT_CONFIGS = ["4096x4096@256", "4096x4096@2048", "4096x11008@256", "4096x11008@2048", "1024x1024@4096"]
REPS = 3  # best-of per pass


def parse_config(text: str):
    shape, tokens = text.split("@")
    d_in, d_out = shape.lower().split("x")
    return int(d_in), int(d_out), int(tokens)


class _Wrap(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def build(d_in: int, d_out: int, tokens: int, r: int, alpha: float, seed: int):
    from peft import RandLoraConfig, get_peft_model

    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    cfg = RandLoraConfig(r=r, randlora_alpha=alpha, target_modules=["lin"], init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_Wrap(lin), cfg)
    layer = model.base_model.model.lin
    base = layer.get_base_layer()
    for p in base.parameters():
        p.requires_grad_(False)
    a_peft = model.base_model.randlora_A["default"]
    b_peft = model.base_model.randlora_B["default"]
    a, b = make_bases(r, max(d_in, d_out), min(d_in, d_out), cfg.projection_prng_key)
    assert torch.equal(a, a_peft) and torch.equal(b, b_peft), "bases differ from PEFT's"
    lam = layer.randlora_lambda["default"].detach().clone().requires_grad_(True)
    gamma = layer.randlora_gamma["default"].detach().clone().requires_grad_(True)
    scaling = layer.scaling["default"]
    x = torch.randn(tokens, d_in, requires_grad=True)
    gy = torch.randn(tokens, d_out)

    def frozen():
        base(x).backward(gy)

    def ours():
        randlora_linear(
            x, lam, gamma, a, b, d_in, d_out, scaling, base_weight=base.weight, base_bias=base.bias
        ).backward(gy)

    def peft():
        layer(x).backward(gy)

    params = [x, lam, gamma, layer.randlora_lambda["default"], layer.randlora_gamma["default"]]
    return {"frozen": frozen, "ours": ours, "peft": peft}, params


def clear_grads(params):
    for p in params:
        p.grad = None


def timed(fn, params) -> float:
    clear_grads(params)
    t0 = time.thread_time()
    fn()
    t1 = time.thread_time()
    clear_grads(params)
    return t1 - t0


def peak_bytes(fn, params):
    """Highest running total of allocator events during one call (bytes), or None."""
    from torch.profiler import ProfilerActivity, profile

    clear_grads(params)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    clear_grads(params)
    try:
        from torch._C._profiler import _EventType

        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            stack.extend(node.children)
    except Exception:  # pragma: no cover - private API moved: fall back to the flat event list
        events = [
            (e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"
        ]
    total = peak = 0
    for _, nbytes in sorted(events):
        total += nbytes
        peak = max(peak, total)
    return peak


def run_config(text: str, args):
    d_in, d_out, tokens = parse_config(text)
    fns, params = build(d_in, d_out, tokens, args.r, args.alpha, args.seed)
    names = list(fns)
    path = choose_path(tokens, d_in, d_out, args.r, requires_grad=True, fused_base=True)

    # Peak memory (also the warm-up; gives a time estimate for choosing the pass count).
    t0 = time.thread_time()
    peaks = {n: peak_bytes(fns[n], params) for n in names}
    round_s = max(1e-3, time.thread_time() - t0)
    passes = max(1, min(args.passes, math.floor(args.budget / (REPS * round_s))))

    per_pass = {n: [] for n in names}
    for _ in range(passes):
        best = {n: math.inf for n in names}
        for _ in range(REPS):
            for n in names:  # round-robin
                best[n] = min(best[n], timed(fns[n], params))
        for n in names:
            per_pass[n].append(best[n])
    med = {n: statistics.median(per_pass[n]) for n in names}
    return dict(
        config=text, path=path, passes=passes, time=med, peak=peaks,
    )


def fmt_mb(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:8.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="INxOUT@TOKENS ...")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=640.0, help="randlora_alpha (PEFT default 640)")
    ap.add_argument("--passes", type=int, default=3, help="max passes (median over passes)")
    ap.add_argument("--budget", type=float, default=40.0, help="approx. seconds of timing per config")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, r={args.r}; times: median over passes of best-of-{REPS}")
    t_start = time.time()
    rows = []
    for text in args.configs:
        res = run_config(text, args)
        rows.append(res)
        t, p = res["time"], res["peak"]
        print(
            f"{text:>16} [{res['path']:>12}, {res['passes']} pass] time s: frozen {t['frozen']:.3f} "
            f"ours {t['ours']:.3f} peft {t['peft']:.3f} | peak MiB: frozen {fmt_mb(p['frozen'])} "
            f"ours {fmt_mb(p['ours'])} peft {fmt_mb(p['peft'])}",
            flush=True,
        )

    print()
    hdr = (
        f"{'config':>16} {'path':>12} | {'ours/peft':>9} {'ours/frz':>8} {'peft/frz':>8} | "
        f"{'mem ours/peft':>13} {'ours MiB':>8} {'peft MiB':>8} {'frz MiB':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for res in rows:
        t, p = res["time"], res["peak"]
        mem_ratio = "n/a" if not (p["ours"] and p["peft"]) else f"{p['ours'] / p['peft']:.2f}"
        print(
            f"{res['config']:>16} {res['path']:>12} | {t['ours'] / t['peft']:9.2f} "
            f"{t['ours'] / t['frozen']:8.2f} {t['peft'] / t['frozen']:8.2f} | {mem_ratio:>13} "
            f"{fmt_mb(p['ours'])} {fmt_mb(p['peft'])} {fmt_mb(p['frozen'])}"
        )
    print(f"\ntotal wall time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
