"""FourierFT numerical kernels: positions, FFT-path linear, dense delta weight (vs PEFT 0.21.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.methods import _fourier_ops as fo
from deltatune.methods._fourier_ops import (
    FourierPlan,
    choose_dense,
    fourier_delta_weight,
    fourier_linear,
    peft_positions,
)

# ----------------------------------------------------------------------------- helpers


def _randperm_positions(out_f: int, in_f: int, n: int, seed: int) -> torch.Tensor:
    perm = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([perm // in_f, perm % in_f], dim=0)


def _reference_delta(spectrum, rows, cols, out_f, in_f, scaling):
    """Straight from the definition: dense spectrum, ifft2, real part, scaled."""
    dtype = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
    dense = torch.zeros(out_f, in_f, dtype=dtype).index_put((rows, cols), spectrum.to(dtype))
    return torch.fft.ifft2(dense).real * scaling


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- positions

POSITION_CASES = [
    (1, 1, 1, 0),
    (1, 5, 5, 3),
    (2, 3, 6, 0),
    (7, 9, 10, 777),
    (16, 16, 8, 2**32 + 5),
    (64, 48, 100, 12345),
    (300, 257, 999, 2**63 - 1),
    (1000, 1000, 2000, -1),
    (1024, 4096, 5000, 777),
]


@pytest.mark.parametrize("out_f,in_f,n,seed", POSITION_CASES)
def test_positions_equal_randperm(out_f, in_f, n, seed):
    got = peft_positions(out_f, in_f, n, seed)
    assert got.dtype == torch.long and got.shape == (2, n)
    assert torch.equal(got, _randperm_positions(out_f, in_f, n, seed))


@pytest.mark.parametrize("total,seed", [(1, 0), (2, 5), (3, 1), (17, 777), (640, 2**40 + 1)])
def test_shuffle_simulation_full_permutation(total, seed):
    # n == N exercises the last-slot rule (torch draws nothing for the final position)
    ref = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    assert fo._shuffle_prefix(total, total, seed) == ref


def test_positions_above_2_pow_24():
    out_f, in_f = 4097, 4097  # 16.8M > 2**24 positions (float32 indices would be inexact here)
    for n, seed in ((2000, 2**33 + 7),):
        assert torch.equal(peft_positions(out_f, in_f, n, seed), _randperm_positions(out_f, in_f, n, seed))


def test_positions_fallback_regime(monkeypatch):
    # above the forward-shuffle limit torch.randperm itself is used; emulate with a tiny limit
    monkeypatch.setattr(fo, "_FORWARD_SHUFFLE_LIMIT", 10)
    assert torch.equal(peft_positions(40, 30, 20, 9), _randperm_positions(40, 30, 20, 9))


def test_mt19937_pure_python_matches_numpy_stream():
    import numpy  # noqa: F401  (installed with transformers, a pinned test dependency)
    for seed in (0, 1, 777, 2**32 - 1):
        assert fo._mt19937_pure(seed, 1300) == fo._mt19937_raw(seed, 1300)


def test_positions_validation():
    with pytest.raises(ValueError):
        peft_positions(4, 4, 0, 0)
    with pytest.raises(ValueError):
        peft_positions(4, 4, 17, 0)


# ----------------------------------------------------------------------------- fourier_linear

LINEAR_CASES = [
    # out, in, n, leading shape
    (16, 16, 12, (10,)),  # square, even
    (15, 15, 30, (2, 5)),  # square, odd, 3-D input
    (12, 20, 25, (7,)),  # non-square, even/even
    (9, 14, 40, (3, 4)),  # odd out, even in
    (14, 9, 126, (6,)),  # even out, odd in, n == out * in
    (1, 8, 5, (4,)),
    (8, 1, 3, (2, 2)),
    (64, 48, 300, (5, 3)),
]


def _check_linear(out_f, in_f, n, lead, dtype, seed=0, scaling=3.5):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = peft_positions(out_f, in_f, n, seed + 11)
    spectrum = torch.randn(n, generator=gen).requires_grad_()
    x = torch.randn(*lead, in_f, generator=gen).to(dtype).requires_grad_()
    y = fourier_linear(x, spectrum, rows, cols, out_f, scaling)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=gen).to(dtype)
    gx, gc = torch.autograd.grad(y, (x, spectrum), grad_y)
    assert gx.dtype == dtype and gc.dtype == spectrum.dtype

    x_ref = x.detach().float().requires_grad_()
    c_ref = spectrum.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, _reference_delta(c_ref, rows, cols, out_f, in_f, scaling))
    gx_ref, gc_ref = torch.autograd.grad(y_ref, (x_ref, c_ref), grad_y.float())
    return (y, gx, gc), (y_ref, gx_ref, gc_ref)


@pytest.mark.parametrize("out_f,in_f,n,lead", LINEAR_CASES)
def test_fourier_linear_matches_dense_reference_fp32(out_f, in_f, n, lead):
    (y, gx, gc), (y_ref, gx_ref, gc_ref) = _check_linear(out_f, in_f, n, lead, torch.float32)
    assert _rel(y, y_ref) < 1e-5
    assert _rel(gx, gx_ref) < 1e-5
    assert _rel(gc, gc_ref) < 1e-5


@pytest.mark.parametrize("out_f,in_f,n,lead", LINEAR_CASES[:5])
def test_fourier_linear_bf16_input(out_f, in_f, n, lead):
    (y, gx, gc), (y_ref, gx_ref, gc_ref) = _check_linear(out_f, in_f, n, lead, torch.bfloat16)
    # outputs are computed in float32 and rounded once to bfloat16
    for got, ref in ((y, y_ref), (gx, gx_ref)):
        bound = 2.0**-8 * ref.abs().double() + 1e-6 * ref.abs().max().double()
        assert ((got.double() - ref.double()).abs() <= bound).all()
        assert (got == ref.to(torch.bfloat16)).float().mean() > 0.98
    assert _rel(gc, gc_ref) < 1e-5  # float32 spectrum: full accuracy


def test_fourier_linear_gradcheck_float64():
    rows, cols = peft_positions(5, 6, 9, 4)
    x = torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fourier_linear(a, b, rows, cols, 5, 0.7), (x, c))
    rows, cols = peft_positions(4, 7, 28, 1)  # every position, odd input dim
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    c = torch.randn(28, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: fourier_linear(a, b, rows, cols, 4, 1.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, c), fast_mode=True)


def test_fourier_linear_float64_matches_reference_tightly():
    rows, cols = peft_positions(10, 13, 50, 2)
    x = torch.randn(4, 13, dtype=torch.float64)
    c = torch.randn(50, dtype=torch.float64)
    y = fourier_linear(x, c, rows, cols, 10, 2.0)
    assert y.dtype == torch.float64
    assert _rel(y, F.linear(x, _reference_delta(c, rows, cols, 10, 13, 2.0))) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [6, 200])
def test_backward_keeps_only_the_used_input_bins(n, dtype):
    # the saved input spectrum has two rows (re, im) per distinct used input bin: for small n far
    # less than x, never more than the full half spectrum (in + 2 floats per token)
    rows, cols = peft_positions(20, 64, n, 5)
    x = torch.randn(9, 64).to(dtype).requires_grad_()
    c = torch.randn(n, requires_grad=True)
    y = fourier_linear(x, c, rows, cols, 20, 2.0)
    kept = y.grad_fn.saved_tensors[-1]
    folded = torch.where(cols > 32, 64 - cols, cols)
    assert kept.numel() == 9 * 2 * folded.unique().numel() <= 9 * (64 + 2)
    g = torch.randn(9, 20).to(dtype)
    (gc,) = torch.autograd.grad(y, (c,), g)
    ref = F.linear(x.detach().float(), _reference_delta(c, rows, cols, 20, 64, 2.0))
    (gc_ref,) = torch.autograd.grad(ref, (c,), g.float())
    assert _rel(gc, gc_ref) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_f,in_f", [(12, 10), (16, 16)])
def test_fused_base_layer(out_f, in_f, bias):
    # base_weight/base_bias fold the frozen layer into the same autograd node
    rows, cols = peft_positions(out_f, in_f, 30, 3)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f) if bias else None
    x = torch.randn(2, 5, in_f, requires_grad=True)
    c = torch.randn(30, requires_grad=True)
    g = torch.randn(2, 5, out_f)
    y = fourier_linear(x, c, rows, cols, out_f, 1.5, base_weight=w, base_bias=b)
    gx, gc = torch.autograd.grad(y, (x, c), g)
    ref = F.linear(x, w + _reference_delta(c, rows, cols, out_f, in_f, 1.5), b)
    gx_ref, gc_ref = torch.autograd.grad(ref, (x, c), g)
    assert _rel(y, ref) < 1e-5 and _rel(gx, gx_ref) < 1e-5 and _rel(gc, gc_ref) < 1e-5
    with pytest.raises(ValueError, match="base_weight must be"):
        fourier_linear(x, c, rows, cols, out_f, 1.5, base_weight=w.T.contiguous() if out_f != in_f else w.double())
    with pytest.raises(ValueError, match="base_bias given without base_weight"):
        fourier_linear(x, c, rows, cols, out_f, 1.5, base_bias=torch.zeros(out_f))


@pytest.mark.parametrize("n", [6, 300])
def test_token_chunking(monkeypatch, n):
    # several chunks, the last one ragged; small and large n
    monkeypatch.setattr(fo, "_CHUNK_TOKENS_OVERRIDE", 3)
    (y, gx, gc), (y_ref, gx_ref, gc_ref) = _check_linear(20, 18, n, (2, 5), torch.float32, seed=4)
    assert _rel(y, y_ref) < 1e-5
    assert _rel(gx, gx_ref) < 1e-5
    assert _rel(gc, gc_ref) < 1e-5


def test_partial_gradients():
    rows, cols = peft_positions(12, 10, 20, 0)
    x = torch.randn(5, 10)
    c = torch.randn(20, requires_grad=True)
    (gc,) = torch.autograd.grad(fourier_linear(x, c, rows, cols, 12, 1.0).sum(), (c,))
    ref = torch.autograd.grad(F.linear(x, _reference_delta(c, rows, cols, 12, 10, 1.0)).sum(), (c,))[0]
    assert _rel(gc, ref) < 1e-5
    x.requires_grad_()
    c2 = c.detach()
    (gx,) = torch.autograd.grad(fourier_linear(x, c2, rows, cols, 12, 1.0).sum(), (x,))
    ref = torch.autograd.grad(F.linear(x, _reference_delta(c2, rows, cols, 12, 10, 1.0)).sum(), (x,))[0]
    assert _rel(gx, ref) < 1e-5


def test_empty_tokens_and_plan_reuse():
    rows, cols = peft_positions(6, 8, 7, 0)
    plan = FourierPlan(rows, cols, 6, 8)
    x = torch.randn(0, 8, requires_grad=True)
    c = torch.randn(7, requires_grad=True)
    y = fourier_linear(x, c, rows, cols, 6, 1.0, plan=plan)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert torch.equal(c.grad, torch.zeros(7))
    x = torch.randn(3, 8)
    assert torch.equal(
        fourier_linear(x, c, rows, cols, 6, 1.0, plan=plan), fourier_linear(x, c, rows, cols, 6, 1.0)
    )
    with pytest.raises(ValueError):
        fourier_linear(torch.randn(3, 9), c, rows, cols, 6, 1.0, plan=plan)
    with pytest.raises(ValueError):
        fourier_linear(x, torch.randn(5), rows, cols, 6, 1.0)


# ----------------------------------------------------------------------------- delta weight


@pytest.mark.parametrize("out_f,in_f,n", [(16, 16, 20), (15, 9, 40), (9, 14, 126), (1, 6, 3), (32, 24, 700)])
def test_delta_weight_matches_reference(out_f, in_f, n):
    rows, cols = peft_positions(out_f, in_f, n, 5)
    c = torch.randn(n, requires_grad=True)
    dw = fourier_delta_weight(c, rows, cols, out_f, in_f, 2.5)
    c_ref = c.detach().clone().requires_grad_()
    ref = _reference_delta(c_ref, rows, cols, out_f, in_f, 2.5)
    assert dw.shape == (out_f, in_f) and dw.dtype == torch.float32
    assert _rel(dw, ref) < 1e-6
    g = torch.randn(out_f, in_f)
    (gc,) = torch.autograd.grad(dw, (c,), g)
    (gc_ref,) = torch.autograd.grad(ref, (c_ref,), g)
    assert _rel(gc, gc_ref) < 1e-5


# ----------------------------------------------------------------------------- against PEFT


@pytest.fixture(scope="module")
def peft_model():
    from peft import FourierFTConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 18), nn.Tanh(), nn.Linear(18, 11), nn.Tanh(), nn.Linear(11, 11))
    config = FourierFTConfig(
        n_frequency=40, scaling=37.0, random_loc_seed=2024, target_modules=["0", "2", "4"], init_weights=False
    )
    return get_peft_model(base, config)


def _fourier_layers(model):
    from peft.tuners.fourierft.layer import FourierFTLinear

    return [m for m in model.modules() if isinstance(m, FourierFTLinear)]


def test_against_peft_layers(peft_model):
    layers = _fourier_layers(peft_model)
    assert len(layers) == 3
    gen = torch.Generator().manual_seed(1)
    for layer in layers:
        indices = layer.indices["default"]
        assert torch.equal(indices, peft_positions(layer.out_features, layer.in_features, 40, 2024))
        with torch.no_grad():
            layer.fourierft_spectrum["default"].copy_(torch.randn(40, generator=gen))

        x = torch.randn(3, 5, layer.in_features, generator=gen)
        peft_spec = layer.fourierft_spectrum["default"]
        peft_spec.grad = None
        y_peft = layer(x)
        grad_y = torch.randn(y_peft.shape, generator=gen)
        y_peft.backward(grad_y)

        spec = peft_spec.detach().clone().requires_grad_()
        base = layer.get_base_layer()
        y = base(x) + fourier_linear(x, spec, indices[0], indices[1], layer.out_features, 37.0)
        y.backward(grad_y)
        assert _rel(y, y_peft) < 1e-5
        assert _rel(spec.grad, peft_spec.grad) < 1e-5
        dw = fourier_delta_weight(
            spec.detach(), indices[0], indices[1], layer.out_features, layer.in_features, 37.0
        )
        assert _rel(dw, layer.get_delta_weight("default")) < 1e-6


def test_against_peft_full_model(peft_model):
    layers = _fourier_layers(peft_model)
    x = torch.randn(4, 24)
    for layer in layers:
        layer.fourierft_spectrum["default"].grad = None
    y_peft = peft_model(x)
    y_peft.square().sum().backward()

    # re-run the same network with fourier_linear in place of PEFT's dense formula
    specs = [layer.fourierft_spectrum["default"].detach().clone().requires_grad_() for layer in layers]
    h = x
    for i, (layer, spec) in enumerate(zip(layers, specs)):
        idx = layer.indices["default"]
        h = layer.get_base_layer()(h) + fourier_linear(h, spec, idx[0], idx[1], layer.out_features, 37.0)
        h = torch.tanh(h) if i < 2 else h
    h.square().sum().backward()
    assert _rel(h, y_peft) < 1e-5
    for layer, spec in zip(layers, specs):
        assert _rel(spec.grad, layer.fourierft_spectrum["default"].grad) < 1e-5


# ----------------------------------------------------------------------------- cost model


# (tokens, out, in, n) -> the cheaper path on a CPU and on an accelerator, for shapes where the
# model's two costs are at least 3x apart on that kind
CLEAR = [
    ((8192, 4096, 4096, 1000), "fft", "fft"),  # the usual FourierFT budget: transforms beat GEMMs
    ((2048, 4096, 11008, 10000), "fft", "fft"),
    ((4096, 64, 64, 4096), "dense", "dense"),  # every coefficient trained: T·n sparse work > T·O·I
    ((2048, 4096, 4096, 503316), "fft", "dense"),  # n = 3% of O·I: fp32 GEMMs cheap on a GPU, gathers not
]


@pytest.mark.parametrize("shape,cpu,accelerator", CLEAR, ids=[str(c[0]) for c in CLEAR])
def test_cost_model_picks_the_clear_branch(shape, cpu, accelerator):
    for kind, expected in (("cpu", cpu), ("accelerator", accelerator)):
        costs = {path: fo.path_cost(path, *shape, kind) for path in ("fft", "dense")}
        cheap, dear = sorted(costs.values())
        assert dear > 3 * cheap, f"{shape} on {kind}: not a clear case {costs}"
        assert choose_dense(*shape, kind) == (expected == "dense"), f"{shape} on {kind}: {costs}"


def test_the_layer_asks_the_cost_model_for_its_device_kind(monkeypatch):
    """A FourierFT layer prices its own device: the CPU on CPU tensors, the accelerator on meta."""
    import deltatune as dt
    from deltatune.methods import fourierft

    seen = []
    real = fourierft.choose_dense
    monkeypatch.setattr(fourierft, "choose_dense", lambda *a: seen.append(a) or real(*a))
    for device in ("cpu", "meta"):
        with torch.device(device):
            base = nn.Sequential(nn.Linear(64, 64, bias=False))
        model = dt.get_peft_model(base, dt.FourierFTConfig(n_frequency=4096, target_modules=["0"]))
        model(torch.randn(4, 64, device=device)).sum().backward()
    assert [a[-1] for a in seen[:1]] == ["cpu"] and seen[-1][-1] == "accelerator"
    assert seen[-1][:4] == (4, 64, 64, 4096)


@pytest.mark.parametrize("kind", ["cpu", "accelerator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_and_fft_branches_give_the_same_numbers(monkeypatch, kind, dtype):
    """Whichever branch the cost model picks, a layer returns the same output and gradients."""
    import deltatune as dt
    from deltatune.methods import _device, fourierft

    monkeypatch.setattr(_device, "cache_sized", lambda device: kind == "cpu")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40, bias=True, dtype=dtype))
    model = dt.get_peft_model(base, dt.FourierFTConfig(n_frequency=300, scaling=20.0, target_modules=["0"]))
    x = torch.randn(3, 7, 48, dtype=dtype)
    gy = torch.randn(3, 7, 40, dtype=dtype)
    results = {}
    for branch in ("fft", "dense"):
        monkeypatch.setattr(fourierft, "choose_dense", lambda *a, b=branch: b == "dense")
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        y = model(xr)
        y.backward(gy)
        spectrum = next(p for n, p in model.named_parameters() if "fourierft_spectrum" in n)
        results[branch] = (y.float(), xr.grad.float(), spectrum.grad.clone())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(results["fft"], results["dense"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


# ----------------------------------------------------------------------------- plans as buffers


def _fourier_delta(model):
    return next(m for m in model.modules() if type(m).__name__ == "FourierDelta")


def test_plan_is_buffers_that_follow_the_module_and_stay_out_of_the_state_dict():
    import deltatune as dt

    base = nn.Sequential(nn.Linear(32, 24, bias=False))
    model = dt.get_peft_model(base, dt.FourierFTConfig(n_frequency=50, target_modules=["0"]))
    delta = _fourier_delta(model)
    buffers = dict(delta.named_buffers())
    assert {"plan_index", "plan_csr"} <= set(buffers)
    assert buffers["plan_index"].dtype == torch.long and buffers["plan_csr"].dtype == torch.int32
    assert not any("plan" in k for k in model.state_dict())  # checkpoint keys unchanged
    x = torch.randn(5, 32)
    y = model(x)
    model.to(torch.bfloat16)  # integer buffers: a dtype cast leaves them alone
    assert delta.plan_index.dtype == torch.long and delta.plan_csr.dtype == torch.int32
    model.to(torch.float32)
    model.to("meta")
    assert delta.plan_index.device.type == "meta"
    model.to_empty(device="cpu")  # garbage memory, derived again from the seed on leaving meta
    fresh = FourierPlan.from_positions(peft_positions(24, 32, 50, 777), 24, 32)
    assert torch.equal(delta.plan_index, fresh.index) and torch.equal(delta.plan_csr, fresh.csr)
    assert y.shape == (5, 24)


def test_backward_reads_the_plan_through_save_for_backward():
    """Every tensor the backward needs is a saved tensor (saved-tensor hooks see the plan too)."""
    rows, cols = peft_positions(20, 64, 30, 5)
    plan = FourierPlan(rows, cols, 20, 64)
    x = torch.randn(9, 64, requires_grad=True)
    c = torch.randn(30, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = fourier_linear(x, c, rows, cols, 20, 2.0, plan=plan)
    ptrs = {t.untyped_storage().data_ptr() for t in packed}
    assert plan.index.untyped_storage().data_ptr() in ptrs and plan.csr.untyped_storage().data_ptr() in ptrs
    assert not [k for k, v in vars(y.grad_fn).items() if isinstance(v, (torch.Tensor, FourierPlan))]
    y.sum().backward()
    assert c.grad is not None and x.grad is not None
