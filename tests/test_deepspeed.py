"""DeepSpeed ZeRO-2 and ZeRO-3 training of every method: two CPU processes, gloo (issue 17, item 1).

One ``torch.distributed.run`` launch (tests/ds_worker.py, ``DS_ACCELERATOR=cpu``) trains one case per
method (FourierFT, RandLoRA, AdaLoRA, Bone, BAT on a tiny Llama) under four setups: ZeRO-2; ZeRO-2
with gradient accumulation (2 micro-batches per step); ZeRO-3 with base model and adapter built
inside ``deepspeed.zero.Init``; ZeRO-3 with the adapter added to a ``zero.Init`` base. Rank 0 writes
what each rank measured; the tests below read it. Every tensor is partitioned under ZeRO-3
(persistence threshold 0). Each run is compared with the same training done without DeepSpeed
(gradients averaged over both ranks' batches), AdaLoRA's rank allocation included: through
``attach_adalora``, and in one setup through the two calls it makes (``capture_gradients`` before
``engine.step()``, ``update_and_allocate`` after).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cases import CASES
from ds_worker import MODES, STEPS, model_cases
from test_distributed import ranks

HERE = os.path.dirname(os.path.abspath(__file__))
SELECTED = model_cases(CASES, "llama")  # every setup
CASE_IDS = [c.id for c in SELECTED]
ZERO3_IDS = [c.id for c in model_cases(CASES, "gpt2")]  # Conv1D layers, whose shape ZeRO-3 hides too
ZERO3_MODES = [m for m in MODES if m.startswith("zero3")]
RUNS = [(m, c) for m in MODES for c in CASE_IDS] + [(m, c) for m in ZERO3_MODES for c in ZERO3_IDS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        os.path.join(HERE, "ds_worker.py"), "--out", str(out), "--cases", ",".join(CASE_IDS),
        "--zero3-cases", ",".join(ZERO3_IDS),
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=os.path.dirname(HERE))
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        pytest.fail(f"torchrun wrote no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(path) as f:
        data = json.load(f)
    data.update(wall=time.perf_counter() - start, returncode=proc.returncode, stderr=proc.stderr[-3000:],
                stdout=proc.stdout)
    return data


def test_every_method_is_covered():
    """Every method of the case table has a tiny-Llama case here; Bone and BAT both."""
    covered = {c.config().peft_type for c in SELECTED}
    assert covered == {c.config().peft_type for c in CASES}, "a method has no tiny-Llama case in tests/cases*.py"
    assert {"bone", "bat"} <= {c.id.split("-")[0] for c in SELECTED}
    assert {c.split("-")[0] for c in ZERO3_IDS} == {c.id.split("-")[0] for c in SELECTED}, "GPT-2 cases per variant"


def test_launch_finished(results):
    assert results["returncode"] == 0, results["stderr"]
    assert "built successfully" not in results["stdout"], "a DeepSpeed C++ op was compiled"
    print(f"\nDeepSpeed ZeRO-2/3, {len(RUNS)} runs ({len(CASE_IDS)} variants x {len(MODES)} setups + GPT-2 under ZeRO-3): "
          f"{results['wall']:.1f} s wall, per setup {results['timing']}")


@pytest.mark.parametrize("mode, case_id", RUNS)
def test_trains_identically_and_saves_once(results, mode, case_id):
    """Both ranks see different data; after the steps the adapters are bitwise equal on both ranks,
    equal to data-parallel training without DeepSpeed, and rank 0 alone wrote a checkpoint that
    loads into a model without DeepSpeed and reproduces the trained outputs."""
    r0, r1 = ranks(results, mode, case_id)
    assert r0["digest"] == r1["digest"], "adapter weights differ between ranks"
    assert r0["changed"] > 1e-3, "training did not move the adapter"
    assert len(r0["losses"]) == STEPS and all(v == v for v in r0["losses"])
    assert r0["vs_reference"] < 1e-4, f"differs from training without DeepSpeed by {r0['vs_reference']}"
    if mode.startswith("zero3"):
        assert r0["partitioned"] > 0, "ZeRO-3 partitioned nothing: the test would not see partitioning bugs"
    assert r0["wrote"] and not r1["wrote"]
    assert r0["writes"] == [case_id] and r1["writes"] == [], "the checkpoint must be written once, by rank 0"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(r0["files"])
    assert r0["load_diff"] < 1e-5 and r1["load_diff"] < 1e-5, "the saved adapter does not reproduce the trained model"
    if "rank_pattern" in r0:  # AdaLoRA: the allocator ran at every step, the same on both ranks
        assert r0["allocation_calls"] == STEPS
        assert r0["rank_pattern"] and r0["rank_pattern"] == r1["rank_pattern"]
        assert not all(all(flags) for flags in r0["rank_pattern"].values()), "nothing was pruned"
        assert r0["pruned_max_abs"] == 0.0, "a pruned singular value is not zero in the model's weights"
        if mode == "zero2":
            assert r0["uncaptured_error"] and "capture_gradients" in r0["uncaptured_error"]


@pytest.mark.parametrize("mode, case_id", RUNS)
def test_frozen_buffers_match_a_plain_model(results, mode, case_id):
    """FourierFT's positions and RandLoRA's bases are the ones a model built without DeepSpeed draws
    from the same seed (zero.Init must not change them: a checkpoint without them relies on it)."""
    r0, _ = ranks(results, mode, case_id)
    assert r0["buffers_vs_plain"] == {}, r0["buffers_vs_plain"]


def test_attach_adalora_refuses_what_is_not_a_deepspeed_engine():
    import deltatune as dt
    from deltatune.integrations.deepspeed import attach_adalora
    from models import MLP

    model = dt.get_peft_model(MLP(), dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin0"]))
    with pytest.raises(TypeError, match="needs a DeepSpeed engine"):
        attach_adalora(model)


def test_without_deepspeed_gradients_stay_in_grad():
    """capture_gradients does nothing for plain parameters; update_and_allocate reads .grad as before."""
    import torch

    import deltatune as dt
    from models import MLP, mlp_input

    model = dt.get_peft_model(MLP(), dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin0"]))
    model(mlp_input()).pow(2).mean().backward()
    tuner = model.base_model
    tuner.capture_gradients()
    assert tuner.allocation.zero_grads is None and tuner.allocation.zero_copies is None
    assert tuner.update_and_allocate(0) is None  # warm-up step: scores only
    assert tuner.update_and_allocate(1) is not None  # pruned from the .grad values
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
