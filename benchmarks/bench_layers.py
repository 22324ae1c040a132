"""Layer-level forward+backward and inference, deltatune vs PEFT 0.21.2, in one process.

    .venv/bin/python benchmarks/bench_layers.py --method fourierft [--quick]
    .venv/bin/python benchmarks/bench_layers.py --method randlora

For each layer shape and token count: the frozen layer (gradient w.r.t. the input only) is the
floor; deltatune and PEFT run the same config on copies of the same layer, interleaved. Also:
inference without merging (no_grad, after a first call), and adapter creation time.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import time

import torch
import torch.nn as nn

import harness

METHODS = {
    "fourierft": {
        "shapes": [(1024, 1024), (4096, 4096), (11008, 4096)],
        "tokens": [256, 2048],
        "configs": [{"n_frequency": 1000}, {"n_frequency": 10000}],
        "peft": "FourierFTConfig", "ours": "FourierFTConfig",
    },
    "randlora": {
        "shapes": [(4096, 4096), (11008, 4096), (1024, 1024)],
        "tokens": [256, 2048, 4096],
        "configs": [{"r": 32}],
        "peft": "RandLoraConfig", "ours": "RandLoraConfig",
        "skip": lambda shape, tokens: (shape == (1024, 1024)) != (tokens == 4096),
    },
}


def create(library: str, cls: str, layer: nn.Module, config: dict) -> nn.Module:
    lib = importlib.import_module("peft" if library == "peft" else "deltatune")
    return lib.get_peft_model(layer, getattr(lib, cls)(target_modules=["0"], **config))


def wrap(library: str, cls: str, base: nn.Linear, config: dict) -> nn.Module:
    model = create(library, cls, nn.Sequential(copy.deepcopy(base)), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    return model


def timed_creation(library: str, cls: str, base: nn.Linear, config: dict) -> float:
    """Adapter creation alone: the copy of the base layer (the same for both libraries) is made first."""
    layer = nn.Sequential(copy.deepcopy(base))
    start = time.thread_time()
    create(library, cls, layer, config)
    return time.thread_time() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=sorted(METHODS), required=True)
    ap.add_argument("--quick", action="store_true", help="first shape and token count only")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    harness.setup()
    spec = METHODS[args.method]
    rows = []
    shapes = spec["shapes"][:1] if args.quick else spec["shapes"]
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        base = nn.Linear(in_f, out_f).requires_grad_(False)
        for config in spec["configs"]:
            ours = wrap("deltatune", spec["ours"], base, config)
            theirs = wrap("peft", spec["peft"], base, config)
            create = {lib: min(timed_creation(lib, spec[lib if lib == "peft" else "ours"], base, config) for _ in range(2))
                      for lib in ("deltatune", "peft")}
            for tokens in (spec["tokens"][:1] if args.quick else spec["tokens"]):
                if "skip" in spec and spec["skip"]((out_f, in_f), tokens):
                    continue
                x = torch.randn(tokens, in_f, requires_grad=True)
                steps = {"floor": harness.layer_step(base, x), "deltatune": harness.layer_step(ours, x),
                         "peft": harness.layer_step(theirs, x)}
                infer = {"floor": harness.forward_only(base, x), "deltatune": harness.forward_only(ours, x),
                         "peft": harness.forward_only(theirs, x)}
                t = harness.time_interleaved(steps, passes=args.passes)
                ti = harness.time_interleaved(infer, passes=args.passes)
                mem = {k: harness.peak_memory(fn) for k, fn in steps.items()}
                rows.append({
                    "layer": f"{out_f}x{in_f}", "tokens": tokens, **config,
                    "floor_ms": 1e3 * t["floor"],
                    "train_vs_floor": t["deltatune"] / t["floor"], "peft_train_vs_floor": t["peft"] / t["floor"],
                    "train_vs_peft": t["deltatune"] / t["peft"],
                    "MiB": harness.mib(mem["deltatune"]), "peft_MiB": harness.mib(mem["peft"]),
                    "mem_vs_peft": mem["deltatune"] / max(mem["peft"], 1),
                    "infer_vs_floor": ti["deltatune"] / ti["floor"], "peft_infer_vs_floor": ti["peft"] / ti["floor"],
                    "create_ms": 1e3 * create["deltatune"], "peft_create_ms": 1e3 * create["peft"],
                })
                print(rows[-1], flush=True)
    cols = ["layer", "tokens", *spec["configs"][0].keys(), "floor_ms", "train_vs_floor", "peft_train_vs_floor",
            "train_vs_peft", "MiB", "peft_MiB", "mem_vs_peft", "infer_vs_floor", "peft_infer_vs_floor",
            "create_ms", "peft_create_ms"]
    print(harness.write(f"layers_{args.method}", rows, cols, f"{args.method}: layer forward+backward and inference (one thread)"))


if __name__ == "__main__":
    main()
