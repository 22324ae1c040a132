"""AdaLoRA: config rules, the SVD delta's maths, rank_pattern save/load, the regulariser, and the
ways the allocator runs (by hand, after each optimizer step, inside transformers' Trainer)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import peft  # noqa: E402  (a pinned test dependency: imported, never skipped)

import deltatune as dt
from deltatune.integrations.adalora import attach_optimizer, detach_optimizer, optimizer_attached
from deltatune.methods._adalora_alloc import orthogonal_regularization as reference_orth_reg
from models import MLP, mlp_input, tiny_gpt2, tiny_llama, token_input

SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)


def _config(**kw):
    return dt.AdaLoraConfig(**{**SCHEDULE, **kw})


def _llama_model(**kw):
    return dt.get_peft_model(tiny_llama(), _config(task_type="CAUSAL_LM", **kw))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 8), generator=g) for _ in range(n)]


def _mlp():
    torch.manual_seed(0)
    return MLP().eval()


def _fill(model, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("total_step,tinit,tfinal", [(100, 0, 0), (100, 10, 10), (100, 79, 20), (100, 80, 19)])
def test_valid_schedules(total_step, tinit, tfinal):
    config = dt.AdaLoraConfig(total_step=total_step, tinit=tinit, tfinal=tfinal)
    assert (config.total_step, config.tinit, config.tfinal) == (total_step, tinit, tfinal)


@pytest.mark.parametrize(
    "total_step,tinit,tfinal",
    [(100, 20, 80), (100, 80, 20), (10, 20, 0), (10, 0, 10), (10, 10, 0), (10, 20, 20), (10, 0, 20)],
)
def test_schedules_without_budgeting_phase_raise_peft_message(total_step, tinit, tfinal):
    with pytest.raises(ValueError, match="The supplied schedule values don't allow for a budgeting phase"):
        dt.AdaLoraConfig(total_step=total_step, tinit=tinit, tfinal=tfinal)


def test_config_messages_match_peft():
    for total_step in (None, 0, -3):
        with pytest.raises(ValueError, match="AdaLoRA does not work when `total_step` is None, supply a value > 0."):
            dt.AdaLoraConfig(total_step=total_step)
    with pytest.raises(ValueError, match="`orth_reg_weight` should be greater than or equal to 0, but the value passed is -0.1"):
        dt.AdaLoraConfig(total_step=5, orth_reg_weight=-0.1)
    with pytest.raises(ValueError, match="`init_r` should be a positive integer or 0"):
        dt.AdaLoraConfig(total_step=5, init_r=-1)
    with pytest.raises(ValueError, match="deltaT"):
        dt.AdaLoraConfig(total_step=5, deltaT=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        dt.AdaLoraConfig(total_step=5, rank_pattern={"lin0.lora_E": "yes"})
    assert dt.AdaLoraConfig(total_step=5, target_modules=["a", "b"]).target_modules == {"a", "b"}


def test_allocator_only_values_are_checked_for_the_trainable_adapter():
    # PEFT crashes at its first pruning step (init_r == target_r) or asserts (betas): clear errors here
    with pytest.raises(ValueError, match="init_r > target_r"):
        dt.get_peft_model(_mlp(), dt.AdaLoraConfig(total_step=5, init_r=4, target_r=4, target_modules=["lin0"]))
    for beta in ({"beta1": 1.0}, {"beta2": 0.0}, {"beta1": -0.5}):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            dt.get_peft_model(_mlp(), dt.AdaLoraConfig(total_step=5, target_modules=["lin0"], **beta))
    # an adapter loaded for inference never allocates: such values are accepted
    model = dt.get_peft_model(_mlp(), dt.AdaLoraConfig(total_step=5, init_r=4, target_r=4, beta1=1.0,
                                                       target_modules=["lin0"], inference_mode=True))
    assert model.base_model.trainable_adapter_name is None
    assert not any(p.requires_grad for p in model.parameters())


def _peft_style(**overrides):
    data = {"peft_type": "ADALORA", "total_step": 10, "target_modules": ["lin0"], "r": 8, "use_rslora": False,
            "alpha_pattern": {}, "loftq_config": {}, "use_dora": False, "layer_replication": None, "lora_bias": False,
            "megatron_core": "megatron.core", "rank_pattern": None}
    data.update(overrides)
    return data


def _peft_file(tmp_path, **overrides):
    """An adapter_config.json written by PEFT 0.21.2 itself (every LoRA field present)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=["lin0"], **overrides)
    config.save_pretrained(str(tmp_path))
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_peft_lora_fields_at_defaults_load_silently(tmp_path):
    written = _peft_file(tmp_path)
    assert {"r", "lora_alpha", "use_rslora", "layers_to_transform", "lora_bias", "use_qalora", "loftq_config",
            "ensure_weight_tying", "trainable_token_indices"} <= set(written)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = dt.PeftConfig.from_pretrained(str(tmp_path))
        from_dict = dt.PeftConfig.from_peft_type(**_peft_style())
    assert isinstance(config, dt.AdaLoraConfig) and config.rank_pattern is None and from_dict.rank_pattern is None
    assert (config.init_r, config.target_r, config.r, config.use_rslora) == (4, 2, 8, False)
    # the files written here stay as they were: LoRA fields at their defaults are left out
    assert "r" not in config.to_dict() and "use_dora" not in config.to_dict() and "loftq_config" not in config.to_dict()
    model = dt.get_peft_model(_mlp(), config)
    assert model.base_model.triplets()["lin0"][0].shape == (4, 10)


