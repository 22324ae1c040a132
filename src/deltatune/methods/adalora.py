"""AdaLoRA: LoRA in SVD form whose rank budget is re-allocated during training.

Reference: Q. Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023
(arXiv:2303.10512). Checkpoint format, maths and schedule of PEFT 0.21.2. §3.1, eq. 3, with PEFT's names:

    W = W0 + ΔW,   ΔW = P Λ Q = B · (A ⊙ E) · α / (ranknum + 1e-5)

Q = A = ``lora_A`` (r, in), Λ = E = ``lora_E`` (r, 1) broadcast over A's columns, P = B = ``lora_B``
(out, r), α = ``lora_alpha``, ``ranknum`` = init_r for life (the scale stays α / init_r while ranks
are pruned). Conv2d flattens the kernel: A is (r, in/groups·kh·kw). Training minimises
L = C + γ·R (eq. 4, R the orthogonality of P and Q, γ = ``orth_reg_weight``): :meth:`AdaLoraModel.forward`
adds γ·R to ``outputs.loss``. The rank allocation (§3.2-3.3) is in :mod:`._adalora_alloc`: it masks E
during training; ``rank_pattern`` slices A/E/B at save and resizes the modules at load.
Training loops: ``deltatune.integrations.adalora``, ``.transformers`` (``AdaLoraCallback``), ``.deepspeed``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TunerConfig
from ..core.layer import AdapterLayer, Delta, LayerSpec
from ..core.registry import register_method
from ..core.targeting import ADALORA_DEFAULT_TARGETS
from ..core.tuner import AdapterModel, find_tuner
from . import _device
from ._adalora_alloc import (Allocation, check_rank_pattern, check_schedule, check_trainable, pattern_by_path,
                             resize_to_pattern, schedule_for_steps, slice_ranks)
from ._adalora_alloc import orthogonal_regularization as _orth_reg
from ._lora_fields import LoraFields, check_lora_fields, without_default_lora_fields

@dataclass
class AdaLoraConfig(LoraFields):
    """Configuration of an AdaLoRA adapter (PEFT's ``AdaLoraConfig``).

    Schedule, in optimizer steps: ``tinit`` warm-up steps at the full budget, a cubic decrease of the
    total rank from ``init_r`` to ``target_r`` per module (masking every ``deltaT`` steps) until
    ``total_step - tfinal``, then ``tfinal`` steps with the final pattern. ``beta1``/``beta2`` smooth
    the sensitivity and its uncertainty. ``rank_pattern``: ``{"<module>.lora_E": [kept?] * init_r}``.
    PEFT's inherited LoRA fields are accepted and ignored (a warning when set); DoRA, LoftQ and the
    fields that would change what PEFT builds are refused.
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    # deltatune's command line (read through the registry): sizes, adapter lr; the schedule from --steps
    CLI_PRESET: ClassVar[dict] = {"fields": {"init_r": 12, "target_r": 8}, "lr": 1e-2, "why": (
        "ΔW = B·diag(E)·A·lora_alpha/ranknum; rank budget 12 → 8 per module, pruned between tinit and "
        "total_step − tfinal (set from --steps)")}
    cli_derived = classmethod(lambda cls, values, steps=None: schedule_for_steps(values, steps))

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()  # types, from the annotations
        check_schedule(self)
        if self.orth_reg_weight < 0:
            raise ValueError(
                f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is {self.orth_reg_weight}"
            )
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        if self.loftq_config and self.init_lora_weights != "loftq":  # PEFT drops it the same way
            warnings.warn("AdaLoraConfig: loftq_config is ignored (it only applies with init_lora_weights='loftq')")
            self.loftq_config = {}
        if isinstance(self.init_lora_weights, str):
            # PEFT's AdaLoRA only tests truthiness: every LoRA init name acts as True
            warnings.warn(f"AdaLoRA treats init_lora_weights={self.init_lora_weights!r} as True (as PEFT does)")
        check_lora_fields(self)
        self.rank_pattern = check_rank_pattern(self.rank_pattern)

    def to_dict(self) -> dict[str, Any]:
        return without_default_lora_fields(super().to_dict())


class SVDDelta(Delta):
    """ΔW = B · (A ⊙ E) · α / (ranknum + 1e-5) on one Linear, Conv1D or Conv2d layer."""

    def __init__(self, spec: LayerSpec, r: int, lora_alpha: float, dropout: float, init_weights: bool) -> None:
        super().__init__(spec)
        width = math.prod(spec.weight_shape[1:]) if spec.kind == "conv2d" else spec.in_features
        # drawn in PEFT's order (A, E, B, then ranknum's discarded initial value): one seed gives PEFT's weights
        self.lora_A = nn.Parameter(torch.randn(r, width))  # (r, in) or (r, in/groups·kh·kw)
        self.lora_E = nn.Parameter(torch.randn(r, 1))  # (r, 1)
        self.lora_B = nn.Parameter(torch.randn(spec.out_features, r))  # (out, r)
        torch.randn(1)  # (PEFT's ranknum placeholder)
        # init_r for life (PEFT keeps it after pruning and after resizing at load); not in checkpoints
        self.register_derived("ranknum", lambda: torch.full((1,), float(r)))
        self.r = r
        self.scaling = float(lora_alpha) if lora_alpha > 0 else float(r)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        if init_weights:
            nn.init.zeros_(self.lora_E)  # ΔW = 0: identity at init
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        # PEFT's rounding order (·α, then /(ranknum + 1e-5)): merged weights equal PEFT's bit for bit
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)  # (out, in[·kh·kw])

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        # the scale rides on the (r, in) factor: no extra pass over the (tokens, out) output
        a = self.lora_A * (self.lora_E * (self.scaling / (self.ranknum + 1e-5)))  # (r, in)
        if self.spec.kind != "conv2d" and isinstance(self.lora_dropout, nn.Identity) and not _device.cache_sized(x.device):
            # accelerators: the backward keeps x as it came (bf16), not an fp32 copy (methods/_device.py)
            return F.linear(_device.upcast_linear(x, a), self.lora_B)
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        if self.spec.kind != "conv2d":
            return F.linear(F.linear(x, a), self.lora_B)  # (..., r) -> (..., out)
        return self.spec.conv2d(x, (self.lora_B @ a).reshape(self.spec.weight_shape))  # ΔW: (out, in/groups, kh, kw)

    def keep_ranks(self, keep: list[bool]) -> None:
        """Shrink A, E, B to the ranks flagged True (PEFT's resize before loading a pruned checkpoint)."""
        kept = slice_ranks({n: getattr(self, n).detach() for n in ("lora_A", "lora_E", "lora_B")}, keep, "")
        for name, tensor in kept.items():
            setattr(self, name, nn.Parameter(tensor, requires_grad=getattr(self, name).requires_grad))
        self.r = sum(keep)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, ranknum={float(self.ranknum):g}"


