"""Every lifecycle invariant, written once, run over every method case in cases.py."""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch

import deltatune as dt
from cases import CASES
from conftest import build, out_of
from models import randomize_adapters

IDS = [c.id for c in CASES]


def make(case, adapter_name="default", **kw):
    base, inputs = build(case.model)
    expected = out_of(base, inputs).detach()
    model = dt.get_peft_model(base, case.config(), adapter_name=adapter_name, **kw)
    return model, inputs, expected


def trained(case):
    """An adapter as after training: adapter tensors random, modules_to_save copies changed."""
    model, inputs, expected = make(case)
    randomize_adapters(model)
    train_modules_to_save(model)
    return model, inputs, expected


def second_config(case):
    """The config of an added second adapter: only one adapter may train biases, and methods that
    train one adapter at a time (AdaLoRA) set more fields through ``extra["second_adapter"]``."""
    config = case.config()
    config.bias = "none"
    for key, value in case.extra.get("second_adapter", {}).items():
        setattr(config, key, value)
    return config


def adapter_layers(model):
    return [m for m in model.modules() if isinstance(m, dt.AdapterLayer)]


def live_state(model, inputs) -> dict:
    """What a failed load must leave as it was (see assert_unchanged)."""
    return {
        "modules": [(k, type(m)) for k, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "trainable": {n for n, p in model.named_parameters() if p.requires_grad},
        "adapters": set(model.peft_config),
        "active": list(model.active_adapters),
        "out": out_of(model, inputs).detach(),
    }


def assert_unchanged(now: dict, before: dict) -> None:
    assert now["modules"] == before["modules"]
    assert now["state"].keys() == before["state"].keys()
    assert all(torch.equal(now["state"][k], v) for k, v in before["state"].items())
    for key in ("trainable", "adapters", "active"):
        assert now[key] == before[key], key
    assert torch.equal(now["out"], before["out"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init_where_promised(case):
    model, inputs, expected = make(case)
    out = out_of(model, inputs)
    if case.identity:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    else:
        assert not torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trained_adapter_changes_output(case):
    model, inputs, expected = trained(case)
    assert not torch.allclose(out_of(model, inputs), expected, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_equals_unmerged_and_unmerge_restores_weights(case):
    model, inputs, _ = trained(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = out_of(model, inputs)
    model.merge_adapter()
    assert all(layer.merged for layer in adapter_layers(model))
    torch.testing.assert_close(out_of(model, inputs), out, atol=case.merge_atol, rtol=1e-4)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    assert not any(layer.merged for layer in adapter_layers(model))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_of(model, inputs), out, atol=case.merge_atol, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_leaves_a_plain_model(case):
    model, inputs, _ = trained(case)
    out = out_of(model, inputs)
    merged = model.merge_and_unload(progressbar=False, safe_merge=True)
    assert not any(isinstance(m, (dt.AdapterLayer, dt.ModulesToSaveWrapper)) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(out_of(merged, inputs), out, atol=case.merge_atol, rtol=1e-4)


def train_modules_to_save(model) -> dict:
    """Change every modules_to_save copy (as training would); returns ``{path: copy}`` (path in the
    inner model)."""
    copies = {}
    for key, module in model.base_model.model.named_modules():
        if isinstance(module, dt.ModulesToSaveWrapper):
            copies[key] = module.active_module
            assert copies[key] is not module.original_module
            with torch.no_grad():
                for p in copies[key].parameters():
                    p.mul_(1.5).add_(0.05)
    return copies


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unload_gives_back_the_base_model(case):
    base, inputs = build(case.model)
    reference = copy.deepcopy(base.state_dict())
    model = dt.get_peft_model(base, case.config())
    randomize_adapters(model)
    copies = train_modules_to_save(model)
    assert bool(copies) == bool(case.config().modules_to_save)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, (dt.AdapterLayer, dt.ModulesToSaveWrapper)) for m in plain.modules())
    assert set(plain.state_dict()) == set(reference)
    # the adapters leave no trace (unload unmerges them); a modules_to_save module is replaced by
    # its trained copy, as in PEFT
    for key, trained_copy in copies.items():
        assert plain.get_submodule(key) is trained_copy
    want = dict(reference)
    for key, trained_copy in copies.items():
        want.update({f"{key}.{k}": v for k, v in trained_copy.state_dict().items()})
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    fresh, _ = build(case.model)
    fresh.load_state_dict(want)
    expected = out_of(fresh, inputs)
    torch.testing.assert_close(out_of(plain, inputs), expected, atol=1e-5, rtol=1e-5)
    if copies:  # the trained copy shows in the outputs
        assert not torch.allclose(expected, out_of(build(case.model)[0], inputs), atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_equals_base_and_context_restores(case):
    model, inputs, expected = trained(case)
    out = out_of(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(out_of(model, inputs), expected, atol=1e-6, rtol=0)
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." in n)
    torch.testing.assert_close(out_of(model, inputs), out)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".adapters." in n)
    # merged adapters are unmerged when disabled
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(out_of(model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_adapter_parameters_train(case):
    model, inputs, _ = trained(case)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    config = model.peft_config["default"]
    for n in trainable:
        ok = ".adapters.default." in n or ".modules_to_save.default." in n
        if config.bias != "none":
            ok = ok or n.endswith(".bias")
        assert ok, n
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        out_of(model, inputs).float().pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.allclose(p, before[n], atol=1e-7)
        if n in trainable and (".adapters." in n or ".modules_to_save." in n):
            assert changed, f"{n} did not train"
        if n not in trainable:
            assert not changed, f"{n} changed but is frozen"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_adapters_activate_switch_delete(case):
    model, inputs, expected = trained(case)
    out_default = out_of(model, inputs)
    model.add_adapter("other", second_config(case))
    assert model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    torch.testing.assert_close(out_of(model, inputs), out_default)  # a new adapter is not active
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters.other." in n:
                p.copy_(torch.randn_like(p) * 0.2)
    model.set_adapter("other")
    assert model.active_adapters == ["other"]
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapters.other." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters.default." in n)
    out_other = out_of(model, inputs)
    assert not torch.allclose(out_other, out_default, atol=1e-5)
    if case.config().modules_to_save:
        with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
            model.base_model.set_adapter(["default", "other"])
        model.base_model.set_adapter(["other"])
        model.merge_adapter()
    else:
        model.base_model.set_adapter(["default", "other"])
        out_both = out_of(model, inputs)
        model.merge_adapter()
        torch.testing.assert_close(out_of(model, inputs), out_both, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['other'\] while they are merged"):
        model.delete_adapter("other")
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, (dict, list)):
                assert "other" not in value
    assert not any(".other." in n for n in model.state_dict())
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(out_of(model, inputs), out_default, atol=1e-4, rtol=1e-4)
    model.delete_adapter("default")
    assert model.active_adapters == []
    assert not adapter_layers(model)
    torch.testing.assert_close(out_of(model, inputs), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Adapter unknown does not exist"):
        model.delete_adapter("unknown")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_then_load_gives_the_same_outputs(case, tmp_path):
    model, inputs, _ = trained(case)
    model.add_adapter("second", second_config(case))
    out = out_of(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    assert (tmp_path / "second" / "adapter_config.json").exists()
    assert "library_name: peft" in (tmp_path / "README.md").read_text()
    assert not (tmp_path / "model.safetensors").exists()
    base, _ = build(case.model)
    loaded = dt.PeftModel.from_pretrained(base, tmp_path)
    assert loaded.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(out_of(loaded, inputs), out, atol=1e-6, rtol=1e-6)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert set(loaded.peft_config) == {"default", "second"}
    ref = dt.get_peft_model_state_dict(model.base_model, "second")
    got = dt.get_peft_model_state_dict(loaded.base_model, "second")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # trainable reload
    base, _ = build(case.model)
    again = dt.PeftModel.from_pretrained(base, tmp_path, is_trainable=True, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in again.parameters())
    assert any(p.requires_grad for p in again.parameters())
    torch.testing.assert_close(out_of(again, inputs), out, atol=1e-6, rtol=1e-6)


BF16_TOL = 2e-2  # relative to the magnitude compared: a few bf16 roundings (one is 2**-8 = 3.9e-3)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bfloat16_base_keeps_output_dtype_and_fp32_adapters(case):
    base, inputs = build(case.model)
    base = base.to(torch.bfloat16)
    if "x" in inputs:
        inputs = {"x": inputs["x"].to(torch.bfloat16)}
    model = dt.get_peft_model(base, case.config())
    randomize_adapters(model)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".adapters." in n)
    out = out_of(model, inputs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in model.named_parameters() if ".adapters." in n and p.requires_grad)
    # merging writes the fp32 delta into the bf16 weights: outputs agree within bf16 rounding, and
    # unmerging gives back the weights up to one rounding of the merged value
    tol = BF16_TOL * (1 + float(out.detach().float().abs().max()))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}
    with torch.no_grad():
        unmerged = out_of(model, inputs).float()
        model.merge_adapter(safe_merge=True)
        assert all(layer.merged for layer in adapter_layers(model))
        merged = out_of(model, inputs)
        assert merged.dtype == torch.bfloat16
        torch.testing.assert_close(merged.float(), unmerged, atol=tol, rtol=0)
        model.unmerge_adapter()
        assert not any(layer.merged for layer in adapter_layers(model))
        for n, p in model.named_parameters():
            if n in weights:
                assert p.dtype == weights[n].dtype, n
                atol = BF16_TOL * (1 + float(weights[n].float().abs().max()))
                torch.testing.assert_close(p.float(), weights[n].float(), atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(out_of(model, inputs).float(), unmerged, atol=tol, rtol=0)
    no_cast = dt.get_peft_model(build(case.model)[0].to(torch.bfloat16), case.config(), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for n, p in no_cast.named_parameters() if ".adapters." in n)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_safe_merge_refuses_nan_without_touching_weights(case):
    model, inputs, _ = trained(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if ".adapters." in n).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)
    after = model.state_dict()
    for k, v in before.items():
        if ".adapters." not in k:
            assert torch.equal(after[k], v), k
    assert not any(layer.merged for layer in adapter_layers(model))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_failed_load_leaves_the_model_untouched(case, tmp_path):
    model, inputs, _ = trained(case)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base, _ = build(case.model)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    expected = out_of(base, inputs)
    with pytest.raises(dt.CheckpointError, match=f"shape mismatch for {key}"):
        dt.PeftModel.from_pretrained(base, tmp_path)
    assert set(base.state_dict()) == set(reference)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in reference.items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads
    assert not hasattr(base, "peft_config")
    torch.testing.assert_close(out_of(base, inputs), expected)
    # the same through load_adapter on a live model whose adapter trains no bias (so the rule of one
    # adapter with bias lets the load through), loaded for training: the refusal comes after the new
    # adapter was injected, and the live model is exactly as before
    live = dt.get_peft_model(build(case.model)[0], second_config(case))
    randomize_adapters(live, seed=4)
    before = live_state(live, inputs)
    layer = re.escape(key.rsplit(".", 1)[0])  # the tensor may be renamed (Bone reads MiSS files)
    with pytest.raises(dt.CheckpointError, match=rf"shape mismatch for {layer}\.\w+: checkpoint \(3, 3\)"):
        live.load_adapter(tmp_path, adapter_name="broken", is_trainable=True)
    assert_unchanged(live_state(live, inputs), before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_failure_after_injection_is_rolled_back(case, tmp_path, monkeypatch):
    """A load that fails once the new adapter is in place (layers wrapped, biases made trainable,
    modules_to_save copied) gives the live model back exactly as it was."""
    model, inputs, _ = trained(case)
    model.save_pretrained(tmp_path)
    live = dt.get_peft_model(build(case.model)[0], second_config(case))
    randomize_adapters(live, seed=4)
    before = live_state(live, inputs)
    seen = {}

    def fail(self, *args, **kwargs):
        seen["adapters"] = set(self.peft_config)
        seen["keys"] = set(self.state_dict())
        seen["trainable"] = {n for n, p in self.named_parameters() if p.requires_grad}
        raise RuntimeError("injected failure")

    monkeypatch.setattr(dt.PeftModel, "_load_weights", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        live.load_adapter(tmp_path, adapter_name="incoming", is_trainable=True)
    # the failure came after the injection: there was something to take back
    assert seen["adapters"] == {"default", "incoming"}
    assert any(".adapters.incoming." in k for k in seen["keys"])
    config = case.config()
    if config.bias != "none":
        assert any(n.endswith(".bias") for n in seen["trainable"] - before["trainable"])
    if config.modules_to_save:
        assert any(".modules_to_save.incoming." in k for k in seen["keys"])
    assert_unchanged(live_state(live, inputs), before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_name_makes_no_difference(case):
    a, inputs, _ = make(case)
    b, _, _ = make(case, adapter_name="custom")
    randomize_adapters(a)
    randomize_adapters(b)
    assert any(".custom." in n for n, _ in b.named_parameters())
    torch.testing.assert_close(out_of(a, inputs), out_of(b, inputs))
    ka = dt.get_peft_model_state_dict(a.base_model, "default")
    kb = dt.get_peft_model_state_dict(b.base_model, "custom")
    assert ka.keys() == kb.keys()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inference_path_follows_every_parameter_change(case):
    model, inputs, _ = trained(case)
    with torch.no_grad():
        first = out_of(model, inputs)  # may build an inference cache
    torch.testing.assert_close(first, out_of(model, inputs), atol=1e-5, rtol=1e-5)  # grad path, no cache
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.mul_(1.5)
        cached = out_of(model, inputs)
    torch.testing.assert_close(cached, out_of(model, inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached, first, atol=1e-6)