def test_r_is_accepted_with_a_warning_and_ignored(tmp_path):
    with pytest.warns(UserWarning, match=r"ignores r=10.*`init_r`"):
        config = dt.AdaLoraConfig(r=10, init_r=4, target_r=2, total_step=10, target_modules=["lin0"])
    assert config.r == 10 and config.to_dict()["r"] == 10  # written like PEFT writes it
    with pytest.warns(UserWarning, match="ignores r=16"):
        replaced = dataclasses.replace(config, r=16)
    assert replaced.r == 16 and replaced.init_r == 4
    model = dt.get_peft_model(_mlp(), config)
    assert model.base_model.triplets()["lin0"][0].shape == (4, 10)  # the rank is init_r
    with pytest.warns(UserWarning, match="ignores r=12"):  # PEFT's own file with r set loads too
        loaded = dt.PeftConfig.from_peft_type(**_peft_file(tmp_path, r=12))
    assert loaded.r == 12 and loaded.init_r == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(dt.AdaLoraConfig(total_step=10), total_step=20).total_step == 20


@pytest.mark.parametrize("kw", [dict(use_dora=True), dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})])
def test_dora_and_loftq_are_refused_as_in_peft(kw):
    with pytest.raises(ValueError, match="use_dora" if "use_dora" in kw else "LoftQ"):
        dt.AdaLoraConfig(total_step=10, **kw)
    with pytest.raises(ValueError):  # PEFT refuses the same configs
        peft.AdaLoraConfig(total_step=10, **kw)
    with pytest.raises(ValueError, match="use_dora" if "use_dora" in kw else "LoftQ"):
        dt.PeftConfig.from_peft_type(**_peft_style(**kw))


def test_loftq_config_without_loftq_init_is_dropped_as_in_peft():
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        config = dt.AdaLoraConfig(total_step=10, loftq_config={"loftq_bits": 4})
    with pytest.warns(UserWarning, match="will be ignored"):
        theirs = peft.AdaLoraConfig(total_step=10, loftq_config={"loftq_bits": 4})
    assert config.loftq_config == theirs.loftq_config == {}


