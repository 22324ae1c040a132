"""RandLoRA: full-rank updates from fixed random bases and small trainable diagonals.

Reference: P. Albert et al., "RandLoRA: Full-rank parameter-efficient fine-tuning of large
models", ICLR 2025, arXiv:2502.00987 (§3, Eq. 3-5). Checkpoint format and maths of PEFT 0.21.2.

With s = randlora_alpha / r, m = min(in, out), nb = ceil(m / r) and shared frozen bases A (r, 1,
D_min), B (D_max, NB, r) sliced per layer:

    ΔW = s · Σ_b B_b · diag(λ_b) · A · diag(γ_b)        (λ: (r, nb), γ: (nb, m) trainable)

in PEFT's flattening order (see ``_randlora_ops``). The bases are drawn once per model from
``projection_prng_key`` exactly as PEFT draws them, held once (not per layer), and written once
to checkpoints (model-level keys, which PEFT reads) when ``save_projection`` is True.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn as nn

from ..config import TunerConfig, check_positive_int
from ..core.layer import Delta, DerivedBuffers, LayerSpec
from ..core.registry import register_method
from ..core.tuner import AdapterModel
from ._randlora_ops import basis_dims, make_bases, num_bases, randlora_delta_weight, randlora_linear

BASE_KEYS = ("randlora_A", "randlora_B")


@dataclass
class RandLoraConfig(TunerConfig):
    """Configuration of a RandLoRA adapter (PEFT's ``RandLoraConfig``, plus ``exclude_modules``).

    ``r`` is the rank of each random basis: a *smaller* r means more bases and more trainable
    parameters. ``randlora_alpha`` / r scales ΔW (PEFT's default 640 with r=32 gives 20).
    """

    PEFT_TYPE: ClassVar[str] = "RANDLORA"
    # deltatune's command line (read through the registry): sizes and adapter lr; alpha from r below
    CLI_PRESET: ClassVar[dict] = {
        "fields": {"r": 32},
        "lr": 5e-4,
        "why": "scaling = randlora_alpha / r with randlora_alpha = 20·r (set from r unless given); gamma starts "
        "at 1/max(in, out) (2.6e-3 for MiniLM), so an Adam step of 1e-2 moves it 4x its size: measured "
        "here lr 1e-2 -> 55 %, 3e-3 -> 69 %, 1e-3 -> 81.3 %, 3e-4 -> 81.7 %, 1e-4 -> 78.8 %",
    }

    @classmethod
    def cli_derived(cls, values: dict[str, Any], steps: Optional[int] = None) -> dict[str, Any]:
        """Fields the command line fills from the others unless the user sets them: the paper's and
        PEFT's alpha = 20·r (PEFT's default 640 is right only for r = 32)."""
        r = values.get("r", cls.r)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            return {}  # the config's own check names the bad r
        return {"randlora_alpha": 20 * r}

    r: int = 32
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: float = 640  # a real number in PEFT too (only ever divided by r)
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)  # PEFT divides by zero for r=0
        if not 0.0 <= float(self.randlora_dropout) < 1.0:
            raise ValueError(f"`randlora_dropout` must be in [0, 1), got {self.randlora_dropout}")
        if not self.save_projection:
            warnings.warn(
                "Specified to not save basis_A and basis_B in the state dictionary: they will be regenerated "
                "from `projection_prng_key`, which is not guaranteed to give the same bases on other machines or "
                "PyTorch versions."
            )


class _Bases(DerivedBuffers):
    """The shared bases of one adapter: registered once, at model level, drawn from the PRNG key."""

    def __init__(self, draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], persistent: bool) -> None:
        super().__init__()
        a, b = draw()
        self.register_derived("randlora_A", lambda: draw()[0], persistent, a)  # (r, 1, D_min)
        self.register_derived("randlora_B", lambda: draw()[1], persistent, b)  # (D_max, NB, r)


class RandLoraDelta(Delta):
    """λ (r, nb) and γ (nb, m) of one layer; the bases are read from the model-level holder."""

    cache_in_inference: ClassVar[bool] = True

    def __init__(self, spec: LayerSpec, bases: _Bases, r: int, scaling: float, dropout: float, init_weights: bool) -> None:
        super().__init__(spec)
        m = min(spec.in_features, spec.out_features)
        nb = num_bases(m, r)
        object.__setattr__(self, "_bases", bases)  # a reference, not a submodule: held once per model
        self.scaling = float(scaling)
        self.randlora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.randlora_lambda = nn.Parameter(torch.zeros(r, nb) if init_weights else torch.randn(r, nb))
        gamma = 1.0 / max(nb, m) if init_weights else 1.0 / max(spec.in_features, spec.out_features)
        self.randlora_gamma = nn.Parameter(torch.full((nb, m), gamma))

    def _args(self) -> tuple:
        b = self._bases
        return (self.randlora_lambda, self.randlora_gamma, b.randlora_A, b.randlora_B,
                self.spec.in_features, self.spec.out_features, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return randlora_delta_weight(*self._args())

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        lam, gamma, a, b, in_f, out_f, s = self._args()
        return randlora_linear(self.randlora_dropout(x), lam, gamma, a, b, in_f, out_f, s)

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not isinstance(self.randlora_dropout, nn.Identity) and self.training:
            return None  # dropout applies to the adapter input only
        lam, gamma, a, b, in_f, out_f, s = self._args()
        return randlora_linear(x, lam, gamma, a, b, in_f, out_f, s, base_weight=weight, base_bias=bias)


class RandLoraModel(AdapterModel):
    """Creates a RandLoRA model: ``RandLoraModel(model, config, "default")``."""
    config_cls = RandLoraConfig
    prefix = "randlora_"

    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    @property
    def _holders(self) -> nn.ModuleDict:
        """adapter -> _Bases; adapters of one model share one holder (as in PEFT)."""
        if "randlora_bases" not in self._modules:
            self.randlora_bases = nn.ModuleDict()
        return self._modules["randlora_bases"]

    # ---------------------------------------------------------------- bases
    def check_new_adapter(self, config: RandLoraConfig, adapter_name: str) -> None:
        for name, other in self.peft_config.items():
            if other.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    f"RandLora PRNG initialisation key must be the same for all adapters. Got "
                    f"config.projection_prng_key={config.projection_prng_key} but previous config had "
                    f"{other.projection_prng_key}."
                )
            if other.save_projection != config.save_projection:
                raise ValueError(
                    "RandLora projection weights must be saved for all adapters or none, but got multiple different "
                    f"values: {[other.save_projection, config.save_projection]}"
                )
            for field in ("r", "sparse", "very_sparse"):
                if getattr(other, field) != getattr(config, field):
                    # PEFT reuses the first adapter's bases and fails late (or silently ignores the flag)
                    raise ValueError(
                        f"RandLoRA adapters of one model share their random bases, so `{field}` must match: adapter "
                        f"'{name}' has {field}={getattr(other, field)!r}, adapter '{adapter_name}' has "
                        f"{getattr(config, field)!r}. Use one value, or a separate model."
                    )

    def before_inject(self, model: nn.Module, config: RandLoraConfig, adapter_name: str, targets: list[str]) -> None:
        shapes, dtypes = [], []
        for key in targets:
            module = model.get_submodule(key)
            module = getattr(module, "base_layer", module)
            try:
                spec = LayerSpec.of(module)
            except TypeError:
                continue
            shapes.append((spec.in_features, spec.out_features))
            dtypes.append(self._adapter_dtype(module.weight.dtype))
        if not shapes:
            raise ValueError("No layers types compatible with RandLora were found. Please check `peft_config.target_modules`.")
        d_max, d_min = basis_dims(shapes)
        shared = next(iter(self._holders.values()), None)
        if shared is not None:  # PEFT: every adapter reuses the first adapter's bases
            a, b = shared.randlora_A, shared.randlora_B
            if b.shape[0] < d_max or b.shape[1] < num_bases(d_min, config.r):
                raise ValueError(
                    f"randlora_B has a size of {tuple(b.shape)} but {(d_max, num_bases(d_min, config.r), config.r)} or "
                    f"greater is required for adapter '{adapter_name}'; the existing adapters' layers are smaller. "
                    "Loading the adapters in reverse order may solve this."
                )
            if a.shape[2] < d_min:
                raise ValueError(
                    f"randlora_A has a size of {a.shape[2]} but {d_min} or greater is required for adapter "
                    f"'{adapter_name}'. Loading the adapters in reverse order may solve this."
                )
            holder = self._holders[adapter_name] = shared
        else:
            devices = [p.device for p in model.parameters()]
            device = next((d for d in devices if d.type != "meta"), devices[0] if devices else torch.device("cpu"))
            draw = functools.partial(make_bases, config.r, d_max, d_min, config.projection_prng_key, config.sparse, config.very_sparse)
            holder = self._holders[adapter_name] = _Bases(draw, config.save_projection).to(device)
        if holder.randlora_A.device.type != "meta" and holder.randlora_A.dtype != dtypes[0]:
            holder.to(dtype=dtypes[0])  # the bases follow the adapters' float dtype (fp32 by default)

    def after_delete(self, adapter_name: str) -> None:
        if adapter_name in self._holders:
            del self._holders[adapter_name]

    def make_delta(self, config: RandLoraConfig, adapter_name: str, base_layer: nn.Module, spec: LayerSpec, key: str) -> Delta:
        scaling = config.randlora_alpha / config.r
        return RandLoraDelta(spec, self._holders[adapter_name], config.r, scaling, config.randlora_dropout, config.init_weights)

    # ---------------------------------------------------------------- checkpoints
    shared_tensor_names = BASE_KEYS

    def model_tensors(self, adapter_name: str) -> dict[str, tuple[nn.Module, str]]:
        config = self.peft_config.get(adapter_name)
        if config is None or not config.save_projection or adapter_name not in self._holders:
            return {}  # without save_projection the bases are regenerated from projection_prng_key
        return {k: (self._holders[adapter_name], k) for k in BASE_KEYS}

    def config_for_save(self, adapter_name: str) -> dict[str, Any]:
        data = super().config_for_save(adapter_name)
        if data.get("exclude_modules") is None:
            data.pop("exclude_modules", None)  # PEFT's RandLoraConfig has no such field
        return data


register_method(RandLoraConfig, RandLoraModel)
