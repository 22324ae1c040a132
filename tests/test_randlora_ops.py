"""RandLoRA kernels (deltatune.methods._randlora_ops) against PEFT 0.21.2's RandLoRA."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import peft  # noqa: E402  (pinned test dependencies: imported, never skipped)
import transformers  # noqa: E402

from peft import RandLoraConfig, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import deltatune.methods._randlora_ops as ops  # noqa: E402
from deltatune.methods._randlora_ops import (  # noqa: E402
    basis_dims,
    choose_path,
    default_basis_dtype,
    make_bases,
    num_bases,
    randlora_delta_weight,
    randlora_linear,
)

ADAPTER = "default"
PATHS = ("factored", "materialized")
RTOL = 1e-5


# ----------------------------------------------------------------------------- helpers


class ThreeLinear(nn.Module):
    """in > out, in < out and in == out layers with different shapes (so bases are sliced)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.down = nn.Linear(48, 20, bias=bias)  # in > out
        self.up = nn.Linear(20, 52, bias=bias)  # in < out
        self.square = nn.Linear(36, 36, bias=bias)  # in == out

    def forward(self, x):
        return self.down(x)


SHAPES = {"down": (48, 20), "up": (20, 52), "square": (36, 36)}


class GPT2Style(nn.Module):
    """transformers Conv1D layers as in GPT-2 (weight stored (in, out))."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(30, 12)  # nf=out=30, nx=in=12
        self.c_proj = Conv1D(12, 18)  # out=12, in=18

    def forward(self, x):
        return self.c_attn(x)


def peft_model(module: nn.Module, targets, **cfg):
    cfg.setdefault("init_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(module, RandLoraConfig(target_modules=list(targets), **cfg))


def peft_bases(model):
    return model.base_model.randlora_A[ADAPTER], model.base_model.randlora_B[ADAPTER]


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, what: str = ""):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max relative error {err:.2e} > {rtol:.0e}"


def peft_adapter_grads(layer, x, gy):
    """PEFT's adapter-only output (base zeroed) and grads of x, lambda, gamma."""
    lam, gam = layer.randlora_lambda[ADAPTER], layer.randlora_gamma[ADAPTER]
    x = x.detach().requires_grad_(True)
    y = layer(x)
    gx, gl, gg = torch.autograd.grad(y, (x, lam, gam), gy)
    return y.detach(), gx, gl, gg


def ours_grads(x, lam, gam, A, B, din, dout, scaling, gy, **kw):
    x = x.detach().requires_grad_(True)
    lam = lam.detach().clone().requires_grad_(True)
    gam = gam.detach().clone().requires_grad_(True)
    y = randlora_linear(x, lam, gam, A, B, din, dout, scaling, **kw)
    gx, gl, gg = torch.autograd.grad(y, (x, lam, gam), gy)
    return y.detach(), gx, gl, gg


# ----------------------------------------------------------------------------- bases


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
@pytest.mark.parametrize("r,seed", [(4, 0), (8, 123), (7, 2024), (32, 5)])
def test_bases_bit_exact(kind, r, seed):
    flags = {"sparse": kind == "sparse", "very_sparse": kind == "very_sparse"}
    model = peft_model(ThreeLinear(), SHAPES, r=r, projection_prng_key=seed, **flags)
    A_ref, B_ref = peft_bases(model)
    d_max, d_min = basis_dims(SHAPES.values())
    assert (d_max, d_min) == (52, 48)  # elementwise max of (out, in) = (52, 48)
    A, B = make_bases(r, d_max, d_min, seed, **flags)
    assert A.dtype == A_ref.dtype == torch.float32 and B.dtype == B_ref.dtype
    assert A.shape == (r, 1, d_min) and B.shape == (d_max, num_bases(d_min, r), r)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)