@pytest.mark.parametrize(
    "field,value,outcome",
    [
        ("r", 16, "ignores r=16"),
        ("use_rslora", True, "ignores use_rslora=True"),
        ("lora_bias", True, "ignores lora_bias=True"),
        ("use_qalora", True, "ignores use_qalora=True"),
        ("alpha_pattern", {"lin0": 4}, "ignores alpha_pattern=.*"),
        ("layer_replication", [[0, 1]], ValueError("layer_replication")),
        ("target_parameters", ["lin0.weight"], ValueError("target_parameters")),
        ("trainable_token_indices", [1, 2], ValueError("trainable_token_indices")),
    ],
)
def test_peft_lora_fields_off_default(field, value, outcome):
    for build in (lambda: dt.PeftConfig.from_peft_type(**_peft_style(**{field: value})),
                  lambda: dt.AdaLoraConfig(total_step=10, **{field: value})):
        if isinstance(outcome, Exception):
            with pytest.raises(ValueError, match=str(outcome)):
                build()
        else:
            with pytest.warns(UserWarning, match=outcome):
                assert getattr(build(), field) == value


def test_lora_field_types_are_checked():
    with pytest.raises(ValueError, match="`r` must be an int"):
        dt.AdaLoraConfig(total_step=10, r="8")
    with pytest.raises(ValueError, match="use_rslora"):
        dt.AdaLoraConfig(total_step=10, use_rslora="yes")


# ----------------------------------------------------------------------------- the delta's maths


def _set_triplets(model, seed=0):
    _fill(model, seed)
    return {path: tuple(t.detach().clone() for t in trip) for path, trip in model.base_model.triplets().items()}


def test_linear_delta_follows_the_svd_equation():
    base = _mlp()
    reference = copy.deepcopy(base)
    model = dt.get_peft_model(base, dt.AdaLoraConfig(total_step=5, init_r=3, target_r=1, lora_alpha=6,
                                                     target_modules=["lin0"]))
    a, e, b = _set_triplets(model)["lin0"]
    delta = b @ (a * e) * 6 / (3 + 1e-5)  # ΔW = B (A ⊙ E) α / (ranknum + 1e-5), ranknum = init_r
    x = mlp_input()
    hidden = F.linear(x, reference.lin0.weight + delta, reference.lin0.bias)
    expected = reference.lin1(torch.relu(hidden))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    layer = model.base_model.model.lin0
    assert layer.adapters["default"].ranknum.item() == 3.0
    assert "ranknum" not in str(dt.get_peft_model_state_dict(model.base_model).keys())
    assert not any("ranknum" in n for n, _ in model.named_parameters())


def test_conv1d_delta_is_transposed_into_the_stored_weight():
    base = tiny_gpt2()
    reference = copy.deepcopy(base)
    model = dt.get_peft_model(base, dt.AdaLoraConfig(total_step=5, init_r=3, target_r=1, target_modules=["c_fc"]))
    trips = _set_triplets(model, seed=1)
    with torch.no_grad():
        for path, (a, e, b) in trips.items():
            w = reference.get_submodule(path).weight  # (in, out)
            w += (b @ (a * e) * 8 / (3 + 1e-5)).T
    ids = token_input()
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv_kw", [{}, {"groups": 2, "padding": 1, "padding_mode": "reflect", "stride": 2}])
def test_conv2d_delta_reshapes_to_the_kernel(conv_kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, **conv_kw))
    reference = copy.deepcopy(base)
    model = dt.get_peft_model(base, dt.AdaLoraConfig(total_step=5, init_r=3, target_r=1, target_modules=["0"]))
    a, e, b = _set_triplets(model, seed=2)["0"]
    assert a.shape == (3, 4 // conv_kw.get("groups", 1) * 9)
    with torch.no_grad():
        reference[0].weight += (b @ (a * e) * 8 / (3 + 1e-5)).reshape(reference[0].weight.shape)
    x = torch.randn(2, 4, 7, 7)
    expected = reference(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_dropout_applies_to_the_adapter_input_only_in_training():
    base = _mlp()
    model = dt.get_peft_model(base, dt.AdaLoraConfig(total_step=5, init_r=3, target_r=1, lora_dropout=0.5,
                                                     target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    assert not layer.adapters["default"].training  # created in the base model's mode
    a, e, b = _set_triplets(model)["lin0"]
    x = mlp_input()
    delta = b @ (a * e) * 8 / (3 + 1e-5)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base_layer.weight + delta, layer.base_layer.bias))
    model.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, layer.base_layer(x) + dropped @ delta.T, atol=1e-5, rtol=1e-5)


def test_init_is_identity_and_randn_when_asked():
    model = dt.get_peft_model(_mlp(), dt.AdaLoraConfig(total_step=5, target_modules=["lin0"]))
    a, e, b = model.base_model.triplets()["lin0"]
    assert a.shape == (12, 10) and e.shape == (12, 1) and b.shape == (20, 12)
    assert torch.all(e == 0) and 0.005 < a.std() < 0.05 and 0.005 < b.std() < 0.05
    model = dt.get_peft_model(_mlp(), dt.AdaLoraConfig(total_step=5, target_modules=["lin0"], init_lora_weights=False))
    assert model.base_model.triplets()["lin0"][1].abs().min() > 0


def test_default_targets_are_adaloras_own_table():
    llama = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(total_step=5, task_type="CAUSAL_LM"))
    assert {k.rsplit(".", 1)[1] for k in llama.base_model.targeted_module_names} == {"q_proj", "v_proj"}
    gpt2 = dt.get_peft_model(tiny_gpt2(), dt.AdaLoraConfig(total_step=5, task_type="CAUSAL_LM"))
    assert {k.rsplit(".", 1)[1] for k in gpt2.base_model.targeted_module_names} == {"c_attn"}


