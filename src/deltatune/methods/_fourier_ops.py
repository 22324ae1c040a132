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
from collections import OrderedDict
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..core.precision import autocast_exempt
from . import _device

__all__ = [
    "DensePlan",
    "FourierPlan",
    "choose_dense",
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


def _csr_entries(row, col, n_rows: int, n_cols: int, coef: torch.Tensor):
    """A real CSR map with one entry per ``(row[e], col[e])`` carrying ``coef[e]`` times the
    coefficient ``e mod n``: ``(pattern, src, coef, sums)`` with ``src``/``coef`` in slot order, or
    in entry order plus ``sums`` (entry -> slot) where entries share a slot."""
    pattern, pos = _csr_pattern(row, col, n_rows, n_cols)
    src = torch.arange(row.numel(), device=row.device) % (row.numel() // 2)
    if pattern[1].numel() == row.numel():  # no shared slots: a permutation
        order = torch.empty_like(pos)
        order[pos] = torch.arange(pos.numel(), device=pos.device)
        return pattern, src[order], coef[order], None
    return pattern, src, coef, pos


def _csr(pattern, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if values.device.type == "meta":
        # shape-only runs: meta has no sparse GEMM kernels; a dense stand-in keeps one op per product
        return values.new_empty(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(pattern[0], pattern[1], values, size, check_invariants=False)


class FourierPlan:
    """Sparse structure of the frequency maps for fixed positions and layer shape.

    Spectra are held planar: row ``2b`` the real parts of bin ``b`` over the tokens, row ``2b + 1``
    the imaginary parts. Position ``k`` folded into the half spectra reads input bin ``q_k`` and
    writes output bin ``p_k``; where it reads the conjugate (``s_k = -1``) its imaginary-part entry
    is negated, so each map is one real CSR matrix with 2n entries (merged where folded positions
    coincide). Backward keeps the input spectrum at the distinct used input bins only (planar rows
    ``used2``). Depends only on ``(rows, cols, out_features, in_features)``: build it
    once per adapter and pass it to :func:`fourier_linear` (otherwise it comes from a small cache).
    """

    _TENSORS = ("sign", "f_src", "b_src", "f_coef", "b_coef", "g_pos", "used2", "f_pat", "b_pat", "g_pat")

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
        self.out_features, self.in_features, self.n = O, I, rows.numel()
        self.device = rows.device
        fold_p, fold_q = rows > O // 2, cols > I // 2
        p = torch.where(fold_p, O - rows, rows)
        q = torch.where(fold_q, I - cols, cols)
        used, slot = torch.unique(q, sorted=True, return_inverse=True)
        self.sign = torch.where(fold_p == fold_q, -1.0, 1.0).double()  # phi_k(z) = conj(z) where -1
        re_im = lambda idx: torch.cat([2 * idx, 2 * idx + 1])  # noqa: E731  (real rows, then imaginary rows)
        both = lambda t: torch.cat([t, t * self.sign])  # noqa: E731  (an entry's factor: real, imaginary)
        self.n_used = used.numel()
        self.used2 = torch.stack([2 * used, 2 * used + 1], dim=1).reshape(-1)  # planar rows kept for backward
        # each map entry e reads coefficient src[e] times coef[e]; entries sit in CSR slot order,
        # with a slot -> entries sum only where folded positions coincide (``*_sum``)
        self.f_pat, self.f_src, self.f_coef, self.f_sum = _csr_entries(
            re_im(p), re_im(q), 2 * Oh, 2 * Ih, both(1.0 / (I * torch.where(_edge(p, O), 1.0, 2.0).double()))
        )  # y  <- x
        self.b_pat, self.b_src, self.b_coef, self.b_sum = _csr_entries(
            re_im(q), re_im(p), 2 * Ih, 2 * Oh, both(1.0 / (O * torch.where(_edge(q, I), 1.0, 2.0).double()))
        )  # gx <- gy
        self.g_pat, self.g_pos = _csr_pattern(re_im(p), re_im(slot), 2 * Oh, 2 * self.n_used)  # gc: sampled F·R
        self._cache: dict = {}
        self._device_copies: dict = {}

    @classmethod
    def from_positions(cls, indices: torch.Tensor, out_features: int, in_features: int) -> "FourierPlan":
        """Plan from a ``(2, n)`` position tensor as returned by :func:`peft_positions`."""
        return cls(indices[0], indices[1], out_features, in_features)

    def map(self, spectrum: torch.Tensor, scaling: float, direction: str) -> torch.Tensor:
        """The real CSR map of ``direction`` ("forward": x -> y, "backward": gy -> gx) for these
        coefficients. One CSR tensor per (direction, dtype, scaling) is kept and its values are
        rewritten in place: a map is consumed within the forward or backward call that asks for it."""
        key = (direction, spectrum.dtype, scaling)
        hit = self._cache.get(key)
        if hit is None:
            forward = direction == "forward"
            pattern, coef = (self.f_pat, self.f_coef) if forward else (self.b_pat, self.b_coef)
            Oh2, Ih2 = 2 * (self.out_features // 2 + 1), 2 * (self.in_features // 2 + 1)
            values = coef.new_zeros(pattern[1].numel(), dtype=spectrum.dtype)
            csr = _csr(pattern, values, (Oh2, Ih2) if forward else (Ih2, Oh2))
            src, sums = (self.f_src, self.f_sum) if forward else (self.b_src, self.b_sum)
            hit = self._cache[key] = (csr, values, src, (coef * scaling).to(spectrum.dtype), sums)
        csr, values, src, coef, sums = hit
        if sums is None:  # one entry per slot
            torch.mul(spectrum.detach().index_select(0, src), coef, out=values)
        else:
            values.zero_().index_add_(0, sums, spectrum.detach().index_select(0, src) * coef)
        return csr

    def sample_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """CSR pattern (zero values) of the coefficient gradient's sampled product."""
        key = ("mask", dtype)
        if key not in self._cache:
            shape = (2 * (self.out_features // 2 + 1), self.used2.numel())
            self._cache[key] = _csr(self.g_pat, self.sign.new_zeros(self.g_pat[1].numel(), dtype=dtype), shape)
        return self._cache[key]

    def coefficient_grad(self, sampled: torch.Tensor, scaling: float) -> torch.Tensor:
        """scaling / (out in) Σ_t Re(conj(F) phi(R)) per position, from the sampled re·re and im·im sums."""
        key = ("grad", sampled.dtype, scaling)
        if key not in self._cache:
            factor = scaling / (self.out_features * self.in_features)
            self._cache[key] = (torch.stack([torch.ones_like(self.sign), self.sign]) * factor).to(sampled.dtype)
        return (sampled.index_select(0, self.g_pos).view(2, self.n) * self._cache[key]).sum(0)

    def to(self, device: Union[str, torch.device]) -> "FourierPlan":
        """This plan on ``device`` (copies are memoised per device)."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = str(device)
        new = self._device_copies.get(key)
        if new is None:
            new = object.__new__(FourierPlan)
            new.__dict__.update(self.__dict__)
            for name in self._TENSORS:
                value = getattr(self, name)
                moved = tuple(t.to(device) for t in value) if isinstance(value, tuple) else value.to(device)
                setattr(new, name, moved)
            for name in ("f_sum", "b_sum"):
                value = getattr(self, name)
                setattr(new, name, None if value is None else value.to(device))
            new.device = device
            new._cache = {}
            new._device_copies = {}
            self._device_copies[key] = new
        return new


_PLAN_CACHE: "OrderedDict" = OrderedDict()
_PLAN_CACHE_SIZE = 64


def _tensor_key(t: torch.Tensor):
    t = t.detach().reshape(-1).long()
    try:
        return t.numpy().tobytes()
    except Exception:
        return tuple(t.tolist())


def _get_plan(rows, cols, out_features, in_features, device) -> FourierPlan:
    """Plan for these positions; cached by value for CPU index tensors, rebuilt otherwise."""
    rows = torch.as_tensor(rows)
    cols = torch.as_tensor(cols)
    if rows.device.type != "cpu" or cols.device.type != "cpu":
        return FourierPlan(rows, cols, out_features, in_features).to(device)
    key = (int(out_features), int(in_features), _tensor_key(rows), _tensor_key(cols))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = FourierPlan(rows, cols, out_features, in_features)
        _PLAN_CACHE[key] = plan
        if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    return plan.to(device)


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
    def forward(ctx, x, spectrum, plan, scaling, base_weight=None, base_bias=None):
        O, I = plan.out_features, plan.in_features
        lead = x.shape[:-1]
        x2d = x.reshape(-1, I)
        T = x2d.shape[0]
        cdtype = _compute_dtype(x.dtype, spectrum.dtype)
        ctx.plan, ctx.scaling, ctx.cdtype = plan, scaling, cdtype
        ctx.x_shape, ctx.x_dtype, ctx.c_dtype = x.shape, x.dtype, spectrum.dtype
        ctx.has_base = base_weight is not None  # frozen: saved like F.linear saves its weight
        base = (base_weight,) if ctx.has_base else ()
        if T == 0 or plan.n == 0:
            ctx.save_for_backward(spectrum, *base)
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
        ctx.save_for_backward(spectrum, *base, *(() if kept is None else (kept,)))
        return y.reshape(*lead, O)

    @staticmethod
    @autocast_exempt
    def backward(ctx, grad_out):
        plan, scaling, cdtype = ctx.plan, ctx.scaling, ctx.cdtype
        O, I = plan.out_features, plan.in_features
        saved = ctx.saved_tensors  # read once: a checkpoint's saved tensors unpack only once
        spectrum = saved[0]
        base = saved[1] if ctx.has_base else None
        kept = saved[-1] if len(saved) > 1 + ctx.has_base else None
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g2d = grad_out.reshape(-1, O)
        T = g2d.shape[0]
        if T == 0 or plan.n == 0:
            grad_x = None
            if need_x:
                gx = g2d.to(base.dtype) @ base if base is not None else g2d.new_zeros((T, I))
                grad_x = gx.to(ctx.x_dtype).reshape(ctx.x_shape)
            return grad_x, (torch.zeros_like(spectrum) if need_c else None), None, None, None, None

        if need_x:
            bmap = plan.map(spectrum.to(cdtype), scaling, "backward")
            gx = torch.empty((T, I), dtype=ctx.x_dtype, device=g2d.device)
        if need_c:
            rows = plan.used2.numel()
            mask = plan.sample_mask(cdtype)
            acc = torch.zeros(plan.g_pat[1].numel(), dtype=cdtype, device=g2d.device)
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
        return grad_x, grad_c, None, None, None, None


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
        plan: optional :class:`FourierPlan` for these positions (skips the plan lookup).
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
        plan = _get_plan(rows, cols, out_features, in_features, x.device)
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
    return _FourierLinearFn.apply(x, spectrum, plan, scaling, base_weight, base_bias)


# =============================================================================================
# Dense delta weight
# =============================================================================================


class DensePlan:
    """Everything :func:`fourier_delta_weight` derives from the fixed positions alone (index
    tensors of known sizes), computed once per adapter so that building ΔW has only static shapes
    (no boolean masks or ``unique``: nothing that breaks a ``torch.compile`` graph)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, out_features: int, in_features: int):
        O, I = int(out_features), int(in_features)
        rows = torch.as_tensor(rows).reshape(-1).to(torch.long).cpu()
        cols = torch.as_tensor(cols).reshape(-1).to(torch.long).cpu()
        fold_q = cols > I // 2
        q = torch.where(fold_q, I - cols, cols)
        p = torch.where(fold_q, (O - rows) % O, rows)
        edge_idx = torch.nonzero(_edge(q, I)).reshape(-1)
        # edge columns (DC / Nyquist) keep both halves: the coefficient and its mirror (-p, q)
        p_all = torch.cat([p, ((O - p) % O)[edge_idx]])
        q_all = torch.cat([q, q[edge_idx]])
        used, q_inv = torch.unique(q_all, sorted=True, return_inverse=True)
        self.out_features, self.in_features = O, I
        self.edge_idx = edge_idx  # which coefficients are repeated for their mirror
        self.slot = q_inv * O + p_all  # position of each (repeated) coefficient in the occupied columns
        self.used = used  # occupied half-spectrum columns
        self.n_used = int(used.numel())

    def to(self, device: Union[str, torch.device]) -> "DensePlan":
        moved = object.__new__(DensePlan)
        moved.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})
        return moved


def fourier_delta_weight(
    spectrum: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    out_features: int,
    in_features: int,
    scaling: Union[float, torch.Tensor],
    *,
    dense_plan: Optional[DensePlan] = None,
) -> torch.Tensor:
    """Dense ``Re(ifft2(S)) * scaling`` of shape ``(out, in)`` (float32; float64 for a float64 spectrum).

    The sparse spectrum is folded into the half spectrum (along the input dim) of its Hermitian
    part, which is real-valued, so only the columns that hold a coefficient need the complex
    inverse DFT along the output dim, followed by one ``irfft`` along the input dim (about half
    to a third of the cost of PEFT's dense complex ``ifft2``).
    Differentiable with respect to ``spectrum`` through ordinary autograd. Pass a
    :class:`DensePlan` for these positions to skip its (position-only) index work.
    """
    O, I = int(out_features), int(in_features)
    Ih = I // 2 + 1
    if isinstance(scaling, torch.Tensor):
        scaling = float(scaling.detach().item())
    dtype = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
    device = spectrum.device
    plan = dense_plan if dense_plan is not None else DensePlan(rows, cols, O, I).to(device)
    c = spectrum.reshape(-1).to(dtype) * (0.5 * float(scaling))
    c_all = torch.cat([c, c.index_select(0, plan.edge_idx)])
    # occupied columns only, laid out (column, output-frequency) so the transform is along the last dim
    cols_half = torch.zeros(plan.n_used * O, dtype=dtype, device=device).index_add(0, plan.slot, c_all)
    cols_spec = torch.fft.ifft(cols_half.view(plan.n_used, O), dim=-1)  # (n_used, O) complex
    half = torch.zeros(O, Ih, dtype=cols_spec.dtype, device=device)
    half = half.index_copy(1, plan.used, cols_spec.transpose(0, 1))
    return torch.fft.irfft(half, n=I, dim=1)


# =============================================================================================
# Cost model
# =============================================================================================


def choose_dense(tokens: int, out_features: int, in_features: int, n_frequency: int) -> bool:
    """True when materialising ``dW`` (``fourier_delta_weight`` + ``F.linear``, autograd through
    both) is predicted to be cheaper than :func:`fourier_linear` for one forward + backward pass.

    Cost model, seconds on one CPU thread (AMD EPYC, AVX-512, MKL; fitted by weighted least
    squares to 116 measured (tokens, out, in, n) points from 32x32 to 4096x4096, tokens 1..512,
    n 16..out*in; median error 12-13%, and it picks the faster path in every case except
    six tiny (<=128x128) layers where both paths cost the same ~0.5 ms of overhead)::

        fft   = 4.6e-4 + 5.1e-10 * T * (O log2 O + I log2 I) + 5.0e-10 * T * n + 1.2e-8 * n
        dense = 4.4e-4 + 5.8e-10 * (u O log2 O + O I log2 I) + 7.6e-11 * T * O * I + 5.5e-8 * n
        u     = (I//2 + 1) * (1 - exp(-n / (I//2 + 1)))   # expected occupied half-spectrum columns

    (``T`` tokens, ``O``/``I`` out/in features.)  The dense path pays three GEMMs (forward,
    grad-input, grad-weight) plus two 2-D transforms; the FFT path pays 1-D transforms per token
    plus ``T * n`` sparse work.  Hence the dense path only wins once ``n`` is a sizeable fraction
    of the weight (for many tokens, roughly ``n > 0.15 * O * I``); for the usual FourierFT budgets
    (n of 1e3..1e5 on 4096-wide layers) the FFT path is 10-50x cheaper.
    """
    T, O, I, n = int(tokens), int(out_features), int(in_features), int(n_frequency)
    return _dense_cost(T, O, I, n) < _fft_cost(T, O, I, n)


def _fft_cost(T: int, O: int, I: int, n: int) -> float:
    transforms = O * math.log2(max(O, 2)) + I * math.log2(max(I, 2))
    return 4.6e-4 + 5.1e-10 * T * transforms + 5.0e-10 * T * n + 1.2e-8 * n


def _dense_cost(T: int, O: int, I: int, n: int) -> float:
    half = I // 2 + 1
    used = half * (1.0 - math.exp(-n / half))
    transforms = used * O * math.log2(max(O, 2)) + O * I * math.log2(max(I, 2))
    return 4.4e-4 + 5.8e-10 * transforms + 7.6e-11 * T * O * I + 5.5e-8 * n
