"""Kernel and memory budgets per adapted layer, counted on the ``meta`` device at LLaMA-7B shapes.

What a GPU would feel, made checkable without one: a forward + backward of one adapted
``nn.Linear`` (bf16 base, fp32 adapter parameters as ``get_peft_model`` makes them) is run on
``meta`` tensors, which carry shapes and dtypes but no data, so a 4096 x 11008 layer at 8,192
tokens costs milliseconds. ``meta`` takes the accelerator kernels of every method (the CPU keeps
its cache-sized loops), so the counts are those a GPU would launch.

Two quantities, with the budgets of issue 17:

* **kernel-like aten ops** (``TorchDispatchMode``), forward + backward, at most
  :data:`OP_BUDGET`. Not counted (:func:`is_free`): ops that return a view of their input (no
  kernel, metadata only: ``view``, ``t``, ``slice``, ``permute``, ``expand``, ``as_strided``,
  ``detach``, ``alias``, ..., and ``_unsafe_view``, a view that its schema does not mark as one),
  uninitialised allocations (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``,
  ``new_empty_strided``: no kernel, a caching-allocator lookup) and dtype arithmetic
  (``promote_types``, ``result_type``: no tensor data). Everything else counts, zero fills
  (``zeros``, ``zero_``, ``fill_``) and copies included: each is at least one launch. The layer
  runs once before it is counted (index plans and other per-layer setup are built once).
* **bytes saved for backward** (``saved_tensors_hooks``): the unique storages autograd keeps
  between forward and backward, not counting the storages of the model's own parameters and
  buffers (resident anyway: a frozen weight saved by its GEMM costs nothing extra). At most
  ``3 x`` the layer input's bytes ``+ 4 MiB``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.methods import _device

OP_BUDGET = 150
SAVED_SLACK = 4 << 20  # bytes on top of 3 x the input

# the ops that launch no kernel besides views (see the module docstring)
NO_KERNEL = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",  # allocations
    "_unsafe_view",  # a view (reshape's) whose schema carries no alias annotation
    "promote_types", "result_type",  # dtype arithmetic
})


def is_free(func) -> bool:
    """True for an aten op that launches no kernel: a view of an input, an uninitialised
    allocation, dtype arithmetic."""
    if func._schema.name.split("::")[-1] in NO_KERNEL:
        return True
    returns = func._schema.returns
    # a view returns an alias of an input that it does not write (in-place ops alias with a write)
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kernels: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not is_free(func):
            name = func._schema.name.split("::")[-1]
            self.kernels[name] = self.kernels.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@dataclass
class Cost:
    ops: int
    saved_bytes: int
    input_bytes: int
    by_op: dict[str, int]

    @property
    def saved_budget(self) -> int:
        return 3 * self.input_bytes + SAVED_SLACK


class _One(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


# the methods at their defaults, as issue 17 counts them
METHODS: dict[str, Callable[[], object]] = {
    "fourierft": lambda: dt.FourierFTConfig(target_modules=["lin"]),  # n_frequency=1000
    "randlora": lambda: dt.RandLoraConfig(target_modules=["lin"]),  # r=32
    "adalora": lambda: dt.AdaLoraConfig(init_r=12, total_step=100, target_modules=["lin"]),
    "bone": lambda: dt.BoneConfig(r=64, target_modules=["lin"]),
    "bat": lambda: dt.BoneConfig(r=64, init_weights="bat", target_modules=["lin"]),
}
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
TOKENS = [256, 8192]


def adapted_layer(method: str, out_features: int, in_features: int) -> nn.Module:
    """One bf16 ``nn.Linear`` created on ``meta`` and adapted by ``method`` at its defaults."""
    with torch.device("meta"):
        base = _One(nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16))
    return dt.get_peft_model(base, METHODS[method]()).train()


def measure_adapted(model: nn.Module, tokens: int) -> Cost:
    assert any(p.requires_grad for p in model.parameters())
    return measure(model, tokens, model.get_submodule("base_model.model.lin").base_layer)


def measure(model: nn.Module, tokens: int, lin: nn.Linear) -> Cost:
    """Ops and saved bytes of one forward + backward of ``model`` (whose layer ``lin`` is) on ``tokens`` tokens."""
    x = torch.empty(1, tokens, lin.in_features, dtype=lin.weight.dtype, device="meta", requires_grad=True)
    gy = torch.empty(1, tokens, lin.out_features, dtype=lin.weight.dtype, device="meta")
    model(x).backward(gy)  # warm-up: index plans and other per-layer setup are built once
    model.zero_grad(set_to_none=True)
    x.grad = None
    resident = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, torch.UntypedStorage] = {}  # referenced until the end: no storage id is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in resident:
            kept.setdefault(storage._cdata, storage)
        return t

    counter = _OpCounter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
        model(x).backward(gy)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert x.grad is not None and x.grad.shape == x.shape
    saved = sum(s.nbytes() for s in kept.values())
    return Cost(sum(counter.kernels.values()), saved, x.numel() * x.element_size(), counter.kernels)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


CASES = [(m, s) for m in METHODS for s in SHAPES]


@pytest.mark.parametrize("method,shape", CASES, ids=[f"{m}-{s[0]}x{s[1]}" for m, s in CASES])
def test_layer_budgets_on_meta(method, shape):
    model = adapted_layer(method, *shape)  # one model for both token counts (RandLoRA draws its bases once)
    for tokens in TOKENS:
        cost = measure_adapted(model, tokens)
        top = sorted(cost.by_op.items(), key=lambda kv: -kv[1])[:8]
        where = f"{method} (out, in) = {shape} at {tokens} tokens"
        assert cost.ops <= OP_BUDGET, f"{where}: {cost.ops} kernel-like ops > {OP_BUDGET}; most frequent: {top}"
        assert cost.saved_bytes <= cost.saved_budget, (
            f"{where} saves {_mib(cost.saved_bytes)} for backward > 3 x input ({_mib(cost.input_bytes)}) + 4 MiB "
            f"= {_mib(cost.saved_budget)}"
        )


def test_counting_on_a_plain_linear():
    """The tools themselves: a frozen Linear is two GEMMs and keeps nothing of its own (the weight is
    resident); training its weight makes the GEMM keep the input, and adds the weight-gradient GEMM."""
    with torch.device("meta"):
        model = _One(nn.Linear(4096, 1024, bias=False, dtype=torch.bfloat16))
    model.lin.weight.requires_grad_(False)
    cost = measure(model, 256, model.lin)
    assert (cost.ops, cost.saved_bytes) == (2, 0), cost.by_op
    model.lin.weight.requires_grad_(True)
    cost = measure(model, 256, model.lin)
    assert (cost.ops, cost.saved_bytes) == (3, cost.input_bytes), cost.by_op


@pytest.mark.parametrize("method,shape,tokens,what", [
    ("fourierft", (4096, 4096), 8192, "ops"),  # token chunks sized for a CPU cache: ~130 of them
    ("bat", (4096, 4096), 256, "saved"),  # W(I+B) kept in fp32 for the backward
])
def test_cpu_kernels_would_break_the_budgets(monkeypatch, method, shape, tokens, what):
    """The budgets measure what they claim: the CPU kernels, run on meta, exceed them."""
    monkeypatch.setattr(_device, "cache_sized", lambda device: True)
    cost = measure_adapted(adapted_layer(method, *shape), tokens)
    assert cost.ops > OP_BUDGET if what == "ops" else cost.saved_bytes > cost.saved_budget


# ------------------------------------------------------------------ the accelerator kernels' numbers
# The accelerator kernels run on CPU tensors when the policy says so: they must give the CPU
# kernels' outputs and gradients (bf16 base, fp32 adapter, as measured above).

def _train_step(model: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.backward(gy)
    return [y.float(), x.grad.float()] + [p.grad for p in model.parameters() if p.requires_grad]


SMALL = {
    "fourierft": lambda: dt.FourierFTConfig(n_frequency=200, target_modules=["lin"]),
    "randlora": lambda: dt.RandLoraConfig(r=8, target_modules=["lin"]),
    "adalora": lambda: dt.AdaLoraConfig(init_r=6, target_r=4, total_step=100, target_modules=["lin"]),
    "bat": lambda: dt.BoneConfig(r=16, init_weights="bat", target_modules=["lin"]),
}
NUMERIC = [(m, s, t, d) for m in SMALL for s in [(96, 64), (64, 96)] for t in (5, 300)
           for d in ([torch.bfloat16, torch.float32] if m == "randlora" else [torch.bfloat16])]


# on a bf16 base the accelerator kernels of these run their GEMMs in bf16 (_device.gemm_dtype)
BF16_GEMMS = {"randlora", "bat"}


@pytest.mark.parametrize("method,shape,tokens,dtype", NUMERIC, ids=[f"{m}-{s[0]}x{s[1]}-{t}-{str(d)[6:]}" for m, s, t, d in NUMERIC])
def test_accelerator_kernels_match_the_cpu_kernels(monkeypatch, method, shape, tokens, dtype):
    """RandLoRA's 5 and 300 tokens take the factored and the materialised path (fp32: W folded in).
    Where the accelerator kernels run bf16 GEMMs, everything (parameter gradients included, still
    fp32 tensors) is compared with the CPU kernels' fp32 GEMMs within bf16 rounding."""
    torch.manual_seed(0)
    base = _One(nn.Linear(shape[1], shape[0], bias=False, dtype=dtype))
    model = dt.get_peft_model(base, SMALL[method]()).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    x = torch.randn(2, tokens, shape[1], dtype=dtype)
    gy = torch.randn(2, tokens, shape[0], dtype=dtype)
    cpu = _train_step(model, x, gy)
    monkeypatch.setattr(_device, "cache_sized", lambda device: False)
    accel = _train_step(model, x, gy)
    assert [t.dtype for t in accel[2:]] == [t.dtype for t in cpu[2:]] == [torch.float32] * (len(cpu) - 2)
    half_gemms = method in BF16_GEMMS and dtype == torch.bfloat16
    for i, (a, b) in enumerate(zip(accel, cpu)):
        # the same products in other groupings: at most a rounding apart (one bf16 step for y and
        # grad_x); bf16 GEMM operands: a few bf16 steps (2^-8 each) of the largest entry
        tol = 2e-2 if half_gemms else 4e-3 if (dtype == torch.bfloat16 and i < 2) else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=f"{method}: tensor {i}")


