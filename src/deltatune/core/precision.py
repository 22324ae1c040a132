"""What the frozen base layer is numerically: autocast state and quantized weights.

Two facts the wrapper layer needs before it picks a path:

* **Autocast.** ``torch.autocast`` (what Trainer's ``bf16=True`` and accelerate's mixed precision
  turn on) casts each supported op's inputs by itself. Adapter maths and custom autograd nodes must
  not be cast op by op (a GEMM in bf16 next to an in-place ``addmm_`` in fp32 fails, and fp32
  master parameters must get fp32 gradients), so the wrapper casts explicitly at one boundary and
  runs the adapter with autocast off (:func:`no_autocast`, :func:`autocast_exempt`).
* **Quantized bases.** A weight stored as int8/nf4 (bitsandbytes) or as a torchao tensor subclass
  cannot be read as W. :data:`SCHEMES` says, per back end, how to recognise such a layer and how
  to dequantize its weight to (out, in); the wrapper then runs the base layer's own forward and
  adds the adapter's output, and uses the dequantized W only where a method needs W itself (BAT).
  A layer type nobody taught this table is refused when the adapter is created
  (:func:`check_base_layer`), never guessed at.

Only ``torch`` is imported here; the back ends are recognised through their already-imported
modules (a bitsandbytes layer cannot exist unless bitsandbytes was imported).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn


# ------------------------------------------------------------------------------------ autocast
def _autocast_device(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a GEMM on ``x``'s device in, or None when autocast is off."""
    kind = x.device.type
    if not _autocast_device(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``x``'s device inside the block (nothing to do where it is not on)."""
    if autocast_dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def autocast_exempt(fn: Callable) -> Callable:
    """For ``forward``/``backward`` of a custom autograd Function: run with autocast off on the
    device of the first tensor argument. The function casts what it needs itself; a backward run
    inside an autocast region (``loss.backward()`` under ``torch.autocast``) stays correct too."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:
            return fn(ctx, *args)
        with no_autocast(first):
            return fn(ctx, *args)

    return wrapper


# ------------------------------------------------------------------------------- quantized bases
@dataclass(frozen=True)
class QuantScheme:
    """How one quantization back end stores a Linear weight."""

    name: str
    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]  # -> (out, in) float weight, detached
    # writes an (out, in) float weight back in the layer's quantized form (merging); None: refused
    requantize: Optional[Callable[[nn.Module, torch.Tensor], None]] = None


def _is_bnb(module: nn.Module, cls: str) -> bool:
    bnb = sys.modules.get("bitsandbytes.nn")
    return bnb is not None and isinstance(module, getattr(bnb, cls, ()))


def _bnb_int8(module: nn.Module) -> torch.Tensor:
    w = module.weight
    # the row scales live on the weight until the layer's first forward moves them to its state
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        if w.dtype == torch.int8:
            raise RuntimeError(f"{type(module).__name__} holds an int8 weight without its row scales (SCB)")
        return w.detach()  # not quantized yet (before .to(device)), or fp16 weights kept
    import bitsandbytes.functional as bnbF

    return bnbF.int8_vectorwise_dequant(w.data, scb)


def _bnb_4bit(module: nn.Module) -> torch.Tensor:
    w = module.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w.detach()
    import bitsandbytes.functional as bnbF

    data = w.data
    if getattr(state, "packing_format_for_cpu", False):
        # the layer's CPU inference forward repacked its weight (and rounded its scales); undo the
        # layout on copies: bitsandbytes' inverse rewrites the state it is given
        data, state = bnbF._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    return bnbF.dequantize_4bit(data, state)


def _bnb_int8_write(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    device = module.weight.device
    # an Int8Params moved off the host quantizes itself (row-wise absmax, as at load time)
    new = bnb.nn.Int8Params(weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
    module.weight = new.to(device)
    module.state.CB = module.state.SCB = None  # the next forward takes the new scales from the weight


def _bnb_4bit_write(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    state = getattr(old, "quant_state", None)
    dtype = getattr(state, "dtype", None) or weight.dtype
    new = bnb.nn.Params4bit(
        weight.detach().to("cpu", dtype), requires_grad=False, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
        module=module,
    )
    module.weight = new.to(old.device)  # quantizes (blockwise, the layer's own settings)


def _is_tensor_subclass(t: object) -> bool:
    return isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, nn.Parameter)


def _torchao(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (
        type(module) in (nn.Linear,)
        and _is_tensor_subclass(w)
        and type(w).__module__.startswith("torchao")
        and callable(getattr(w, "dequantize", None))
    )


SCHEMES: tuple[QuantScheme, ...] = (
    QuantScheme("bitsandbytes 8-bit (Linear8bitLt)", lambda m: _is_bnb(m, "Linear8bitLt"), _bnb_int8, _bnb_int8_write),
    QuantScheme("bitsandbytes 4-bit (Linear4bit)", lambda m: _is_bnb(m, "Linear4bit"), _bnb_4bit, _bnb_4bit_write),
    QuantScheme("torchao", _torchao, lambda m: m.weight.dequantize()),  # its configs cannot be re-applied here
)


def quant_scheme(module: nn.Module) -> Optional[QuantScheme]:
    return next((s for s in SCHEMES if s.matches(module)), None)


def check_base_layer(module: nn.Module) -> Optional[QuantScheme]:
    """The quantization scheme of a layer about to be adapted (None: a plain float layer).

    Raises TypeError for a layer whose weight or forward this library has not been taught: a
    Linear subclass with its own forward, or a weight that is not a plain floating tensor. Running
    an adapter on such a layer would read W wrongly or bypass its forward: silently wrong outputs.
    """
    scheme = quant_scheme(module)
    if scheme is not None:
        return scheme
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        raise TypeError(
            f"{type(module).__module__}.{type(module).__name__} is a Linear subclass with its own forward, which "
            f"deltatune does not know how to adapt (known quantized layers: {', '.join(s.name for s in SCHEMES)})"
        )
    if isinstance(w, torch.Tensor) and (_is_tensor_subclass(w) or not w.is_floating_point()):
        raise TypeError(
            f"its weight is a {type(w).__name__} of dtype {w.dtype}, not a plain floating-point tensor; deltatune "
            f"adapts float weights and these quantized layers: {', '.join(s.name for s in SCHEMES)}"
        )
    return None
