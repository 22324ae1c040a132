"""AdaLoRA: LoRA in SVD form whose rank budget is re-allocated during training.

Reference: Q. Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023
(arXiv:2303.10512). §3.1 (SVD-based adaptation, with the orthogonality regulariser), §3.2
(importance scores and pruning), §3.3 (the cubic global budget schedule). Checkpoint format, maths
and schedule of PEFT 0.21.2.

Each adapted weight gets a triplet, named as PEFT names it:

    ΔW = B · (A ⊙ E) · α / (ranknum + 1e-5)

with A = ``lora_A`` (r, in) the right singular vectors, E = ``lora_E`` (r, 1) the singular values
(broadcast over A's columns), B = ``lora_B`` (out, r) the left singular vectors, α = ``lora_alpha``
and ``ranknum`` = init_r, which is never changed (so the effective scale stays α / init_r while
ranks are pruned). Conv2d flattens the kernel: A is (r, in·kh·kw) and ΔW is reshaped to the kernel.

Rank allocation (:meth:`AdaLoraModel.update_and_allocate`, PEFT's semantics exactly) zeroes entries
of E; it never resizes a parameter during training, and pruned entries can regrow between two mask
steps because the optimizer still updates them (PEFT behaves the same; parity requires it). At save
time A/E/B are sliced to the kept ranks and the boolean ``rank_pattern`` goes into
``adapter_config.json``; loading resizes the modules from that pattern first.

The orthogonality term ``orth_reg_weight · R`` (see :func:`orthogonal_regularization`) is added to
``outputs.loss`` by :meth:`AdaLoraModel.forward` whenever the output carries a tensor ``loss``.
deltatune's ``PeftModel`` always calls the tuner's forward, so this also holds for a ``PeftModel``
without ``task_type`` (PEFT skips it there, peft#432). The loss is never changed in place: the
output's ``loss`` field is replaced by a new tensor.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TunerConfig, check_positive_int
from ..core.layer import AdapterLayer, Delta, LayerSpec
from ..core.registry import register_method
from ..core.tuner import AdapterModel
from ..io.state_dict import MODEL_PREFIX
from . import _device
from ._adalora_alloc import RankAllocator
from ._adalora_alloc import orthogonal_regularization as _orth_reg

# PEFT's own default-target table for AdaLoRA (it differs from LoRA's for t5, bart, opt, roberta, …).
ADALORA_DEFAULT_TARGETS: dict[str, Any] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# LoRA fields PEFT writes into every AdaLoRA adapter_config.json (AdaLoraConfig subclasses LoraConfig),
# with PEFT 0.21.2's defaults. A file carrying the default is read silently.
_LORA_DEFAULTS: dict[str, Any] = {
    "r": 8, "use_rslora": False, "alpha_pattern": {}, "lora_bias": False, "use_qalora": False,
    "qalora_group_size": 16, "megatron_config": None, "megatron_core": "megatron.core", "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "kasa_config": None, "monteclora_config": None,
    "velora_config": None, "arrow_config": None, "use_bdlora": None, "ensure_weight_tying": False,
    "use_dora": False, "loftq_config": {}, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None,
}
# Non-default values of these change what PEFT builds (or PEFT refuses them): refused here.
_LORA_UNSUPPORTED = ("use_dora", "loftq_config", "layer_replication", "target_parameters",
                     "trainable_token_indices", "alora_invocation_tokens")
_EMPTY = (None, {}, [], ())

_SINGLE_TRAINABLE = (
    "AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode to True for "
    "all adapters except the one you want to train."
)
_BUDGET_PHASE = (
    "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or increase `total_step`."
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class AdaLoraConfig(TunerConfig):
    """Configuration of an AdaLoRA adapter (PEFT's ``AdaLoraConfig``, the fields that mean something).

    Schedule (steps count ``update_and_allocate`` calls, i.e. optimizer steps): ``tinit`` warm-up
    steps at the full budget, a cubic decrease of the total rank from ``init_r`` to ``target_r`` per
    module (re-masking every ``deltaT`` steps) until ``total_step - tfinal``, then ``tfinal`` steps
    with the final rank pattern. ``beta1``/``beta2`` smooth the sensitivity and its uncertainty.
    ``rank_pattern`` is written by the allocator: ``{"<module path>.lora_E": [kept?] * init_r}``.

    PEFT's ``adapter_config.json`` files carry every LoRA field as well; they load here when those
    fields hold PEFT's defaults (see ``_convert_legacy``).
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"

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
        super().__post_init__()
        for name in ("init_r", "target_r", "tinit", "tfinal"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"`{name}` should be a positive integer or 0, but the value passed is {value!r}")
        check_positive_int("deltaT", self.deltaT)
        if self.total_step is None or not _is_number(self.total_step) or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if not _is_int(self.total_step):
            raise ValueError(f"`total_step` must be an integer, got {self.total_step!r}")
        if not _is_number(self.orth_reg_weight) or not math.isfinite(self.orth_reg_weight):
            raise ValueError(f"`orth_reg_weight` must be a finite number, got {self.orth_reg_weight!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(
                f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is {self.orth_reg_weight}"
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(_BUDGET_PHASE)
        for name in ("beta1", "beta2"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"`{name}` must be a number, got {getattr(self, name)!r}")
        if not _is_number(self.lora_alpha):
            raise ValueError(f"`lora_alpha` must be a number, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.init_lora_weights, (bool, str)):
            raise ValueError(f"`init_lora_weights` must be a bool, got {self.init_lora_weights!r}")
        if isinstance(self.init_lora_weights, str):
            # PEFT's AdaLoRA only tests truthiness: every LoRA init name acts as True
            warnings.warn(f"AdaLoRA treats init_lora_weights={self.init_lora_weights!r} as True (as PEFT does)")
        self.rank_pattern = _check_rank_pattern(self.rank_pattern)

    @classmethod
    def _convert_legacy(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Read PEFT's full AdaLoRA config: drop the LoRA fields AdaLoRA does not use.

        A field at PEFT's default goes silently; a non-default one that PEFT's AdaLoRA also ignores
        goes with a warning; one that would change what PEFT builds is refused.
        """
        data = dict(data)
        for key, default in _LORA_DEFAULTS.items():
            if key not in data:
                continue
            value = data.pop(key)
            if value == default or (value in _EMPTY and default in _EMPTY):
                continue
            if key == "use_dora":
                raise ValueError("PeftType.ADALORA does not support DoRA.")
            if key == "loftq_config":
                raise ValueError("PeftType.ADALORA does not support LOFTQ.")
            if key in _LORA_UNSUPPORTED:
                raise ValueError(
                    f"AdaLoraConfig: {key}={value!r} changes how PEFT builds the model, which deltatune's AdaLoRA "
                    f"does not support; remove it from the config (its default is {default!r})"
                )
            if key == "r":
                warnings.warn(
                    "Note that `r` is not used in AdaLora and will be ignored.If you intended to set the initial "
                    "rank, use `init_r` instead."
                )
            else:
                warnings.warn(f"AdaLoraConfig: {key}={value!r} is ignored: AdaLoRA does not use it (PEFT ignores it too)")
        if data.get("rank_pattern") == {}:
            data["rank_pattern"] = None
        return data


def _check_rank_pattern(pattern: Any) -> Optional[dict[str, list[bool]]]:
    if pattern is None:
        return None
    if not isinstance(pattern, Mapping):
        raise ValueError(f"`rank_pattern` must be a dict {{'<module>.lora_E': [bool, ...]}}, got {type(pattern).__name__}")
    out: dict[str, list[bool]] = {}
    for key, flags in pattern.items():
        if isinstance(flags, torch.Tensor):
            flags = flags.reshape(-1).tolist()
        if not isinstance(key, str) or not isinstance(flags, (list, tuple)) or not all(
            isinstance(f, bool) or f in (0, 1) for f in flags
        ):
            raise ValueError(f"`rank_pattern` entry {key!r} must map to a list of booleans, got {flags!r}")
        out[key] = [bool(f) for f in flags]
    return out


def _check_trainable(config: AdaLoraConfig) -> None:
    """Values only the rank allocator uses (PEFT asserts or crashes on them during training)."""
    if config.init_r <= config.target_r:
        raise ValueError(
            f"AdaLoRA needs init_r > target_r: ranks are pruned from init_r down to target_r per module on average; "
            f"got init_r={config.init_r}, target_r={config.target_r} (PEFT fails at its first pruning step)"
        )
    for name in ("beta1", "beta2"):
        beta = getattr(config, name)
        if not 0 < beta < 1:
            raise ValueError(f"`{name}` must be strictly between 0 and 1, got {beta}")


# ------------------------------------------------------------------------------------------ layer


class SVDDelta(Delta):
    """ΔW = B · (A ⊙ E) · α / (ranknum + 1e-5) on one Linear, Conv1D or Conv2d layer."""

    def __init__(
        self, spec: LayerSpec, r: int, lora_alpha: float, dropout: float, init_weights: bool,
        conv: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__(spec)
        width = math.prod(spec.weight_shape[1:]) if spec.kind == "conv2d" else spec.in_features
        # drawn in PEFT's order (A, E, B, then ranknum's discarded initial value) so that one seed
        # gives PEFT's initial weights
        self.lora_A = nn.Parameter(torch.randn(r, width))  # (r, in) or (r, in/groups·kh·kw)
        self.lora_E = nn.Parameter(torch.randn(r, 1))  # (r, 1)
        self.lora_B = nn.Parameter(torch.randn(spec.out_features, r))  # (out, r)
        torch.randn(1)  # (PEFT's ranknum placeholder)
        # init_r for life (PEFT keeps it after pruning and after resizing at load); not in checkpoints
        self.register_derived("ranknum", lambda: torch.full((1,), float(r)))
        self.r = r
        self.scaling = float(lora_alpha) if lora_alpha > 0 else float(r)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.conv = conv
        if init_weights:
            nn.init.zeros_(self.lora_E)  # ΔW = 0: identity at init
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def _scale(self) -> torch.Tensor:
        return self.scaling / (self.ranknum + 1e-5)  # (1,)

    def delta_weight(self) -> torch.Tensor:
        # PEFT's rounding order (·α, then /(ranknum + 1e-5)): merged weights equal PEFT's bit for bit
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)  # (out, in[·kh·kw])

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        # the scale rides on the (r, in) factor: no extra pass over the (tokens, out) output
        a = self.lora_A * (self.lora_E * self._scale())  # (r, in)
        if self.conv is None and isinstance(self.lora_dropout, nn.Identity) and not _device.cache_sized(x.device):
            # accelerators: the backward keeps x as it came (bf16), not an fp32 copy (methods/_device.py)
            return F.linear(_device.upcast_linear(x, a), self.lora_B)
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        if self.conv is None:
            return F.linear(F.linear(x, a), self.lora_B)  # (..., r) -> (..., out)
        weight = (self.lora_B @ a).reshape(self.spec.weight_shape)  # (out, in/groups, kh, kw)
        c = self.conv
        if c["padding_mode"] != "zeros":
            x = F.pad(x, c["padding_pad"], mode=c["padding_mode"])
            return F.conv2d(x, weight, None, c["stride"], 0, c["dilation"], c["groups"])
        return F.conv2d(x, weight, None, c["stride"], c["padding"], c["dilation"], c["groups"])

    def triplet(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_E, self.lora_B

    def keep_ranks(self, keep: list[bool]) -> None:
        """Shrink A, E, B to the ranks flagged True (PEFT's resize before loading a pruned checkpoint)."""
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            old = getattr(self, name)
            new = old.detach().index_select(dim, index.to(old.device))
            setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))
        self.r = len(index)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}, ranknum={float(self.ranknum):g}"


def _conv_params(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
        "padding_mode": conv.padding_mode, "padding_pad": getattr(conv, "_reversed_padding_repeated_twice", None),
    }


# ------------------------------------------------------------------------------------------ model


class AdaLoraModel(AdapterModel):
    """Creates an AdaLoRA model from a pretrained model: ``AdaLoraModel(model, config, "default")``.

    Only one adapter may train (its config has ``inference_mode=False``); others are for inference.
    During training, call :meth:`update_and_allocate` once per optimizer step, or let
    :meth:`attach_optimizer` (or ``deltatune.integrations.transformers.AdaLoraCallback``) do it.
    """
    config_cls = AdaLoraConfig
    prefix = "lora_"

    default_targets: ClassVar[dict[str, Any]] = ADALORA_DEFAULT_TARGETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d", "conv2d")

    # plain per-instance state; these immutable class-level defaults hold until the first assignment
    allocation_calls: int = 0  # update_and_allocate calls so far
    optimizer_step: int = 0  # the step attach_optimizer's hook passes next
    _allocator: Optional[RankAllocator] = None
    _allocator_for: Optional[str] = None  # the adapter it was built for
    _deltas: Optional[tuple[str, dict[str, SVDDelta]]] = None
    _train_forwards: int = 0
    _enabled: bool = True
    _optimizer_handle: Any = None
    # DeepSpeed ZeRO: (adapter, {path: whole fp32 copies of (A, E, B)}) the allocator works on, and
    # the gradients read before engine.step() freed them ({id(copy): gradient})
    _zero_copies: Optional[tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = None
    _zero_grads: Optional[dict[int, torch.Tensor]] = None

    # ------------------------------------------------------------------ method hooks
    def make_delta(self, config: AdaLoraConfig, adapter_name: str, base_layer: nn.Module, spec: LayerSpec, key: str) -> Delta:
        if config.fan_in_fan_out and spec.kind != "conv1d":
            warnings.warn(
                f"fan_in_fan_out is set to True but the target module '{key}' is a {type(base_layer).__name__}; "
                "it is ignored (the layout follows the layer type)."
            )
        conv = _conv_params(base_layer) if spec.kind == "conv2d" else None
        delta = SVDDelta(spec, config.init_r, config.lora_alpha, config.lora_dropout, bool(config.init_lora_weights), conv)
        return delta

    def check_new_adapter(self, config: AdaLoraConfig, adapter_name: str) -> None:
        if config.inference_mode:
            return
        if any(not c.inference_mode for c in self.peft_config.values()):
            raise ValueError(_SINGLE_TRAINABLE)
        _check_trainable(config)

    def after_delete(self, adapter_name: str) -> None:
        self._deltas = None
        self._allocator = None
        self._allocator_for = None

    def prepare_state_dict_for_save(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        """Slice A/E/B to the kept ranks of ``rank_pattern`` (where a module still has more)."""
        pattern = self._pattern(adapter_name)
        if not pattern:
            return state_dict
        out = dict(state_dict)
        for path, flags in pattern.items():
            keep = torch.tensor(flags, dtype=torch.bool)
            kept = int(keep.sum())
            for part, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                key = f"{MODEL_PREFIX}{path}.{part}"
                tensor = out[key]
                if tensor.shape[dim] == kept:
                    continue
                if tensor.shape[dim] != len(flags):
                    raise ValueError(
                        f"rank_pattern entry for '{path}' has {len(flags)} flags but {key} has rank {tensor.shape[dim]}"
                    )
                out[key] = tensor[keep] if dim == 0 else tensor[:, keep.to(tensor.device)]
        return out

    def prepare_state_dict_for_load(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
        """Resize the adapter's modules to the kept ranks of its ``rank_pattern`` (ranknum stays init_r)."""
        pattern = self._pattern(adapter_name)
        if pattern:
            deltas = self._svd_deltas(adapter_name)
            for path, flags in pattern.items():
                delta = deltas[path]
                if delta.r == sum(flags):
                    continue
                if delta.r != len(flags):
                    raise ValueError(
                        f"rank_pattern entry for '{path}' has {len(flags)} flags but the module has rank {delta.r}"
                    )
                delta.keep_ranks(flags)
            self._allocator = None
        return state_dict

    def config_for_save(self, adapter_name: str) -> dict[str, Any]:
        if adapter_name == self.trainable_adapter_name and self._train_forwards and not self.allocation_calls:
            warnings.warn(
                f"AdaLoRA adapter '{adapter_name}' was trained ({self._train_forwards} forward passes in training "
                "mode) but its rank allocator never ran: no rank was pruned and rank_pattern stays empty. Call "
                "model.base_model.update_and_allocate(step) after each optimizer.step() and before zero_grad(), or "
                "model.base_model.attach_optimizer(optimizer) once, or train with "
                "deltatune.integrations.transformers.AdaLoraCallback.",
                stacklevel=3,
            )
        data = self.peft_config[adapter_name].to_dict()  # a deep copy: the live config keeps its keys
        pattern = data.get("rank_pattern")
        if pattern:
            data["rank_pattern"] = {_strip_adapter(k, adapter_name): v for k, v in pattern.items()}
        return data

    # ------------------------------------------------------------------ adapters and triplets
    @property
    def trainable_adapter_name(self) -> Optional[str]:
        """The adapter whose config has ``inference_mode=False`` (at most one), else None."""
        for name, config in self.peft_config.items():
            if not config.inference_mode:
                return name
        return None

    def _require_trainable(self) -> str:
        name = self.trainable_adapter_name
        if name is None:
            raise ValueError(
                "This AdaLoRA model has no trainable adapter (every config has inference_mode=True). Create it with "
                "inference_mode=False or load it with is_trainable=True to train it."
            )
        return name

    def _svd_deltas(self, adapter_name: str) -> dict[str, SVDDelta]:
        """``{module path relative to the inner model: delta}`` in module order (cached)."""
        if self._deltas is None or self._deltas[0] != adapter_name:
            found = {
                path: module.adapters[adapter_name]
                for path, module in self.model.named_modules()
                if isinstance(module, AdapterLayer) and adapter_name in module.adapters
            }
            self._deltas = (adapter_name, found)
        return self._deltas[1]

    def triplets(self, adapter_name: Optional[str] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``{module path: (lora_A, lora_E, lora_B)}`` of an adapter (default: the trainable one)."""
        name = adapter_name or self._require_trainable()
        if name not in self.peft_config:
            raise ValueError(f"Adapter {name} not found.")
        return {path: delta.triplet() for path, delta in self._svd_deltas(name).items()}

    def _pattern(self, adapter_name: str) -> dict[str, list[bool]]:
        """The adapter's rank_pattern keyed by module path (keys with or without the adapter suffix)."""
        pattern = self.peft_config[adapter_name].rank_pattern or {}
        deltas = self._svd_deltas(adapter_name)
        out: dict[str, list[bool]] = {}
        for key, flags in pattern.items():
            stripped = _strip_adapter(key, adapter_name)
            path = stripped[: -len(".lora_E")] if stripped.endswith(".lora_E") else None
            if path not in deltas:
                raise ValueError(
                    f"rank_pattern key {key!r} of adapter '{adapter_name}' names no module adapted by it "
                    f"(expected '<module path>.lora_E', e.g. '{next(iter(deltas), 'model.layer')}.lora_E')"
                )
            out[path] = [bool(f) for f in flags]
        return out

    # ------------------------------------------------------------------ rank allocation
    @property
    def rank_allocator(self) -> RankAllocator:
        """The trainable adapter's allocator (built on first use, rebuilt if its tensors were replaced)."""
        name = self._require_trainable()
        config = self.peft_config[name]
        live = self.triplets(name)
        triplets = self._zero_triplets(name, live) if _zero_managed(live) else live
        current = self._allocator
        if current is None or self._allocator_for != name or not _same_tensors(current.triplets, triplets):
            if current is not None and current.exp_avg_ipt:
                warnings.warn(f"AdaLoRA adapter '{name}' changed shape or storage: its importance scores restart at zero")
            self._allocator = RankAllocator(
                triplets, init_r=config.init_r, target_r=config.target_r, tinit=config.tinit, tfinal=config.tfinal,
                deltaT=config.deltaT, beta1=config.beta1, beta2=config.beta2, total_step=config.total_step,
                grad_getter=self._zero_grad if triplets is not live else None,
            )
            self._allocator_for = name
        return self._allocator

    def update_and_allocate(self, global_step: int) -> Optional[dict[str, list[bool]]]:
        """Update importance scores and re-mask E for optimizer step ``global_step`` (0-based).

        Call it every step after ``loss.backward()`` (and ``optimizer.step()``), before
        ``optimizer.zero_grad()``: it reads the gradients. With T = total_step, F = tfinal:
        before T − F it updates the scores and prunes to the scheduled budget every ``deltaT``
        steps; at T − F it prunes to the target budget and resets the scores; after that it
        re-applies ``rank_pattern`` every step. New patterns are stored in the config's
        ``rank_pattern`` (keys ``<module>.lora_E.<adapter>``, as PEFT) and returned (keys
        ``<module>.lora_E``); otherwise None is returned.

        Under DDP, gradients are all-reduced before the optimizer step, so every rank sees the same
        gradients and computes the same masks (the threshold is selected deterministically on the
        CPU). Under DeepSpeed ZeRO (1, 2 or 3) DeepSpeed holds the gradients and the fp32 master
        weights in its own partitions: the allocator works on whole fp32 copies read through
        ``deepspeed.utils`` (``safe_get_full_grad``, ``safe_get_full_fp32_param``; identical on every
        rank) and writes the masked E back to DeepSpeed's master copy and to the model's weights.
        ``engine.step()`` frees the gradients, so :meth:`capture_gradients` must run between
        ``engine.backward`` and ``engine.step()``, and this method after the step (PEFT's order);
        ``deltatune.integrations.deepspeed.attach_adalora(engine)`` does both at every step.
        Every rank must call it (it gathers).
        """
        name = self._require_trainable()
        config = self.peft_config[name]
        self.allocation_calls += 1
        if global_step > config.total_step - config.tfinal:
            if config.rank_pattern is None:
                raise RuntimeError(
                    f"step {global_step} is past the budgeting phase (total_step - tfinal = "
                    f"{config.total_step - config.tfinal}) but adapter '{name}' has no rank_pattern yet: run the "
                    "allocator from step 0, or set the config's rank_pattern"
                )
            self._mask_with(name, self._pattern(name))
            return None
        allocator = self.rank_allocator
        zero = _zero_managed(self.triplets(name))
        if zero:
            self._zero_pull(name)
        try:
            pattern = allocator.step(global_step)
        finally:
            self._zero_grads = None  # one step's gradients are used once
        if zero and (pattern is not None or global_step >= config.total_step - config.tfinal):
            self._zero_push(name)  # E was masked
        if pattern is None:
            return None
        config.rank_pattern = {f"{key}.{name}": flags for key, flags in pattern.items()}
        return pattern

    def allocator_state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to allocate as the uninterrupted one would: the trainable
        adapter's importance EMAs and its rank pattern (see :meth:`RankAllocator.state_dict`)."""
        self._require_trainable()
        return self.rank_allocator.state_dict()

    def load_allocator_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`allocator_state_dict`'s output into the allocator and the config's
        ``rank_pattern`` (the pattern the final phase re-applies and ``save_pretrained`` prunes to)."""
        name = self._require_trainable()
        allocator = self.rank_allocator
        allocator.load_state_dict(state)
        pattern = allocator.rank_pattern
        self.peft_config[name].rank_pattern = (
            None if pattern is None else {f"{key}.{name}": list(flags) for key, flags in pattern.items()}
        )

    @torch.no_grad()
    def _mask_with(self, adapter_name: str, pattern: dict[str, list[bool]]) -> None:
        deltas = self._svd_deltas(adapter_name)
        zero = _zero_managed(self.triplets(adapter_name))
        if zero:
            self._zero_pull(adapter_name, grads=False)
            copies = self._zero_copies[1]
        for path, flags in pattern.items():
            delta = deltas[path]
            if delta.r != len(flags):
                continue  # resized at load to exactly the kept ranks: nothing is masked
            lora_e = copies[path][1] if zero else delta.lora_E
            keep = torch.tensor(flags, dtype=torch.bool, device=lora_e.device)
            lora_e.masked_fill_(~keep.view(-1, 1), 0.0)
        if zero:
            self._zero_push(adapter_name)

    # ------------------------------------------------------------------ DeepSpeed ZeRO
    def _zero_triplets(self, name: str, live: Mapping[str, tuple]) -> dict[str, tuple[torch.Tensor, ...]]:
        """Whole fp32 copies of the triplets for the allocator (kept across steps: its EMAs are
        keyed to them); ZeRO-3 tensors are empty outside a forward, their shape is ``ds_shape``."""
        held = self._zero_copies
        shapes = {path: tuple(_full_shape(t) for t in trip) for path, trip in live.items()}
        if held is None or held[0] != name or {p: tuple(t.shape for t in c) for p, c in held[1].items()} != shapes:
            copies = {
                path: tuple(torch.zeros(shape, dtype=torch.float32, device=t.device) for shape, t in zip(shapes[path], trip))
                for path, trip in live.items()
            }
            self._zero_copies = held = (name, copies)
        return held[1]

    def _zero_grad(self, copy: torch.Tensor) -> Optional[torch.Tensor]:
        return (self._zero_grads or {}).get(id(copy))

    def capture_gradients(self) -> None:
        """Under DeepSpeed ZeRO: read the trainable adapter's whole gradients now (after
        ``engine.backward``, before ``engine.step()`` frees them) for the next
        :meth:`update_and_allocate`. Every rank must call it (it gathers). Without DeepSpeed,
        gradients stay in ``.grad`` and this does nothing."""
        name = self._require_trainable()
        live = self.triplets(name)
        if not _zero_managed(live):
            return
        from deepspeed.utils import safe_get_full_grad

        self.rank_allocator  # builds the copies if needed
        copies = self._zero_copies[1]
        grads: dict[int, torch.Tensor] = {}
        for path, trip in live.items():
            for part, param, copy in zip(("lora_A", "lora_E", "lora_B"), trip, copies[path]):
                grad = safe_get_full_grad(param)  # the all-reduced gradient, gathered whole
                if grad is None:
                    raise ValueError(
                        f"AdaLoRA needs the gradient of `{path}.{part}` but DeepSpeed holds none: call "
                        "capture_gradients() after engine.backward(loss) and before engine.step(), or use "
                        "deltatune.integrations.deepspeed.attach_adalora(engine)"
                    )
                grads[id(copy)] = grad.detach().reshape(copy.shape).float().clone()
        self._zero_grads = grads

    @torch.no_grad()
    def _zero_pull(self, name: str, grads: bool = True) -> None:
        """The copies take DeepSpeed's fp32 master values; gradients are read now unless captured."""
        from deepspeed.utils import safe_get_full_fp32_param

        if grads and self._zero_grads is None:
            # reading them here is too late after engine.step() (ZeRO-2 then raises on the ranks that
            # own a fragment while the others wait in the all-reduce) and too early before it (PEFT
            # masks after the optimizer step): refuse, on every rank alike, before any collective
            raise RuntimeError(
                f"AdaLoRA adapter '{name}' runs under DeepSpeed ZeRO, whose engine.step() frees the gradients: call "
                "model.base_model.capture_gradients() after engine.backward(loss) and before engine.step(), then "
                "update_and_allocate(step) after it, or let deltatune.integrations.deepspeed.attach_adalora(engine) do both"
            )
        live = self.triplets(name)
        copies = self._zero_triplets(name, live)
        for path, trip in live.items():
            for part, param, copy in zip(("lora_A", "lora_E", "lora_B"), trip, copies[path]):
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

        live = self.triplets(name)
        copies = self._zero_copies[1]
        for path, (_, lora_e, _) in live.items():
            safe_set_full_fp32_param(lora_e, copies[path][1])
        partitioned = [trip[1] for trip in live.values() if hasattr(trip[1], "ds_id")]
        # ZeRO-3: gather E whole, write it (the same values on every rank), repartition from rank 0
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0) if partitioned else contextlib.nullcontext():
            for path, (_, lora_e, _) in live.items():
                lora_e.data.copy_(copies[path][1].reshape(lora_e.shape).to(lora_e.dtype))

    def set_total_step(self, total_step: int) -> None:
        """Change the schedule length of the trainable adapter (e.g. to the trainer's step count)."""
        config = self.peft_config[self._require_trainable()]
        if not _is_int(total_step) or total_step <= 0:
            raise ValueError(f"`total_step` must be a positive integer, got {total_step!r}")
        if config.tinit >= total_step - config.tfinal:
            raise ValueError(f"{_BUDGET_PHASE} (tinit={config.tinit}, tfinal={config.tfinal}, total_step={total_step})")
        config.total_step = total_step
        if self._allocator is not None:
            self._allocator.set_total_step(total_step)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, start_step: int = 0) -> Any:
        """Run :meth:`update_and_allocate` after every ``optimizer.step()``, counting from ``start_step``.

        The hook is an optimizer step post-hook: it runs after the parameters are updated and
        before ``zero_grad()``, while the gradients still exist, and it counts optimizer steps, so
        gradient accumulation is handled (micro-batches that do not step are not counted). A step
        the AMP grad scaler skips (inf/NaN gradients) is not counted either. Returns the hook
        handle; :meth:`detach_optimizer` removes it.
        """
        if self.optimizer_attached:
            warnings.warn("AdaLoRA: an optimizer was already attached; it is replaced by the new one")
            self.detach_optimizer()
        self._require_trainable()
        self.optimizer_step = start_step

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.update_and_allocate(self.optimizer_step)
            self.optimizer_step += 1

        self._optimizer_handle = optimizer.register_step_post_hook(after_step)
        return self._optimizer_handle

    def detach_optimizer(self) -> None:
        if self._optimizer_handle is not None:
            self._optimizer_handle.remove()
            self._optimizer_handle = None

    @property
    def optimizer_attached(self) -> bool:
        handle = self._optimizer_handle
        if handle is None:
            return False
        hooks = handle.hooks_dict_ref()
        return hooks is not None and handle.id in hooks

    # ------------------------------------------------------------------ forward and regulariser
    def _set_enabled(self, enabled: bool) -> None:
        super()._set_enabled(enabled)
        self._enabled = enabled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super().forward(*args, **kwargs)
        name = self.trainable_adapter_name
        if name is None:
            return outputs
        if self.model.training and torch.is_grad_enabled():
            self._train_forwards += 1
        loss = getattr(outputs, "loss", None)
        weight = self.peft_config[name].orth_reg_weight
        if not isinstance(loss, torch.Tensor) or not self._enabled or weight == 0:
            return outputs
        reg = _orth_reg(self.triplets(name))
        outputs.loss = loss + weight * reg.to(device=loss.device, dtype=loss.dtype)
        return outputs

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} does not support add_weighted_adapter method.")


def _zero_managed(triplets: Mapping[str, tuple]) -> bool:
    """Whether DeepSpeed ZeRO manages these parameters: ZeRO-3 partitions them (``ds_id``), ZeRO-1/2
    keep their fp32 master copy and gradient in its own flat buffers (``_hp_mapping``)."""
    return any(hasattr(t, "ds_id") or hasattr(t, "_hp_mapping") for trip in triplets.values() for t in trip)


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))  # ZeRO-3 keeps the whole shape in ds_shape


