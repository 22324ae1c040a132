"""Bone's and BAT's kernels: the fused autograd nodes and the blockwise transform (maths in bone.py).

Shapes: x (..., in), W (out, in), Bone's block B (r, out), BAT's block B (out/r, r, r).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..core.precision import autocast_exempt
from . import _device


def fold(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum of the r-wide chunks of the last axis, zero-padded: (..., in) -> (..., r)."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, r).sum(-2)  # (..., ceil(in/r), r) -> (..., r)


class BoneLinear(torch.autograd.Function):
    """y = x·Wᵀ + fold(x)·B + bias with W (and bias) frozen, as one autograd node.

    The frozen GEMMs accumulate into the small products (BLAS beta = 1): no output-sized or
    input-sized sums, and of the input only fold(x) (T×r) is kept. Gradients:
        grad_x = gy·W + tile(gy·Bᵀ),   grad_B = fold(x)ᵀ·gy
    """

    @staticmethod
    @autocast_exempt
    def forward(ctx, x, weight, block, bias):
        x2 = x.reshape(-1, x.shape[-1])
        folded = fold(x2, block.shape[0])  # (T, r)
        y = folded @ block if bias is None else torch.addmm(bias, folded, block)
        y.addmm_(x2, weight.T)
        ctx.save_for_backward(weight, block, folded)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    @autocast_exempt
    def backward(ctx, gy):
        weight, block, folded = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy2 @ weight  # (T, in)
            r, n_in = block.shape[0], weight.shape[1]
            full = n_in - n_in % r
            g_fold = gy2 @ block.T  # (T, r): the gradient of every r-wide chunk of x
            gx[:, :full].view(gx.shape[0], -1, r).add_(g_fold.unsqueeze(1))
            gx[:, full:].add_(g_fold[:, : n_in - full])  # the zero-padded tail chunk
            gx = gx.view(*gy.shape[:-1], -1)
        if ctx.needs_input_grad[2]:
            gb = folded.T @ gy2
        return gx, None, gb, None


def bat_core(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W_ij (I + B_i) for every block, as one batched GEMM. weight (out, in), block (out/r, r, r)."""
    ni, r, _ = block.shape
    eye = torch.eye(r, dtype=block.dtype, device=block.device)
    w = weight.to(block.dtype).reshape(ni, -1, r)  # (ni, r·nj, r): rows (k, j) of row block i
    return torch.bmm(w, block + eye).reshape(weight.shape)


def bat_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W' = W_ij (I + B_i) + B_i: the transformed weight (merge, and the generic path)."""
    ni, r, _ = block.shape
    new = bat_core(weight, block)
    new.view(ni, r, -1, r).add_(block.unsqueeze(2))  # + B_i on every column block j
    return new


