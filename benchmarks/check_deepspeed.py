"""Independent DeepSpeed check: every method under ZeRO-2, ZeRO-3 with adapters added to a loaded
base, and ZeRO-3 with base and adapter built inside ``deepspeed.zero.Init``, on a model the tests
do not use (a tiny random Qwen2: grouped-query attention, biased q/k/v projections, tied embeddings),
through the user-facing example ``examples/accelerate_deepspeed.py`` (accelerate + DeepSpeedPlugin),
two CPU processes (``DS_ACCELERATOR=cpu``, gloo).

Each run passes when the launch exits 0 (the example itself raises if the trained adapter differs
between ranks) and the checkpoint rank 0 wrote loads into a plain transformers model without
DeepSpeed, where it lowers the loss on the training sequences (the per-step losses of a few noisy
steps are shown, not judged). Writes ``benchmarks/results/deepspeed_check.md``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/check_deepspeed.py [--methods bone,adalora] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETUPS = {"ZeRO-2": ["--zero", "2"], "ZeRO-3, adapters after": ["--zero", "3"], "ZeRO-3, zero.Init": ["--zero", "3", "--zero-init"]}
METHODS = ("fourierft", "randlora", "adalora", "bone", "bat", "miss")


def tiny_qwen2(folder: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reloaded_loss(model_dir: str, adapter_dir: str, batch_size: int) -> tuple[float, float]:
    """(base loss, loss with the saved adapter) on the example's training sequences, without DeepSpeed."""
    import torch
    import transformers

    import deltatune as dt

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from accelerate_train import counting_sequences

    ids = counting_sequences(16 * batch_size * 2, 16, 64, seed=0)  # what the example trains on (2 processes)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        before = base(input_ids=ids, labels=ids).loss.item()
        after = dt.PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids, labels=ids).loss.item()
    return before, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "qwen2")
        tiny_qwen2(model_dir)
        for method in args.methods.split(","):
            for setup, flags in SETUPS.items():
                out = os.path.join(tmp, f"{method}-{len(rows)}")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), os.path.join(ROOT, "examples", "accelerate_deepspeed.py"), "--cpu",
                       *flags, "--method", method, "--model", model_dir, "--steps", str(args.steps), "--output", out]
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
                row = {"method": method, "setup": setup, "seconds": round(time.perf_counter() - start, 1)}
                try:
                    if proc.returncode != 0:
                        raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-600:]}")
                    losses = json.load(open(os.path.join(out, "train_log.json")))["losses"]
                    row["step losses"] = f"{losses[0]:.3f} … {losses[-1]:.3f}"
                    before, after = reloaded_loss(model_dir, out, batch_size=4)
                    row["reloaded: base → adapter loss"] = f"{before:.4f} → {after:.4f}"
                    if not after < before:
                        raise RuntimeError("the saved adapter does not lower the loss")
                    row["result"] = "✓"
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    row["result"] = f"✗ {type(exc).__name__}: {str(exc)[-300:]}".replace("\n", " ").replace("|", "/")
                print(row, flush=True)
                rows.append(row)
    cols = ["method", "setup", "result", "step losses", "reloaded: base → adapter loss", "seconds"]
    lines = ["# DeepSpeed on a model the tests do not use (tiny Qwen2, 2 CPU processes, gloo)", "",
             "`HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/check_deepspeed.py`", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "deepspeed_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(r["result"] != "✓" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