def _same_tensors(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> bool:
    return a.keys() == b.keys() and all(x is y for k in a for x, y in zip(a[k], b[k]))


def _strip_adapter(key: str, adapter_name: str) -> str:
    suffix = f".{adapter_name}"
    return key[: -len(suffix)] if key.endswith(".lora_E" + suffix) else key


def find_adalora_model(model: nn.Module) -> AdaLoraModel:
    """The :class:`AdaLoraModel` inside ``model`` (itself, a ``PeftModel``'s ``base_model``, or a
    DDP/compile wrapper around either)."""
    seen = model
    for _ in range(4):
        if isinstance(seen, AdaLoraModel):
            return seen
        children = seen.__dict__.get("_modules", {})
        seen = next((children[k] for k in ("base_model", "module", "_orig_mod") if children.get(k) is not None), None)
        if seen is None:
            break
    raise TypeError(f"{type(model).__name__} holds no deltatune AdaLoraModel")


def orthogonal_regularization(model: Union[nn.Module, Mapping], adapter_name: Optional[str] = None) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty for a custom training loop (not weighted).

    ``R = (1/N) Σ_modules (‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F)``, N = 2 × the number of modules, over the
    trainable adapter (or ``adapter_name``), as PEFT computes it. ``model`` is a ``PeftModel``, an
    :class:`AdaLoraModel`, or a ``{path: (A, E, B)}`` mapping. Use it as
    ``loss = task_loss + config.orth_reg_weight * orthogonal_regularization(model)`` only when the
    model's output has no ``loss`` (the model adds the term itself to ``outputs.loss``).
    """
    if isinstance(model, Mapping):
        return _orth_reg(model)
    return _orth_reg(find_adalora_model(model).triplets(adapter_name))


register_method(AdaLoraConfig, AdaLoraModel)
