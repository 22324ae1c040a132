"""Bone/BAT numerics against the equations on hand-set weights, and PEFT 0.18.1's bugs fixed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import deltatune as dt
from models import MLP, mlp_input


def one_layer(out_f=6, in_f=10, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_f, out_f, bias=bias))


def test_bone_delta_is_the_block_tiled_along_the_input():
    model = dt.get_peft_model(one_layer(), dt.BoneConfig(r=4, target_modules=["0"]))
    layer = model.base_model.model[0]
    block = torch.arange(24, dtype=torch.float32).view(4, 6) / 10  # (r, out)
    with torch.no_grad():
        layer.adapters["default"].bone_block.copy_(block)
    w = layer.base_layer.weight.detach().clone()
    expected_dw = torch.empty(6, 10)
    for o in range(6):
        for i in range(10):
            expected_dw[o, i] = block[i % 4, o]  # ΔW[o, i] = B[i mod r, o]
    x = torch.randn(3, 10)
    torch.testing.assert_close(model(x), x @ (w + expected_dw).T + layer.base_layer.bias)
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w + expected_dw)


def test_bat_is_the_blockwise_affine_transform_and_unmerge_inverts_it():
    model = dt.get_peft_model(one_layer(4, 6), dt.BoneConfig(r=2, target_modules=["0"], init_weights="bat"))
    layer = model.base_model.model[0]
    g = torch.Generator().manual_seed(1)
    block = torch.randn(2, 2, 2, generator=g) * 0.3  # (out/r, r, r)
    with torch.no_grad():
        layer.adapters["default"].bone_block.copy_(block)
    w = layer.base_layer.weight.detach().clone()
    expected = w.clone()
    for i in range(2):
        for j in range(3):
            wij = w[2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
            expected[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = wij @ (torch.eye(2) + block[i]) + block[i]
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), x @ expected.T + layer.base_layer.bias)
    model.merge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, expected)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, w, atol=1e-6, rtol=1e-6)


def test_bat_gradients_match_autograd_through_the_dense_transform():
    from deltatune.methods._bone_ops import BatLinear, bat_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g, dtype=torch.float64)
    block = torch.randn(4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, c: BatLinear.apply(x, w, b, c), (x, block, bias))
    dense = nn.functional.linear(x, bat_weight(w, block), bias)
    torch.testing.assert_close(BatLinear.apply(x, w, block, bias), dense)


def test_bat_gradient_of_the_block_alone_when_the_input_needs_none():
    # without grad_x the forward keeps no W(I+B) chunks and reuses one buffer
    from deltatune.methods._bone_ops import BatLinear, bat_weight, row_chunks

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g, dtype=torch.float64)
    block = torch.randn(4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    assert len(row_chunks(4, 2, 12, elements=48)) == 2  # two chunks: the buffer is reused
    import deltatune.methods._bone_ops as ops

    real = ops.row_chunks
    ops.row_chunks = lambda ni, r, n_in: real(ni, r, n_in, elements=48)
    try:
        assert torch.autograd.gradcheck(lambda b: BatLinear.apply(x, w, b, None), (block,))
        dense = nn.functional.linear(x, bat_weight(w, block))
        torch.testing.assert_close(BatLinear.apply(x, w, block, None), dense)
    finally:
        ops.row_chunks = real


@pytest.mark.parametrize("in_f, r", [(12, 4), (10, 4), (10, 16)])  # even, a padded tail chunk, r > in
@pytest.mark.parametrize("bias", [True, False])
def test_bone_fused_layer_matches_the_dense_delta(in_f, r, bias):
    from deltatune.methods._bone_ops import BoneLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, in_f, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    block = torch.randn(r, 6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, in_f, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, blk: BoneLinear.apply(x, w, blk, b), (x, block))
    dw = block.T.repeat(1, -(-in_f // r))[:, :in_f]  # ΔW[o, i] = B[i mod r, o]
    torch.testing.assert_close(BoneLinear.apply(x, w, block, b), nn.functional.linear(x, w + dw, b))


def test_bone_layer_uses_the_fused_node_only_for_a_frozen_base():
    model = dt.get_peft_model(one_layer(), dt.BoneConfig(r=4, target_modules=["0"]))
    x = torch.randn(3, 10)
    assert type(model(x).grad_fn).__name__ == "BoneLinearBackward"
    model.base_model.model[0].base_layer.weight.requires_grad_(True)  # a trained base weight: the plain path
    assert type(model(x).grad_fn).__name__ != "BoneLinearBackward"


def test_bone_merge_works_when_r_exceeds_in_features():  # PEFT 0.18.1 crashes here
    model = dt.get_peft_model(MLP().eval(), dt.BoneConfig(r=16, target_modules=["lin0"]))
    with torch.no_grad():
        model.base_model.model.lin0.adapters["default"].bone_block.normal_()
    x = mlp_input()
    out = model(x)
    torch.testing.assert_close(model.merge_and_unload()(x), out, atol=1e-5, rtol=1e-5)


def test_safe_merge_never_mutates_the_weight_with_uneven_blocks():  # PEFT 0.18.1 mutates before its NaN check
    model = dt.get_peft_model(MLP(), dt.BoneConfig(r=3, target_modules=["lin0"]))  # 10 % 3 != 0
    layer = model.base_model.model.lin0
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["default"].bone_block[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_bone_and_bat_adapters_share_a_layer():  # PEFT stores the variant per layer and breaks
    model = dt.get_peft_model(MLP().eval(), dt.BoneConfig(r=2, target_modules=["lin1"]))
    model.add_adapter("bat", dt.BoneConfig(r=2, target_modules=["lin1"], init_weights="bat"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bone_block" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    x = mlp_input()
    inner = model.base_model.model
    model.base_model.set_adapter(["default", "bat"])
    both = model(x)
    # the documented composition: W_eff = T_bat(W) + ΔW_bone
    w = inner.lin1.base_layer.weight.detach()
    bat = inner.lin1.adapters["bat"]
    bone = inner.lin1.adapters["default"]
    hidden = torch.relu(inner.lin0(x))
    expected = hidden @ (bat.transform(w) + bone.delta_weight()).T + inner.lin1.base_layer.bias
    torch.testing.assert_close(both, expected.detach(), atol=1e-5, rtol=1e-5)
    for order in (["default", "bat"], ["bat", "default"]):
        model.merge_adapter(order)
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(inner.lin1.base_layer.weight, w, atol=1e-5, rtol=1e-5)


def test_bat_requires_divisible_blocks_and_names_the_module():
    with pytest.raises(ValueError, match=r"fully divisible into \[r, r\] blocks. Module 'lin1'"):
        dt.get_peft_model(MLP(), dt.BoneConfig(r=3, target_modules=["lin1"], init_weights="bat"))


def test_peft_bone_example_runs_unchanged(tmp_path):
    """PEFT's documented flow with `deltatune` in place of `peft`."""
    import deltatune as peft
    from deltatune import BoneConfig, BoneModel, PeftModel, get_peft_model

    config = BoneConfig(r=2, target_modules=["lin0", "lin1"], init_weights=True)
    inner = BoneModel(MLP(), config, "default")  # the method-level class, as the docs show
    assert isinstance(inner.model.lin0, peft.AdapterLayer)
    model = get_peft_model(MLP(), BoneConfig(r=2, target_modules=["lin0", "lin1"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = mlp_input(), torch.randint(0, 8, (6,))
    losses = []
    model.train()
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    out = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = MLP()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.get_base_model().state_dict().items() if ".adapters." not in k})
    loaded = PeftModel.from_pretrained(base.eval(), tmp_path)
    torch.testing.assert_close(loaded(x), out)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(x), out, atol=1e-5, rtol=1e-5)


def test_bone_wider_than_its_layer_is_written_in_bones_format(tmp_path):
    """PEFT >= 0.19 (MiSS) refuses r above a layer's input width; such an adapter is written in
    PEFT 0.18.1's Bone format, with a warning, and loads back with the same outputs."""
    from conftest import build, out_of

    base, inputs = build("mlp")  # lin0: 10 inputs
    model = dt.get_peft_model(base, dt.BoneConfig(r=16, target_modules=["lin0"], init_weights=False)).eval()
    with pytest.warns(UserWarning, match=r"r=16 above the input width of 'lin0'.*Bone format"):
        model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BONE"
    again = dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path).eval()
    torch.testing.assert_close(out_of(again, inputs), out_of(model, inputs))

    narrow_ok = dt.get_peft_model(build("mlp")[0], dt.BoneConfig(r=8, target_modules=["lin0"]))
    narrow_ok.save_pretrained(tmp_path / "r8")
    assert json.loads((tmp_path / "r8" / "adapter_config.json").read_text())["peft_type"] == "MISS"