class AdaLoraModel(AdapterModel):
    """``AdaLoraModel(model, config, "default")``: SVD deltas, and the orthogonality term in the loss.

    One adapter at most trains (``inference_mode=False``). Its rank allocation runs once per optimizer
    step (:meth:`update_and_allocate`), in :class:`~._adalora_alloc.Allocation` (``self.allocation``).
    """

    config_cls = AdaLoraConfig
    prefix = "lora_"
    default_targets: ClassVar[dict[str, Any]] = ADALORA_DEFAULT_TARGETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "conv2d")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.allocation = Allocation(self)  # set first: the hooks AdapterModel.__init__ calls use it
        self._deltas: dict[str, dict[str, SVDDelta]] = {}  # deltas() per adapter: walked once, not every step
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ method hooks
    def make_delta(self, config: AdaLoraConfig, adapter_name: str, base_layer: nn.Module, spec: LayerSpec, key: str) -> Delta:
        if config.fan_in_fan_out and spec.kind != "conv1d":
            warnings.warn(f"fan_in_fan_out is set to True but the target module '{key}' is a {type(base_layer).__name__}; "
                          "it is ignored (the layout follows the layer type).")
        return SVDDelta(spec, config.init_r, config.lora_alpha, config.lora_dropout, bool(config.init_lora_weights))

    def check_new_adapter(self, config: AdaLoraConfig, adapter_name: str) -> None:
        if config.inference_mode:
            return
        if any(not c.inference_mode for c in self.peft_config.values()):
            raise ValueError("AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set "
                             "inference_mode to True for all adapters except the one you want to train.")
        check_trainable(config)

    def after_delete(self, adapter_name: str) -> None:
        self._deltas.pop(adapter_name, None)
        self.allocation.reset()

    def fragments_for_save(self, fragments: dict[str, dict[str, torch.Tensor]], adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
        """Slice A/E/B to the kept ranks of ``rank_pattern`` (where a module still has more)."""
        pattern = self._pattern(adapter_name)
        return {path: slice_ranks(f, pattern[path], path) if path in pattern else f for path, f in fragments.items()}

    def before_load(self, adapter_name: str) -> None:
        """Resize the adapter's modules to the kept ranks of its ``rank_pattern`` (ranknum stays init_r)."""
        if resize_to_pattern(self.deltas(adapter_name), self._pattern(adapter_name)):
            self.allocation.reset()

    def config_for_save(self, adapter_name: str) -> dict[str, Any]:
        self.allocation.warn_if_never_ran(adapter_name)
        data = self.peft_config[adapter_name].to_dict()  # a deep copy: the live config keeps its keys
        if data.get("rank_pattern"):  # PEFT's files: keys without the adapter suffix
            data["rank_pattern"] = {f"{path}.lora_E": flags for path, flags in self._pattern(adapter_name).items()}
        return data

    # ------------------------------------------------------------------ adapters and triplets
    @property
    def trainable_adapter_name(self) -> Optional[str]:
        """The adapter whose config has ``inference_mode=False`` (at most one), else None."""
        return next((name for name, config in self.peft_config.items() if not config.inference_mode), None)

    def _require_trainable(self) -> str:
        name = self.trainable_adapter_name
        if name is None:
            raise ValueError("This AdaLoRA model has no trainable adapter (every config has inference_mode=True). Create "
                             "it with inference_mode=False or load it with is_trainable=True to train it.")
        return name

    def deltas(self, adapter_name: str) -> dict[str, SVDDelta]:
        """``{module path relative to the inner model: delta}`` of an adapter, in module order."""
        if adapter_name not in self._deltas:
            self._deltas[adapter_name] = {path: module.adapters[adapter_name] for path, module in self.model.named_modules()
                                          if isinstance(module, AdapterLayer) and adapter_name in module.adapters}
        return self._deltas[adapter_name]

    def triplets(self, adapter_name: Optional[str] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{module path: (lora_A, lora_E, lora_B)}`` of an adapter (default: the trainable one)."""
        name = adapter_name or self._require_trainable()
        if name not in self.peft_config:
            raise ValueError(f"Adapter {name} not found.")
        return {path: (d.lora_A, d.lora_E, d.lora_B) for path, d in self.deltas(name).items()}

    def _pattern(self, adapter_name: str) -> dict[str, list[bool]]:
        return pattern_by_path(self.peft_config[adapter_name].rank_pattern, adapter_name, self.deltas(adapter_name))

    # ------------------------------------------------------------------ rank allocation (see Allocation)
    @property
    def allocation_calls(self) -> int:
        return self.allocation.calls

    def update_and_allocate(self, global_step: int) -> Optional[dict[str, list[bool]]]:
        """Update the importance scores and re-mask E for optimizer step ``global_step`` (0-based);
        call it after ``optimizer.step()``, before ``zero_grad()`` (it reads the gradients). A new
        pattern goes into the config's ``rank_pattern`` (keys ``<module>.lora_E.<adapter>``, as
        PEFT's) and is returned (keys ``<module>.lora_E``). DeepSpeed ZeRO: see :meth:`capture_gradients`."""
        return self.allocation.update_and_allocate(global_step)

    def capture_gradients(self) -> None:
        """Under DeepSpeed ZeRO: read the adapter's whole gradients (after ``engine.backward``,
        before ``engine.step()`` frees them) for the next :meth:`update_and_allocate`; otherwise nothing."""
        self.allocation.capture_gradients()

    def allocator_state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to allocate as the uninterrupted one: importance EMAs, rank pattern."""
        return self.allocation.state_dict()

    def load_allocator_state_dict(self, state: dict[str, Any]) -> None:
        self.allocation.load_state_dict(state)

    def set_total_step(self, total_step: int) -> None:
        """Change the schedule length of the trainable adapter (e.g. to the trainer's step count)."""
        self.allocation.set_total_step(total_step)

    # ------------------------------------------------------------------ forward: L = C + γ·R
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The inner model's output; ``outputs.loss``, where it is a tensor, gains γ·R (eq. 4) for the
        trainable adapter, as a new tensor (the model's own loss is not changed in place).
        deltatune's ``PeftModel`` always calls this, so a ``PeftModel`` without ``task_type`` gets the
        term too (PEFT's does not, peft#432)."""
        outputs = super().forward(*args, **kwargs)
        name = self.trainable_adapter_name
        if name is None:
            return outputs
        if self.model.training and torch.is_grad_enabled():
            self.allocation.train_forwards += 1
        loss, weight = getattr(outputs, "loss", None), self.peft_config[name].orth_reg_weight
        layer = next(self.adapter_layers(), None)  # disable_adapter_layers() sets them all alike
        if isinstance(loss, torch.Tensor) and weight != 0 and layer is not None and not layer.disable_adapters:
            outputs.loss = loss + weight * _orth_reg(self.triplets(name)).to(device=loss.device, dtype=loss.dtype)
        return outputs

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")


def find_adalora_model(model: nn.Module) -> AdaLoraModel:
    """The :class:`AdaLoraModel` inside ``model`` (itself, a ``PeftModel``'s ``base_model``, or a
    DDP/compile wrapper around either)."""
    return find_tuner(model, AdaLoraModel)


def orthogonal_regularization(model: Union[nn.Module, Mapping], adapter_name: Optional[str] = None) -> torch.Tensor:
    """R of eq. 4, unweighted: ``(1/N) Σ_modules (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F)``, N = 2 × modules,
    over the trainable adapter (or ``adapter_name``) of a ``PeftModel`` or :class:`AdaLoraModel`, or
    over a ``{path: (A, E, B)}`` mapping. For a custom loop whose model output has no ``loss``:
    ``loss = task_loss + config.orth_reg_weight * orthogonal_regularization(model)``."""
    if isinstance(model, Mapping):
        return _orth_reg(model)
    return _orth_reg(find_adalora_model(model).triplets(adapter_name))


register_method(AdaLoraConfig, AdaLoraModel)
