"""examples/accelerate_train.py works: two processes under ``accelerate launch`` (DDP over gloo on
CPU), and one process for every method."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import deltatune as dt
from deltatune.core.registry import METHODS
from test_distributed import free_port

import accelerate  # noqa: E402,F401  (a pinned test dependency: imported, never skipped)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "accelerate_train.py")


def load_example():
    spec = importlib.util.spec_from_file_location("accelerate_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


def check_checkpoint(folder, method):
    with open(os.path.join(folder, "train_log.json")) as f:
        log = json.load(f)
    assert log["losses"][-1] < log["losses"][0], log["losses"]
    base = example.build_model(None)
    ids = example.counting_sequences(2, 16, 64, seed=5)
    with torch.no_grad():
        before = base(input_ids=ids).logits
    loaded = dt.PeftModel.from_pretrained(base, folder)
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    assert not torch.allclose(after, before, atol=1e-4), "the saved adapter changes nothing"
    return log, loaded


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_accelerate_launch_two_processes(tmp_path):
    out = tmp_path / "adapter"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        EXAMPLE, "--cpu", "--method", "adalora", "--steps", "5", "--output", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log, loaded = check_checkpoint(out, "adalora")
    assert log["processes"] == 2
    assert proc.stdout.count("saved the adalora adapter") == 1  # the main process alone wrote
    assert loaded.peft_config["default"].rank_pattern  # AdaLoRA's allocator ran under DDP


def test_example_lists_every_method():
    types = {str(make(example.parse_args(["--output", "x"])).peft_type) for make in example.CONFIGS.values()}
    assert types == set(METHODS), f"examples/accelerate_train.py CONFIGS lacks {set(METHODS) - types}"


@pytest.mark.parametrize("method", sorted(example.CONFIGS))
def test_example_one_process(method, tmp_path):
    log = example.main(["--cpu", "--method", method, "--steps", "4", "--output", str(tmp_path)])
    assert log["processes"] == 1
    check_checkpoint(tmp_path, method)