def row_chunks(ni: int, r: int, in_features: int, elements: int = 1 << 21) -> list[tuple[int, int]]:
    """Ranges of row blocks whose slice of W holds about ``elements`` numbers (8 MiB in fp32)."""
    per = max(1, elements // (r * in_features))
    return [(a, min(a + per, ni)) for a in range(0, ni, per)]


def bat_chunk(wv: torch.Tensor, scale: torch.Tensor, added: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W_ij (I + B_i) for a chunk of row blocks: ``bmm(W, I + B)`` (``scale`` = I + B), or with
    ``added`` (``scale`` = B, half precision) ``W + W·B`` in one baddbmm, rounded once."""
    if added:
        return torch.baddbmm(wv, wv, scale, out=out)
    return torch.bmm(wv, scale, out=out)


class BatLinear(torch.autograd.Function):
    """y = x·W'ᵀ + bias with W' = W(I+B) + tile(B), streamed over row-block chunks of W.

    On the CPU (``_device.cache_sized``) W(I+B) is built chunk by chunk (8 MiB each) and consumed
    at once. When grad_x is wanted the chunks are saved for the backward (they are what it
    multiplies gy with; rebuilding them costs a quarter GEMM at r/T = 64/256, and separate chunks,
    unlike one weight-sized tensor, reuse freed heap memory instead of page-faulting fresh pages
    every step); otherwise one buffer is reused. On an accelerator W(I+B) is one batched GEMM,
    never kept: the backward builds it again (a weight-sized fp32 matrix per layer held from
    forward to backward would outweigh the activations, 64 MiB for 4096², against a 2 MiB input at
    256 tokens), so only x (in its own dtype) and fold(x) are saved.
    The tiled B_i term never becomes a matrix: x·tile(B)ᵀ = fold(x)·B_iᵀ. The GEMMs run in the
    block's dtype (fp32) on the CPU; on an accelerator with a bf16 base in bf16 (``_device.gemm_dtype``:
    fp32 accumulation, W(I+B) = W + W·B rounded once, as a bf16 merge would hold it), the fp32
    block cast per call and its gradient returned in fp32. Gradients, with G = gyᵀx taken chunk by chunk:
        grad_x = gy·W(I+B) + tile(Σ_i gy_i B_i)
        grad_B_i = Σ_j W_ijᵀ G_ij + gy_iᵀ fold(x)
    """

    @staticmethod
    @autocast_exempt
    def forward(ctx, x, weight, block, bias):
        ni, r, _ = block.shape
        lean = not _device.cache_sized(x.device)
        dtype = _device.gemm_dtype(x.device, torch.promote_types(x.dtype, weight.dtype), block.dtype)
        blk = block.to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
        wv = weight.to(dtype).reshape(ni, -1, r)  # (ni, r·nj, r)
        # I + B_i; in bf16 the 1 would swallow B's low bits, so there W + W·B is one baddbmm instead
        scale = blk if dtype != block.dtype else block + torch.eye(r, dtype=dtype, device=block.device)
        folded = fold(x2, r)  # (T, r)
        tiled = blk.reshape(-1, r).T  # (r, out): x·tile(B)ᵀ = fold(x)·B_iᵀ
        y = folded @ tiled if bias is None else torch.addmm(bias.to(dtype), folded, tiled)  # (T, out)
        chunks = [(0, ni)] if lean else row_chunks(ni, r, weight.shape[1])
        # grad_x needs W(I+B) again: the CPU keeps its chunks rather than rebuild them
        keep = ctx.needs_input_grad[0] and not lean
        cores, buf = [], None
        for a, b in chunks:
            core = bat_chunk(wv[a:b], scale[a:b], dtype != block.dtype, None if buf is None else buf[: b - a])
            if keep:
                cores.append(core)
            elif buf is None:
                buf = core
            y[:, a * r : b * r].addmm_(x2, core.view((b - a) * r, -1).T)  # + x·W(I+B)ᵀ for these rows
        ctx.save_for_backward(x, weight, block, folded, *cores)
        ctx.has_bias, ctx.chunks, ctx.dtype = bias is not None, chunks, dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    @autocast_exempt
    def backward(ctx, gy):
        x, weight, block, folded, *cores = ctx.saved_tensors
        ni, r, _ = block.shape
        dtype = ctx.dtype
        added = dtype != block.dtype  # W + W·B (bf16) rather than W·(I + B)
        blk = block.to(dtype)
        gy2 = gy.reshape(-1, gy.shape[-1]).to(dtype).contiguous()  # (T, out); an expanded gy (from .sum()) read once
        gy_t = gy2.T  # (out, T) view: BLAS reads its row chunks transposed, no copy
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
        wv = weight.to(dtype).reshape(ni, -1, r)
        want_x, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gx = x2.new_empty(x2.shape) if want_x else None
        gb = torch.empty_like(blk) if want_b else None
        buf = None
        scale = None if cores or not want_x else blk if added else blk + torch.eye(r, dtype=dtype, device=block.device)
        for k, (a, b) in enumerate(ctx.chunks):
            rows = slice(a * r, b * r)
            if want_x:
                core = cores[k] if cores else bat_chunk(wv[a:b], scale[a:b], added)  # kept, or rebuilt
                # gy_c · W(I+B)_c, the first chunk written (no zero fill), the others accumulated
                torch.addmm(gx, gy_t[rows].T, core.view((b - a) * r, -1), beta=0.0 if a == 0 else 1.0, out=gx)
                del core
            if want_b:
                g = torch.mm(gy_t[rows], x2, out=None if buf is None else buf[: b - a].view((b - a) * r, -1))
                buf = g.view(b - a, -1, r) if buf is None else buf
                torch.bmm(wv[a:b].transpose(1, 2), g.view(b - a, -1, r), out=gb[a:b])  # Σ_j W_ijᵀ G_ij
        if want_x:
            g_fold = gy2 @ blk.reshape(-1, r)  # Σ_i gy_i B_i: (T, r)
            gx.view(gx.shape[0], -1, r).add_(g_fold.unsqueeze(1))
            gx = gx.view(x.shape).to(x.dtype)
        if want_b:
            gb += (gy_t @ folded).view_as(block)  # gy_iᵀ fold(x)
            gb = gb.to(block.dtype)
        gbias = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, None, gb, gbias
