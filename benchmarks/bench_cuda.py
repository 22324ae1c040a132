"""GPU benchmark: deltatune vs PEFT 0.21.2 in bf16 on CUDA, side by side in one process.

Rows: one adapted layer (forward + backward, gradient w.r.t. the input and the adapter) for every
method at LLaMA-7B shapes (4096x4096 and 11008x4096, 256 and 8192 tokens), and a training step of
a two-layer Llama with LLaMA-7B layer shapes, all-linear targets. The base is bf16 and frozen;
the adapters are fp32 master weights, as ``get_peft_model`` makes them in both libraries
(``autocast_adapter_dtype=True``), and every step runs under ``torch.autocast(bfloat16)``, as
Trainer's ``bf16=True`` does. Times from CUDA events (median of ``--iters`` after warm-up,
contenders interleaved), memory from ``torch.cuda.max_memory_allocated`` above the level before
the step; ratios against the frozen layer (floor: its forward + backward w.r.t. the input).

    .venv/bin/python benchmarks/bench_cuda.py                      # on a CUDA machine
    .venv/bin/python benchmarks/bench_cuda.py --device cpu --small # a smoke run of this script

Results: benchmarks/results/cuda.json and cuda.md (``--name`` to change).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

import harness

# method -> (deltatune config class, PEFT config class, keyword arguments) — the defaults both document
METHODS = {
    "fourierft": ("FourierFTConfig", "FourierFTConfig", {"n_frequency": 1000, "scaling": 300.0}),
    "randlora": ("RandLoraConfig", "RandLoraConfig", {"r": 32}),
    "adalora": ("AdaLoraConfig", "AdaLoraConfig", {"init_r": 12, "target_r": 8, "total_step": 100}),
    "bone": ("BoneConfig", "MissConfig", {"r": 64}),
    "bat": ("BoneConfig", "MissConfig", {"r": 64, "init_weights": "bat"}),
}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make(library, method: str, base: nn.Module, **extra) -> nn.Module:
    ours, theirs, kw = METHODS[method]
    import deltatune as dt
    import peft

    config_cls = getattr(dt, ours) if library == "deltatune" else getattr(peft, theirs)
    config = config_cls(**copy.deepcopy(kw), **extra)
    get = dt.get_peft_model if library == "deltatune" else peft.get_peft_model
    model = get(copy.deepcopy(base), config)
    return model.train()


class Clock:
    """Elapsed milliseconds of ``fn`` (CUDA events on a GPU, perf_counter elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def interleaved(contenders: dict[str, Callable[[], None]], clock: Clock, iters: int, warmup: int = 3) -> dict[str, float]:
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(iters):
        for name, fn in contenders.items():
            samples[name].append(clock(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


def layer_rows(args, device: torch.device, clock: Clock) -> list[dict]:
    rows = []
    shapes = [(256, 512)] if args.small else [(4096, 4096), (11008, 4096)]
    token_counts = [64] if args.small else [256, 8192]
    for out_f, in_f in shapes:
        base = Holder(nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=device)).requires_grad_(False)
        for tokens in token_counts:
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)

            def step(model):
                def run():
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        y = model(x)
                    y.float().pow(2).mean().backward()
                    x.grad = None
                    model.zero_grad(set_to_none=True)
                return run

            for method in args.methods.split(","):
                rows.append(compare(f"layer {out_f}x{in_f}", method, tokens, base, step, {"target_modules": ["proj"]}, args, device, clock))
    return rows


def compare(label: str, method: str, tokens: int, base: nn.Module, step, extra: dict, args, device, clock) -> dict:
    """One row: the frozen base, deltatune and PEFT interleaved; times as ratios, peak memory in MiB."""
    ours, theirs = make("deltatune", method, base, **extra), make("peft", method, base, **extra)
    fns = {"floor": step(base), "deltatune": step(ours), "peft": step(theirs)}
    t = interleaved(fns, clock, args.iters)
    mem = {k: peak_bytes(fn, device) for k, fn in fns.items()}
    row = {
        "row": label, "method": method, "tokens": tokens, "floor_ms": round(t["floor"], 3),
        "deltatune_vs_floor": t["deltatune"] / t["floor"], "peft_vs_floor": t["peft"] / t["floor"],
        "deltatune_vs_peft": t["deltatune"] / t["peft"],
        "mem_deltatune_MiB": mem["deltatune"] / 2**20, "mem_peft_MiB": mem["peft"] / 2**20,
    }
    print(row, flush=True)
    return row


def model_rows(args, device: torch.device, clock: Clock) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers = (256, 704, 2) if args.small else (4096, 11008, 2)
    tokens = 64 if args.small else 2048
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128))
    base = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    embeds = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step(model):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(inputs_embeds=embeds).logits
            out.float().pow(2).mean().backward()
            embeds.grad = None
            model.zero_grad(set_to_none=True)
        return run

    extra = {"target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    return [compare(f"llama {layers}x{hidden} (MLP {inter})", method, tokens, base, step, extra, args, device, clock)
            for method in args.methods.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="small shapes (a smoke run of the script itself)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--name", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --small for a smoke run")
    import warnings

    warnings.filterwarnings("ignore")
    clock = Clock(device)
    rows = layer_rows(args, device, clock)
    if not args.skip_model:
        rows += model_rows(args, device, clock)
    cols = ["row", "method", "tokens", "floor_ms", "deltatune_vs_floor", "peft_vs_floor", "deltatune_vs_peft",
            "mem_deltatune_MiB", "mem_peft_MiB"]
    title = f"bf16 autocast training step on {torch.cuda.get_device_name() if device.type == 'cuda' else device.type}"
    print(harness.write(args.name, rows, cols, title))


if __name__ == "__main__":
    main()
