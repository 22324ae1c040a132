"""Bone (Block-Affine adaptation) and its BAT variant.

Reference: J. Kang, "Bone: Block-Affine Adaptation of Large Language Models", arXiv:2409.15371
(§3: Bone, block-affine transform; §3.2: BAT, "Block Affine Transformation"). Checkpoint format and
maths of PEFT 0.18.1 (the last release with Bone; its successor is MiSS).

Bone (``init_weights`` True/False) adds ΔW[o, i] = B[i mod r, o] with B = ``bone_block`` (r, out):
the block Bᵀ tiled along the input axis. So x·ΔWᵀ = fold(x)·B where fold sums the r-wide chunks
of x (zero-padded to a multiple of r).

BAT (``init_weights="bat"``) transforms the weight blockwise, with B = ``bone_block`` (out/r, r, r):
    W'_ij = W_ij (I + B_i) + B_i        (row block i, column block j)
inverse: W_ij = (W'_ij − B_i)(I + B_i)⁻¹.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
import torch.nn as nn

from ..config import TunerConfig, check_positive_int
from ..core.layer import AdapterLayer, Delta, LayerSpec
from ..core.registry import register_method
from ..core.tuner import AdapterModel
from ._bone_ops import BatLinear, BoneLinear, bat_weight, fold


@dataclass
class BoneConfig(TunerConfig):
    """Configuration of a Bone / BAT adapter (PEFT 0.18.1's ``BoneConfig``).

    ``r`` is the block size; ``init_weights``: True (Bone, zeros: identity at init), False (Bone,
    Kaiming-uniform block), ``"bat"`` (BAT, zeros: identity at init).
    """

    PEFT_TYPE: ClassVar[str] = "BONE"
    CHECK_PATTERN_NEEDS_LAYERS: ClassVar[bool] = False
    # deltatune's command line (read through the registry): sizes for its MiniLM classifier and
    # causal LM, the adapter lr, and "bat" as a method name of its own
    CLI_PRESET: ClassVar[dict] = {
        "fields": {"r": 64},
        "lr": 1e-3,
        "aliases": {"bat": {"init_weights": "bat"}},
        "why": "block B (r, out) starts at zero and acts on in/r inputs each; lr as for LoRA (1e-3: 81.6 %)",
    }

    r: int = 64
    init_weights: Union[bool, str] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("r", self.r)
        if self.init_weights not in (True, False, "bat"):
            raise ValueError(f"BoneConfig.init_weights must be True, False or 'bat', got {self.init_weights!r}")


class BoneDelta(Delta):
    """Additive Bone block: ΔW = tile(Bᵀ) along the input axis."""

    def __init__(self, spec: LayerSpec, r: int, init_weights: bool) -> None:
        super().__init__(spec)
        self.r = r
        self.bone_block = nn.Parameter(torch.zeros(r, spec.out_features))  # (r, out)
        if init_weights is False:
            nn.init.kaiming_uniform_(self.bone_block, a=5**0.5)  # fan_in = out: U(±1/√out)

    def delta_weight(self) -> torch.Tensor:
        n_tiles = -(-self.spec.in_features // self.r)
        return self.bone_block.T.repeat(1, n_tiles)[:, : self.spec.in_features]  # (out, in)

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        block = self.bone_block
        return fold(x.to(block.dtype), self.r) @ block  # (..., r) @ (r, out)

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        # only where the block shares the GEMM's dtype: a bf16 block gradient (a sum over every token,
        # and over the tiles of MiSS's mini block) loses too much; otherwise base GEMM + fp32 delta_out
        same_dtype = weight.dtype == x.dtype == self.bone_block.dtype and (bias is None or bias.dtype == x.dtype)
        if not (frozen and same_dtype):
            return None
        return BoneLinear.apply(x, weight, self.bone_block, bias)


class BatDelta(Delta):
    """BAT weight transform W'_ij = W_ij(I + B_i) + B_i."""

    is_transform: ClassVar[bool] = True
    cache_in_inference: ClassVar[bool] = True  # the transform costs a quarter GEMM per call

    def __init__(self, spec: LayerSpec, r: int) -> None:
        super().__init__(spec)
        self.bone_block = nn.Parameter(torch.zeros(spec.out_features // r, r, r))  # (out/r, r, r)

    def transform(self, weight: torch.Tensor) -> torch.Tensor:
        return bat_weight(weight, self.bone_block)

    def inverse(self, weight: torch.Tensor) -> torch.Tensor:
        block = self.bone_block.float()
        ni, r, _ = block.shape
        eye = torch.eye(r, dtype=block.dtype, device=block.device)
        core = weight.float().view(ni, r, -1, r) - block.unsqueeze(2)  # W'_ij − B_i
        core = core.permute(0, 2, 1, 3)  # (ni, nj, r, r)
        solved = torch.linalg.solve(eye + block.unsqueeze(1), core, left=False)  # X (I+B_i) = W'_ij − B_i
        return solved.permute(0, 2, 1, 3).reshape(weight.shape)

    def transformed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if weight.is_contiguous():
            return BatLinear.apply(x, weight.detach(), self.bone_block, bias)
        return super().transformed_linear(x, weight, bias)


class BoneModel(AdapterModel):
    """Creates a Bone/BAT model from a pretrained model: ``BoneModel(model, config, "default")``."""
    config_cls = BoneConfig
    prefix = "bone_"

    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def make_delta(self, config: BoneConfig, adapter_name: str, base_layer: nn.Module, spec: LayerSpec, key: str) -> Delta:
        r = config.r
        if config.init_weights == "bat":
            if spec.in_features % r or spec.out_features % r:
                raise ValueError(
                    f"The weight matrix must be fully divisible into [r, r] blocks. Module '{key}' has "
                    f"(out, in) = ({spec.out_features}, {spec.in_features}) and r = {r}."
                )
            return BatDelta(spec, r)
        return BoneDelta(spec, r, config.init_weights)

    def checkpoint_format(self, adapter_name: str) -> Optional[str]:
        # PEFT >= 0.19 (MiSS) refuses layers narrower than r, which PEFT 0.18.1's Bone adapts: such
        # an adapter is written in Bone's format, which a PEFT release can still load
        r = self.peft_config[adapter_name].r
        narrow = [
            k for k, m in self.model.named_modules()
            if isinstance(m, AdapterLayer) and adapter_name in m.adapters and m.spec.in_features < r
        ]
        if not narrow:
            return None
        warnings.warn(
            f"Adapter '{adapter_name}' has r={r} above the input width of {narrow[0]!r}, which PEFT's MiSS refuses: "
            "it is saved in PEFT 0.18.1's Bone format (peft_format='BONE')"
        )
        return "BONE"


register_method(BoneConfig, BoneModel)
# PEFT >= 0.19 renamed Bone to MiSS (methods/miss.py); Bone adapters are saved in MiSS's format
# unless PEFT 0.18.1's is asked for (io/formats.py)
