"""Bone/BAT checkpoints cross between deltatune and PEFT 0.18.1 (the last release with Bone) in both
directions with identical outputs (deltatune writes the Bone format on request: peft_format="BONE");
PEFT 0.21.2's MiSS checkpoints load as MiSS (tests/test_miss_parity.py has the rest).

PEFT 0.18.1 runs in one worker process for the whole session (the ``peft018`` fixture), PEFT 0.21.2
in this process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import build, out_of
from models import randomize_adapters
from peft_compat import run_peft

BONE_CONFIGS = [
    ("mlp", {"peft_type": "BONE", "r": 5, "target_modules": ["lin0"]}),
    ("mlp", {"peft_type": "BONE", "r": 3, "target_modules": ["lin0", "lin1"]}),
    ("mlp", {"peft_type": "BONE", "r": 4, "target_modules": ["lin1"], "init_weights": "bat"}),
    ("mlp", {"peft_type": "BONE", "r": 2, "target_modules": ["lin0"], "modules_to_save": ["lin1"], "bias": "all"}),
    ("llama", {"peft_type": "BONE", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}),
    ("llama", {"peft_type": "BONE", "r": 8, "init_weights": "bat", "task_type": "CAUSAL_LM", "layers_to_transform": [1]}),
]
IDS = [f"{m}-{c.get('init_weights', True)}-{c['r']}-{len(c['target_modules']) if 'target_modules' in c else 'default'}" for m, c in BONE_CONFIGS]


@pytest.mark.parametrize("model_kind,config", BONE_CONFIGS, ids=IDS)
def test_peft_checkpoint_loads_with_identical_outputs(model_kind, config, tmp_path, peft018):
    peft018.run({"model": model_kind, "action": "create", "config": config, "dir": str(tmp_path), "seed": 3})
    expected = load_file(tmp_path / "outputs.safetensors")["out"]
    base, inputs = build(model_kind)
    model = dt.PeftModel.from_pretrained(base, tmp_path)
    got = out_of(model, inputs)
    assert (got - expected).abs().max().item() <= 1e-5
    merged = model.merge_and_unload()
    assert (out_of(merged, inputs) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model_kind,config", BONE_CONFIGS, ids=IDS)
def test_our_checkpoint_loads_in_peft_with_identical_outputs(model_kind, config, tmp_path, peft018):
    base, inputs = build(model_kind)
    config = dt.PeftConfig.from_peft_type(**config)
    model = dt.get_peft_model(base, config)
    randomize_adapters(model, seed=5)
    if config.modules_to_save:
        with torch.no_grad():
            model.base_model.model.lin1.modules_to_save["default"].weight.mul_(1.5)
    expected = out_of(model.eval(), inputs)
    model.save_pretrained(tmp_path, peft_format="BONE")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BONE" and saved["inference_mode"] is True
    peft018.run({"model": model_kind, "action": "load", "dir": str(tmp_path), "merge": True})
    got = load_file(tmp_path / "peft_outputs.safetensors")
    assert (got["out"] - expected).abs().max().item() <= 1e-5
    assert (got["merged"] - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("init_weights", [True, "bat"])
def test_miss_checkpoint_from_peft_0_21_loads_as_miss(init_weights, tmp_path):
    config = {"peft_type": "MISS", "r": 4, "target_modules": ["lin1"], "init_weights": init_weights}
    run_peft({"model": "mlp", "action": "create", "config": config, "dir": str(tmp_path), "seed": 1})
    expected = load_file(tmp_path / "outputs.safetensors")["out"]
    base, inputs = build("mlp")
    model = dt.PeftModel.from_pretrained(base, tmp_path)
    assert model.peft_config["default"].peft_type == "MISS"
    assert (out_of(model, inputs) - expected).abs().max().item() <= 1e-5


def test_miss_mini_from_peft_0_21_loads(tmp_path):
    config = {"peft_type": "MISS", "r": 4, "target_modules": ["lin1"], "init_weights": "mini", "mini_r": 2}
    run_peft({"model": "mlp", "action": "create", "config": config, "dir": str(tmp_path), "seed": 1})
    expected = load_file(tmp_path / "outputs.safetensors")["out"]
    base, inputs = build("mlp")
    model = dt.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(out_of(model, inputs), expected, rtol=1e-5, atol=1e-6)