# ------------------------------------------------------------------ no host synchronisation
# A training step that reads a device value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
# an op whose output size depends on values, a copy to the CPU) stalls the accelerator's queue
# once per layer. Such ops are caught on ``meta`` by name, before they run (on meta most of them
# could not run anyway, but a broad ``except`` in a method would hide that).

SYNC_OPS = frozenset({
    "_local_scalar_dense",  # .item(), .tolist(), float(t), int(t)
    "is_nonzero",  # bool(t), `if t:`
    "equal",  # torch.equal returns a Python bool
    "nonzero", "masked_select", "masked_scatter",  # output size from values
    "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "repeat_interleave",  # with a tensor of repeats its output size comes from the values
})


def _sync_reason(func, args, kwargs) -> str | None:
    name = func._schema.name.split("::")[-1]
    if name in SYNC_OPS:
        return name
    if name == "index" or name.startswith("index_put"):  # boolean-mask indexing: a nonzero inside
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return f"{name} with a boolean mask"
    if name in ("_to_copy", "to", "copy_", "_copy_from"):  # .cpu() and other copies to the host
        dst = kwargs.get("device")
        if name in ("copy_", "_copy_from"):
            dst = args[0].device if name == "copy_" else args[1].device
            src = args[1].device if name == "copy_" else args[0].device
        else:
            src = args[0].device
        if dst is not None and torch.device(dst).type == "cpu" and src.type != "cpu":
            return f"{name} to the host"
    return None


