"""AdaLoRA's rank allocator and orthogonal regulariser, independent of any model wrapper.

AdaLoRA parametrises each adapted weight as ``ΔW = B · diag(E) · A`` (an SVD-like triplet) and,
during training, prunes the least important singular values so that the total rank shrinks from
``init_r`` per module to ``target_r`` per module on average. This module holds the bookkeeping for
that pruning, fed directly with the triplets instead of walking a model:

``triplets`` is an ordered mapping from a module path (relative to the inner model, e.g.
``"model.layers.0.self_attn.q_proj"``) to ``(A, E, B)`` — the trainable adapter's parameters of that
module, with ``A`` of shape ``(r, in)``, ``E`` of shape ``(r, 1)`` and ``B`` of shape ``(out, r)``.
Rank patterns are dictionaries keyed ``"<module path>.lora_E"`` whose values are lists of ``r``
booleans (``True`` = the singular value is kept), the layout PEFT stores in
``AdaLoraConfig.rank_pattern`` once the adapter name is stripped from its keys.

The numbers reproduce PEFT 0.21.2 (same weights and gradients give the same rank pattern and the
same ``E`` values), with these deliberate differences:

* invalid settings (``init_r <= target_r``, ``beta1``/``beta2`` outside ``(0, 1)``, a schedule
  without a budgeting phase) raise :class:`ValueError` when the allocator is built;
* a missing gradient raises :class:`ValueError` naming the parameter;
* rank-pattern keys are matched exactly — no substring matching on adapter names;
* a budget equal to the initial budget (nothing to prune) is a no-op instead of a crash.

Everything is deterministic: the same triplets, gradients and state produce the same masks on every
process, so data-parallel ranks whose gradients were already all-reduced stay in lockstep (the
pruning threshold is selected on the CPU from the gathered scores).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

__all__ = ["RankAllocator", "orthogonal_regularization"]

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TripletMapping = Mapping[str, Sequence[torch.Tensor]]
RankPattern = dict[str, list[bool]]

# Suffixes used to name the three parameters of a module in the allocator's state.
_PARTS = ("lora_A", "lora_E", "lora_B")


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} ({value!r})") from None


def _check_triplets(triplets: TripletMapping) -> dict[str, Triplet]:
    """Validate shapes and return a plain ``dict`` copy (same order) of the mapping."""
    if not isinstance(triplets, Mapping):
        raise TypeError(
            "`triplets` must be a mapping {module path: (lora_A, lora_E, lora_B)}, "
            f"got {type(triplets).__name__}"
        )
    checked: dict[str, Triplet] = {}
    for path, triplet in triplets.items():
        if not isinstance(path, str) or not path:
            raise TypeError(f"module paths must be non-empty strings, got {path!r}")
        try:
            lora_a, lora_e, lora_b = triplet
        except (TypeError, ValueError):
            raise TypeError(f"triplets[{path!r}] must be a (lora_A, lora_E, lora_B) tuple") from None
        for part, tensor in zip(_PARTS, (lora_a, lora_e, lora_b)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"triplets[{path!r}] {part} must be a tensor, got {type(tensor).__name__}")
        if lora_a.dim() != 2:
            raise ValueError(f"{path}.lora_A must have shape (r, in_features), got {tuple(lora_a.shape)}")
        r = lora_a.size(0)
        if tuple(lora_e.shape) != (r, 1):
            raise ValueError(f"{path}.lora_E must have shape ({r}, 1) to match lora_A, got {tuple(lora_e.shape)}")
        if lora_b.dim() != 2 or lora_b.size(1) != r:
            raise ValueError(f"{path}.lora_B must have shape (out_features, {r}), got {tuple(lora_b.shape)}")
        checked[path] = (lora_a, lora_e, lora_b)
    return checked


def orthogonal_regularization(
    triplets: Union[TripletMapping, Iterable[Sequence[torch.Tensor]]],
) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty on the singular-vector matrices.

    ``R = (1/N) · Σ_modules (‖A·Aᵀ − I‖_F + ‖Bᵀ·B − I‖_F)`` where ``N`` counts every ``A`` and every
    ``B`` matrix (twice the number of modules), as in PEFT. A module whose rank is 0 contributes
    ``0`` to the sum but is still counted in ``N`` (PEFT's behaviour: the norm of an empty matrix
    is 0). The result is a 0-dim tensor that carries gradients to ``A`` and ``B``; with no modules
    it is a plain ``0.0``. Multiply by ``orth_reg_weight`` and add it to the task loss.

    ``triplets`` is the ``{path: (A, E, B)}`` mapping (or any iterable of ``(A, E, B)``); ``E`` is
    not used.
    """
    values = triplets.values() if isinstance(triplets, Mapping) else triplets
    total: Optional[torch.Tensor] = None
    count = 0
    for triplet in values:
        lora_a, _, lora_b = triplet
        for cov in (lora_a @ lora_a.T, lora_b.T @ lora_b):
            eye = torch.eye(cov.size(0), dtype=cov.dtype, device=cov.device)
            term = torch.linalg.vector_norm(cov - eye, 2)
            total = term if total is None else total + term
            count += 1
    if total is None:
        return torch.zeros(())
    return total / count


