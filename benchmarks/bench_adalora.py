"""AdaLoRA, deltatune vs PEFT side by side in one process (one thread, CPU).

    .venv/bin/python benchmarks/bench_adalora.py [--size 4096] [--tokens 256] [--init-r 12] [--passes 5]

1. One Linear(size, size) layer adapted with init_r ranks: forward, and forward+backward (grads for
   the adapter and the input), thread CPU time and peak tensor memory; the floor is the frozen
   base layer (forward, and forward+backward with the gradient taken for the input only).
2. The rank allocator's cost per optimizer step (``update_and_allocate``) on a small Llama-style
   model with every linear layer adapted: a scoring step that also re-masks (budgeting phase with
   deltaT=1) and one that only updates the scores. Gradients come from one backward pass.

Writes benchmarks/results/adalora.json (and .md) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

import harness


def adapt(library: str, model: nn.Module, **config):
    if library == "peft":
        import peft

        return peft.get_peft_model(model, peft.AdaLoraConfig(**config))
    import deltatune as dt

    return dt.get_peft_model(model, dt.AdaLoraConfig(**config))


def layer_rows(size: int, tokens: int, init_r: int, passes: int) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Linear(size, size).requires_grad_(False)
    x = torch.randn(tokens, size, requires_grad=True)
    models = {}
    for library in ("deltatune", "peft"):
        wrapped = adapt(library, nn.Sequential(copy.deepcopy(base)), init_r=init_r, target_r=init_r // 2,
                        total_step=100, target_modules=["0"])
        with torch.no_grad():  # E = 0 at init; give every adapter tensor a value, as after training
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.02)
        models[library] = wrapped
    setup = f"Linear {size}x{size}, {tokens} tokens, init_r={init_r}"
    rows = []
    fwd = harness.time_interleaved(
        {"floor": harness.forward_only(base, x), **{k: harness.forward_only(m, x) for k, m in models.items()}},
        passes=passes,
    )
    both = harness.time_interleaved(
        {"floor": harness.layer_step(base, x), **{k: harness.layer_step(m, x) for k, m in models.items()}},
        passes=passes,
    )
    for label, times in (("forward time (ms)", fwd), ("forward+backward time (ms)", both)):
        rows.append({
            "benchmark": label, "setup": setup, "floor": 1e3 * times["floor"], "deltatune": 1e3 * times["deltatune"],
            "peft": 1e3 * times["peft"], "deltatune/peft": times["deltatune"] / times["peft"],
        })
    mem = {"floor": harness.peak_memory(harness.layer_step(base, x))}
    mem.update({k: harness.peak_memory(harness.layer_step(m, x)) for k, m in models.items()})
    rows.append({
        "benchmark": "forward+backward peak memory (MiB)", "setup": setup, "floor": harness.mib(mem["floor"]),
        "deltatune": harness.mib(mem["deltatune"]), "peft": harness.mib(mem["peft"]),
        "deltatune/peft": mem["deltatune"] / mem["peft"],
    })
    return rows


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def allocator_rows(init_r: int, passes: int) -> list[dict]:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    for label, deltaT, step in (("allocator step: score + mask (ms)", 1, 10), ("allocator step: score only (ms)", 1000, 10)):
        models = {}
        for library in ("deltatune", "peft"):
            model = adapt(library, small_llama(), task_type="CAUSAL_LM", init_r=init_r, target_r=init_r // 3,
                          total_step=100_000, deltaT=deltaT, init_lora_weights=False, target_modules=targets)
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()  # gradients the allocator reads
            models[library] = model
        n_modules = len(models["deltatune"].base_model.targeted_module_names)
        times = harness.time_interleaved(
            {k: (lambda m=m: m.base_model.update_and_allocate(step)) for k, m in models.items()}, passes=passes
        )
        rows.append({
            "benchmark": label, "setup": f"Llama 4 layers, hidden 256, {n_modules} modules, init_r={init_r}",
            "floor": "", "deltatune": 1e3 * times["deltatune"], "peft": 1e3 * times["peft"],
            "deltatune/peft": times["deltatune"] / times["peft"],
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--init-r", type=int, default=12)
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    harness.setup()
    rows = layer_rows(args.size, args.tokens, args.init_r, args.passes) + allocator_rows(args.init_r, args.passes)
    columns = ["benchmark", "setup", "floor", "deltatune", "peft", "deltatune/peft"]
    print(harness.write("adalora", rows, columns, "AdaLoRA, deltatune vs PEFT 0.21.2 (one thread, CPU)"))


if __name__ == "__main__":
    main()
