"""Configs: PEFT's field names, defaults, validation messages and JSON format."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

import deltatune as dt


def test_defaults_and_json_round_trip(tmp_path):
    config = dt.BoneConfig(target_modules=["q", "v"])
    assert (config.r, config.init_weights, config.bias, config.peft_type) == (64, True, "none", "BONE")
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "BONE" and data["target_modules"] == ["q", "v"] and data["peft_version"] == f"0.21.2@deltatune-{dt.__version__}"
    again = dt.BoneConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    generic = dt.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(generic, dt.BoneConfig)
    assert pickle.loads(pickle.dumps(config)) == config and copy.deepcopy(config) == config


def test_unknown_keys_are_dropped_with_one_warning(tmp_path):
    data = dt.BoneConfig(target_modules=["q"]).to_dict()
    data["a_field_from_the_future"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['a_field_from_the_future'\]"):
        config = dt.PeftConfig.from_pretrained(tmp_path)
    assert not hasattr(config, "a_field_from_the_future")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"r": 0}, "`r` should be a positive integer value but the value passed is 0"),
        ({"r": -3}, "`r` should be a positive integer value but the value passed is -3"),
        ({"init_weights": "mini"}, "init_weights must be True, False or 'bat'"),
        ({"task_type": "NOPE"}, "Invalid task type: 'NOPE'. Must be one of the following task types"),
        ({"target_modules": "x", "layers_pattern": "layers"}, "`layers_pattern` cannot be used when `target_modules` is a str."),
        ({"target_modules": 3}, "`target_modules` must be a string or a list of strings"),
        ({"layers_to_transform": "0"}, "`layers_to_transform` must be an int or a list of ints"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        dt.BoneConfig(**kwargs)


def test_bad_config_files_get_one_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        dt.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match=r"missing required keys: \{'peft_type'\}"):
        dt.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="Unknown peft_type 'LORA'"):
        dt.PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        dt.PeftConfig.from_pretrained(tmp_path / "missing")


def test_hub_ids_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local folder.*Hugging Face Hub"):
        dt.PeftConfig.from_pretrained("someone/some-adapter")
