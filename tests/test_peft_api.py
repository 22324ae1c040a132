"""PEFT's helper API and behaviour, checked against peft 0.21.2 itself where both can run the same
call: enums, injection, status reports, state-dict helpers with PEFT's arguments, AutoPeftModel,
the load_adapter(is_trainable=True) and delete_adapter-keeps-merge behaviours, model cards."""

from __future__ import annotations

import dataclasses
import inspect
import json

import peft
import pytest
import torch

import deltatune as dt
from deltatune.peft_model import PeftMixedModel
from conftest import build, out_of
from models import randomize_adapters, tiny_llama, token_input

HELPERS = [
    "inject_adapter_in_model", "get_model_status", "get_layer_status", "load_peft_weights", "get_peft_config",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "get_peft_model", "get_base_model_state_dict",
    "set_base_model_state_dict",
]


@pytest.mark.parametrize("name", HELPERS)
def test_helpers_have_peft_signatures(name):
    ours = inspect.signature(getattr(dt, name)).parameters
    theirs = inspect.signature(getattr(peft, name)).parameters
    assert list(ours) == list(theirs)
    assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]


def test_enums_behave_like_peft():
    assert {t.value for t in dt.TaskType} == {t.value for t in peft.TaskType}
    assert {t.value for t in peft.PeftType} <= {t.value for t in dt.PeftType}
    config = dt.FourierFTConfig(task_type=dt.TaskType.CAUSAL_LM)
    assert config.peft_type == "FOURIERFT" and config.peft_type.value == "FOURIERFT"
    assert config.peft_type is dt.PeftType.FOURIERFT and config.task_type == peft.TaskType.CAUSAL_LM
    assert f"{config.peft_type}" == "FOURIERFT" and json.loads(config.to_json_string())["peft_type"] == "FOURIERFT"
    assert dt.RandLoraConfig(peft_type="test").peft_type == "RANDLORA"  # PEFT overrides it too
    assert dt.RandLoraConfig(randlora_alpha=640.0).randlora_alpha == peft.RandLoraConfig(randlora_alpha=640.0).randlora_alpha
    assert dt.MissConfig().is_prompt_learning is peft.MissConfig().is_prompt_learning is False


