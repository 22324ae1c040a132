"""Which kernels a method runs, by the kind of device its tensors are on.

The method kernels were tuned on a 2-core CPU, where working sets sized for the cache (slabs of a
basis, chunks of tokens) and a Python loop over them pay off. On an accelerator each loop trip is
a handful of kernel launches and each kept intermediate is device memory, so there the kernels
run whole-tensor (batched) operations and recompute cheap intermediates in the backward instead
of keeping them. ``meta`` (shapes only, used to count kernels and saved bytes in the tests) takes
the accelerator policy: it stands in for the GPU.

:func:`cache_sized` is the one switch, read by every method file at call time (so a test can run
the accelerator kernels on CPU tensors by patching it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..core.precision import autocast_exempt


def cache_sized(device: torch.device) -> bool:
    """True where the CPU kernels run (loops over cache-sized pieces, intermediates kept for the
    backward); False on accelerators and ``meta`` (whole-tensor kernels, lean saved state)."""
    return device.type == "cpu"


class _UpcastLinear(torch.autograd.Function):
    """h = x·aᵀ in a's dtype, with x kept for the backward in its own dtype.

    Plain autograd over ``F.linear(x.to(a.dtype), a)`` keeps the cast copy (an fp32 x is twice a
    bf16 one); the cast is exact, so casting the kept x again in the backward gives the same
    gradient of ``a``:  grad_x = (gh·a) in x's dtype,  grad_a = ghᵀ·x.
    """

    @staticmethod
    @autocast_exempt
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        return F.linear(x.to(a.dtype), a)

    @staticmethod
    @autocast_exempt
    @once_differentiable
    def backward(ctx, gh: torch.Tensor):
        x, a = ctx.saved_tensors
        gx = ga = None
        if ctx.needs_input_grad[0]:
            gx = (gh @ a).to(x.dtype)  # (..., in)
        if ctx.needs_input_grad[1]:
            ga = gh.reshape(-1, gh.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(a.dtype)  # (r, in)
        return gx, ga


def upcast_linear(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``F.linear(x.to(a.dtype), a)`` (no bias) that keeps ``x``, not its cast copy, for the backward."""
    if x.dtype == a.dtype:
        return F.linear(x, a)
    return _UpcastLinear.apply(x, a)


def kind(device: torch.device) -> str:
    """"cpu" where :func:`cache_sized` holds, else "accelerator": the device kind a cost model prices."""
    return "cpu" if cache_sized(device) else "accelerator"


def gemm_dtype(device: torch.device, data_dtype: torch.dtype, master_dtype: torch.dtype) -> torch.dtype:
    """The dtype a method's large GEMMs run in, for activations of ``data_dtype`` and adapter
    parameters (fp32 masters, usually) of ``master_dtype``.

    On the CPU: ``master_dtype``, as the CPU kernels always did. On an accelerator, with a bf16
    base and fp32 masters: bf16, the tensor cores' dtype (torch's bf16 matmul accumulates in fp32
    and rounds the result once); the small parameters stay fp32 and are cast per call, their
    gradients come back in their own dtype. fp16 bases keep fp32 GEMMs: fp16's range does not cover
    the kernels' unnormalised intermediates (sums over thousands of tokens).
    """
    if cache_sized(device) or data_dtype != torch.bfloat16 or master_dtype != torch.float32:
        return master_dtype
    return torch.bfloat16
