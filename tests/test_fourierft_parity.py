"""FourierFT against the real PEFT 0.21.2: same outputs and gradients on the same weights, and
checkpoints crossing in both directions."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import deltatune as dt
from conftest import build, out_of
from peft_compat import adapter_grads, assert_rel

CONFIGS = [
    ("mlp", dict(n_frequency=15, target_modules=["lin0", "lin1"], n_frequency_pattern={"lin1": 7})),
    ("mlp", dict(n_frequency=200, target_modules=["lin0"], scaling=20.0, random_loc_seed=3)),  # n = in·out
    ("gpt2", dict(n_frequency=40, target_modules=["c_attn", "c_proj", "c_fc"], scaling=50.0)),  # Conv1D, non-square
    ("llama", dict(n_frequency=25, task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj", "up_proj"], layers_to_transform=[1])),
    ("llama", dict(n_frequency=12, task_type="CAUSAL_LM", target_modules="all-linear", n_frequency_pattern={"o_proj": 5})),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)]


def pair(model_kind, kwargs):
    base, inputs = build(model_kind)
    ours = dt.get_peft_model(copy.deepcopy(base), dt.FourierFTConfig(**copy.deepcopy(kwargs)))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.FourierFTConfig(**copy.deepcopy(kwargs)))
    ref = peft.get_peft_model_state_dict(theirs)
    mine = dt.get_peft_model_state_dict(ours.base_model)
    assert ref.keys() == mine.keys()
    with torch.no_grad():  # same coefficients in both
        for key, tensor in dt.get_peft_model_state_dict(ours.base_model).items():
            tensor.copy_(ref[key])
    return ours, theirs, inputs


@pytest.mark.parametrize("model_kind,kwargs", CONFIGS, ids=IDS)
def test_outputs_and_gradients_match_peft(model_kind, kwargs):
    ours, theirs, inputs = pair(model_kind, kwargs)
    ours.eval(), theirs.eval()  # no dropout; gradients flow all the same
    if "x" in inputs:
        xa = inputs["x"].clone().requires_grad_(True)
        xb = inputs["x"].clone().requires_grad_(True)
        ya, yb = ours(x=xa), theirs(x=xb)
    else:
        ya, yb = out_of(ours, inputs), out_of(theirs, inputs)
    assert_rel(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    grads_a, grads_b = adapter_grads(ours, ".adapters.default"), adapter_grads(theirs, ".default")
    assert grads_a.keys() == grads_b.keys()
    # Per tensor to 1e-5 for the MLP and GPT-2 (Conv1D) layers. Through a whole Llama the spectrum
    # gradients of attention projections pass through softmax cancellation and are 50x smaller than
    # others, so fp32 rounding (PEFT's dense ifft2 vs our FFT path) is measured against the largest
    # gradient of the model there, to 5e-5 (rounding differences compound over two layers).
    largest = max(g.abs().max() for g in grads_b.values())
    for name in grads_a:
        if model_kind == "llama":
            assert ((grads_a[name] - grads_b[name]).abs().max() / largest).item() <= 5e-5, name
        else:
            assert_rel(grads_a[name], grads_b[name])
    if "x" in inputs:
        assert_rel(xa.grad, xb.grad)


@pytest.mark.parametrize("model_kind,kwargs", CONFIGS, ids=IDS)
def test_checkpoints_cross_both_ways(model_kind, kwargs, tmp_path):
    ours, theirs, inputs = pair(model_kind, kwargs)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "fourierft_spectrum" in n:
                p.mul_(0.5)
    ours.eval(), theirs.eval()
    expected = out_of(theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    base, _ = build(model_kind)
    loaded = dt.PeftModel.from_pretrained(base, tmp_path / "peft")
    torch.testing.assert_close(out_of(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
    # and back: ours saved, PEFT loads
    loaded.save_pretrained(tmp_path / "ours")
    base, _ = build(model_kind)
    again = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    torch.testing.assert_close(out_of(again, inputs), expected, rtol=1e-5, atol=1e-5)


def test_random_loc_seed_none_and_oversized_n_frequency_are_clear_errors():
    with pytest.raises(ValueError, match="`random_loc_seed` must be an integer"):
        dt.FourierFTConfig(random_loc_seed=None)
    base, _ = build("mlp")
    with pytest.raises(ValueError, match="less than or equal to the product.*200.*module 'lin0'"):
        dt.get_peft_model(base, dt.FourierFTConfig(n_frequency=201, target_modules=["lin0"]))
    assert not any(isinstance(m, dt.AdapterLayer) for m in base.modules())


def test_positions_are_buffers_that_follow_the_model():
    base, _ = build("mlp")
    model = dt.get_peft_model(base, dt.FourierFTConfig(n_frequency=10, target_modules=["lin0"]))
    names = [n for n, _ in model.named_buffers()]
    assert "base_model.model.lin0.adapters.default.indices" in names
    assert not any("indices" in k for k in dt.get_peft_model_state_dict(model.base_model))
    model.to(torch.float64)
    assert model.base_model.model.lin0.adapters["default"].indices.dtype == torch.int64