def test_unsupported_layer_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="not supported"):
        dt.get_peft_model(model, dt.AdaLoraConfig(total_step=5, target_modules=["0"]))


# ----------------------------------------------------------------------------- adapters


def test_only_one_trainable_adapter():
    model = dt.get_peft_model(_mlp(), dt.AdaLoraConfig(total_step=5, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, "
                                         "set inference_mode to True for all adapters except the one you want to train."):
        model.add_adapter("other", dt.AdaLoraConfig(total_step=5, target_modules=["lin0"]))
    assert "other" not in model.peft_config
    model.add_adapter("other", dt.AdaLoraConfig(total_step=5, target_modules=["lin0"], inference_mode=True))
    assert model.base_model.trainable_adapter_name == "default"
    assert set(model.base_model.triplets()) == {"lin0"}
    with pytest.raises(TypeError, match="AdaLoraModel does not support add_weighted_adapter method."):
        model.base_model.add_weighted_adapter(["default", "other"], [1, 1], "mix")
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no trainable adapter"):
        model.base_model.update_and_allocate(0)


# ----------------------------------------------------------------------------- rank_pattern save / load


def _pruned_mlp():
    model = dt.get_peft_model(_mlp(), dt.AdaLoraConfig(total_step=5, init_r=4, target_r=1, target_modules=["lin0", "lin1"]))
    _fill(model, seed=3)
    pattern = {"lin0.lora_E.default": [True, False, True, False], "lin1.lora_E.default": [False] * 4}
    model.peft_config["default"].rank_pattern = pattern
    with torch.no_grad():
        for path, flags in (("lin0", pattern["lin0.lora_E.default"]), ("lin1", pattern["lin1.lora_E.default"])):
            model.base_model.triplets()[path][1][~torch.tensor(flags)] = 0.0
    return model, pattern


def test_rank_pattern_prunes_at_save_and_resizes_at_load(tmp_path):
    model, pattern = _pruned_mlp()
    x = mlp_input()
    expected = model(x)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    shapes = {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in saved.items()}
    assert shapes == {"lin0.lora_A": (2, 10), "lin0.lora_E": (2, 1), "lin0.lora_B": (20, 2),
                      "lin1.lora_A": (0, 20), "lin1.lora_E": (0, 1), "lin1.lora_B": (8, 0)}
    lin0 = model.base_model.triplets()["lin0"]
    keep = torch.tensor([0, 2])
    assert torch.equal(saved["base_model.model.lin0.lora_A"], lin0[0][keep])
    assert torch.equal(saved["base_model.model.lin0.lora_B"], lin0[2][:, keep])
    written = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert written == {"lin0.lora_E": pattern["lin0.lora_E.default"], "lin1.lora_E": pattern["lin1.lora_E.default"]}
    assert model.peft_config["default"].rank_pattern == pattern  # the live config is not rewritten

    loaded = dt.PeftModel.from_pretrained(_mlp(), tmp_path)
    deltas = {p: loaded.base_model.model.get_submodule(p).adapters["default"] for p in ("lin0", "lin1")}
    assert deltas["lin0"].lora_A.shape == (2, 10) and deltas["lin1"].lora_E.shape == (0, 1)
    assert deltas["lin0"].ranknum.item() == 4.0 and deltas["lin1"].ranknum.item() == 4.0  # scale stays α / init_r
    torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)
    # re-saving a resized adapter writes the same tensors
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_rank_pattern_for_an_unknown_module_is_an_error(tmp_path):
    model, _ = _pruned_mlp()
    model.peft_config["default"].rank_pattern = {"lin9.lora_E": [True] * 4}
    with pytest.raises(ValueError, match="lin9.lora_E"):
        model.save_pretrained(tmp_path)


