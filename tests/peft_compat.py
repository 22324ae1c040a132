"""Drive the real PEFT: the installed 0.21.2 in this process, or 0.18.1 (from .peft018/) in one
worker process that serves every job of a test session (tests/peft_runner.py)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEFT018 = ROOT / ".peft018"
JOB_TIMEOUT_S = 300


def run_peft(spec: dict) -> dict:
    """A peft_runner job with the installed PEFT (0.21.2), in this process."""
    import peft_runner

    info = peft_runner.run_job(spec)
    assert info["peft_version"] == "0.21.2", info
    return info


class PeftWorker:
    """One child interpreter with PEFT 0.18.1 first on its path; ``run(spec)`` sends it a
    peft_runner job and waits for the reply. Started once, it answers every later job."""

    version = "0.18.1"

    def __init__(self) -> None:
        if not (PEFT018 / "peft").is_dir():
            raise RuntimeError(f"PEFT 0.18.1 is not installed in {PEFT018}; run `make test`, which installs it")
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(PEFT018), OMP_NUM_THREADS="1")
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("peft_runner.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._reply()
        assert ready.get("ready") == self.version, f"the worker runs PEFT {ready.get('ready')}, not {self.version}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)  # the worker closed its stdout: it has exited

    def _stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def _reply(self) -> dict:
        try:
            line = self.replies.get(timeout=JOB_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(f"PEFT {self.version} worker gave no reply in {JOB_TIMEOUT_S} s:\n{self._stderr()}") from None
        if line is None:
            raise RuntimeError(f"PEFT {self.version} worker exited ({self.proc.wait()}):\n{self._stderr()}")
        return json.loads(line)

    def run(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if not reply.pop("ok"):
            raise RuntimeError(f"PEFT {self.version} failed:\n{reply['error'][-4000:]}")
        assert reply["peft_version"] == self.version, reply
        return reply

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # end of jobs: the worker leaves its loop and exits
        except OSError:  # it has exited already
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def assert_rel(a, b, tol: float = 1e-5) -> None:
    """Max abs difference relative to the reference's largest magnitude (1e-5 relative by default)."""
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err <= tol, err


def adapter_grads(model, strip: str) -> dict:
    """Gradients of the trainable parameters, keyed without the adapter part ``strip``."""
    return {n.replace(strip, ""): p.grad for n, p in model.named_parameters() if p.requires_grad}
