"""Numerical kernels for FourierFT.

A FourierFT adapter on a layer with weight ``W`` of shape ``(out, in)`` owns ``n`` trainable
spectral coefficients ``c`` placed at fixed frequency positions ``(rows[k], cols[k])``.  The weight
update is the real part of the 2-D inverse DFT (``norm="backward"``) of the sparse spectrum::

    dW[u, v] = scaling / (out * in) * sum_k c_k * cos(2 pi (rows_k u / out + cols_k v / in))

This module provides

* :func:`peft_positions` -- the frequency positions exactly as PEFT 0.21.2 draws them, without the
  ``O(out * in)`` ``torch.randperm`` PEFT uses;
* :func:`fourier_linear` -- ``x @ dW.T`` evaluated with 1-D real FFTs and a gather/scatter over
  the n positions,
  never building ``dW`` (custom autograd with gradients for ``x`` and ``c``);
* :func:`fourier_delta_weight` -- the dense ``dW`` (differentiable), for merging or the dense path;
* :func:`choose_dense` -- a cost model choosing between the two evaluation strategies.

Derivation of the factorised form (``T`` tokens, ``R = rfft(x)`` along the input dim,
``I' = in // 2 + 1``, ``O' = out // 2 + 1``).  For real ``x`` the full spectrum is recovered from
the half spectrum by ``X[q] = conj(X[in - q])``; for the output, ``Re(ifft(Z))`` equals
``irfft(H)`` where ``H`` is the half spectrum of the Hermitian part of ``Z`` (interior bins are
implicitly doubled by ``irfft``).  Folding every position into the half ranges with

    p'_k = rows_k  if rows_k <= out // 2  else out - rows_k
    q'_k = cols_k  if cols_k <= in // 2   else in - cols_k
    conj_k = (rows_k > out // 2) == (cols_k > in // 2)
    m(p) = 1 for the DC / Nyquist bin, 2 otherwise

gives, with ``phi_k(z) = conj(z) if conj_k else z``:

    forward :  G[t, p'_k] += scaling * c_k / (in * m(p'_k))  * phi_k(R[t, q'_k]);   y = irfft_out(G)
    grad x  :  H[t, q'_k] += scaling * c_k / (out * m(q'_k)) * phi_k(F[t, p'_k]);   gx = irfft_in(H)
    grad c  :  gc_k = scaling / (out * in) * sum_t Re(conj(F[t, p'_k]) * phi_k(R[t, q'_k]))

where ``F = rfft(grad_y)`` along the output dim.  Each direction is a gather of the n bins a
coefficient reads, a multiply by per-position real factors (the conjugation is a sign on the
imaginary part) and an ``index_add`` into the bins it writes; the spectra are laid out bin-major
(bins x tokens) so that these are contiguous row copies.  Tokens are processed in chunks:
cache-sized on the CPU, a few large ones on an accelerator (see ``_chunks``).  Total cost ``O(T (out log out + in log in) + T n)``; besides the output, the forward keeps
the input spectrum at the distinct used input bins (at most ``in + 2`` floats per token).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..core.precision import autocast_exempt
from . import _device

__all__ = [
    "FourierPlan",
    "choose_dense",
    "path_cost",
    "fourier_delta_weight",
    "fourier_linear",
    "peft_positions",
]


# =============================================================================================
# Frequency positions (bit-exact with PEFT's torch.randperm draw)
# =============================================================================================
#
# torch's CPU ``randperm(N, generator=g)`` (ATen ``randperm_cpu``), for ``N < (2**32 - 1) // 20``,
# fills ``r = arange(N)`` and runs a forward Fisher-Yates shuffle
#
#     for i in range(N - 1):
#         z = g.random() % (N - i)          # one raw 32-bit mt19937 output per step
#         swap(r[i], r[i + z])
#
# Position ``i`` is final after step ``i`` and step ``i`` consumes exactly one draw, so the first
# ``n`` outputs need only the first ``n`` draws; untouched slots hold their own index, so the
# shuffle state is a dict of the (at most n) displaced slots.  ``Generator.manual_seed(s)`` seeds
# the mt19937 engine with the low 32 bits of ``s`` (two's complement for negative seeds) using the
# reference ``init_genrand`` recursion, which is the same stream numpy's legacy seeding produces.
#
# For ``N >= (2**32 - 1) // 20`` torch switches to an inside-out shuffle with 64-bit draws whose
# prefix depends on all ``N`` draws; there we call torch.randperm itself (exact by construction).
# Both regimes were verified empirically against torch 2.13 (threshold included), and a small
# self-check at first use guards against a future change of torch's algorithm or of numpy's
# seeding, falling back to torch.randperm if anything disagrees.

_FORWARD_SHUFFLE_LIMIT = (2**32 - 1) // 20  # 214748364; torch uses forward Fisher-Yates below it
_SIM_MAX_FRACTION = 8  # simulate only when n * 8 <= N; otherwise randperm is about as cheap

_self_check_ok: Optional[bool] = None


def _mt19937_pure(seed32: int, count: int) -> list:
    """Reference mt19937 (32-bit outputs), used only when numpy's generator is unavailable."""
    mt = [0] * 624
    mt[0] = seed32
    for i in range(1, 624):
        prev = mt[i - 1]
        mt[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF
    out = []
    idx = 624
    while len(out) < count:
        if idx >= 624:
            for i in range(624):
                y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
                v = mt[(i + 397) % 624] ^ (y >> 1)
                if y & 1:
                    v ^= 0x9908B0DF
                mt[i] = v
            idx = 0
        y = mt[idx]
        idx += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        out.append(y)
    return out


def _mt19937_raw(seed32: int, count: int) -> list:
    try:
        import numpy as np

        bitgen = np.random.MT19937()
        bitgen._legacy_seeding(seed32)
        return bitgen.random_raw(count).tolist()
    except Exception:  # numpy missing or its private seeding API changed
        return _mt19937_pure(seed32, count)


def _shuffle_prefix(total: int, n: int, seed: int) -> list:
    """First ``n`` entries of torch's forward Fisher-Yates ``randperm(total)``."""
    draws = _mt19937_raw(seed & 0xFFFFFFFF, n)
    displaced: dict = {}
    out = [0] * n
    last = total - 1
    for i in range(n):
        if i == last:  # torch's loop stops before the last slot (no draw consumed)
            out[i] = displaced.get(i, i)
            break
        j = i + draws[i] % (total - i)
        vi = displaced.pop(i, i)
        if j == i:
            out[i] = vi
        else:
            out[i] = displaced.get(j, j)
            displaced[j] = vi
    return out


def _simulation_trusted() -> bool:
    global _self_check_ok
    if _self_check_ok is None:
        ok = True
        try:
            for total, n, seed in ((5003, 97, 777), (64, 64, 2**40 + 11), (2, 2, 0)):
                ref = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
                if ref.tolist() != _shuffle_prefix(total, n, seed):
                    ok = False
                    break
        except Exception:
            ok = False
        _self_check_ok = ok
    return _self_check_ok


def peft_positions(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """Frequency positions of a PEFT 0.21.2 FourierFT layer, as a CPU ``LongTensor`` ``(2, n)``.

    Row 0 holds the output-dim frequencies, row 1 the input-dim frequencies, identical to
    ``torch.randperm(out * in, generator=torch.Generator().manual_seed(seed))[:n]`` split by
    ``// in`` and ``% in``, but in ``O(n)`` time and memory whenever ``n * 8 <= out * in`` and
    ``out * in < 214748364`` (otherwise the randperm is computed, which is exact by definition).
    """
    out_features, in_features, n = int(out_features), int(in_features), int(n_frequency)
    if out_features <= 0 or in_features <= 0:
        raise ValueError("out_features and in_features must be positive")
    total = out_features * in_features
    if n <= 0 or n > total:
        raise ValueError(f"n_frequency must be in [1, out_features * in_features = {total}], got {n}")
    seed = int(seed)
    generator = torch.Generator().manual_seed(seed)  # same seed validation / wrapping as PEFT
    if total < _FORWARD_SHUFFLE_LIMIT and n * _SIM_MAX_FRACTION <= total and _simulation_trusted():
        flat = torch.tensor(_shuffle_prefix(total, n, seed), dtype=torch.long)
    else:
        flat = torch.randperm(total, generator=generator)[:n].clone()
    return torch.stack([flat // in_features, flat % in_features], dim=0)


# =============================================================================================
# Frequency-map plan
# =============================================================================================


def _edge(idx: torch.Tensor, size: int) -> torch.Tensor:
    """True for the bins ``irfft`` does not double (DC, and Nyquist for even sizes)."""
    edge = idx == 0
    if size % 2 == 0:
        edge = edge | (idx == size // 2)
    return edge


def _csr_pattern(row: torch.Tensor, col: torch.Tensor, n_rows: int, n_cols: int):
    """CSR structure ``(crow, col)`` (int32) of entries ``(row[e], col[e])`` with duplicates merged,
    and ``pos``: the value slot of each entry."""
    uniq, pos = torch.unique(row * n_cols + col, sorted=True, return_inverse=True)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=row.device)
    torch.cumsum(torch.bincount(uniq // n_cols, minlength=n_rows), 0, out=crow[1:])
    return (crow.int(), (uniq % n_cols).int()), pos


def _csr_entries(row, col, n_rows: int, n_cols: int, div: torch.Tensor):
    """A real CSR map with one entry per ``(row[e], col[e])`` carrying the coefficient ``e mod n``
    divided by ``div[e]``: ``(pattern, src, div, sums)`` with ``src``/``div`` in slot order, or
    in entry order plus ``sums`` (entry -> slot) where entries share a slot."""
    pattern, pos = _csr_pattern(row, col, n_rows, n_cols)
    src = torch.arange(row.numel(), device=row.device) % (row.numel() // 2)
    if pattern[1].numel() == row.numel():  # no shared slots: a permutation
        order = torch.empty_like(pos)
        order[pos] = torch.arange(pos.numel(), device=pos.device)
        return pattern, src[order], div[order], None
    return pattern, src, div, pos


def _csr(pattern, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if values.device.type == "meta":
        # shape-only runs: meta has no sparse GEMM kernels; a dense stand-in keeps one op per product
        return values.new_empty(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(pattern[0], pattern[1], values, size, check_invariants=False)


# plan parts: index tensors (int64: gathers and scatters) and CSR structure plus small integer
# factors (int32). Integers only, so that a module's ``.to(dtype)`` / ``.half()`` leaves them alone.
_LONG_PARTS = ("used", "used2", "f_src", "b_src", "f_sum", "b_sum", "g_pos", "edge_idx", "dense_slot")
_INT_PARTS = ("sign", "f_div", "b_div", "f_crow", "f_col", "b_crow", "b_col", "g_crow", "g_col")


class FourierPlan:
    """Sparse structure of the frequency maps (and of the dense ΔW) for fixed positions and layer shape.

    Spectra are held planar: row ``2b`` the real parts of bin ``b`` over the tokens, row ``2b + 1``
    the imaginary parts. Position ``k`` folded into the half spectra reads input bin ``q_k`` and
    writes output bin ``p_k``; where it reads the conjugate (``sign_k = -1``) its imaginary-part entry
    is negated, so each map is one real CSR matrix with 2n entries (merged where folded positions
    coincide). Backward keeps the input spectrum at the distinct used input bins only (planar rows
    ``used2``).

    Everything is held in two flat integer tensors, :attr:`index` (int64) and :attr:`csr` (int32);
    the named parts are views into them, placed by :attr:`layout` (plain Python ints, the same for
    every device). A module owns the two tensors as non-persistent buffers (so ``.to()`` and
    ``to_empty`` move them with it) and views them with :meth:`over`; shape-only (``meta``) tensors
    work as well, as nothing here reads values after the build. ``FourierPlan(rows, cols, out, in)``
    builds one (reading the positions' values: a host sync, once).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, out_features: int, in_features: int):
        rows = torch.as_tensor(rows).reshape(-1).long()
        cols = torch.as_tensor(cols).reshape(-1).to(device=rows.device, dtype=torch.long)
        if rows.numel() != cols.numel():
            raise ValueError("rows and cols must have the same number of entries")
        O, I = int(out_features), int(in_features)
        if rows.numel() and (
            int(rows.min()) < 0 or int(rows.max()) >= O or int(cols.min()) < 0 or int(cols.max()) >= I
        ):
            raise ValueError("frequency positions out of range for the layer shape")
        Oh, Ih = O // 2 + 1, I // 2 + 1
        fold_p, fold_q = rows > O // 2, cols > I // 2
        p = torch.where(fold_p, O - rows, rows)
        q = torch.where(fold_q, I - cols, cols)
        used, slot = torch.unique(q, sorted=True, return_inverse=True)
        sign = torch.where(fold_p == fold_q, -1, 1)  # phi_k(z) = conj(z) where -1
        re_im = lambda idx: torch.cat([2 * idx, 2 * idx + 1])  # noqa: E731  (real rows, then imaginary rows)
        both = lambda t: torch.cat([t, t * sign])  # noqa: E731  (an entry's factor: real, imaginary)
        parts = {"sign": sign, "used": used, "used2": torch.stack([2 * used, 2 * used + 1], dim=1).reshape(-1)}
        # each map entry e reads coefficient src[e] divided by div[e] (times scaling / in or / out):
        # div = ±m, m = 1 for the DC / Nyquist bins and 2 otherwise; entries sit in CSR slot order,
        # with a slot -> entries sum only where folded positions coincide (``*_sum``)
        for d, (w_idx, r_idx, n_w, n_r, m_of) in {
            "f": (p, q, Oh, Ih, torch.where(_edge(p, O), 1, 2)),  # y  <- x
            "b": (q, p, Ih, Oh, torch.where(_edge(q, I), 1, 2)),  # gx <- gy
        }.items():
            (crow, col), src, div, sums = _csr_entries(re_im(w_idx), re_im(r_idx), 2 * n_w, 2 * n_r, both(m_of))
            parts.update({f"{d}_crow": crow, f"{d}_col": col, f"{d}_src": src, f"{d}_div": div, f"{d}_sum": sums})
        (parts["g_crow"], parts["g_col"]), parts["g_pos"] = _csr_pattern(re_im(p), re_im(slot), 2 * Oh, 2 * used.numel())
        # dense ΔW (fourier_delta_weight): positions folded along the input dim only; edge columns
        # (DC / Nyquist) keep both halves, the coefficient and its mirror (-p, q)
        p_dense = torch.where(fold_q, (O - rows) % O, rows)
        edge_idx = torch.nonzero(_edge(q, I)).reshape(-1)
        parts["edge_idx"] = edge_idx  # which coefficients are repeated for their mirror
        p_all = torch.cat([p_dense, ((O - p_dense) % O)[edge_idx]])
        parts["dense_slot"] = torch.cat([slot, slot[edge_idx]]) * O + p_all  # in the occupied columns
        layout: dict = {}
        flats = []
        for which, (names, dtype) in enumerate(((_LONG_PARTS, torch.long), (_INT_PARTS, torch.int32))):
            pieces, start = [], 0
            for name in names:
                t = parts[name]
                if t is not None:
                    layout[name] = (which, start, t.numel())
                    pieces.append(t.reshape(-1).to(dtype))
                    start += t.numel()
            flats.append(torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=rows.device))
        self._view(flats[0], flats[1], (layout, O, I, rows.numel()))

    def _view(self, index: torch.Tensor, csr: torch.Tensor, spec: tuple) -> None:
        layout, O, I, n = spec
        self.index, self.csr, self.spec = index, csr, spec
        self.out_features, self.in_features, self.n = O, I, n
        for name in (*_LONG_PARTS, *_INT_PARTS):
            where = layout.get(name)
            flat = None if where is None else (index, csr)[where[0]]
            setattr(self, name, None if where is None else flat.narrow(0, where[1], where[2]))
        self.n_used = self.used.numel()
        self.device = index.device

    @classmethod
    def over(cls, index: torch.Tensor, csr: torch.Tensor, spec: tuple) -> "FourierPlan":
        """The plan whose flat tensors are ``index`` and ``csr`` (any device), laid out as ``spec``
        (another plan's :attr:`spec`)."""
        plan = object.__new__(cls)
        plan._view(index, csr, spec)
        return plan

    @classmethod
    def from_positions(cls, indices: torch.Tensor, out_features: int, in_features: int) -> "FourierPlan":
        """Plan from a ``(2, n)`` position tensor as returned by :func:`peft_positions`."""
        return cls(indices[0], indices[1], out_features, in_features)

    def to(self, device: Union[str, torch.device]) -> "FourierPlan":
        """This plan on ``device`` (itself if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return FourierPlan.over(self.index.to(device), self.csr.to(device), self.spec)

    def map(self, spectrum: torch.Tensor, scaling: float, direction: str) -> torch.Tensor:
        """The real CSR map of ``direction`` ("forward": x -> y, "backward": gy -> gx) for these
        coefficients (values: ``scaling * c[src] / (in · div)``, resp. ``/ (out · div)``)."""
        forward = direction == "forward"
        d = "f" if forward else "b"
        crow, col, src, div, sums = (getattr(self, f"{d}_{k}") for k in ("crow", "col", "src", "div", "sum"))
        Oh2, Ih2 = 2 * (self.out_features // 2 + 1), 2 * (self.in_features // 2 + 1)
        # ``div`` is ±1 or ±2: dividing by it is exact, so the values are those of one rounded factor
        values = spectrum.detach().index_select(0, src).mul_(scaling / (self.in_features if forward else self.out_features))
        values.div_(div)
        if sums is not None:
            values = values.new_zeros(col.numel()).index_add_(0, sums, values)
        return _csr((crow, col), values, (Oh2, Ih2) if forward else (Ih2, Oh2))

    def sample_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """CSR pattern (zero values) of the coefficient gradient's sampled product."""
        shape = (2 * (self.out_features // 2 + 1), self.used2.numel())
        return _csr((self.g_crow, self.g_col), torch.zeros(self.g_col.numel(), dtype=dtype, device=self.device), shape)

    def coefficient_grad(self, sampled: torch.Tensor, scaling: float) -> torch.Tensor:
        """scaling / (out in) Σ_t Re(conj(F) phi(R)) per position, from the sampled re·re and im·im sums."""
        re_re, im_im = sampled.index_select(0, self.g_pos).view(2, self.n)
        return (im_im * self.sign).add_(re_re).mul_(scaling / (self.out_features * self.in_features))


# =============================================================================================
# FFT-path evaluation of x @ dW^T
# =============================================================================================


def _planar(mat: torch.Tensor) -> torch.Tensor:
    """``rfft(mat)`` along the features as a planar bin-major real matrix: (T, K) -> (2 (K//2 + 1), T).

    Bin-major rows make each frequency map one CSR x dense product over contiguous rows.
    """
    spec = torch.view_as_real(torch.fft.rfft(mat, dim=-1))  # (T, K', 2)
    return spec.permute(1, 2, 0).contiguous().view(-1, mat.shape[0])  # the copy into planar rows


def _inverse_planar(planar: torch.Tensor, n_out: int, out: torch.Tensor) -> None:
    """Inverse of :func:`_planar` for a (2 K', T) half spectrum, written into ``out`` (T, n_out)."""
    T = planar.shape[1]
    # rows 2b, 2b+1 = re, im of bin b: the plain 2-D transpose is already the interleaved complex
    # layout, and as a 2-D copy it takes PyTorch's blocked transpose (up to 3x faster than the 3-D
    # permute, which thrashes the cache when T is a power of two)
    spec = torch.view_as_complex(planar.T.contiguous().view(T, -1, 2))  # (T, K')
    if out.dtype == planar.dtype:
        torch.fft.irfft(spec, n=n_out, dim=-1, out=out)
    else:
        out.copy_(torch.fft.irfft(spec, n=n_out, dim=-1))


def _apply(csr: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``csr @ dense`` into a fresh row-major result (``addmm`` with ``out=`` skips the zero fill and
    the layout copies ``torch.sparse.mm`` makes)."""
    out = dense.new_empty((csr.shape[0], dense.shape[1]))
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


def _sampled(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor, nnz: int) -> torch.Tensor:
    """The ``nnz`` values of (a @ b) at the entries of the CSR ``mask`` (on meta, where ``mask`` is a
    dense stand-in (see ``_csr``), one dense product of the same shape)."""
    if a.device.type == "meta":
        return (a @ b).reshape(-1)[:nnz]
    return torch.sparse.sampled_addmm(mask, a, b, beta=0.0).values()


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


# Tokens are processed in chunks. On the CPU each chunk's spectra stay cache sized (on 4096x4096
# with 2048 tokens: 2-3x faster than one pass). On an accelerator (_device) a chunk is ~17 kernel
# launches whatever its size, so chunks only bound the transient spectra (a few times the planar
# spectrum, 256 MiB here): one chunk up to ~8k tokens at 4096 features, two or three at 11008.
# Chunks are balanced (no one-token tail).
_CHUNK_BYTES = 2 << 20
_DEVICE_CHUNK_BYTES = 256 << 20
_CHUNK_TOKENS_OVERRIDE: Optional[int] = None


def _chunks(T: int, in_features: int, out_features: int, elem: int, device: torch.device) -> list[tuple[int, int]]:
    if _CHUNK_TOKENS_OVERRIDE is not None:
        size = _CHUNK_TOKENS_OVERRIDE
    else:
        per_token = 4 * elem * (max(in_features, out_features) // 2 + 1)  # planar spectrum bytes
        budget = _CHUNK_BYTES if _device.cache_sized(device) else _DEVICE_CHUNK_BYTES
        limit = max(32, budget // per_token)
        size = -(-T // -(-T // limit))  # ceil(T / number of chunks)
    return [(t0, min(T, t0 + size)) for t0 in range(0, T, size)]


class _FourierLinearFn(torch.autograd.Function):
    """With ``R = rfft(x)``, ``F = rfft(grad_y)`` and, per position k,

        forward :  G[p_k] += s c_k / (in  m(p_k)) phi_k(R[q_k]);   y  = irfft_out(G)
        grad x  :  H[q_k] += s c_k / (out m(q_k)) phi_k(F[p_k]);   gx = irfft_in(H)
        grad c  :  gc_k = s / (out in) Σ_t Re(conj(F[t, p_k]) phi_k(R[t, q_k]))

    (``s`` the scaling, ``m`` 1 for the DC/Nyquist bins and 2 otherwise, ``phi_k`` the optional
    conjugation): the two maps are CSR products on planar spectra, the coefficient gradient a
    sampled dense product on the same pattern.

    With a frozen ``base`` weight (and bias) the layer's own GEMMs run here too, accumulating into
    the spectral results (BLAS ``beta=1``), which saves autograd a node and a full output-sized and
    input-sized sum per call.
    """

    @staticmethod
    @autocast_exempt
    def forward(ctx, x, spectrum, plan_index, plan_csr, plan_spec, scaling, base_weight=None, base_bias=None):
        # the plan's two flat tensors come in as inputs and go through save_for_backward like every
        # tensor the backward reads (saved-tensor hooks see them; the ctx holds no tensor)
        plan = FourierPlan.over(plan_index, plan_csr, plan_spec)
        O, I = plan.out_features, plan.in_features
        lead = x.shape[:-1]
        x2d = x.reshape(-1, I)
        T = x2d.shape[0]
        cdtype = _compute_dtype(x.dtype, spectrum.dtype)
        ctx.plan_spec, ctx.scaling, ctx.cdtype = plan_spec, scaling, cdtype
        ctx.x_shape, ctx.x_dtype, ctx.c_dtype = x.shape, x.dtype, spectrum.dtype
        ctx.has_base = base_weight is not None  # frozen: saved like F.linear saves its weight
        base = (base_weight,) if ctx.has_base else ()
        if T == 0 or plan.n == 0:
            ctx.save_for_backward(spectrum, plan_index, plan_csr, *base)
            y = F.linear(x2d, base_weight, base_bias) if base_weight is not None else x.new_zeros((T, O))
            return y.reshape(*lead, O)

        fmap = plan.map(spectrum.to(cdtype), scaling, "forward")
        ctx.chunks = _chunks(T, I, O, torch.finfo(cdtype).bits // 8, x.device)
        rows = plan.used2.numel()
        kept = x2d.new_empty((rows * T,), dtype=cdtype) if ctx.needs_input_grad[1] else None
        y = torch.empty((T, O), dtype=x.dtype, device=x.device)
        for t0, t1 in ctx.chunks:
            spec = _planar(x2d[t0:t1].to(cdtype))  # (2I', Tc)
            if kept is not None:
                torch.index_select(spec, 0, plan.used2, out=kept[rows * t0 : rows * t1].view(rows, t1 - t0))
            _inverse_planar(_apply(fmap, spec), O, y[t0:t1])
        if base_weight is not None:
            y.addmm_(x2d, base_weight.T)
            if base_bias is not None:
                y += base_bias
        ctx.save_for_backward(spectrum, plan_index, plan_csr, *base, *(() if kept is None else (kept,)))
        return y.reshape(*lead, O)

    @staticmethod
    @autocast_exempt
    def backward(ctx, grad_out):
        scaling, cdtype = ctx.scaling, ctx.cdtype
        saved = ctx.saved_tensors  # read once: a checkpoint's saved tensors unpack only once
        spectrum, plan = saved[0], FourierPlan.over(saved[1], saved[2], ctx.plan_spec)
        O, I = plan.out_features, plan.in_features
        base = saved[3] if ctx.has_base else None
        kept = saved[-1] if len(saved) > 3 + ctx.has_base else None
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g2d = grad_out.reshape(-1, O)
        T = g2d.shape[0]
        if T == 0 or plan.n == 0:
            grad_x = None
            if need_x:
                gx = g2d.to(base.dtype) @ base if base is not None else g2d.new_zeros((T, I))
                grad_x = gx.to(ctx.x_dtype).reshape(ctx.x_shape)
            return grad_x, (torch.zeros_like(spectrum) if need_c else None), None, None, None, None, None, None

        if need_x:
            bmap = plan.map(spectrum.to(cdtype), scaling, "backward")
            gx = torch.empty((T, I), dtype=ctx.x_dtype, device=g2d.device)
        if need_c:
            rows = plan.used2.numel()
            mask = plan.sample_mask(cdtype)
            acc = torch.zeros(plan.g_col.numel(), dtype=cdtype, device=g2d.device)
        for t0, t1 in ctx.chunks:
            spec = _planar(g2d[t0:t1].to(cdtype))  # (2O', Tc)
            if need_c:
                kept_c = kept[rows * t0 : rows * t1].view(rows, t1 - t0)
                acc += _sampled(mask, spec, kept_c.T, acc.numel())
            if need_x:
                _inverse_planar(_apply(bmap, spec), I, gx[t0:t1])
        if need_x and base is not None:
            gx.addmm_(g2d.to(base.dtype), base)  # + the frozen layer's gy·W
        grad_x = gx.reshape(ctx.x_shape) if need_x else None
        grad_c = plan.coefficient_grad(acc, scaling).to(ctx.c_dtype) if need_c else None
        return grad_x, grad_c, None, None, None, None, None, None


def fourier_linear(
    x: torch.Tensor,
    spectrum: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    out_features: int,
    scaling: Union[float, torch.Tensor],
    *,
    plan: Optional[FourierPlan] = None,
    base_weight: Optional[torch.Tensor] = None,
    base_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, dW)`` for the FourierFT update ``dW`` without materialising it.

    Args:
        x: input ``(..., in_features)``; any float dtype (half types are computed in float32,
            float64 in float64).  The result and ``grad_x`` have ``x``'s dtype.
        spectrum: coefficients ``c`` of shape ``(n,)``; its gradient has its dtype.
        rows, cols: integer frequency positions ``(n,)`` (output dim, input dim); the pairs must
            be distinct (as drawn by PEFT / :func:`peft_positions`), duplicates would be summed.
        out_features: ``out`` of the adapted layer.
        scaling: the FourierFT scaling factor (Python number or 0-d tensor, not differentiated).
        plan: the :class:`FourierPlan` of these positions (a module keeps it; without it one is
            built for this call, which reads the positions' values: a host sync).
        base_weight, base_bias: a frozen layer ``(out, in)`` (and ``(out,)``) in ``x``'s dtype to
            include: the result is then ``F.linear(x, base_weight + dW, base_bias)``. They get
            no gradient.

    Returns:
        ``(..., out_features)`` tensor equal to ``F.linear(x, Re(ifft2(S)) * scaling)`` (plus the
        base layer when given).
    """
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    in_features = x.shape[-1]
    if isinstance(scaling, torch.Tensor):
        scaling = float(scaling.detach().item())
    scaling = float(scaling)
    if spectrum.dim() != 1:
        raise ValueError("spectrum must be a 1-D tensor")
    if plan is None:
        plan = FourierPlan(torch.as_tensor(rows), torch.as_tensor(cols), out_features, in_features)
    else:
        if plan.out_features != int(out_features) or plan.in_features != in_features:
            raise ValueError("plan was built for a different layer shape")
    plan = plan.to(x.device)
    if plan.n != spectrum.numel():
        raise ValueError(f"spectrum has {spectrum.numel()} entries but there are {plan.n} positions")
    if base_weight is not None:
        if tuple(base_weight.shape) != (int(out_features), in_features) or base_weight.dtype != x.dtype:
            raise ValueError(f"base_weight must be ({out_features}, {in_features}) in {x.dtype}")
        base_weight, base_bias = base_weight.detach(), (None if base_bias is None else base_bias.detach())
    elif base_bias is not None:
        raise ValueError("base_bias given without base_weight")
    return _FourierLinearFn.apply(x, spectrum, plan.index, plan.csr, plan.spec, scaling, base_weight, base_bias)


# =============================================================================================
# Dense delta weight
# =============================================================================================


def fourier_delta_weight(
    spectrum: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    out_features: int,
    in_features: int,
    scaling: Union[float, torch.Tensor],
    *,
    plan: Optional[FourierPlan] = None,
) -> torch.Tensor:
    """Dense ``Re(ifft2(S)) * scaling`` of shape ``(out, in)`` (float32; float64 for a float64 spectrum).

    The sparse spectrum is folded into the half spectrum (along the input dim) of its Hermitian
    part, which is real-valued, so only the columns that hold a coefficient need the complex
    inverse DFT along the output dim, followed by one ``irfft`` along the input dim (about half
    to a third of the cost of PEFT's dense complex ``ifft2``).
    Differentiable with respect to ``spectrum`` through ordinary autograd. Pass the
    :class:`FourierPlan` of these positions to skip its (position-only) index work.
    """
    O, I = int(out_features), int(in_features)
    Ih = I // 2 + 1
    if isinstance(scaling, torch.Tensor):
        scaling = float(scaling.detach().item())
    dtype = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
    device = spectrum.device
    plan = (FourierPlan(torch.as_tensor(rows), torch.as_tensor(cols), O, I) if plan is None else plan).to(device)
    c = spectrum.reshape(-1).to(dtype) * (0.5 * float(scaling))
    c_all = torch.cat([c, c.index_select(0, plan.edge_idx)])
    # occupied columns only, laid out (column, output-frequency) so the transform is along the last dim
    cols_half = torch.zeros(plan.n_used * O, dtype=dtype, device=device).index_add(0, plan.dense_slot, c_all)
    cols_spec = torch.fft.ifft(cols_half.view(plan.n_used, O), dim=-1)  # (n_used, O) complex
    half = torch.zeros(O, Ih, dtype=cols_spec.dtype, device=device)
    half = half.index_copy(1, plan.used, cols_spec.transpose(0, 1))
    return torch.fft.irfft(half, n=I, dim=1)


# =============================================================================================
# Cost model
# =============================================================================================
#
# One forward + backward of each path, as work counted from the kernels it runs (T tokens, O/I
# out/in features, n coefficients, u the expected number of occupied half-spectrum columns), priced
# per device kind. FFT flops use the usual 5 N log2 N for a complex length-N transform (2.5 N log2 N
# for a real one); the transforms and products run in fp32 (half inputs are cast).
#
#   FFT path   transforms  4 real 1-D FFTs per token (rfft x, irfft y, rfft gy, irfft gx):
#                          5 T (O log2 O + I log2 I) flops
#              sparse      the forward and backward CSR maps and the sampled product, 2n
#                          entries each, over T tokens: 12 T n flops, reading 32 T n bytes
#              passes      spectra copies (planar layout, kept bins, casts): 32 T (O + I) bytes
#              ~40 kernel launches
#   dense path transforms  ΔW = irfft_in(ifft_out(S)) on u + O rows, and the same again in the
#                          backward: 5 (u O log2 O + O I log2 I) flops (the backward's counted
#                          in the per-flop rate)
#              GEMMs       x·ΔWᵀ, gy·ΔW, gyᵀ·x in fp32: 6 T O I flops
#              passes      ΔW, its gradient and their spectra (about 7 weight-sized fp32 passes),
#                          casts of x, y, gx: 28 O I + 6 T (2I + O) bytes
#              ~20 kernel launches
#
# CPU rates: fitted by weighted least squares to 116 measured (tokens, out, in, n) points on one
# thread of this project's 2-core machines (AMD EPYC, AVX-512, MKL), 32x32 to 4096x4096, tokens
# 1..512, n 16..out*in; median error 12-13%, and the model picks the faster path in every case
# except six tiny (<=128x128) layers where both cost the same ~0.5 ms of overhead. There the memory
# traffic is priced inside the per-flop rates (byte rate 0), and the fixed cost is Python and
# dispatch overhead. Written out, the CPU model is
#
#   fft   = 4.6e-4 + 5.1e-10 T (O log2 O + I log2 I) + 5.0e-10 T n + 1.2e-8 n
#   dense = 4.4e-4 + 5.8e-10 (u O log2 O + O I log2 I) + 7.6e-11 T O I + 5.5e-8 n
#
# Accelerator rates: not measured (no GPU here); from NVIDIA's H100 SXM5 datasheet, with stated
# efficiencies:
#   * fp32 GEMMs: 67 TFLOP/s peak for FP32 without tensor cores (PyTorch leaves TF32 off for
#     matmuls by default), at an assumed 70% => 1 / 47e12 s per flop;
#   * FFTs: cuFFT at these lengths (<= 16k, one kernel each) is bound by memory, not flops; its
#     traffic is in the byte counts (the 5 N log2 N flops at 67 TFLOP/s would be a few % of it);
#   * memory: 3.35 TB/s HBM3, at an assumed 80% for streaming passes => 1 / 2.7e12 s per byte;
#     CSR gathers (cuSPARSE SpMM / SDDMM reading whole token rows per entry) at an assumed 50%
#     => 1 / 1.7e12 s per byte;
#   * launches: ~5 µs of host-side dispatch per eager op, an assumption typical of PyTorch eager
#     on a fast host CPU (it matters only for tiny layers or token counts).
# Under this model the dense path wins on an accelerator once n reaches about 1-2 % of O·I at
# many tokens (the fp32 GEMMs are cheap there, the T·n gathers are not); on the CPU only past
# about 15 %. For the usual FourierFT budgets (n of 1e3..1e5 on 4096-wide layers) the FFT path
# is the cheaper one on both.


@dataclass(frozen=True)
class _Rates:
    """Seconds per unit of work of one path on one kind of device."""

    call: float  # per forward + backward: launches, dispatch, Python
    fft_flop: float  # per transform flop
    gemm_flop: float  # per dense GEMM flop
    sparse_flop: float  # per flop of the CSR products
    coef: float  # per coefficient (index work on the n positions)
    byte: float  # per byte of streaming memory traffic
    gather_byte: float  # per byte read by the CSR products


_LAUNCH = 5e-6
_COST_RATES = {
    "cpu": {
        "fft": _Rates(call=4.6e-4, fft_flop=5.1e-10 / 5, gemm_flop=0.0, sparse_flop=5.0e-10 / 12, coef=1.2e-8, byte=0.0, gather_byte=0.0),
        "dense": _Rates(call=4.4e-4, fft_flop=5.8e-10 / 5, gemm_flop=7.6e-11 / 6, sparse_flop=0.0, coef=5.5e-8, byte=0.0, gather_byte=0.0),
    },
    "accelerator": {
        "fft": _Rates(call=40 * _LAUNCH, fft_flop=0.0, gemm_flop=1 / 47e12, sparse_flop=0.0, coef=0.0, byte=1 / 2.7e12, gather_byte=1 / 1.7e12),
        "dense": _Rates(call=20 * _LAUNCH, fft_flop=0.0, gemm_flop=1 / 47e12, sparse_flop=0.0, coef=0.0, byte=1 / 2.7e12, gather_byte=1 / 1.7e12),
    },
}


def _nlog(n: int) -> float:
    return n * math.log2(max(n, 2))


def _work(path: str, T: int, O: int, I: int, n: int) -> dict:
    """Work of one forward + backward of ``path``: flops by kind, bytes, coefficients."""
    if path == "fft":
        return {"fft_flop": 5.0 * T * (_nlog(O) + _nlog(I)), "sparse_flop": 12.0 * T * n, "gemm_flop": 0.0,
                "byte": 32.0 * T * (O + I), "gather_byte": 32.0 * T * n, "coef": float(n)}
    half = I // 2 + 1
    used = half * (1.0 - math.exp(-n / half))  # expected occupied half-spectrum columns
    return {"fft_flop": 5.0 * (used * _nlog(O) + O * _nlog(I)), "sparse_flop": 0.0, "gemm_flop": 6.0 * T * O * I,
            "byte": 28.0 * O * I + 6.0 * T * (2 * I + O), "gather_byte": 0.0, "coef": float(n)}


def path_cost(path: str, tokens: int, out_features: int, in_features: int, n_frequency: int, kind: str = "cpu") -> float:
    """Predicted seconds of one forward + backward of ``path`` ("fft" or "dense") on ``kind``
    ("cpu" or "accelerator", see :func:`._device.kind`)."""
    rates = _COST_RATES[kind][path]
    work = _work(path, int(tokens), int(out_features), int(in_features), int(n_frequency))
    return rates.call + sum(getattr(rates, unit) * amount for unit, amount in work.items())


def choose_dense(tokens: int, out_features: int, in_features: int, n_frequency: int, kind: str = "cpu") -> bool:
    """True when materialising ``dW`` (``fourier_delta_weight`` + ``F.linear``, autograd through
    both) is predicted to be cheaper than :func:`fourier_linear` for one forward + backward pass
    on a device of ``kind`` ("cpu" or "accelerator"); the model is described above."""
    args = (tokens, out_features, in_features, n_frequency, kind)
    return path_cost("dense", *args) < path_cost("fft", *args)
