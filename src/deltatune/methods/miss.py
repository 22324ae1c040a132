"""MiSS ("Matrix Shard Sharing"), the name PEFT ≥ 0.19 gives Bone, with its ``mini`` variant.

Reference: J. Kang, "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing
Structure", arXiv:2409.15371 (v6+, the renamed Bone paper). Checkpoint format of PEFT 0.21.2's
``MissConfig``: ``peft_type`` "MISS", tensor ``miss_block``.

Variants (``init_weights``), with B = ``miss_block``:

- True / False: Bone's additive block (see :mod:`.bone`), ΔW[o, i] = B[i mod r, o], B (r, out),
  zeros (identity at init) or Kaiming-uniform.
- ``"bat"``: Bone's BAT weight transform W'_ij = W_ij(I + B_i) + B_i, B (out/r, r, r).
- ``"mini"``: B (r, mini_r) tiled out/mini_r times along the output axis, then as True:
  ΔW[o, i] = B[i mod r, o mod mini_r]; fewer parameters for the same r.

``miss_dropout`` drops inputs of the additive path while training (PEFT applies it to x before the
r-wide chunks are summed); BAT has no input path to drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Union

import torch
import torch.nn as nn

from ..config import TunerConfig, check_positive_int
from ..core.layer import Delta, LayerSpec
from ..core.registry import register_method
from ..core.tuner import AdapterModel
from .bone import BatDelta, BoneDelta


@dataclass
class MissConfig(TunerConfig):
    """Configuration of a MiSS adapter (PEFT 0.21.2's ``MissConfig``: same fields and defaults).

    ``r``: shard size along the input axis; ``miss_dropout``: input dropout of the additive path;
    ``mini_r``: shard size along the output axis for ``init_weights="mini"``; ``init_weights``: True
    (zeros), False (Kaiming-uniform), ``"bat"`` or ``"mini"`` (zeros).
    """

    PEFT_TYPE: ClassVar[str] = "MISS"
    CHECK_PATTERN_NEEDS_LAYERS: ClassVar[bool] = False
    # deltatune's command line: Bone's sizes and lr (the same maths)
    CLI_PRESET: ClassVar[dict] = {
        "fields": {"r": 64},
        "lr": 1e-3,
        "why": "Bone's block under PEFT's newer name: the same sizes and lr as bone",
    }

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: Union[bool, Literal["bat", "mini"]] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        check_positive_int("mini_r", self.mini_r)
        if not 0.0 <= self.miss_dropout < 1.0:
            raise ValueError(f"MissConfig.miss_dropout must be in [0, 1), got {self.miss_dropout!r}")


class _MissBlock:
    """PEFT's MiSS registers the block as ``miss_block``; the Bone maths reads ``bone_block``
    (for "mini": the block tiled to the full output width)."""

    mini_r: Optional[int] = None

    def _rename_block(self, mini_r: Optional[int] = None) -> None:
        block = self._parameters.pop("bone_block")
        if mini_r is not None:  # (r, mini_r), zeros as in PEFT
            block = nn.Parameter(block.new_zeros(block.shape[0], mini_r))
        self.mini_r = mini_r
        self.miss_block = block

    @property
    def bone_block(self) -> torch.Tensor:
        try:
            block = self._parameters["miss_block"]
        except KeyError:  # while the Bone constructor registers it (before the rename)
            raise AttributeError("bone_block") from None
        if self.mini_r is None:
            return block
        return block.repeat(1, self.spec.out_features // self.mini_r)  # (r, mini_r) -> (r, out)


class MissDelta(_MissBlock, BoneDelta):
    """Additive MiSS shard (True/False/"mini"): Bone's ΔW = tile(Bᵀ) along the input axis, with B
    tiled along the output axis first for "mini", and input dropout while training."""

    def __init__(self, spec: LayerSpec, r: int, mini_r: Optional[int], init_weights: Any, dropout: float) -> None:
        super().__init__(spec, r, init_weights is not False)  # BoneDelta: False -> Kaiming
        self._rename_block(mini_r)
        self.miss_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def _dropping(self) -> bool:
        return self.training and isinstance(self.miss_dropout, nn.Dropout)

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        return super().delta_out(self.miss_dropout(x) if self._dropping() else x)

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self._dropping():
            return None  # the base GEMM must see x, the shard path the dropped x
        return super().fused_linear(x, weight, bias)


class MissBatDelta(_MissBlock, BatDelta):
    """BAT under PEFT's MiSS name: the same transform, its block registered as ``miss_block``."""

    def __init__(self, spec: LayerSpec, r: int) -> None:
        super().__init__(spec, r)
        self._rename_block()


class MissModel(AdapterModel):
    """Creates a MiSS model from a pretrained model: ``MissModel(model, config, "default")``."""
    config_cls = MissConfig
    prefix = "miss_"

    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def make_delta(self, config: MissConfig, adapter_name: str, base_layer: nn.Module, spec: LayerSpec, key: str) -> Delta:
        r, out_f, in_f = config.r, spec.out_features, spec.in_features
        # as PEFT 0.21.2 (Bone allowed r > in_features; such Bone adapters are saved in Bone's format)
        if r > in_f:
            raise ValueError(f"`r` ({r}) must be less than or equal to in_features ({in_f}): module '{key}'")
        if config.init_weights == "bat":
            if in_f % r or out_f % r:
                raise ValueError(
                    f"The weight matrix must be fully divisible into [r, r] blocks. Module '{key}' has "
                    f"(out, in) = ({out_f}, {in_f}) and r = {r}."
                )
            return MissBatDelta(spec, r)
        mini_r = None
        if config.init_weights == "mini":
            if out_f % config.mini_r:
                raise ValueError(
                    f"MiSS init_weights='mini' needs out_features divisible by mini_r: module '{key}' has "
                    f"out_features {out_f}, mini_r = {config.mini_r}"
                )
            mini_r = config.mini_r
        return MissDelta(spec, r, mini_r, config.init_weights, config.miss_dropout)


register_method(MissConfig, MissModel)
