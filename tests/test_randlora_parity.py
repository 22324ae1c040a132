"""RandLoRA against the real PEFT 0.21.2: same bases, outputs and gradients; checkpoints crossing
both ways with save_projection True and False; bases stored once."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from conftest import build, out_of
from peft_compat import adapter_grads, assert_rel

CONFIGS = [
    ("mlp", dict(r=4, randlora_alpha=80, target_modules=["lin0", "lin1"], init_weights=False)),
    ("mlp", dict(r=3, randlora_alpha=6, target_modules=["lin0", "lin1"], init_weights=False, sparse=True)),
    ("mlp", dict(r=2, randlora_alpha=4, target_modules=["lin1"], init_weights=False, very_sparse=True, projection_prng_key=7)),
    ("gpt2", dict(r=4, randlora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_weights=False)),
    ("llama", dict(r=8, randlora_alpha=16, task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj", "up_proj"], init_weights=False)),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)]


def pair(model_kind, kwargs):
    base, inputs = build(model_kind)
    ours = dt.get_peft_model(copy.deepcopy(base), dt.RandLoraConfig(**copy.deepcopy(kwargs)))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.RandLoraConfig(**copy.deepcopy(kwargs)))
    # the bases are drawn independently by each library from the same key: they must be identical
    bases = ours.base_model.randlora_bases["default"]
    assert torch.equal(bases.randlora_A, theirs.base_model.randlora_A["default"])
    assert torch.equal(bases.randlora_B, theirs.base_model.randlora_B["default"])
    ref = peft.get_peft_model_state_dict(theirs)
    with torch.no_grad():
        for key, tensor in dt.get_peft_model_state_dict(ours.base_model).items():
            tensor.copy_(ref[key])
    return ours.eval(), theirs.eval(), inputs


@pytest.mark.parametrize("model_kind,kwargs", CONFIGS, ids=IDS)
def test_outputs_and_gradients_match_peft(model_kind, kwargs):
    ours, theirs, inputs = pair(model_kind, kwargs)
    ya, yb = out_of(ours, inputs), out_of(theirs, inputs)
    assert_rel(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    grads_a, grads_b = adapter_grads(ours, ".adapters.default"), adapter_grads(theirs, ".default")
    assert grads_a.keys() == grads_b.keys() and grads_a
    largest = max(g.abs().max() for g in grads_b.values())
    for name in grads_a:  # measured against the model's largest gradient (attention cancellation in Llama)
        assert ((grads_a[name] - grads_b[name]).abs().max() / largest).item() <= 1e-5, name


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("model_kind,kwargs", [CONFIGS[0], CONFIGS[3]], ids=["mlp", "gpt2"])
def test_checkpoints_cross_both_ways(model_kind, kwargs, save_projection, tmp_path):
    kwargs = dict(kwargs, save_projection=save_projection)
    ours, theirs, inputs = pair(model_kind, kwargs)
    expected = out_of(theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    base, _ = build(model_kind)
    loaded = dt.PeftModel.from_pretrained(base, tmp_path / "peft")
    assert_rel(out_of(loaded, inputs), expected)
    loaded.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k for k in keys if "randlora_A" in k or "randlora_B" in k} == (
        {"base_model.randlora_A", "base_model.randlora_B"} if save_projection else set()
    )
    base, _ = build(model_kind)
    again = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    assert_rel(out_of(again, inputs), expected)


def test_checkpoint_with_only_model_level_or_only_per_layer_bases_loads(tmp_path):
    from safetensors.torch import save_file

    ours, theirs, inputs = pair(*CONFIGS[0])
    expected = out_of(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    full = load_file(tmp_path / "adapter_model.safetensors")
    for keep in ("model", "layer"):
        tensors = {k: v for k, v in full.items() if not (("randlora_A" in k or "randlora_B" in k) and (k.startswith("base_model.randlora") != (keep == "model")))}
        save_file(tensors, tmp_path / "adapter_model.safetensors")
        base, _ = build("mlp")
        # different key: the checkpoint's bases must be the ones used
        loaded = dt.PeftModel.from_pretrained(base, tmp_path)
        assert_rel(out_of(loaded, inputs), expected)


def test_adapter_file_is_a_tenth_of_peft_for_a_1024_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=1024, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8)
    base = LlamaForCausalLM(cfg)
    kw = dict(r=32, target_modules="all-linear", task_type="CAUSAL_LM")
    peft.get_peft_model(copy.deepcopy(base), peft.RandLoraConfig(**kw)).save_pretrained(tmp_path / "peft")
    dt.get_peft_model(base, dt.RandLoraConfig(**kw)).save_pretrained(tmp_path / "ours")
    size = lambda d: (d / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "ours") * 10 <= size(tmp_path / "peft"), (size(tmp_path / "ours"), size(tmp_path / "peft"))


def test_incompatible_second_adapters_fail_at_add_time():
    base, _ = build("mlp")
    model = dt.get_peft_model(base, dt.RandLoraConfig(r=4, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="PRNG initialisation key must be the same"):
        model.add_adapter("b", dt.RandLoraConfig(r=4, target_modules=["lin0"], projection_prng_key=1))
    with pytest.raises(ValueError, match="`r` must match"):
        model.add_adapter("c", dt.RandLoraConfig(r=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="randlora_B has a size of"):
        model.add_adapter("d", dt.RandLoraConfig(r=4, target_modules=["lin0", "lin1"]))
    assert set(model.peft_config) == {"default"} and set(model.base_model.randlora_bases) == {"default"}
    with pytest.raises(ValueError, match="`r` should be a positive integer value but the value passed is 0"):
        dt.RandLoraConfig(r=0)


def test_bases_are_held_once_and_never_train():
    base, _ = build("llama")
    model = dt.get_peft_model(base, dt.RandLoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.add_adapter("second", dt.RandLoraConfig(r=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    buffers = [n for n, _ in model.named_buffers() if "randlora_A" in n]
    assert buffers == ["base_model.randlora_bases.default.randlora_A"]  # one tensor, whatever the layer count
    holders = model.base_model.randlora_bases
    assert holders["default"] is holders["second"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "randlora_A" in n or "randlora_B" in n)