def test_bases_raw_low_precision_and_fp16_branch(monkeypatch):
    A16, B16 = make_bases(8, 52, 48, 3, upcast=False)
    assert A16.dtype == default_basis_dtype() == torch.bfloat16  # plain CPU: bf16
    A, B = make_bases(8, 52, 48, 3)
    assert torch.equal(A16.float(), A) and torch.equal(B16.float(), B)

    # PEFT's other branch (no bf16 -> fp16) is reproduced through ``dtype``.
    import peft.tuners.randlora.model as peft_randlora_model

    monkeypatch.setattr(peft_randlora_model, "is_bf16_available", lambda *a, **k: False)
    model = peft_model(ThreeLinear(), SHAPES, r=8, projection_prng_key=3)
    A_ref, B_ref = peft_bases(model)
    A, B = make_bases(8, 52, 48, 3, dtype=torch.float16)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)


def test_basis_dims_conv1d_and_errors():
    # Conv1D (in=12, out=30), (in=18, out=12): (out, in) max = (30, 18)
    model = peft_model(GPT2Style(), ["c_attn", "c_proj"], r=4)
    A_ref, B_ref = peft_bases(model)
    d_max, d_min = basis_dims([(12, 30), (18, 12)])
    assert (d_max, d_min) == (30, 18)
    A, B = make_bases(4, d_max, d_min, 0)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)
    with pytest.raises(ValueError):
        make_bases(4, 10, 20, 0)
    with pytest.raises(ValueError):
        basis_dims([])


