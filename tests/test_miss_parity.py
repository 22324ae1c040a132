"""MiSS (PEFT >= 0.19's name for Bone) against the real PEFT 0.21.2, imported here; Bone adapters
written in MiSS format (the default) and in PEFT 0.18.1's Bone format (on request, checked through
the PEFT 0.18.1 worker process); every MiSS variant round-trips with identical outputs."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import build, out_of
from models import randomize_adapters

MISS_CONFIGS = [
    {"r": 4, "target_modules": ["lin0", "lin1"]},
    {"r": 3, "target_modules": ["lin0"], "init_weights": False},
    {"r": 4, "target_modules": ["lin1"], "init_weights": "bat"},
    {"r": 4, "target_modules": ["lin0", "lin1"], "init_weights": "mini", "mini_r": 4, "miss_dropout": 0.1},
    {"r": 2, "target_modules": ["lin0"], "modules_to_save": ["lin1"]},
]
IDS = [f"{c.get('init_weights', True)}-r{c['r']}" + ("-mts" if "modules_to_save" in c else "") for c in MISS_CONFIGS]


def _fill(model, seed: int) -> None:
    """The same values in both libraries: adapter tensors in the order of their checkpoint keys."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in sorted(n for n, p in params.items() if p.requires_grad):
            params[name].copy_(torch.randn(params[name].shape, generator=g) * 0.1)


def _peft_model(config: dict, seed: int = 1):
    base, inputs = build("mlp")
    model = peft.get_peft_model(base, peft.MissConfig(**config))
    _fill(model, seed)
    return model.eval(), inputs


def _ours(config: dict, seed: int = 1):
    base, inputs = build("mlp")
    model = dt.get_peft_model(base, dt.MissConfig(**config))
    _fill(model, seed)
    return model.eval(), inputs


@pytest.mark.parametrize("config", MISS_CONFIGS, ids=IDS)
def test_miss_matches_peft_and_checkpoints_cross_both_ways(config, tmp_path):
    theirs, inputs = _peft_model(config)
    ours, _ = _ours(config)
    # same parameters under PEFT's names (adapter name moved), same outputs, same checkpoint
    their_sd = peft.get_peft_model_state_dict(theirs)
    our_sd = dt.get_peft_model_state_dict(ours)
    assert sorted(their_sd) == sorted(our_sd)
    for key in their_sd:
        torch.testing.assert_close(our_sd[key], their_sd[key], rtol=0, atol=0)
    expected = out_of(theirs, inputs)
    torch.testing.assert_close(out_of(ours, inputs), expected, rtol=1e-5, atol=1e-6)
    # PEFT's file loads here ...
    theirs.save_pretrained(tmp_path / "peft")
    loaded = dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path / "peft")
    assert isinstance(loaded.peft_config["default"], dt.MissConfig) and loaded.peft_type.value == "MISS"
    torch.testing.assert_close(out_of(loaded, inputs), expected, rtol=1e-5, atol=1e-6)
    # ... ours loads in PEFT, and merges alike
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MISS" and saved["mini_r"] == config.get("mini_r", 1)
    back = peft.PeftModel.from_pretrained(build("mlp")[0], tmp_path / "ours").eval()
    torch.testing.assert_close(out_of(back, inputs), expected, rtol=1e-5, atol=1e-6)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(out_of(merged, inputs), out_of(back.merge_and_unload(), inputs), rtol=1e-5, atol=1e-6)


def test_miss_dropout_drops_only_while_training():
    config = {"r": 2, "target_modules": ["lin0"], "miss_dropout": 0.5}
    model, inputs = _ours(config)
    model.train()
    torch.manual_seed(0)
    a = out_of(model, inputs)
    torch.manual_seed(1)
    b = out_of(model, inputs)
    assert not torch.equal(a, b)  # the base MLP has dropout too: compare with the adapter disabled
    with model.disable_adapter():
        torch.manual_seed(0)
        base_a = out_of(model, inputs)
    model.eval()
    with model.disable_adapter():
        base_eval = out_of(model, inputs)
    assert not torch.allclose(a - base_a, out_of(model, inputs) - base_eval)  # dropped inputs in the shard path


