"""FourierFT: fine-tuning a handful of spectral coefficients of ΔW.

Reference: Z. Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
ICML 2024, arXiv:2405.03003 (§3.1, Eq. 2-3). Checkpoint format and maths of PEFT 0.21.2.

A layer with weight W (out × in) trains n coefficients c placed at fixed frequencies (p_k, q_k):

    ΔW[u, v] = scaling / (out·in) · Σ_k c_k · cos(2π (p_k u / out + q_k v / in))
             = scaling · Re(IDFT2(S)),  S sparse with S[p_k, q_k] = c_k

The frequencies are drawn exactly as PEFT draws them from ``random_loc_seed`` (so PEFT checkpoints,
which hold only the coefficients, load with identical outputs), but in O(n) instead of a full
permutation of out·in. Training never builds S or ΔW: x·ΔWᵀ comes from 1-D FFTs of the activations
and a gather/scatter over the n coefficients (``_fourier_ops.fourier_linear``); the dense ΔW is
built only where it is cheaper (see ``choose_dense``), for merging, and for the inference cache.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import TunerConfig, check_positive_int, pattern_lookup
from ..core.layer import Delta, LayerSpec
from ..core.registry import register_method
from ..core.targeting import DEFAULT_TARGETS
from ..core.tuner import AdapterModel
from . import _device
from ._fourier_ops import FourierPlan, choose_dense, fourier_delta_weight, fourier_linear, peft_positions

# PEFT's FourierFT defaults: the LoRA table, but GPT-2-style models adapt only the MLP output
FOURIERFT_TARGETS = {**DEFAULT_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


@dataclass
class FourierFTConfig(TunerConfig):
    """Configuration of a FourierFT adapter (PEFT's ``FourierFTConfig``).

    ``n_frequency`` coefficients per layer (``n_frequency_pattern`` overrides per module),
    ``scaling`` multiplies ΔW (the paper uses 100-150 for RoBERTa, 300 for LLaMA and ViT),
    ``random_loc_seed`` fixes the frequencies, ``init_weights`` True gives zero coefficients
    (identity at init), False (PEFT's default) standard-normal ones.
    """

    PEFT_TYPE: ClassVar[str] = "FOURIERFT"
    # deltatune's command line (read through the registry): sizes and adapter lr
    CLI_PRESET: ClassVar[dict] = {
        "fields": {"n_frequency": 1000, "scaling": 150.0},
        "lr": 5e-2,
        "why": "ΔW = scaling·Re(IDFT2(c)); the IDFT divides by out·in, so each coefficient moves ΔW by "
        "~scaling/(out·in): the spectrum needs a large lr (PEFT's GLUE recipe: scaling 100-150, lr 5e-2..1e-1)",
    }

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: Optional[int] = 777
    fan_in_fan_out: bool = False
    n_frequency_pattern: Optional[dict] = field(default_factory=dict)
    init_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("n_frequency", self.n_frequency)
        if isinstance(self.random_loc_seed, bool) or not isinstance(self.random_loc_seed, int):
            # PEFT accepts None here and then crashes inside torch.manual_seed
            raise ValueError(
                f"`random_loc_seed` must be an integer (it fixes the spectral positions), got {self.random_loc_seed!r}"
            )
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"`scaling` must be a number, got {self.scaling!r}")
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        for key, value in self.n_frequency_pattern.items():
            check_positive_int(f"n_frequency_pattern[{key!r}]", value)


class FourierDelta(Delta):
    """ΔW = scaling · Re(IDFT2(S)) with ``fourierft_spectrum`` (n,) at ``indices`` (2, n)."""

    cache_in_inference: ClassVar[bool] = True

    def __init__(self, spec: LayerSpec, n_frequency: int, scaling: float, seed: int, init_weights: bool) -> None:
        super().__init__(spec)
        self.scaling = float(scaling)
        # positions are derived from the seed, never saved (PEFT's checkpoints hold only the spectrum)
        O, I = spec.out_features, spec.in_features

        def positions() -> torch.Tensor:  # values are needed: derived on the CPU whatever the device context
            with torch.device("cpu"):
                return peft_positions(O, I, n_frequency, seed)

        def plan() -> FourierPlan:
            return FourierPlan.from_positions(positions(), O, I)

        self.register_derived("indices", positions)  # (2, n): rows p_k, cols q_k
        # the index plan of both paths (sparse maps, dense ΔW), derived from the positions: two flat
        # integer buffers that move with the module (dtype casts leave them alone); the layout (Python
        # ints) is the same on every device, so a module on meta views its shape-only buffers alike
        built = FourierPlan.from_positions(self.indices, O, I)  # the positions just derived (CPU)
        self._plan_spec = built.spec
        self.register_derived("plan_index", lambda: plan().index, value=built.index)
        self.register_derived("plan_csr", lambda: plan().csr, value=built.csr)
        spectrum = torch.zeros(n_frequency) if init_weights else torch.randn(n_frequency)
        self.fourierft_spectrum = nn.Parameter(spectrum)

    def _plan(self) -> FourierPlan:
        return FourierPlan.over(self.plan_index, self.plan_csr, self._plan_spec)

    def delta_weight(self) -> torch.Tensor:
        rows, cols = self.indices
        spectrum = self.fourierft_spectrum
        return fourier_delta_weight(
            spectrum, rows, cols, self.spec.out_features, self.spec.in_features, self.scaling, plan=self._plan()
        )  # (out, in), fp32

    def _dense_is_cheaper(self, x: torch.Tensor) -> bool:
        tokens = x.numel() // max(x.shape[-1], 1)
        return choose_dense(
            tokens, self.spec.out_features, self.spec.in_features, self.fourierft_spectrum.numel(), _device.kind(x.device)
        )

    def _fft_path(self, x: torch.Tensor, **base: Optional[torch.Tensor]) -> torch.Tensor:
        rows, cols = self.indices
        plan = self._plan()
        return fourier_linear(x, self.fourierft_spectrum, rows, cols, self.spec.out_features, self.scaling, plan=plan, **base)

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense_is_cheaper(x):
            dw = self.delta_weight()
            return F.linear(x.to(dw.dtype), dw)
        return self._fft_path(x)

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # the frozen layer's GEMMs run inside the FFT path's autograd (one node, no extra sums)
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        same_dtype = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
        if not (frozen and same_dtype) or self._dense_is_cheaper(x):
            return None
        return self._fft_path(x, base_weight=weight, base_bias=bias)


class FourierFTModel(AdapterModel):
    """Creates a FourierFT model: ``FourierFTModel(model, config, "default")``."""
    config_cls = FourierFTConfig
    prefix = "fourierft_"

    default_targets = FOURIERFT_TARGETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def make_delta(self, config: FourierFTConfig, adapter_name: str, base_layer: nn.Module, spec: LayerSpec, key: str) -> Delta:
        _check_fan_in_fan_out(config, spec, key)
        n = pattern_lookup(config.n_frequency_pattern or {}, key, config.n_frequency)
        size = spec.in_features * spec.out_features
        if n > size:
            raise ValueError(
                f"`n_frequency` should be less than or equal to the product of the input and output dimensions but "
                f"the value passed is {n} and the product is {size} (module '{key}')"
            )
        return FourierDelta(spec, n, config.scaling, config.random_loc_seed, config.init_weights)


def _check_fan_in_fan_out(config: Union[FourierFTConfig, "object"], spec: LayerSpec, key: str) -> None:
    """PEFT corrects ``fan_in_fan_out`` per layer with a warning; the layer type decides here too."""
    wanted = spec.fan_in_fan_out
    if bool(getattr(config, "fan_in_fan_out", False)) != wanted:
        warnings.warn(
            f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module '{key}' is "
            f"{'`Conv1D`' if wanted else '`torch.nn.Linear`'}; using fan_in_fan_out={wanted} for it."
        )


register_method(FourierFTConfig, FourierFTModel)
