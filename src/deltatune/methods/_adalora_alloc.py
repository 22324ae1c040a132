"""AdaLoRA's rank allocation and orthogonality regulariser, and how the allocator reaches its tensors.

Reference: Q. Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023
(arXiv:2303.10512): §3.1 (the regulariser), §3.2 (importance), §3.3 (the global budget schedule).
The numbers reproduce PEFT 0.21.2: the same weights and gradients give the same rank pattern and
the same E values.

``triplets`` map a module path (relative to the inner model, e.g. ``model.layers.0.self_attn.q_proj``)
to the trainable adapter's ``(A, E, B)``, of shapes (r, in), (r, 1), (out, r). A rank pattern is
``{"<module path>.lora_E": [kept?] * r}`` (PEFT's ``rank_pattern`` without the adapter suffix).

Importance of every entry p of A, E and B (§3.2, eqs. 8-11), updated once per optimizer step:

    I = |p ⊙ ∇p|,   Ī ← β1·Ī + (1 − β1)·I,   Ū ← β2·Ū + (1 − β2)·|I − Ī|,   s = Ī ⊙ Ū
    score(rank i of a module) = s_E[i] + mean_j s_A[i, j] + mean_j s_B[j, i]

Budget b(t), the total number of kept ranks after optimizer step t (§3.3, eq. 12; T = total_step):

    b(t) = b0                                                        t ≤ tinit
    b(t) = bT + (b0 − bT) · (1 − (t − tinit) / (T − tfinal − tinit))³   (masks every deltaT steps)
    b(t) = bT                                                        t ≥ T − tfinal

with b0 = Σ r over the modules (their actual ranks) and bT = target_r × the number of modules.
Masking zeroes E where score ≤ the (b0 − b)-th smallest score (ties at the threshold are pruned
together, as in PEFT); at T − tfinal the scores are reset, after it the final pattern is re-applied
every step. Deliberate differences from PEFT: a missing gradient raises naming the parameter, and
pattern keys match exactly (no substring matching). The threshold is selected on the CPU, so data-parallel ranks whose gradients were
all-reduced compute the same masks.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Mapping, Optional

import torch

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
RankPattern = dict[str, list[bool]]

_PARTS = ("lora_A", "lora_E", "lora_B")
_BUDGET_PHASE = (
    "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or increase `total_step`."
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def schedule_for_steps(values: dict[str, Any], steps: Optional[int] = None) -> dict[str, Any]:
    """A budget schedule for ``steps`` optimizer steps (the CLI's default): ``tinit`` = 10 % at init_r,
    a cubic decrease to target_r until total_step − tfinal (the last 30 % keep the final pattern),
    about 20 re-allocations. ``values``: the fields set so far (a different total_step warns)."""
    if not steps:
        return {}
    if values.get("total_step") not in (None, steps):
        warnings.warn(f"AdaLoRA total_step={values['total_step']} differs from the {steps} training steps")
    tinit, tfinal = steps // 10, (3 * steps) // 10
    if steps - tfinal - tinit < 2:  # too short to budget: prune once at the end of warm-up
        tinit, tfinal = 0, 0
    return {"total_step": steps, "tinit": tinit, "tfinal": tfinal, "deltaT": max(1, (steps - tinit - tfinal) // 20)}


def check_schedule(config: Any, total_step: Any = None) -> None:
    """The budget schedule's values (§3.3), checked in this one place: when a config is created and
    when ``set_total_step`` changes ``total_step`` (given here; default: the config's own)."""
    total_step = config.total_step if total_step is None else total_step
    for name in ("init_r", "target_r", "tinit", "tfinal"):
        value = getattr(config, name)
        if not _is_int(value) or value < 0:
            raise ValueError(f"`{name}` should be a positive integer or 0, but the value passed is {value!r}")
    if not _is_int(config.deltaT) or config.deltaT <= 0:
        raise ValueError(f"`deltaT` should be a positive integer value but the value passed is {config.deltaT!r}")
    if total_step is None or (isinstance(total_step, (int, float)) and total_step <= 0):
        raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
    if not _is_int(total_step):
        raise ValueError(f"`total_step` must be a positive integer, got {total_step!r}")
    if config.tinit >= total_step - config.tfinal:
        raise ValueError(f"{_BUDGET_PHASE} (tinit={config.tinit}, tfinal={config.tfinal}, total_step={total_step})")


def check_trainable(config: Any) -> None:
    """Values only the allocator uses, checked when an adapter that trains is added (PEFT fails at
    its first pruning step on init_r <= target_r, and asserts on the betas)."""
    if config.init_r <= config.target_r:
        raise ValueError(f"AdaLoRA needs init_r > target_r: ranks are pruned from init_r down to target_r per module "
                         f"on average; got init_r={config.init_r}, target_r={config.target_r}")
    for name in ("beta1", "beta2"):
        if not 0 < getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be strictly between 0 and 1, got {getattr(config, name)}")


def orthogonal_regularization(triplets: Mapping[str, Triplet]) -> torch.Tensor:
    """R = (1/N) · Σ_modules (‖A·Aᵀ − I‖_F + ‖Bᵀ·B − I‖_F), N = 2 × the number of modules (§3.1).

    A rank-0 module adds 0 but still counts in N (PEFT's behaviour: the norm of an empty matrix is
    0). A 0-dim tensor that carries gradients to A and B; ``0.0`` without modules.
    """
    terms = []
    for lora_a, _, lora_b in triplets.values():
        for cov in (lora_a @ lora_a.T, lora_b.T @ lora_b):  # (r, r)
            terms.append(torch.linalg.vector_norm(cov - torch.eye(cov.size(0), dtype=cov.dtype, device=cov.device), 2))
    if not terms:
        return torch.zeros(())
    total = terms[0]
    for term in terms[1:]:  # summed one by one, in PEFT's order: the same rounding
        total = total + term
    return total / len(terms)


class RankAllocator:
    """Importance EMAs and budget masks over one adapter's triplets (PEFT's ``RankAllocator``).

    It keeps references to the tensors: it reads their gradients (``grad_getter(param)``, default
    ``param.grad``) and zeroes entries of E in place. The schedule is read from ``config`` at every
    step, so ``config.total_step`` may change between steps.
    """

    def __init__(self, triplets: Mapping[str, Triplet], config: Any,
                 grad_getter: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None) -> None:
        self.triplets = dict(triplets)
        self.config = config
        self.grad_getter = grad_getter
        self.init_bgt = sum(lora_a.size(0) for lora_a, _, _ in self.triplets.values())  # b0
        self.target_bgt = config.target_r * len(self.triplets)  # bT
        if self.init_bgt <= self.target_bgt:
            raise ValueError(
                f"AdaLoRA needs an initial rank budget larger than the target one: the modules' ranks sum to "
                f"{self.init_bgt}, the target is {self.target_bgt} (target_r={config.target_r} x {len(self.triplets)} modules)"
            )
        self.params = {f"{path}.{part}": t for path, trip in self.triplets.items() for part, t in zip(_PARTS, trip)}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}  # Ī
        self.exp_avg_unc: dict[str, torch.Tensor] = {}  # Ū
        self.rank_pattern: Optional[RankPattern] = None  # the last one allocated (or loaded)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(b(step), whether to mask at this step)``."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt), step % c.deltaT == 0

    def _grad(self, name: str, param: torch.Tensor) -> torch.Tensor:
        grad = self.grad_getter(param) if self.grad_getter is not None else param.grad
        if grad is None:
            if param.numel() == 0:  # a rank-0 module: nothing to score
                return torch.zeros_like(param)
            raise ValueError(
                f"AdaLoRA needs the gradient of `{name}` to update importance scores, but it is None. Call the "
                "rank allocator after loss.backward() and before the gradients are cleared, and make sure the "
                "adapter's parameters are trainable."
            )
        return grad

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Ī and Ū from the current gradients (they start at zeros in the parameter's dtype)."""
        grads = {name: self._grad(name, p) for name, p in self.params.items()}  # all first: none missing
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, p in self.params.items():
            ipt = (p * grads[name]).abs().detach()
            avg_ipt = beta1 * self.exp_avg_ipt.get(name, torch.zeros_like(p)) + (1 - beta1) * ipt
            avg_unc = beta2 * self.exp_avg_unc.get(name, torch.zeros_like(p)) + (1 - beta2) * (ipt - avg_ipt).abs()
            self.exp_avg_ipt[name], self.exp_avg_unc[name] = avg_ipt, avg_unc

    @torch.no_grad()
    def scores(self) -> dict[str, torch.Tensor]:
        """``{"<path>.lora_E": (r,) scores}`` (summed in PEFT's order: the same rounding)."""
        missing = [name for name in self.params if name not in self.exp_avg_ipt]
        if missing:
            raise RuntimeError(
                f"No importance scores for {', '.join(missing[:3])}: the allocator must update them (a step before "
                "total_step - tfinal) or load them (load_allocator_state_dict) before it prunes to the target budget"
            )
        s = {name: self.exp_avg_ipt[name] * self.exp_avg_unc[name] for name in self.params}
        out = {}
        for path in self.triplets:
            score_a = s[f"{path}.lora_A"].mean(dim=1, keepdim=True)  # (r, 1)
            score_b = s[f"{path}.lora_B"].mean(dim=0).view(-1, 1)  # (r, 1)
            out[f"{path}.lora_E"] = s[f"{path}.lora_E"].view(-1) + torch.cat([score_a, score_b], dim=1).sum(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> RankPattern:
        """Keep the ``budget`` best-scored ranks: zero E of the others; returns the pattern."""
        k = self.init_bgt - budget  # > 0: the schedule's budgets are below b0 after tinit
        scores = self.scores()
        threshold = torch.kthvalue(torch.cat([s.reshape(-1).cpu() for s in scores.values()]), k=k).values.item()
        pattern: RankPattern = {}
        for path, (_, lora_e, _) in self.triplets.items():
            pruned = (scores[f"{path}.lora_E"] <= threshold).view(-1, 1)
            lora_e.masked_fill_(pruned.to(lora_e.device), 0.0)
            pattern[f"{path}.lora_E"] = (~pruned).view(-1).tolist()
        return pattern

    def step(self, global_step: int) -> Optional[RankPattern]:
        """PEFT's ``update_and_allocate`` up to T − tfinal (the final phase re-applies the config's
        pattern, see :meth:`Allocation.update_and_allocate`). Returns a new pattern, else None."""
        boundary = self.config.total_step - self.config.tfinal
        if global_step < boundary:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(global_step)
            if not mask_now:
                return None
            self.rank_pattern = self.mask_to_budget(budget)
        else:  # the final allocation: to the target budget, then the scores are no longer needed
            self.rank_pattern = self.mask_to_budget(self.target_bgt)
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        return {key: list(flags) for key, flags in self.rank_pattern.items()}

    def state_dict(self) -> dict[str, Any]:
        """The EMAs (copies, keyed ``"<path>.lora_X"``), the last rank pattern and the budgets."""
        return {
            "exp_avg_ipt": {name: t.detach().clone() for name, t in self.exp_avg_ipt.items()},
            "exp_avg_unc": {name: t.detach().clone() for name, t in self.exp_avg_unc.items()},
            "rank_pattern": None if self.rank_pattern is None else {k: list(v) for k, v in self.rank_pattern.items()},
            "init_bgt": self.init_bgt,
            "target_bgt": self.target_bgt,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (tensors go to their parameter's device); all or nothing."""
        for field in ("init_bgt", "target_bgt"):
            if field in state and state[field] != getattr(self, field):
                raise ValueError(f"state was saved with {field}={state[field]} but this allocator has {getattr(self, field)}")
        loaded = []
        for field in ("exp_avg_ipt", "exp_avg_unc"):
            entries = dict(state.get(field, {}))
            if entries and entries.keys() != self.params.keys():
                raise ValueError(
                    f"{field} does not match the adapter: unknown {sorted(entries.keys() - self.params.keys())[:3]}, "
                    f"missing {sorted(self.params.keys() - entries.keys())[:3]}"
                )
            for name, t in entries.items():
                if not isinstance(t, torch.Tensor) or t.shape != self.params[name].shape:
                    raise ValueError(f"{field} entry {name!r} is not a tensor of shape {tuple(self.params[name].shape)}")
            loaded.append({name: t.detach().to(device=self.params[name].device, copy=True) for name, t in entries.items()})
        if loaded[0].keys() != loaded[1].keys():
            raise ValueError("state has sensitivity and uncertainty entries for different parameters")
        pattern = state.get("rank_pattern")
        if pattern is not None:
            ranks = {f"{path}.lora_E": a.size(0) for path, (a, _, _) in self.triplets.items()}
            if pattern.keys() != ranks.keys() or any(len(flags) != ranks[k] for k, flags in pattern.items()):
                raise ValueError(f"the saved rank pattern does not match the adapter's modules and ranks {ranks}")
            pattern = {key: [bool(f) for f in flags] for key, flags in pattern.items()}
        self.exp_avg_ipt, self.exp_avg_unc = loaded
        self.rank_pattern = pattern


# ------------------------------------------------------------------------------------ rank patterns


def check_rank_pattern(pattern: Any) -> Optional[RankPattern]:
    """A config's ``rank_pattern`` as ``{key: [bool, ...]}`` (tensors and 0/1 accepted), or None."""
    if not pattern:
        return None  # PEFT's files write {} for "no pattern yet"
    if not isinstance(pattern, Mapping):
        raise ValueError(f"`rank_pattern` must be a dict {{'<module>.lora_E': [bool, ...]}}, got {type(pattern).__name__}")
    out: dict[str, list[bool]] = {}
    for key, flags in pattern.items():
        if isinstance(flags, torch.Tensor):
            flags = flags.reshape(-1).tolist()
        if not isinstance(key, str) or not isinstance(flags, (list, tuple)) or not all(isinstance(f, bool) or f in (0, 1) for f in flags):
            raise ValueError(f"`rank_pattern` entry {key!r} must map to a list of booleans, got {flags!r}")
        out[key] = [bool(f) for f in flags]
    return out


def pattern_by_path(rank_pattern: Optional[Mapping[str, Any]], adapter_name: str, paths: Any) -> RankPattern:
    """A config's ``rank_pattern`` keyed by module path; keys may carry the adapter suffix (PEFT's
    live config) or not (its file). Keys match exactly."""
    out: RankPattern = {}
    for key, flags in (rank_pattern or {}).items():
        stripped = key.removesuffix(f".{adapter_name}") if key.endswith(f".lora_E.{adapter_name}") else key
        path = stripped.removesuffix(".lora_E") if stripped.endswith(".lora_E") else None
        if path not in paths:
            raise ValueError(
                f"rank_pattern key {key!r} of adapter '{adapter_name}' names no module adapted by it "
                f"(expected '<module path>.lora_E', e.g. '{next(iter(paths), 'model.layer')}.lora_E')"
            )
        out[path] = [bool(f) for f in flags]
    return out


def slice_ranks(fragment: Mapping[str, torch.Tensor], flags: list[bool], path: str) -> dict[str, torch.Tensor]:
    """A module's ``{"lora_A", "lora_E", "lora_B": tensor}`` cut to the ranks flagged True (rows of A
    and E, columns of B); a tensor that already has exactly the kept ranks stays as it is."""
    index = torch.tensor([i for i, kept in enumerate(flags) if kept], dtype=torch.long)
    out = dict(fragment)
    for part, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
        tensor = out[part]
        if tensor.shape[dim] == len(index):
            continue
        if tensor.shape[dim] != len(flags):
            raise ValueError(f"rank_pattern entry for '{path}' has {len(flags)} flags but its {part} has rank {tensor.shape[dim]}")
        out[part] = tensor.index_select(dim, index.to(tensor.device))  # works on meta tensors too
    return out


def resize_to_pattern(deltas: Mapping[str, Any], pattern: RankPattern) -> bool:
    """Shrink each module to the ranks its pattern keeps (``delta.keep_ranks``), before a pruned
    checkpoint is loaded; modules already at the kept ranks stay. Whether anything changed."""
    changed = False
    for path, flags in pattern.items():
        delta = deltas[path]
        if delta.r != sum(flags):
            if delta.r != len(flags):
                raise ValueError(f"rank_pattern entry for '{path}' has {len(flags)} flags but the module has rank {delta.r}")
            delta.keep_ranks(flags)
            changed = True
    return changed


# ------------------------------------------------------------------------------------ the driver


class Allocation:
    """The training side of an ``AdaLoraModel``: its trainable adapter's allocator (built on first
    use, rebuilt when the adapter's tensors are replaced), run once per optimizer step by
    :meth:`update_and_allocate`, and its checkpointable state.

    Under DeepSpeed ZeRO (1, 2 or 3) DeepSpeed holds the gradients and the fp32 master weights in
    its own partitions: the allocator then works on whole fp32 copies read through
    ``deepspeed.utils`` (``safe_get_full_grad``, ``safe_get_full_fp32_param``; the same on every
    rank), and the masked E is written back to DeepSpeed's master copy and to the model's weights.
    ``engine.step()`` frees the gradients, so :meth:`capture_gradients` reads them between
    ``engine.backward`` and ``engine.step()`` (``deltatune.integrations.deepspeed.attach_adalora``
    does both). Every rank must call these (they gather).
    """

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner  # the AdaLoraModel: peft_config, triplets(), deltas(), _require_trainable()
        self.calls = 0  # update_and_allocate calls so far
        self.train_forwards = 0  # forwards in training mode (see warn_if_never_ran)
        self.allocator: Optional[RankAllocator] = None
        self.allocator_for: Optional[str] = None
        # ZeRO: (adapter, {path: whole fp32 copies of (A, E, B)}) and the captured gradients {id(copy): grad}
        self.zero_copies: Optional[tuple[str, dict[str, Triplet]]] = None
        self.zero_grads: Optional[dict[int, torch.Tensor]] = None

    def reset(self) -> None:
        self.allocator = self.allocator_for = None

    def rank_allocator(self) -> RankAllocator:
        name = self.tuner._require_trainable()
        live = self.tuner.triplets(name)
        zero = _zero_managed(live)
        triplets = self._zero_triplets(name, live) if zero else live
        current = self.allocator
        if current is None or self.allocator_for != name or not _same_tensors(current.triplets, triplets):
            if current is not None and current.exp_avg_ipt:
                warnings.warn(f"AdaLoRA adapter '{name}' changed shape or storage: its importance scores restart at zero")
            self.allocator = RankAllocator(triplets, self.tuner.peft_config[name], self._zero_grad if zero else None)
            self.allocator_for = name
        return self.allocator

    def update_and_allocate(self, global_step: int) -> Optional[RankPattern]:
        name = self.tuner._require_trainable()
        config = self.tuner.peft_config[name]
        self.calls += 1
        if global_step > config.total_step - config.tfinal:  # the final phase: re-apply the final pattern
            if config.rank_pattern is None:
                raise RuntimeError(
                    f"step {global_step} is past the budgeting phase (total_step - tfinal = "
                    f"{config.total_step - config.tfinal}) but adapter '{name}' has no rank_pattern yet: run the "
                    "allocator from step 0, or set the config's rank_pattern"
                )
            self.mask_with(name, pattern_by_path(config.rank_pattern, name, self.tuner.deltas(name)))
            return None
        allocator = self.rank_allocator()
        zero = _zero_managed(self.tuner.triplets(name))
        if zero:
            self._zero_pull(name)
        try:
            pattern = allocator.step(global_step)
        finally:
            self.zero_grads = None  # one step's gradients are used once
        if zero and pattern is not None:
            self._zero_push(name)  # E was masked
        if pattern is not None:
            config.rank_pattern = {f"{key}.{name}": flags for key, flags in pattern.items()}
        return pattern

    @torch.no_grad()
    def mask_with(self, name: str, pattern: RankPattern) -> None:
        deltas = self.tuner.deltas(name)
        zero = _zero_managed(self.tuner.triplets(name))
        if zero:
            self._zero_pull(name, grads=False)
        for path, flags in pattern.items():
            if deltas[path].r != len(flags):
                continue  # resized at load to exactly the kept ranks: nothing is masked
            lora_e = self.zero_copies[1][path][1] if zero else deltas[path].lora_E
            lora_e.masked_fill_(~torch.tensor(flags, dtype=torch.bool, device=lora_e.device).view(-1, 1), 0.0)
        if zero:
            self._zero_push(name)

    def state_dict(self) -> dict[str, Any]:
        return self.rank_allocator().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        name = self.tuner._require_trainable()
        allocator = self.rank_allocator()
        allocator.load_state_dict(state)
        pattern = allocator.rank_pattern
        self.tuner.peft_config[name].rank_pattern = (
            None if pattern is None else {f"{key}.{name}": list(flags) for key, flags in pattern.items()}
        )

    def set_total_step(self, total_step: int) -> None:
        config = self.tuner.peft_config[self.tuner._require_trainable()]
        check_schedule(config, total_step)
        config.total_step = total_step

    def warn_if_never_ran(self, name: str) -> None:
        """At save time: the adapter trained but nothing ever called the allocator."""
        if name == self.tuner.trainable_adapter_name and self.train_forwards and not self.calls:
            warnings.warn(
                f"AdaLoRA adapter '{name}' was trained ({self.train_forwards} forward passes in training mode) but "
                "its rank allocator never ran: no rank was pruned and rank_pattern stays empty. Call "
                "model.base_model.update_and_allocate(step) after each optimizer.step() and before zero_grad(), or "
                "deltatune.integrations.adalora.attach_optimizer(model, optimizer) once, or train with "
                "deltatune.integrations.transformers.AdaLoraCallback.",
                stacklevel=4,
            )

    # ------------------------------------------------------------------ DeepSpeed ZeRO
    def capture_gradients(self) -> None:
        name = self.tuner._require_trainable()
        live = self.tuner.triplets(name)
        if not _zero_managed(live):
            return
        from deepspeed.utils import safe_get_full_grad

        self.rank_allocator()  # builds the copies if needed
        grads: dict[int, torch.Tensor] = {}
        for path, trip in live.items():
            for part, param, copy in zip(_PARTS, trip, self.zero_copies[1][path]):
                grad = safe_get_full_grad(param)  # the all-reduced gradient, gathered whole
                if grad is None:
                    raise ValueError(
                        f"AdaLoRA needs the gradient of `{path}.{part}` but DeepSpeed holds none: call "
                        "capture_gradients() after engine.backward(loss) and before engine.step(), or use "
                        "deltatune.integrations.deepspeed.attach_adalora(engine)"
                    )
                grads[id(copy)] = grad.detach().reshape(copy.shape).float().clone()
        self.zero_grads = grads

    def _zero_grad(self, copy: torch.Tensor) -> Optional[torch.Tensor]:
        return (self.zero_grads or {}).get(id(copy))

    def _zero_triplets(self, name: str, live: Mapping[str, Triplet]) -> dict[str, Triplet]:
        """Whole fp32 copies for the allocator, kept across steps (its EMAs are keyed to them);
        ZeRO-3 tensors are empty outside a forward, their whole shape is ``ds_shape``."""
        shapes = {path: tuple(tuple(getattr(t, "ds_shape", t.shape)) for t in trip) for path, trip in live.items()}
        held = self.zero_copies
        if held is None or held[0] != name or {p: tuple(t.shape for t in c) for p, c in held[1].items()} != shapes:
            copies = {
                path: tuple(torch.zeros(shape, dtype=torch.float32, device=t.device) for shape, t in zip(shapes[path], trip))
                for path, trip in live.items()
            }
            self.zero_copies = held = (name, copies)
        return held[1]

    @torch.no_grad()
    def _zero_pull(self, name: str, grads: bool = True) -> None:
        """The copies take DeepSpeed's fp32 master values; the gradients must have been captured."""
        from deepspeed.utils import safe_get_full_fp32_param

        if grads and self.zero_grads is None:
            # too late after engine.step() (ZeRO-2 then raises on the ranks that own a fragment while
            # the others wait in the all-reduce), too early before it (PEFT masks after the optimizer
            # step): refused on every rank alike, before any collective
            raise RuntimeError(
                f"AdaLoRA adapter '{name}' runs under DeepSpeed ZeRO, whose engine.step() frees the gradients: call "
                "model.base_model.capture_gradients() after engine.backward(loss) and before engine.step(), then "
                "update_and_allocate(step) after it, or let deltatune.integrations.deepspeed.attach_adalora(engine) do both"
            )
        live = self.tuner.triplets(name)
        copies = self._zero_triplets(name, live)
        for path, trip in live.items():
            for part, param, copy in zip(_PARTS, trip, copies[path]):
                value = safe_get_full_fp32_param(param)
                if value is None:
                    raise ValueError(
                        f"`{path}.{part}` is a DeepSpeed ZeRO parameter without an fp32 master copy: run the "
                        "allocator after deepspeed.initialize(...) with an optimizer over the adapter's parameters"
                    )
                copy.copy_(value.reshape(copy.shape))

    @torch.no_grad()
    def _zero_push(self, name: str) -> None:
        """Write the copies' E (masked) to DeepSpeed's fp32 master and to the model's own weights."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        live = self.tuner.triplets(name)
        copies = self.zero_copies[1]
        for path, (_, lora_e, _) in live.items():
            safe_set_full_fp32_param(lora_e, copies[path][1])
        partitioned = [trip[1] for trip in live.values() if hasattr(trip[1], "ds_id")]
        # ZeRO-3: gather E whole, write it (the same values on every rank), repartition from rank 0
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0) if partitioned else contextlib.nullcontext():
            for path, (_, lora_e, _) in live.items():
                lora_e.data.copy_(copies[path][1].reshape(lora_e.shape).to(lora_e.dtype))


def _zero_managed(triplets: Mapping[str, Triplet]) -> bool:
    """Whether DeepSpeed ZeRO manages these parameters: ZeRO-3 partitions them (``ds_id``), ZeRO-1/2
    keep their fp32 master copy and gradient in its own flat buffers (``_hp_mapping``)."""
    return any(hasattr(t, "ds_id") or hasattr(t, "_hp_mapping") for trip in triplets.values() for t in trip)


def _same_tensors(a: Mapping[str, Triplet], b: Mapping[str, Triplet]) -> bool:
    return a.keys() == b.keys() and all(x is y for k in a for x, y in zip(a[k], b[k]))
