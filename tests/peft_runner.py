"""Runs the real PEFT in a child process (PEFT 0.18.1, the last with Bone, lives in .peft018/).

    python peft_runner.py '<json spec>'

spec: {"model": "mlp"|"llama"|"gpt2", "action": "create"|"load", "dir": path,
       "config": {...} (create), "seed": int, "merge": bool}
"create" builds the PEFT adapter, fills its trainable adapter tensors from ``seed``, saves it to
``dir`` and writes the outputs to dir/outputs.safetensors; "load" loads ``dir`` with
PeftModel.from_pretrained and writes dir/peft_outputs.safetensors (and merged outputs).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import build, out_of  # noqa: E402


def main() -> None:
    spec = json.loads(sys.argv[1])
    import peft

    base, inputs = build(spec["model"])
    if spec["action"] == "create":
        config = peft.get_peft_config(dict(spec["config"]))
        model = peft.get_peft_model(base, config)
        g = torch.Generator().manual_seed(spec.get("seed", 0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and any(k in name for k in ("bone_", "miss_", "lora_", "fourierft_", "randlora_")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.eval()
        model.save_pretrained(spec["dir"])
        save_file({"out": out_of(model, inputs).detach().contiguous()}, os.path.join(spec["dir"], "outputs.safetensors"))
    else:
        model = peft.PeftModel.from_pretrained(base, spec["dir"]).eval()
        result = {"out": out_of(model, inputs).detach().contiguous()}
        if spec.get("merge"):
            merged = model.merge_and_unload()
            result["merged"] = out_of(merged, inputs).detach().contiguous()
        save_file(result, os.path.join(spec["dir"], "peft_outputs.safetensors"))
    print(json.dumps({"peft_version": peft.__version__}))


if __name__ == "__main__":
    main()
