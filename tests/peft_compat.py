"""Drive the real PEFT (0.21.2 installed, or 0.18.1 from .peft018/) in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEFT018 = ROOT / ".peft018"


def run_peft(spec: dict, version: str = "0.21.2") -> dict:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    if version == "0.18.1":
        if not (PEFT018 / "peft").is_dir():
            raise RuntimeError(f"PEFT 0.18.1 is not installed in {PEFT018}; run `make test`, which installs it")
        env["PYTHONPATH"] = str(PEFT018)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("peft_runner.py")), json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"PEFT {version} failed:\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["peft_version"] == version, info
    return info


def assert_rel(a, b, tol: float = 1e-5) -> None:
    """Max abs difference relative to the reference's largest magnitude (the issues' "1e-5 relative")."""
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err <= tol, err


def adapter_grads(model, strip: str) -> dict:
    """Gradients of the trainable parameters, keyed without the adapter part ``strip``."""
    return {n.replace(strip, ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
