from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from models import MLP, ConvNet, mlp_input, tiny_gpt2, tiny_llama, token_input  # noqa: E402

MODEL_BUILDERS = {
    "mlp": (lambda: MLP(), lambda: {"x": mlp_input()}),
    "llama": (lambda: tiny_llama(), lambda: {"input_ids": token_input()}),
    "gpt2": (lambda: tiny_gpt2(), lambda: {"input_ids": token_input()}),
    "conv": (lambda: ConvNet(), lambda: {"x": torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) / 200.0}),
}


def build(kind: str):
    """A fresh model and its inputs (seeded: two calls give identical weights)."""
    torch.manual_seed(0)
    make_model, make_inputs = MODEL_BUILDERS[kind]
    return make_model().eval(), make_inputs()


def out_of(model, inputs) -> torch.Tensor:
    result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.simplefilter("default")
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs single-threaded (the models and tensors here are tiny: intra-op threads only
    add synchronisation cost, which explodes on a loaded machine); the previous count comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def peft018():
    """One PEFT 0.18.1 worker process (tests/peft_runner.py) for every job of the session."""
    from peft_compat import PeftWorker

    worker = PeftWorker()
    yield worker
    worker.close()
