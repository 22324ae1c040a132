"""Model-level training step: a Llama-style model built from a config, all-linear targets,
deltatune vs PEFT 0.21.2 vs the frozen base (gradient w.r.t. the input embeddings only).

    .venv/bin/python benchmarks/bench_model.py [--hidden 1024 --layers 4 --tokens 512]
    # LLaMA-7B layer shapes (hidden 4096, MLP 11008), two layers:
    .venv/bin/python benchmarks/bench_model.py --hidden 4096 --intermediate 11008 --layers 2 \
        --tokens 256 --methods fourierft,bone --name model_step_7b
"""

from __future__ import annotations

import argparse
import copy

import torch

import harness

CONFIGS = {
    "fourierft": ("FourierFTConfig", {"n_frequency": 1000, "scaling": 300.0}),
    "randlora": ("RandLoraConfig", {"r": 32}),
    "adalora": ("AdaLoraConfig", {"init_r": 12, "target_r": 8, "total_step": 100}),
    "bone": ("BoneConfig", {"r": 64}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2.75 x hidden)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--methods", default="fourierft,randlora,adalora,bone")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--name", default="model_step", help="results file: benchmarks/results/<name>.json/.md")
    args = ap.parse_args()
    harness.setup()
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt
    import peft

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate or int(2.75 * args.hidden),
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128),
                      num_key_value_heads=max(1, args.hidden // 128))
    base = LlamaForCausalLM(cfg).requires_grad_(False)
    embeds = torch.randn(1, args.tokens, args.hidden, requires_grad=True)

    def step(model):
        def run():
            model(inputs_embeds=embeds).logits.float().pow(2).mean().backward()
            embeds.grad = None
            model.zero_grad(set_to_none=True)
        return run

    rows = []
    for method in args.methods.split(","):
        if not hasattr(dt, CONFIGS[method][0]):
            continue
        cls, kw = CONFIGS[method]
        kw = dict(kw, target_modules="all-linear", task_type="CAUSAL_LM")
        ours = dt.get_peft_model(copy.deepcopy(base), getattr(dt, cls)(**copy.deepcopy(kw)))
        if method == "bone":
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(**copy.deepcopy(kw)))
        else:
            theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls)(**copy.deepcopy(kw)))
        for m in (ours, theirs):
            m.train()
        t = harness.time_interleaved({"floor": step(base), "deltatune": step(ours), "peft": step(theirs)}, passes=args.passes, best_of=2)
        rows.append({"method": method, "model": f"llama {args.layers}x{args.hidden}", "tokens": args.tokens,
                     "floor_ms": 1e3 * t["floor"], "deltatune_vs_floor": t["deltatune"] / t["floor"],
                     "peft_vs_floor": t["peft"] / t["floor"], "deltatune_vs_peft": t["deltatune"] / t["peft"]})
        print(rows[-1], flush=True)
    cols = ["method", "model", "tokens", "floor_ms", "deltatune_vs_floor", "peft_vs_floor", "deltatune_vs_peft"]
    print(harness.write(args.name, rows, cols, "Model-level training step, all-linear (one thread)"))


if __name__ == "__main__":
    main()