# ----------------------------------------------------------------------------- orthogonal regulariser


def _capture_inner_loss(model):
    seen = []
    def hook(module, args, out):
        seen.append((out.loss, None if out.loss is None else out.loss.detach().clone()))

    model.get_base_model().register_forward_hook(hook)
    return seen


def test_regulariser_is_added_for_a_plain_peft_model_without_mutating_the_loss():
    base = tiny_llama()
    model = dt.get_peft_model(base, _config(orth_reg_weight=0.7, init_lora_weights=False))  # no task_type
    assert type(model) is dt.PeftModel
    seen = _capture_inner_loss(model)
    ids = _batches(1)[0]
    out = model(input_ids=ids, labels=ids)
    inner_loss, inner_value = seen[-1]
    assert torch.equal(inner_loss, inner_value)  # the model's own loss tensor was not changed in place
    reg = dt.orthogonal_regularization(model)
    assert reg.item() > 0
    torch.testing.assert_close(out.loss, inner_value + 0.7 * reg, atol=1e-6, rtol=1e-6)
    assert torch.equal(reg, reference_orth_reg(model.base_model.triplets()))
    assert torch.equal(reg, dt.orthogonal_regularization(model.base_model.triplets()))
    out.loss.backward()  # gradients reach A and B through the term
    a, e, b = model.base_model.triplets()["model.layers.0.self_attn.q_proj"]
    assert a.grad is not None and b.grad is not None
    with model.disable_adapter():  # the base model's loss, unchanged
        assert torch.equal(model(input_ids=ids, labels=ids).loss, seen[-1][1])
    assert model(input_ids=ids).loss is None


def test_no_regulariser_without_weight_or_trainable_adapter(tmp_path):
    model = dt.get_peft_model(tiny_llama(), _config(task_type="CAUSAL_LM", orth_reg_weight=0.0, init_lora_weights=False))
    seen = _capture_inner_loss(model)
    ids = _batches(1)[0]
    assert torch.equal(model(input_ids=ids, labels=ids).loss, seen[-1][1])
    model.peft_config["default"].orth_reg_weight = 0.5
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)  # inference only (PEFT raises here)
    seen = _capture_inner_loss(loaded)
    assert torch.equal(loaded(input_ids=ids, labels=ids).loss, seen[-1][1])


# ----------------------------------------------------------------------------- running the allocator