def test_no_accelerate_import_at_module_import():
    # the package and this module import only torch: accelerate is read when the bases are drawn
    code = (
        "import sys; import deltatune.methods._randlora_ops as m; "
        "assert 'accelerate' not in sys.modules, 'accelerate imported'; "
        "assert m.default_basis_dtype() is not None; assert 'accelerate' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- vs PEFT's layer


@pytest.fixture(scope="module")
def three_linear():
    torch.manual_seed(0)
    model = peft_model(ThreeLinear(), SHAPES, r=16, randlora_alpha=24)
    torch.manual_seed(1)
    for name in SHAPES:  # give gamma some structure (PEFT's init is a constant)
        layer = getattr(model.base_model.model, name)
        with torch.no_grad():
            layer.randlora_gamma[ADAPTER].mul_(1 + torch.rand_like(layer.randlora_gamma[ADAPTER]))
    return model


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens,chunk,shared", [(5, None, False), (40, 50, True)])
def test_adapter_matches_peft(three_linear, name, path, tokens, chunk, shared, monkeypatch):
    # ``shared``: the x / gamma gradients from one GEMM (_grad_x_gamma), normally only for r >= 32
    monkeypatch.setattr(ops, "_SHARED_GRAD_MIN_R", 1 if shared else 10**9)
    layer = getattr(three_linear.base_model.model, name)
    A, B = peft_bases(three_linear)
    din, dout = SHAPES[name]
    base = layer.get_base_layer()
    saved = base.weight.detach().clone(), base.bias.detach().clone()
    torch.manual_seed(2)
    x = torch.randn(2, tokens, din)
    gy = torch.randn(2, tokens, dout)
    try:
        with torch.no_grad():  # zero base: PEFT's layer output is then exactly its adapter output
            base.weight.zero_()
            base.bias.zero_()
        ref = peft_adapter_grads(layer, x, gy)
    finally:
        with torch.no_grad():
            base.weight.copy_(saved[0])
            base.bias.copy_(saved[1])
    got = ours_grads(
        x, layer.randlora_lambda[ADAPTER], layer.randlora_gamma[ADAPTER], A, B, din, dout,
        layer.scaling[ADAPTER], gy, path=path, chunk_elems=chunk,
    )
    for what, a, e in zip(("y", "x", "lambda", "gamma"), got, ref):
        assert_rel(a, e, what=f"{name}/{path}/{what}")


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("path", PATHS)
def test_with_base_matches_peft_layer(three_linear, name, path):
    """base_weight/base_bias folded in (the materialised path shares the base GEMMs)."""
    layer = getattr(three_linear.base_model.model, name)
    A, B = peft_bases(three_linear)
    din, dout = SHAPES[name]
    base = layer.get_base_layer()
    torch.manual_seed(3)
    x = torch.randn(30, din)
    gy = torch.randn(30, dout)
    ref = peft_adapter_grads(layer, x, gy)
    got = ours_grads(
        x, layer.randlora_lambda[ADAPTER], layer.randlora_gamma[ADAPTER], A, B, din, dout,
        layer.scaling[ADAPTER], gy, path=path, base_weight=base.weight, base_bias=base.bias,
    )
    for what, a, e in zip(("y", "x", "lambda", "gamma"), got, ref):
        assert_rel(a, e, what=f"{name}/{path}/{what}")


@pytest.mark.parametrize("path", PATHS)
def test_conv1d_matches_peft(path):
    torch.manual_seed(0)
    model = peft_model(GPT2Style(), ["c_attn", "c_proj"], r=4, randlora_alpha=8)
    A, B = peft_bases(model)
    for name in ("c_attn", "c_proj"):
        layer = getattr(model.base_model.model, name)
        assert layer.fan_in_fan_out
        din, dout = layer.in_features, layer.out_features
        conv = layer.get_base_layer()
        assert conv.weight.shape == (din, dout)
        torch.manual_seed(4)
        x = torch.randn(3, 7, din)
        gy = torch.randn(3, 7, dout)
        ref = peft_adapter_grads(layer, x, gy)
        lam, gam = layer.randlora_lambda[ADAPTER], layer.randlora_gamma[ADAPTER]
        got = ours_grads(
            x, lam, gam, A, B, din, dout, layer.scaling[ADAPTER], gy, path=path,
            base_weight=conv.weight.t(), base_bias=conv.bias,
        )
        for what, a, e in zip(("y", "x", "lambda", "gamma"), got, ref):
            assert_rel(a, e, what=f"{name}/{path}/{what}")
        # delta weight: PEFT returns it transposed (fan_in_fan_out) for Conv1D
        dw = randlora_delta_weight(lam, gam, A, B, din, dout, layer.scaling[ADAPTER])
        assert_rel(dw.t(), layer.get_delta_weight(ADAPTER), what=f"{name}/delta_weight")


def test_delta_weight_and_cached_eval(three_linear):
    A, B = peft_bases(three_linear)
    for name, (din, dout) in SHAPES.items():
        layer = getattr(three_linear.base_model.model, name)
        lam, gam = layer.randlora_lambda[ADAPTER], layer.randlora_gamma[ADAPTER]
        s = layer.scaling[ADAPTER]
        dw = randlora_delta_weight(lam, gam, A, B, din, dout, s, chunk_elems=7)
        assert dw.shape == (dout, din) and dw.dtype == torch.float32 and not dw.requires_grad
        assert_rel(dw, layer.get_delta_weight(ADAPTER), what=f"{name}/delta_weight")

        x = torch.randn(4, 6, din)
        base = layer.get_base_layer()
        with torch.no_grad():
            ref = layer(x)
            cached = randlora_linear(
                x, lam, gam, A, B, din, dout, s, base_weight=base.weight, base_bias=base.bias, delta_weight=dw
            )
            plain = randlora_linear(x, lam, gam, A, B, din, dout, s, delta_weight=dw)
            auto = randlora_linear(
                x, lam, gam, A, B, din, dout, s, base_weight=base.weight, base_bias=base.bias
            )
        assert_rel(cached, ref, what=f"{name}/cached")
        assert_rel(auto, ref, what=f"{name}/no-grad auto")
        assert_rel(plain, ref - base(x).detach(), rtol=1e-4, what=f"{name}/cached adapter-only")
        # with gradients required the cache is ignored (a stale cache cannot leak into training)
        y = randlora_linear(x, lam, gam, A, B, din, dout, s, delta_weight=torch.zeros_like(dw))
        assert y.requires_grad and y.abs().max() > 0


# ----------------------------------------------------------------------------- gradcheck, paths


@pytest.mark.parametrize("din,dout", [(7, 12), (12, 7), (9, 9)])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("r,shared", [(3, True), (16, False)])
def test_gradcheck_float64(din, dout, path, r, shared, monkeypatch):
    monkeypatch.setattr(ops, "_SHARED_GRAD_MIN_R", 1 if shared else 10**9)
    torch.manual_seed(0)
    m, M = min(din, dout), max(din, dout)
    A, B = make_bases(r, M + 2, m + 1, 7)
    A, B = A.double(), B.double()
    nb = num_bases(m, r)
    x = torch.randn(2, 3, din, dtype=torch.float64, requires_grad=True)
    lam = torch.randn(r, nb, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(nb, m, dtype=torch.float64, requires_grad=True)
    w = torch.randn(dout, din, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dout, dtype=torch.float64, requires_grad=True)

    def adapter(x, lam, gam):
        return randlora_linear(x, lam, gam, A, B, din, dout, 0.7, path=path, chunk_elems=5)

    def fused(x, lam, gam, w, b):
        return randlora_linear(
            x, lam, gam, A, B, din, dout, 0.7, path=path, chunk_elems=5, base_weight=w, base_bias=b
        )

    assert torch.autograd.gradcheck(adapter, (x, lam, gam))
    assert torch.autograd.gradcheck(fused, (x, lam, gam, w, b), fast_mode=True)


@pytest.mark.parametrize("din,dout", [(40, 24), (24, 40), (33, 33)])
@pytest.mark.parametrize("shared", [False, True])
def test_paths_agree(din, dout, shared, monkeypatch):
    monkeypatch.setattr(ops, "_SHARED_GRAD_MIN_R", 1 if shared else 10**9)
    torch.manual_seed(0)
    r = 16
    m = min(din, dout)
    A, B = make_bases(r, max(din, dout), m, 1)
    nb = num_bases(m, r)
    lam, gam = torch.randn(r, nb), torch.rand(nb, m)
    x, gy = torch.randn(50, din), torch.randn(50, dout)
    ref = ours_grads(x, lam, gam, A, B, din, dout, 2.0, gy, path="factored")
    variants = (
        {"path": "materialized"},
        {"path": "factored", "chunk_elems": 64},
        {"path": "materialized", "chunk_elems": 1},
    )
    for kw in variants:
        got = ours_grads(x, lam, gam, A, B, din, dout, 2.0, gy, **kw)
        for what, a, e in zip(("y", "x", "lambda", "gamma"), got, ref):
            assert_rel(a, e, what=f"{kw}/{what}")


def test_partial_requires_grad_and_dtypes():
    torch.manual_seed(0)
    din, dout, r = 20, 30, 8
    A, B = make_bases(r, dout, din, 0)
    nb = num_bases(din, r)
    lam = torch.randn(r, nb, requires_grad=True)
    gam = torch.rand(nb, din)  # frozen gamma
    x = torch.randn(6, din, dtype=torch.bfloat16)  # no grad, low precision input
    w = torch.randn(dout, din, dtype=torch.bfloat16)
    for path in PATHS:
        y = randlora_linear(x, lam, gam, A, B, din, dout, 1.0, path=path, base_weight=w)
        assert y.dtype == torch.float32  # bf16 base + fp32 adapter, as in PEFT before its final cast
        (g,) = torch.autograd.grad(y.sum(), (lam,))
        ref = randlora_linear(x.float(), lam, gam, A, B, din, dout, 1.0, path="factored")
        ref = ref + (x @ w.t()).float()
        (g_ref,) = torch.autograd.grad(ref.sum(), (lam,))
        assert_rel(y.detach(), ref.detach(), what=path)
        assert_rel(g, g_ref, what=path)


def test_choose_path_and_validation():
    assert choose_path(256, 4096, 4096, 32, fused_base=True) == "factored"
    assert choose_path(4096, 1024, 1024, 32, fused_base=True) == "materialized"
    assert choose_path(1, 1024, 1024, 32, requires_grad=False) == "factored"
    A, B = make_bases(4, 10, 8, 0)
    lam, gam, x = torch.zeros(4, 2), torch.zeros(2, 8), torch.zeros(3, 8)
    with pytest.raises(ValueError):
        randlora_linear(x, lam, gam, A, B, 8, 10, 1.0, path="bogus")
    with pytest.raises(ValueError):
        randlora_linear(x, torch.zeros(4, 3), gam, A, B, 8, 10, 1.0)
    with pytest.raises(ValueError):
        randlora_linear(x, lam, gam, A, B, 8, 11, 1.0)  # B too small
    y = randlora_linear(torch.zeros(0, 8), lam, gam, A, B, 8, 10, 1.0)
    assert y.shape == (0, 10)
    assert math.isclose(float(y.sum()), 0.0)