class _SyncGuard(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            import traceback

            where = [f"{f.filename.split('src/')[-1]}:{f.lineno} in {f.name}" for f in traceback.extract_stack()
                     if "/deltatune/" in f.filename]
            self.found.append(f"{reason} at {where[-1] if where else '?'}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_step_never_syncs_with_the_host(method):
    """One 7B-shape layer (bf16 base, 11008 x 4096) forward + backward on meta, after a warm-up step."""
    model = adapted_layer(method, 11008, 4096)
    x = torch.empty(1, 512, 4096, dtype=torch.bfloat16, device="meta", requires_grad=True)
    gy = torch.empty(1, 512, 11008, dtype=torch.bfloat16, device="meta")
    model(x).backward(gy)  # warm-up: per-layer setup may read values once
    model.zero_grad(set_to_none=True)
    guard = _SyncGuard()
    with guard:
        model(x).backward(gy)
    assert not guard.found, f"{method}: host syncs in the steady-state step: {guard.found}"


def test_the_sync_guard_catches_syncs():
    t = torch.empty(8, device="meta")
    for step in (lambda: t.sum().item(), lambda: t[t > 0], lambda: torch.unique(t), lambda: bool(t.sum()),
                 lambda: torch.nonzero(t), lambda: t.to("cpu")):
        guard = _SyncGuard()
        with guard:
            try:
                step()
            except (RuntimeError, NotImplementedError):  # meta cannot produce the value; the guard saw the op
                pass
        assert guard.found, step


# ------------------------------------------------------------------ GEMM dtypes on a bf16 base
GEMMS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}


class _GemmRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[tuple[str, int, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in GEMMS:
            a, b = (args[i] for i in GEMMS[name])
            macs = a.numel() * b.shape[-1]  # (.., m, k) x (.., k, n)
            self.gemms.append((name, macs, tuple(t.dtype for t in args if isinstance(t, torch.Tensor))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", sorted(BF16_GEMMS))
@pytest.mark.parametrize("tokens", [256, 8192])
def test_large_gemms_run_in_bf16_on_a_bf16_base(method, tokens):
    """Accelerator policy (meta), bf16 base: every GEMM of at least 1% of the layer's own
    multiply-adds has only bf16 operands; the fp32 adapter parameters get fp32 gradients."""
    out_f, in_f = 11008, 4096
    model = adapted_layer(method, out_f, in_f)
    x = torch.empty(1, tokens, in_f, dtype=torch.bfloat16, device="meta", requires_grad=True)
    gy = torch.empty(1, tokens, out_f, dtype=torch.bfloat16, device="meta")
    recorder = _GemmRecorder()
    with recorder:
        model(x).backward(gy)
    large = [g for g in recorder.gemms if g[1] >= tokens * out_f * in_f // 100]
    assert len(large) >= 3, recorder.gemms
    assert all(set(dtypes) == {torch.bfloat16} for _, _, dtypes in large), large
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == p.grad.dtype == torch.float32 for p in params)
