"""Bone and BAT at layer level, deltatune vs PEFT side by side (PEFT 0.21.2's MiSS: the same maths).

    .venv/bin/python benchmarks/bench_bone.py [--size 4096] [--tokens 256] [--r 64]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

import harness


def build(size: int, r: int, variant, library: str, base: nn.Linear) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(base))
    if library == "peft":
        import peft

        wrapped = peft.get_peft_model(model, peft.MissConfig(r=r, init_weights=variant, target_modules=["0"]))
    else:
        import deltatune as dt

        wrapped = dt.get_peft_model(model, dt.BoneConfig(r=r, init_weights=variant, target_modules=["0"]))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    harness.setup()
    torch.manual_seed(0)
    base = nn.Linear(args.size, args.size).requires_grad_(False)
    x = torch.randn(args.tokens, args.size, requires_grad=True)
    rows = []
    floor = {"fwd": harness.forward_only(base, x), "fwd+bwd": harness.layer_step(base, x)}
    for label, variant in (("Bone", True), ("BAT", "bat")):
        ours = build(args.size, args.r, variant, "deltatune", base)
        theirs = build(args.size, args.r, variant, "peft", base)
        times = harness.time_interleaved(
            {
                "floor fwd+bwd": floor["fwd+bwd"],
                "deltatune fwd+bwd": harness.layer_step(ours, x),
                "peft fwd+bwd": harness.layer_step(theirs, x),
            },
            passes=args.passes,
        )
        mem = {name: harness.peak_memory(fn) for name, fn in (
            ("floor", floor["fwd+bwd"]), ("deltatune", harness.layer_step(ours, x)), ("peft", harness.layer_step(theirs, x)))}
        rows.append({
            "method": label, "layer": f"{args.size}x{args.size}", "tokens": args.tokens, "r": args.r,
            "floor_ms": 1e3 * times["floor fwd+bwd"], "deltatune_ms": 1e3 * times["deltatune fwd+bwd"],
            "peft_ms": 1e3 * times["peft fwd+bwd"],
            "time_vs_peft": times["deltatune fwd+bwd"] / times["peft fwd+bwd"],
            "time_vs_floor": times["deltatune fwd+bwd"] / times["floor fwd+bwd"],
            "peft_time_vs_floor": times["peft fwd+bwd"] / times["floor fwd+bwd"],
            "floor_MiB": harness.mib(mem["floor"]), "deltatune_MiB": harness.mib(mem["deltatune"]),
            "peft_MiB": harness.mib(mem["peft"]), "mem_vs_peft": mem["deltatune"] / mem["peft"],
        })
    cols = ["method", "layer", "tokens", "r", "floor_ms", "deltatune_ms", "peft_ms", "time_vs_peft", "time_vs_floor",
            "peft_time_vs_floor", "floor_MiB", "deltatune_MiB", "peft_MiB", "mem_vs_peft"]
    print(harness.write("bone", rows, cols, "Bone / BAT, forward+backward (one thread, CPU)"))


if __name__ == "__main__":
    main()