def test_config_files_as_peft(tmp_path):
    peft.MissConfig(r=4, target_modules=["lin0"]).save_pretrained(tmp_path)
    assert dt.PeftConfig.from_json_file(tmp_path / "adapter_config.json") == peft.PeftConfig.from_json_file(
        str(tmp_path / "adapter_config.json"))
    assert isinstance(dt.PeftConfig.from_pretrained(tmp_path), dt.MissConfig)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    del data["peft_type"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(TypeError, match=r"The MissConfig config that is trying to be loaded is missing required keys: \{'peft_type'\}"):
        dt.MissConfig.from_pretrained(tmp_path)
    config = dt.get_peft_config({"peft_type": "FOURIERFT", "n_frequency": 7})
    assert isinstance(config, dt.FourierFTConfig) and config.n_frequency == 7


def test_inject_adapter_in_model_matches_peft():
    config = dict(r=4, target_modules=["lin0"])
    ours = dt.inject_adapter_in_model(dt.MissConfig(**config), build("mlp")[0])
    theirs = peft.inject_adapter_in_model(peft.MissConfig(**config), build("mlp")[0])
    assert type(ours).__name__ == type(theirs).__name__ == "MLP"
    our_sd, their_sd = dt.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert sorted(our_sd) == sorted(their_sd) == ["lin0.miss_block"]
    with torch.no_grad():
        their_sd = {k: torch.randn_like(v) for k, v in their_sd.items()}
    result = dt.set_peft_model_state_dict(ours, their_sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    peft.set_peft_model_state_dict(theirs, their_sd)
    x = build("mlp")[1]["x"]
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    status = dt.get_model_status(ours)
    assert status.peft_types == {"default": "MISS"} and status.num_adapter_layers == 1


def test_state_dict_helpers_take_peft_arguments():
    model = dt.get_peft_model(build("mlp")[0], dt.MissConfig(r=2, target_modules=["lin0", "lin1"]))
    randomize_adapters(model, seed=1)
    live = dt.get_peft_model_state_dict(model)
    from_sd = dt.get_peft_model_state_dict(model, state_dict=model.state_dict(), adapter_name="default",
                                           unwrap_compiled=True)
    assert live.keys() == from_sd.keys() and all(torch.equal(live[k], from_sd[k]) for k in live)
    part = {k: v for k, v in live.items() if "lin0" in k}
    part["base_model.model.nowhere.miss_block"] = torch.zeros(1)
    result = dt.set_peft_model_state_dict(model, part, adapter_name="default")
    assert result.missing_keys == ["base_model.model.lin1.miss_block"]
    assert result.unexpected_keys == ["base_model.model.nowhere.miss_block"]
    wrong = {"base_model.model.lin0.miss_block": torch.zeros(3, 20)}
    with pytest.raises(dt.CheckpointError, match="shape mismatch for base_model.model.lin0.miss_block"):
        dt.set_peft_model_state_dict(model, wrong)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes=True"):
        dt.set_peft_model_state_dict(model, wrong, ignore_mismatched_sizes=True)
    assert torch.equal(model.base_model.model.lin0.adapters["default"].miss_block, live["base_model.model.lin0.miss_block"])


def test_base_model_state_dict_round_trip():
    model = dt.get_peft_model(build("mlp")[0], dt.MissConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"]))
    plain = build("mlp")[0].state_dict()
    got = dt.get_base_model_state_dict(model)
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
    new = {k: v + 1 for k, v in plain.items()}
    assert dt.set_base_model_state_dict(model, new) == ([], [])
    assert torch.equal(model.base_model.model.lin0.base_layer.weight, new["lin0.weight"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dt.set_base_model_state_dict(model, {**new, "extra": torch.zeros(1)})


def test_status_reports_match_peft():
    def make(lib):
        model = lib.get_peft_model(build("mlp")[0], lib.MissConfig(r=2, target_modules=["lin0", "lin1"]))
        model.add_adapter("other", lib.MissConfig(r=2, target_modules=["lin1"]))
        return model

    ours, theirs = make(dt), make(peft)
    for model in (ours, theirs):  # one layer merged: "irregular" in both
        model.base_model.model.lin1.merge(adapter_names=["default"])
    a, b = dt.get_model_status(ours), peft.get_model_status(theirs)
    for field in ("base_model_type", "peft_types", "trainable_params", "total_params", "num_adapter_layers",
                  "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"):
        assert getattr(a, field) == getattr(b, field), field
    layers_a = {s.name: s for s in dt.get_layer_status(ours)}
    layers_b = {s.name: s for s in peft.get_layer_status(theirs)}
    assert layers_a.keys() == layers_b.keys()
    for key in layers_a:
        for field in ("enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters"):
            assert getattr(layers_a[key], field) == getattr(layers_b[key], field), (key, field)
    with pytest.raises(ValueError, match="No adapter layers found"):
        dt.get_layer_status(build("mlp")[0])


def test_peft_model_properties_and_errors(tmp_path):
    model = dt.get_peft_model(build("mlp")[0], dt.MissConfig(r=2, target_modules=["lin0"]))
    assert model.active_peft_config is model.peft_config["default"] and model.has_active_enabled_adapter
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
    with pytest.raises(AttributeError, match="'PeftModel' object has no attribute 'no_such_thing'"):
        model.no_such_thing
    with pytest.raises(RuntimeError, match="offline"):
        model.push_to_hub("someone/some-adapter")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- \"miss\"" in card and '"r": 2' in card
    assert "PeftModel.from_pretrained" in card


def test_load_adapter_trainable_at_once_and_delete_keeps_merge(tmp_path):
    config = dict(r=2, target_modules=["lin0"], modules_to_save=["lin1"])
    first = dt.get_peft_model(build("mlp")[0], dt.MissConfig(**config))
    randomize_adapters(first, seed=4)
    first.save_pretrained(tmp_path)
    for lib in (dt, peft):
        model = lib.get_peft_model(build("mlp")[0], lib.MissConfig(**config))
        model.load_adapter(str(tmp_path), "other", is_trainable=True)
        grads = {n: p.requires_grad for n, p in model.named_parameters() if ".other" in n or "other." in n}
        assert grads and all(grads.values()), (lib.__name__, grads)
        assert model.active_adapters == ["default"]
    # delete an inactive adapter while the active one is merged: the merge stays (PEFT too)
    results = {}
    for lib in (dt, peft):
        model = lib.get_peft_model(build("mlp")[0], lib.MissConfig(r=2, target_modules=["lin0"], init_weights=False), "a0")
        model.add_adapter("a1", lib.MissConfig(r=2, target_modules=["lin0"], init_weights=False))
        model.set_adapter("a1")
        model.merge_adapter()
        model.delete_adapter("a0")
        results[lib.__name__] = (model.base_model.model.lin0.merged, list(model.base_model.model.lin0.merged_adapters))
    assert results["deltatune"] == results["peft"] == (True, ["a1"])


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = dt.get_peft_model(base, dt.FourierFTConfig(n_frequency=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    randomize_adapters(model, seed=2)
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    ids = token_input()
    expected = model.eval()(input_ids=ids).logits
    for cls in (dt.AutoPeftModelForCausalLM, dt.AutoPeftModel):
        loaded = cls.from_pretrained(tmp_path / "adapter")
        assert isinstance(loaded, dt.PeftModelForCausalLM)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    with pytest.raises(ValueError, match="Expected target PEFT class: PeftModelForSequenceClassification"):
        dt.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")


def test_config_dataclasses_replace():
    config = dt.MissConfig(r=4)
    assert dataclasses.replace(config, r=8).r == 8


@pytest.mark.parametrize("method,width,other_width", [("fourierft", 12, 14), ("randlora", 20, 24)])
def test_adapter_for_other_layer_shapes_is_refused(method, width, other_width, tmp_path):
    import torch.nn as nn

    def mlp(width: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 4))

    def config():
        if method == "fourierft":
            return dt.FourierFTConfig(n_frequency=6, target_modules=["0"])
        return dt.RandLoraConfig(r=4, target_modules=["0"], save_projection=False)

    model = dt.get_peft_model(mlp(width), config())
    randomize_adapters(model, seed=3)
    model.save_pretrained(tmp_path)
    # same tensor shapes, other layer shape: the file alone cannot tell
    other = dt.get_peft_model(mlp(other_width), config())
    assert {k: v.shape for k, v in dt.get_peft_model_state_dict(other).items()} == {
        k: v.shape for k, v in dt.get_peft_model_state_dict(model).items()}
    with pytest.raises(dt.CheckpointError, match=rf"base_model.model.0: made for \(16, {width}\), this model's is \(16, {other_width}\)"):
        dt.PeftModel.from_pretrained(mlp(other_width), tmp_path)
    loaded = dt.PeftModel.from_pretrained(mlp(width), tmp_path)  # the right shapes load
    x = torch.randn(3, width)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def _adalora_folders(tmp_path):
    """Two trained-looking AdaLoRA adapters saved by PEFT, on different layers."""
    folders = []
    for i, target in enumerate(["lin0", "lin1"]):
        torch.manual_seed(10 + i)
        config = peft.AdaLoraConfig(target_modules=[target], init_lora_weights=False, total_step=1, init_r=4, target_r=2)
        model = peft.get_peft_model(build("mlp")[0], config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_E" in name:
                    p.copy_(torch.randn_like(p))
        model.save_pretrained(tmp_path / f"a{i}")
        folders.append(tmp_path / f"a{i}")
    return folders


def test_mixed_model_matches_peft(tmp_path):
    folders = _adalora_folders(tmp_path)
    inputs = build("mlp")[1]
    outs = {}
    for lib in (peft, dt):
        cls = peft.PeftMixedModel if lib is peft else PeftMixedModel
        mixed = cls.from_pretrained(build("mlp")[0], folders[0], adapter_name="a0")
        mixed.load_adapter(folders[1], adapter_name="a1")
        assert mixed.active_adapters == ["a0"]  # a loaded adapter is not activated
        first = out_of(mixed, inputs)
        mixed.set_adapter(["a1", "a0"])
        both = out_of(mixed, inputs)
        with mixed.disable_adapter():
            base = out_of(mixed, inputs)
        outs[lib.__name__] = (first, both, base)
    for ours, theirs in zip(outs["deltatune"], outs["peft"]):
        torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(outs["deltatune"][0], outs["deltatune"][1])


def test_get_peft_model_mixed(tmp_path):
    base = build("mlp")[0]
    x = build("mlp")[1]
    reference = out_of(base, x)
    config = dt.AdaLoraConfig(target_modules=["lin0"], init_lora_weights=False, total_step=1)
    mixed = dt.get_peft_model(base, config, mixed=True)
    assert type(mixed).__name__ == "PeftMixedModel" and mixed.active_adapters == ["default"]
    # two trainable AdaLoRA adapters are allowed in a mixed model (AdaLoraModel refuses a second)
    mixed.add_adapter("other", dt.AdaLoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, total_step=1))
    with pytest.raises(ValueError, match="already exists"):
        mixed.add_adapter("other", dt.AdaLoraConfig(target_modules=["lin1"], total_step=1))
    mixed.set_adapter(["default", "other"])
    both = out_of(mixed, x)
    assert not torch.allclose(both, reference)
    trainable = {n for n, p in mixed.named_parameters() if p.requires_grad}
    assert any(".default" in n for n in trainable) and any(".other" in n for n in trainable)
    with pytest.raises(ValueError, match=r"\['nope'\] not found"):
        mixed.set_adapter(["default", "nope"])
    with pytest.raises(NotImplementedError, match="Saving is not supported"):
        mixed.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="get_layer_status is not supported"):
        mixed.get_layer_status()
    for other in (dt.FourierFTConfig(target_modules=["lin0"]), dt.MissConfig(target_modules=["lin0"])):
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            mixed.add_adapter("x", other)
        with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
            dt.get_peft_model(build("mlp")[0], other, mixed=True)
    merged = mixed.merge_and_unload()
    torch.testing.assert_close(out_of(merged, x), both)


@pytest.mark.parametrize("method", ["FourierFTConfig", "MissConfig"])
def test_adding_a_frozen_adapter_keeps_the_others_trainable(method, tmp_path):
    # PEFT's test_loading_model_requires_grad_set_correctly: load_adapter(is_trainable=False) sets only
    # the new adapter's flags
    config = {"target_modules": ["lin0"], **({"n_frequency": 4} if method == "FourierFTConfig" else {"r": 2})}
    dt.get_peft_model(build("mlp")[0], getattr(dt, method)(**config)).save_pretrained(tmp_path)
    trainable = {}
    for lib in (peft, dt):
        model = lib.PeftModel.from_pretrained(build("mlp")[0], tmp_path, is_trainable=True)
        model.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
        model.load_adapter(tmp_path, adapter_name="opposite", is_trainable=False)
        trainable[lib.__name__] = {a for a in ("default", "other", "opposite")
                                   if any(f".{a}" in n for n, p in model.named_parameters() if p.requires_grad)}
    assert trainable["deltatune"] == trainable["peft"] == {"default", "other"}


@pytest.mark.parametrize("bias", ["all", "fourierft_only"])
def test_set_state_dict_loads_base_biases_it_holds_as_peft_does(bias):
    """A state dict saved with trained biases loads them into a model whose config trains none, in
    both libraries (PEFT loads every key that names a model tensor)."""
    from models import MLP, mlp_input

    x, results = mlp_input(), {}
    for lib in (dt, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(MLP(), lib.FourierFTConfig(n_frequency=8, target_modules=["lin0"], bias=bias,
                                                              init_weights=False)).eval()
        with torch.no_grad():
            model.base_model.model.lin0.base_layer.bias.fill_(1.23)
            if bias == "all":  # every bias trains (and is saved); with "_only" those of adapted layers
                model.base_model.model.lin1.bias.fill_(-0.5)
        before = model(x)
        state = lib.get_peft_model_state_dict(model)
        torch.manual_seed(0)
        fresh = lib.get_peft_model(MLP(), lib.FourierFTConfig(n_frequency=8, target_modules=["lin0"])).eval()
        assert not torch.allclose(fresh(x), before)
        result = lib.set_peft_model_state_dict(fresh, state)
        results[lib.__name__] = (torch.allclose(fresh(x), before), sorted(result.unexpected_keys))
    assert results["deltatune"] == results["peft"] == (True, [])
