"""Runs the real PEFT for the parity tests: in this process (the installed PEFT 0.21.2) or as a
worker process (PEFT 0.18.1, the last with Bone, from .peft018/ on PYTHONPATH).

    python peft_runner.py        # worker: one JSON job per stdin line, one JSON reply per stdout line

job: {"model": "mlp"|"llama"|"gpt2", "action": "create"|"load", "dir": path,
      "config": {...} (create), "seed": int, "merge": bool}
"create" builds the PEFT adapter, fills its trainable adapter tensors from ``seed``, saves it to
``dir`` and writes the outputs to dir/outputs.safetensors; "load" loads ``dir`` with
PeftModel.from_pretrained and writes dir/peft_outputs.safetensors (and merged outputs).

The worker first writes ``{"ready": <peft version>}``, then for each job ``{"ok": true,
"peft_version": ...}`` or ``{"ok": false, "error": <traceback>}``. Its own stdout goes to stderr, so
nothing a library prints can be taken for a reply.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import build, out_of  # noqa: E402

ADAPTER_PREFIXES = ("bone_", "miss_", "lora_", "fourierft_", "randlora_")


def run_job(spec: dict) -> dict:
    import peft

    base, inputs = build(spec["model"])
    if spec["action"] == "create":
        config = peft.get_peft_config(dict(spec["config"]))
        model = peft.get_peft_model(base, config)
        g = torch.Generator().manual_seed(spec.get("seed", 0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and any(k in name for k in ADAPTER_PREFIXES):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.eval()
        model.save_pretrained(spec["dir"])
        save_file({"out": out_of(model, inputs).detach().contiguous()}, os.path.join(spec["dir"], "outputs.safetensors"))
    elif spec["action"] == "load":
        model = peft.PeftModel.from_pretrained(base, spec["dir"]).eval()
        result = {"out": out_of(model, inputs).detach().contiguous()}
        if spec.get("merge"):
            merged = model.merge_and_unload()
            result["merged"] = out_of(merged, inputs).detach().contiguous()
        save_file(result, os.path.join(spec["dir"], "peft_outputs.safetensors"))
    else:
        raise ValueError(f"unknown action {spec['action']!r}")
    return {"peft_version": peft.__version__}


def serve() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    import peft

    replies.write(json.dumps({"ready": peft.__version__}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = {"ok": True, **run_job(json.loads(line))}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    serve()