def _train(model, steps, accumulate=1, manual=True, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = _batches(8, seed=1)
    model.train()
    step = 0
    for i in range(steps * accumulate):
        ids = batches[i % len(batches)]
        (model(input_ids=ids, labels=ids).loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            if manual:
                model.base_model.update_and_allocate(step)
            opt.zero_grad()
            step += 1
    return opt


def test_attached_optimizer_counts_optimizer_steps_under_gradient_accumulation():
    torch.manual_seed(0)
    manual = _llama_model(init_lora_weights=False)
    hooked = copy.deepcopy(manual)
    steps = SCHEDULE["total_step"] + 2
    _train(manual, steps, accumulate=2)
    opt = torch.optim.SGD([p for p in hooked.parameters() if p.requires_grad], lr=0.05)
    handle = attach_optimizer(hooked, opt)
    assert optimizer_attached(hooked) and handle.attached
    batches = _batches(8, seed=1)
    hooked.train()
    for i in range(steps * 2):
        ids = batches[i % len(batches)]
        (hooked(input_ids=ids, labels=ids).loss / 2).backward()
        if i % 2 == 1:
            opt.step()
            opt.zero_grad()
    assert hooked.base_model.allocation_calls == steps == handle.step
    pattern = manual.peft_config["default"].rank_pattern
    assert pattern is not None and pattern == hooked.peft_config["default"].rank_pattern
    for (n, p), (m, q) in zip(manual.named_parameters(), hooked.named_parameters()):
        assert n == m and torch.equal(p, q), n
    handle.remove()
    assert not optimizer_attached(hooked)
    opt.step()
    assert hooked.base_model.allocation_calls == steps
    # a second attach replaces the first (one allocation per step), detach removes it
    first = attach_optimizer(hooked.base_model, opt, start_step=steps)
    with pytest.warns(UserWarning, match="already attached"):
        second = attach_optimizer(hooked, opt, start_step=steps)
    assert not first.attached and second.attached
    detach_optimizer(hooked)
    assert not second.attached and not optimizer_attached(hooked)
    with pytest.raises(TypeError, match="holds no deltatune AdaLoraModel"):
        attach_optimizer(torch.nn.Linear(2, 2), opt)


def test_schedule_budgets_and_final_phase_remasking():
    model = _llama_model(init_lora_weights=False)
    allocator = model.base_model.allocation.rank_allocator()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batches = _batches(4)
    boundary = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for step in range(boundary + 2):
        ids = batches[step % 4]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        returned = model.base_model.update_and_allocate(step)
        opt.zero_grad()
        budget, mask = allocator.budget_schedule(step)
        kept = sum(map(sum, (model.peft_config["default"].rank_pattern or {}).values()))
        if step == boundary:
            assert kept == allocator.target_bgt == 8
        elif mask and step < boundary:
            assert returned is not None and kept == budget
        else:
            assert returned is None
    # after T - F the stored pattern is re-applied every step, even to entries the optimizer moved
    pattern = model.peft_config["default"].rank_pattern
    triplets = model.base_model.triplets()
    with torch.no_grad():
        for trip in triplets.values():
            trip[1].fill_(1.0)
    model.base_model.update_and_allocate(boundary + 5)
    for key, flags in pattern.items():
        e = triplets[key.removesuffix(".lora_E.default")][1].view(-1)
        assert torch.equal(e != 0, torch.tensor(flags))


def test_final_phase_needs_a_rank_pattern_and_total_step_is_checked():
    model = _llama_model()
    with pytest.raises(RuntimeError, match="no rank_pattern"):
        model.base_model.update_and_allocate(SCHEDULE["total_step"])
    with pytest.raises(ValueError, match="budgeting phase"):
        model.base_model.set_total_step(5)
    model.base_model.set_total_step(40)
    assert model.peft_config["default"].total_step == 40
    assert model.base_model.allocation.rank_allocator().budget_schedule(3) == (15, False)  # 13 with total_step=12: read live
    with pytest.raises(ValueError, match="positive integer"):
        model.base_model.set_total_step(2.5)


def test_save_warns_when_the_model_trained_but_the_allocator_never_ran(tmp_path):
    model = _llama_model()
    _train(model, 1, manual=False)
    with pytest.warns(UserWarning, match="rank allocator never ran"):
        model.save_pretrained(tmp_path / "a")
    _train(model, 1, manual=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "b")


# ----------------------------------------------------------------------------- transformers Trainer


def test_trainer_callback_prunes_on_schedule_and_saves_adapter_checkpoints(tmp_path):
    import transformers
    from deltatune.integrations.transformers import AdaLoraCallback

    model = dt.get_peft_model(tiny_llama(), dt.AdaLoraConfig(
        task_type="CAUSAL_LM", init_r=4, target_r=2, tinit=1, tfinal=2, total_step=1000,
        target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        ids = torch.randint(0, 64, (8,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    seen = []

    class Probe(transformers.TrainerCallback):  # runs after AdaLoraCallback on the same event
        def on_optimizer_step(self, args, state, control, **kwargs):
            pattern = model.peft_config["default"].rank_pattern
            seen.append((state.global_step, None if pattern is None else sum(map(sum, pattern.values()))))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=1e-2, report_to=[], save_steps=4, logging_steps=100, use_cpu=True, disable_tqdm=True)
    with pytest.warns(UserWarning) as record:
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback(), Probe()])
        trainer.train()
    assert any("total_step=1000" in str(w.message) for w in record)
    assert not any("never ran" in str(w.message) or "above the target" in str(w.message) for w in record)

    # 16 samples / batch 2 / accumulation 2 = 4 optimizer steps per epoch, 2 epochs
    config = model.peft_config["default"]
    assert config.total_step == 8
    allocator = model.base_model.allocation.rank_allocator()
    assert [s for s, _ in seen] == list(range(8))
    for step, kept in seen:
        budget, mask = allocator.budget_schedule(step)
        if step <= config.tinit:
            assert kept is None
        elif step < 8 - config.tfinal:
            assert kept == budget, step  # masked every step (deltaT=1)
        else:
            assert kept == allocator.target_bgt == 12
    for key, flags in config.rank_pattern.items():
        e = model.base_model.triplets()[key.removesuffix(".lora_E.default")][1].view(-1)
        assert torch.all(e[~torch.tensor(flags)] == 0)

    final = tmp_path / "checkpoint-8"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {k.removesuffix(".default"): v for k, v in config.rank_pattern.items()}
    trainer_file = load_file(final / "model.safetensors")
    assert trainer_file and all(".adapters.default." in k for k in trainer_file)  # no base weights
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").exists()
    model.eval()
    ids = token_input()
    reloaded = dt.PeftModel.from_pretrained(tiny_llama(), final)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def test_callback_warns_when_the_allocator_never_ran():
    from deltatune.integrations.transformers import AdaLoraCallback

    model = _llama_model()
    callback = AdaLoraCallback()
    args = SimpleNamespace(max_steps=12, gradient_accumulation_steps=1, num_train_epochs=1, should_save=False,
                           remove_unused_columns=False)
    callback.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=12), None, model=model)
    with pytest.warns(UserWarning, match="never ran"):
        callback.on_train_end(args, SimpleNamespace(global_step=12), None)


def test_callback_restores_the_rank_pattern_when_resuming(tmp_path):
    from deltatune.integrations.transformers import AdaLoraCallback

    model = _llama_model()
    pattern = {f"model.layers.{i}.self_attn.{m}.lora_E": [True, False, True, False]
               for i in (0, 1) for m in ("q_proj", "v_proj")}
    (tmp_path / "checkpoint-11").mkdir()
    (tmp_path / "checkpoint-11" / "adapter_config.json").write_text(json.dumps({"rank_pattern": pattern}))
    args = SimpleNamespace(output_dir=str(tmp_path), max_steps=12, gradient_accumulation_steps=1, num_train_epochs=1)
    callback = AdaLoraCallback()
    with pytest.warns(UserWarning, match="rank_pattern restored"):
        callback.on_train_begin(args, SimpleNamespace(global_step=11, max_steps=12), None, model=model)
    with torch.no_grad():
        for _, e, _ in model.base_model.triplets().values():
            e.fill_(1.0)
    callback.on_optimizer_step(args, SimpleNamespace(global_step=11), None)  # final phase: re-masks E
    for _, e, _ in model.base_model.triplets().values():
        assert e.view(-1).tolist() == [1.0, 0.0, 1.0, 0.0]
