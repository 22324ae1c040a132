"""PEFT's module-selection rules (core/targeting.py), checked on small models."""

from __future__ import annotations

import pytest
import torch.nn as nn

import deltatune as dt
from deltatune.core.targeting import select_targets
from models import MLP, DeepMLP, tiny_bert_cls, tiny_gpt2, tiny_llama


def targets(model, **config):
    config.setdefault("r", 2)
    return select_targets(model, dt.BoneConfig(**config), lambda m: isinstance(m, dt.AdapterLayer), None).targets


def test_list_matches_exact_names_and_dotted_suffixes_only():
    model = DeepMLP()
    assert targets(model, target_modules=["proj"]) == ["layers.0.proj", "layers.1.proj", "layers.2.proj"]
    assert targets(model, target_modules=["layers.1.proj", "head"]) == ["layers.1.proj", "head"]
    with pytest.raises(dt.NoMatchingModuleError, match="not found in the base model"):
        targets(model, target_modules=["roj"])  # a suffix must start at a dot


def test_string_is_a_full_regex_match():
    model = MLP()
    with pytest.raises(dt.NoMatchingModuleError):
        targets(model, target_modules="lin")
    assert targets(model, target_modules="lin.*") == ["lin0", "lin1"]
    assert targets(model, target_modules=r"lin[1]") == ["lin1"]


def test_layers_to_transform_and_pattern():
    model = DeepMLP(n=3)
    assert targets(model, target_modules=["proj"], layers_to_transform=[0, 2], layers_pattern="layers") == ["layers.0.proj", "layers.2.proj"]
    # without a pattern PEFT needs a dotted component before "<name>.<index>." (as in "model.layers.0.")
    llama = tiny_llama(layers=2)
    found = targets(llama, target_modules=["q_proj"], layers_to_transform=[1])
    assert found == ["model.layers.1.self_attn.q_proj"]
    assert targets(model, target_modules=["proj"], layers_to_transform=1, layers_pattern="layers") == ["layers.1.proj"]
    assert targets(model, target_modules=["proj"], layers_to_transform=[]) == ["layers.0.proj", "layers.1.proj", "layers.2.proj"]
    with pytest.raises(dt.NoMatchingModuleError, match="layers_to_transform"):
        targets(model, target_modules=["proj"], layers_to_transform=[0])
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str."):
        dt.BoneConfig(target_modules="proj", layers_to_transform=[0])


def test_exclude_modules_list_and_regex():
    model = DeepMLP()
    assert targets(model, target_modules=["proj", "out"], exclude_modules=["out"]) == [f"layers.{i}.proj" for i in range(3)]
    assert targets(model, target_modules=["proj"], exclude_modules="layers\\.[01]\\.proj") == ["layers.2.proj"]
    with pytest.raises(dt.NoMatchingModuleError, match="All modules were excluded"):
        targets(model, target_modules=["proj"], exclude_modules=["proj"])


def test_modules_to_save_are_never_targeted_and_match_on_a_dot_boundary():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre_classifier = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

        def forward(self, x):
            return self.classifier(self.pre_classifier(x))

    model = dt.get_peft_model(Heads(), dt.BoneConfig(r=2, target_modules=["pre_classifier"], modules_to_save=["classifier"]))
    inner = model.base_model.model
    assert isinstance(inner.classifier, dt.ModulesToSaveWrapper)
    assert isinstance(inner.pre_classifier, dt.AdapterLayer)  # PEFT's bare suffix match would have wrapped it too
    with pytest.raises(dt.NoMatchingModuleError, match="All modules were excluded"):
        targets(Heads(), target_modules=["classifier"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="match no module"):
        dt.get_peft_model(Heads(), dt.BoneConfig(r=2, target_modules=["pre_classifier"], modules_to_save=["nothere"]))


def test_all_linear_skips_the_output_embedding_and_is_saved_explicitly():
    model = tiny_llama()
    config = dt.BoneConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = dt.get_peft_model(model, config)
    assert "lm_head" not in config.target_modules
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= {t.split(".")[-1] for t in config.target_modules}
    assert not isinstance(peft_model.base_model.model.lm_head, dt.AdapterLayer)


def test_all_linear_on_gpt2_takes_conv1d_and_on_seq_cls_skips_the_head():
    found = targets(tiny_gpt2(), target_modules="all-linear")
    assert "transformer.h.0.attn.c_attn" in found and "lm_head" not in found
    bert = tiny_bert_cls()
    found = select_targets(bert, dt.BoneConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"),
                           lambda m: isinstance(m, dt.AdapterLayer), None).targets
    assert "classifier" not in found and "bert.encoder.layer.0.attention.self.query" in found


def test_default_targets_per_architecture():
    model = dt.get_peft_model(tiny_llama(), dt.BoneConfig(r=4, task_type="CAUSAL_LM"))
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="Please specify `target_modules` in `peft_config`"):
        dt.get_peft_model(MLP(), dt.BoneConfig(r=2))


def test_unsupported_layer_type_names_the_module_and_leaves_the_model_alone():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 4)

    model = WithEmbedding()
    with pytest.raises(dt.UnsupportedModuleError, match="'emb' \\(Embedding\\) is not supported"):
        dt.get_peft_model(model, dt.BoneConfig(r=2, target_modules=["lin", "emb"]))
    assert isinstance(model.lin, nn.Linear) and not isinstance(model.lin, dt.AdapterLayer)
    assert all(p.requires_grad for p in model.parameters())


def test_bias_modes_decide_what_trains():
    def trainable(bias):
        model = dt.get_peft_model(MLP(), dt.BoneConfig(r=2, target_modules=["lin0"], bias=bias))
        return sorted(n for n, p in model.named_parameters() if p.requires_grad)

    assert trainable("none") == ["base_model.model.lin0.adapters.default.bone_block"]
    assert "base_model.model.lin0.base_layer.bias" in trainable("bone_only")
    assert "base_model.model.lin1.bias" not in trainable("bone_only")
    assert {"base_model.model.lin0.base_layer.bias", "base_model.model.lin1.bias"} <= set(trainable("all"))
    with pytest.raises(NotImplementedError, match="Requested bias: some, is not implemented."):
        dt.BoneConfig(r=2, bias="some")