class RankAllocator:
    """Importance-based budget allocation of AdaLoRA (PEFT's ``RankAllocator`` + ``update_and_allocate``).

    Args:
        triplets: ordered ``{module path: (lora_A, lora_E, lora_B)}`` of the trainable adapter. The
            allocator keeps references to these tensors: it reads their ``.grad`` and zeroes
            entries of ``lora_E`` in place.
        init_r: the initial rank per module, only used for validation (``init_r > target_r``).
            The initial budget is always the sum of the actual ranks, ``Σ A.size(0)``.
        target_r: the target average rank; the final budget is ``target_r · len(triplets)``.
        tinit: warm-up steps during which nothing is pruned.
        tfinal: final steps during which the rank pattern is frozen.
        deltaT: interval (in steps) between two re-allocations during the budgeting phase.
        beta1: EMA coefficient of the sensitivity, in ``(0, 1)``.
        beta2: EMA coefficient of the uncertainty, in ``(0, 1)``.
        total_step: total number of training steps.
        grad_getter: optional ``callable(param) -> grad`` used instead of ``param.grad`` (e.g. to
            gather a full gradient under ZeRO-3); it may return ``None`` for a missing gradient.

    Call :meth:`step` once per optimisation step, after ``loss.backward()`` and before the
    gradients are cleared (PEFT's order: backward, ``optimizer.step()``, ``step(global_step)``,
    ``zero_grad()``).
    """

    def __init__(
        self,
        triplets: TripletMapping,
        *,
        init_r: Optional[int] = None,
        target_r: int,
        tinit: int = 0,
        tfinal: int = 0,
        deltaT: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        total_step: int,
        grad_getter: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None,
    ) -> None:
        self.triplets = _check_triplets(triplets)
        if not self.triplets:
            raise ValueError("RankAllocator needs at least one (lora_A, lora_E, lora_B) triplet")

        self.target_r = _as_int(target_r, "target_r")
        if self.target_r < 0:
            raise ValueError(f"`target_r` must be >= 0, got {self.target_r}")
        self.init_r = None if init_r is None else _as_int(init_r, "init_r")
        if self.init_r is not None and self.init_r <= self.target_r:
            raise ValueError(
                f"AdaLoRA needs `init_r` > `target_r` (there must be ranks to prune), "
                f"got init_r={self.init_r}, target_r={self.target_r}"
            )

        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta < 1.0):
                raise ValueError(f"`{name}` must be a number strictly between 0 and 1, got {beta!r}")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)

        self.total_step = _as_int(total_step, "total_step")
        self.tinit = _as_int(tinit, "tinit")
        self.tfinal = _as_int(tfinal, "tfinal")
        self.deltaT = _as_int(deltaT, "deltaT")
        self._check_schedule(self.total_step)

        self.grad_getter = grad_getter

        # Budgets, as in PEFT: the initial one counts actual ranks, the target one counts modules.
        self.init_bgt = sum(lora_a.size(0) for lora_a, _, _ in self.triplets.values())
        self.target_bgt = self.target_r * len(self.triplets)
        if self.init_bgt <= self.target_bgt:
            raise ValueError(
                f"AdaLoRA needs an initial rank budget larger than the target one, got "
                f"init budget {self.init_bgt} (sum of the modules' ranks) <= target budget "
                f"{self.target_bgt} (target_r={self.target_r} x {len(self.triplets)} modules)"
            )

        # Named parameters "<path>.lora_A" / ".lora_E" / ".lora_B" in triplet order.
        self._params: dict[str, torch.Tensor] = {}
        for path, triplet in self.triplets.items():
            for part, tensor in zip(_PARTS, triplet):
                self._params[f"{path}.{part}"] = tensor

        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self._rank_pattern: Optional[RankPattern] = None

    # ------------------------------------------------------------------ schedule

    def _check_schedule(self, total_step: int) -> None:
        if total_step <= 0:
            raise ValueError(f"`total_step` must be a positive integer, got {total_step}")
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"`tinit` and `tfinal` must be >= 0, got tinit={self.tinit}, tfinal={self.tfinal}")
        if self.deltaT < 1:
            raise ValueError(f"`deltaT` must be >= 1, got {self.deltaT}")
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(
                f"The schedule leaves no budgeting phase: need tinit < total_step - tfinal, got "
                f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={total_step}"
            )

    def set_total_step(self, total_step: int) -> None:
        """Change the schedule length (PEFT's ``set_total_step``), re-validating the schedule."""
        total_step = _as_int(total_step, "total_step")
        self._check_schedule(total_step)
        self.total_step = total_step

    @property
    def keys(self) -> list[str]:
        """The rank-pattern keys, ``"<module path>.lora_E"``, in triplet order."""
        return [f"{path}.lora_E" for path in self.triplets]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``: constant during warm-up, cubic decay, then the target."""
        step = _as_int(step, "step")
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.deltaT == 0

    # ------------------------------------------------------------------ importance

    def _grad_of(self, name: str, param: torch.Tensor) -> torch.Tensor:
        grad = self.grad_getter(param) if self.grad_getter is not None else param.grad
        if grad is None:
            if param.numel() == 0:
                # a rank-0 module: nothing to score
                return torch.zeros_like(param)
            raise ValueError(
                f"AdaLoRA needs the gradient of `{name}` to update importance scores, but it is None. "
                "Call the rank allocator after loss.backward() and before the gradients are cleared, "
                "and make sure the adapter's parameters are trainable."
            )
        return grad

    def update_ipt(self) -> None:
        """Update the sensitivity / uncertainty EMAs of every ``A``, ``E`` and ``B`` from its gradient.

        ``I = |p ⊙ ∇p|``, ``Ī ← β1·Ī + (1−β1)·I``, ``Ū ← β2·Ū + (1−β2)·|I − Ī|``; the state starts
        at zeros in the parameter's dtype (and follows PyTorch's type promotion if the gradient has
        a wider dtype, as in PEFT).
        """
        with torch.no_grad():
            # Fetch every gradient first so a missing one leaves the state untouched.
            grads = {name: self._grad_of(name, p) for name, p in self._params.items()}
            for name, p in self._params.items():
                ipt = (p * grads[name]).abs().detach()
                if name not in self.exp_avg_ipt:
                    self.exp_avg_ipt[name] = torch.zeros_like(p)
                    self.exp_avg_unc[name] = torch.zeros_like(p)
                avg_ipt = self.beta1 * self.exp_avg_ipt[name] + (1 - self.beta1) * ipt
                avg_unc = self.beta2 * self.exp_avg_unc[name] + (1 - self.beta2) * (ipt - avg_ipt).abs()
                self.exp_avg_ipt[name] = avg_ipt
                self.exp_avg_unc[name] = avg_unc

    def reset_ipt(self) -> None:
        """Forget the accumulated importance state."""
        self.exp_avg_ipt = {}
        self.exp_avg_unc = {}

    def _element_score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per-rank importance ``{"<path>.lora_E": (r,) tensor}``.

        Score of rank ``i`` = ``s_E[i] + (mean_j s_A[i, j] + mean_j s_B[j, i])`` with ``s = Ī ⊙ Ū``.
        """
        missing = [name for name in self._params if name not in self.exp_avg_ipt]
        if missing:
            raise RuntimeError(
                "No importance scores for "
                + ", ".join(missing[:3])
                + (" ..." if len(missing) > 3 else "")
                + ": call update_ipt() (or load_state_dict()) before allocating the budget"
            )
        scores: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for path in self.triplets:
                score_a = torch.mean(self._element_score(f"{path}.lora_A"), dim=1, keepdim=True)
                score_b = torch.mean(self._element_score(f"{path}.lora_B"), dim=0, keepdim=False).view(-1, 1)
                score_e = self._element_score(f"{path}.lora_E")
                score_ab = torch.cat([score_a, score_b], dim=1).sum(dim=1, keepdim=False)
                scores[f"{path}.lora_E"] = score_e.view(-1) + score_ab.view(-1)
        return scores

    # ------------------------------------------------------------------ masking

    def mask_to_budget(self, budget: int) -> RankPattern:
        """Keep the ``budget`` most important ranks: zero ``E`` of the others, return the pattern.

        The threshold ``τ`` is the ``(init_bgt − budget)``-th smallest triplet score; every rank
        with a score ``≤ τ`` is pruned (ties at ``τ`` are all pruned, as in PEFT). With
        ``budget == init_bgt`` nothing is pruned.
        """
        budget = _as_int(budget, "budget")
        if not 0 <= budget <= self.init_bgt:
            raise ValueError(f"`budget` must be between 0 and the initial budget {self.init_bgt}, got {budget}")
        k = self.init_bgt - budget
        if k == 0:
            return {f"{path}.lora_E": [True] * lora_a.size(0) for path, (lora_a, _, _) in self.triplets.items()}

        scores = self.triplet_scores()
        # Select the threshold on the CPU: the value is exact whatever the device, the selection is
        # deterministic, and modules may live on different devices.
        all_scores = torch.cat([s.detach().reshape(-1).cpu() for s in scores.values()])
        threshold = torch.kthvalue(all_scores, k=k).values.item()

        pattern: RankPattern = {}
        with torch.no_grad():
            for path, (_, lora_e, _) in self.triplets.items():
                key = f"{path}.lora_E"
                pruned = (scores[key] <= threshold).view(-1, 1)
                lora_e.masked_fill_(pruned.to(lora_e.device), 0.0)
                pattern[key] = (~pruned).view(-1).tolist()
        return pattern

    def _normalise_pattern(self, pattern: Mapping[str, Any]) -> RankPattern:
        if not isinstance(pattern, Mapping):
            raise TypeError(f"a rank pattern must be a mapping, got {type(pattern).__name__}")
        known = set(self.keys)
        unknown = [key for key in pattern if key not in known]
        if unknown:
            raise ValueError(
                f"rank pattern has keys for no known module: {unknown[:3]}; expected keys "
                f"'<module path>.lora_E' such as {self.keys[0]!r} (without an adapter name)"
            )
        normalised: RankPattern = {}
        for path, (lora_a, _, _) in self.triplets.items():
            key = f"{path}.lora_E"
            if key not in pattern:
                raise KeyError(f"rank pattern has no entry for {key!r}")
            value = pattern[key]
            if isinstance(value, torch.Tensor):
                flags = [bool(v) for v in value.detach().reshape(-1).tolist()]
            else:
                flags = [bool(v) for v in value]
            if len(flags) != lora_a.size(0):
                raise ValueError(
                    f"rank pattern entry {key!r} has {len(flags)} flags but the module's rank is {lora_a.size(0)}"
                )
            normalised[key] = flags
        return normalised

    @property
    def rank_pattern(self) -> Optional[RankPattern]:
        """The stored rank pattern (the last one allocated, or the one set / loaded), or ``None``."""
        if self._rank_pattern is None:
            return None
        return {key: list(flags) for key, flags in self._rank_pattern.items()}

    @rank_pattern.setter
    def rank_pattern(self, pattern: Optional[Mapping[str, Any]]) -> None:
        self._rank_pattern = None if pattern is None else self._normalise_pattern(pattern)

    def apply_rank_pattern(self, pattern: Optional[Mapping[str, Any]] = None) -> None:
        """Zero ``E`` wherever ``pattern`` (default: the stored one) is ``False``. Keys must match exactly."""
        if pattern is None:
            if self._rank_pattern is None:
                raise RuntimeError("no rank pattern to apply: none was allocated, set or loaded yet")
            normalised = self._rank_pattern
        else:
            normalised = self._normalise_pattern(pattern)
        with torch.no_grad():
            for path, (_, lora_e, _) in self.triplets.items():
                keep = torch.tensor(normalised[f"{path}.lora_E"], dtype=torch.bool, device=lora_e.device)
                lora_e.masked_fill_(~keep.view(-1, 1), 0.0)

    # ------------------------------------------------------------------ the training-loop hook

    def step(self, global_step: int) -> Optional[RankPattern]:
        """PEFT's ``update_and_allocate(global_step)``.

        * ``global_step < total_step − tfinal``: update the importance EMAs, then, when the schedule
          says so, prune to the scheduled budget; returns the new rank pattern (also stored), else
          ``None``.
        * ``global_step == total_step − tfinal``: no EMA update; prune to the target budget, store and
          return the final rank pattern, and reset the importance state.
        * ``global_step > total_step − tfinal``: re-apply the stored rank pattern to ``E`` (the
          optimiser may have moved pruned entries); returns ``None``.
        """
        global_step = _as_int(global_step, "global_step")
        boundary = self.total_step - self.tfinal
        if global_step < boundary:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(global_step)
            if not mask_now:
                return None
            self._rank_pattern = self.mask_to_budget(budget)
            return self.rank_pattern
        if global_step == boundary:
            self._rank_pattern = self.mask_to_budget(self.target_bgt)
            self.reset_ipt()
            return self.rank_pattern
        if self._rank_pattern is None:
            raise RuntimeError(
                f"step {global_step} is in the final phase (> total_step - tfinal = {boundary}) but no rank "
                "pattern was allocated; run the budgeting steps first or restore the rank pattern "
                "(load_state_dict() or the `rank_pattern` attribute)"
            )
        self.apply_rank_pattern()
        return None

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The importance EMAs (cloned) and the stored rank pattern, keyed by ``"<path>.lora_X"``."""
        return {
            "exp_avg_ipt": {name: t.detach().clone() for name, t in self.exp_avg_ipt.items()},
            "exp_avg_unc": {name: t.detach().clone() for name, t in self.exp_avg_unc.items()},
            "rank_pattern": self.rank_pattern,
            "init_bgt": self.init_bgt,
            "target_bgt": self.target_bgt,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; tensors go to their parameter's device, dtype kept."""
        for field in ("init_bgt", "target_bgt"):
            if field in state and state[field] != getattr(self, field):
                raise ValueError(
                    f"state was saved with {field}={state[field]} but this allocator has {getattr(self, field)}"
                )
        ipt_state = dict(state.get("exp_avg_ipt", {}))
        unc_state = dict(state.get("exp_avg_unc", {}))
        if set(ipt_state) != set(unc_state):
            raise ValueError("state has sensitivity and uncertainty entries for different parameters")
        if ipt_state and set(ipt_state) != set(self._params):
            unknown = sorted(set(ipt_state) - set(self._params))
            missing = sorted(set(self._params) - set(ipt_state))
            raise ValueError(
                f"state does not match the triplets: unknown entries {unknown[:3]}, missing entries {missing[:3]}"
            )
        new_ipt: dict[str, torch.Tensor] = {}
        new_unc: dict[str, torch.Tensor] = {}
        for name in ipt_state:
            param = self._params[name]
            for source, target in ((ipt_state, new_ipt), (unc_state, new_unc)):
                tensor = source[name]
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(param.shape):
                    shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ValueError(f"state entry for {name!r} has shape {shape}, expected {tuple(param.shape)}")
                target[name] = tensor.detach().to(device=param.device, copy=True)
        pattern = state.get("rank_pattern")
        new_pattern = None if pattern is None else self._normalise_pattern(pattern)
        self.exp_avg_ipt = new_ipt
        self.exp_avg_unc = new_unc
        self._rank_pattern = new_pattern