@pytest.mark.parametrize("init_weights", [True, "bat"])
def test_bone_is_saved_as_miss_for_peft_0_21_and_as_bone_on_request(init_weights, tmp_path, peft018):
    base, inputs = build("mlp")
    model = dt.get_peft_model(base, dt.BoneConfig(r=4, target_modules=["lin1"], init_weights=init_weights))
    randomize_adapters(model, seed=2)
    expected = out_of(model.eval(), inputs)
    model.save_pretrained(tmp_path / "miss")
    saved = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MISS" and saved["miss_dropout"] == 0.0 and saved["init_weights"] == init_weights
    assert all(k.endswith(".miss_block") for k in load_file(tmp_path / "miss" / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(build("mlp")[0], tmp_path / "miss").eval()
    torch.testing.assert_close(out_of(theirs, inputs), expected, rtol=1e-5, atol=1e-6)
    here = dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path / "miss")
    torch.testing.assert_close(out_of(here, inputs), expected, rtol=1e-5, atol=1e-6)  # BAT: cached weight

    model.save_pretrained(tmp_path / "bone", peft_format="BONE")
    saved = json.loads((tmp_path / "bone" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BONE" and "miss_dropout" not in saved and "mini_r" not in saved
    assert all(k.endswith(".bone_block") for k in load_file(tmp_path / "bone" / "adapter_model.safetensors"))
    here = dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path / "bone")
    assert isinstance(here.peft_config["default"], dt.BoneConfig)
    torch.testing.assert_close(out_of(here, inputs), expected, rtol=1e-5, atol=1e-6)  # BAT: cached weight
    peft018.run({"model": "mlp", "action": "load", "dir": str(tmp_path / "bone"), "merge": True})
    got = load_file(tmp_path / "bone" / "peft_outputs.safetensors")
    torch.testing.assert_close(got["out"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["merged"], expected, rtol=1e-5, atol=1e-6)


def test_miss_in_bone_format_refuses_mini(tmp_path):
    model, _ = _ours({"r": 4, "target_modules": ["lin1"], "init_weights": "mini", "mini_r": 2})
    with pytest.raises(ValueError, match="init_weights='mini' has no Bone equivalent"):
        model.save_pretrained(tmp_path, peft_format="BONE")
    with pytest.raises(ValueError, match="peft_format='RANDLORA' cannot be written for a MISS adapter"):
        model.save_pretrained(tmp_path, peft_format="RANDLORA")


def test_miss_config_fields_and_errors_match_peft():
    ours, theirs = dt.MissConfig(), peft.MissConfig()
    for name in ("r", "miss_dropout", "mini_r", "init_weights", "bias", "target_modules", "layers_pattern"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.peft_type == theirs.peft_type == "MISS"
    base, _ = build("mlp")
    with pytest.raises(ValueError, match="module 'lin1' has out_features 8, mini_r = 3"):
        dt.get_peft_model(base, dt.MissConfig(r=4, target_modules=["lin1"], init_weights="mini", mini_r=3))
    # r > in_features: refused by both, with PEFT's words (Bone, PEFT 0.18.1's method, allows it)
    for init in (True, False, "mini", "bat"):
        for lib in (dt, peft):
            with pytest.raises(ValueError, match=r"`r` \(16\) must be less than or equal to in_features \(10\)"):
                lib.get_peft_model(build("mlp")[0], lib.MissConfig(r=16, target_modules=["lin0"], init_weights=init))
    bone = dt.get_peft_model(build("mlp")[0], dt.BoneConfig(r=16, target_modules=["lin0"], init_weights=False))
    assert bone.base_model.model.lin0.adapters["default"].bone_block.shape == (16, 20)


def test_saved_files_name_the_peft_release_of_their_format(tmp_path):
    """peft_version is "<PEFT release of the format>@deltatune-<version>": PEFT reads the release
    (the part before "@"), so its checks see a real PEFT version and it loads the file silently."""
    import warnings

    model = dt.get_peft_model(build("mlp")[0], dt.BoneConfig(r=4, target_modules=["lin0"]))
    model.save_pretrained(tmp_path / "miss")
    model.save_pretrained(tmp_path / "bone", peft_format="BONE")
    version = {f: json.loads((tmp_path / f / "adapter_config.json").read_text())["peft_version"] for f in ("miss", "bone")}
    assert version == {"miss": f"0.21.2@deltatune-{dt.__version__}", "bone": f"0.18.1@deltatune-{dt.__version__}"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = peft.PeftModel.from_pretrained(build("mlp")[0], tmp_path / "miss")
    assert loaded.peft_config["default"].peft_version == version["miss"]
