"""The one wrapper layer: every adapter lifecycle rule lives here, once.

A method contributes a :class:`Delta` per adapted layer. A delta either *adds* to the weight
(``delta_weight()`` and a fast ``delta_out(x)`` = x·ΔWᵀ) or *transforms* it (``transform(W)`` and
``inverse(W')``; BAT). The wrapper composes them:

    W_eff = T_k(…T_1(W)) + Σ_additive ΔW_a            (active adapters, in activation order)

and keeps that equation true through merge (``W ← W_eff``), unmerge (LIFO inverse), disable and
delete. The wrapped module stays reachable as ``base_layer`` so checkpoint keys such as
``q_proj.base_layer.bias`` match PEFT's.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import QuantScheme, autocast_dtype, check_base_layer, no_autocast, quant_scheme
from .targeting import is_conv1d

BASE_NAME = "__base__"  # per-sample adapter name meaning "no adapter" in mixed batches


def is_adapter_parameter(name: str) -> bool:
    """Whether a name from ``named_parameters()`` is an adapter's own tensor: it lives in an
    AdapterLayer's ``adapters`` or a ModulesToSaveWrapper's ``modules_to_save`` (the only two
    containers that hold per-adapter tensors)."""
    return any(part in ("adapters", "modules_to_save") for part in name.split(".")[:-1])


@dataclass(frozen=True)
class LayerSpec:
    """Geometry of the wrapped layer, in the (out, in) convention every delta works in."""

    kind: str  # "linear" | "conv1d" (transformers Conv1D, weight stored (in, out)) | "conv2d"
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]  # of the float weight (a quantized weight may be stored packed)
    quantized: Optional[str] = None  # the quantization scheme's name (core.precision.SCHEMES)
    # a Conv2d's stride, padding, dilation, groups, padding_mode and its padding for F.pad
    conv: Optional[tuple] = None

    @property
    def fan_in_fan_out(self) -> bool:
        return self.kind == "conv1d"

    @staticmethod
    def of(module: nn.Module) -> "LayerSpec":
        """The geometry of ``module``; TypeError for a type (or weight) this library cannot adapt."""
        scheme = check_base_layer(module)
        if isinstance(module, nn.Linear):
            out_in = (module.out_features, module.in_features)
            return LayerSpec("linear", out_in[1], out_in[0], out_in, None if scheme is None else scheme.name)
        # DeepSpeed ZeRO-3 (zero.Init) leaves an empty tensor in .weight and keeps its shape in ds_shape
        shape = lambda: tuple(getattr(module.weight, "ds_shape", module.weight.shape))  # noqa: E731
        if is_conv1d(module):
            rows, cols = shape()  # Conv1D stores (in, out)
            return LayerSpec("conv1d", rows, cols, shape())
        if isinstance(module, nn.Conv2d):
            conv = (module.stride, module.padding, module.dilation, module.groups, module.padding_mode,
                    tuple(module._reversed_padding_repeated_twice))
            return LayerSpec("conv2d", module.in_channels, module.out_channels, shape(), conv=conv)
        raise TypeError(f"{type(module).__name__} is not a layer type deltatune adapts")


    def conv2d(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` convolved with ``weight`` (out, in/groups, kh, kw) the way the wrapped Conv2d convolves
        (its stride, padding, dilation, groups and padding mode), without bias: x·ΔWᵀ for a Conv2d."""
        stride, padding, dilation, groups, padding_mode, reversed_padding = self.conv
        if padding_mode != "zeros":
            x, padding = F.pad(x, reversed_padding, mode=padding_mode), 0
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)


class DerivedBuffers(nn.Module):
    """A module whose non-persistent buffers are computed from constructor arguments (FourierFT
    positions from a seed, RandLoRA bases from a PRNG key, AdaLoRA's ranknum). They are not in
    checkpoints, so a model created on ``meta`` and materialised with ``to_empty`` would hold
    uninitialised memory there: such buffers are derived again, identical to a normal creation,
    when they leave the meta device."""

    def register_derived(
        self, name: str, derive: Callable[[], torch.Tensor], persistent: bool = False, value: Optional[torch.Tensor] = None
    ) -> None:
        """Register buffer ``name`` = ``derive()`` (or ``value``, already derived)."""
        self.__dict__.setdefault("_derivers", {})[name] = derive
        self.register_buffer(name, derive() if value is None else value, persistent=persistent)

    def _apply(self, fn: Callable, recurse: bool = True) -> "DerivedBuffers":
        derivers = self.__dict__.get("_derivers", {})
        on_meta = [n for n in derivers if self._buffers[n] is not None and self._buffers[n].device.type == "meta"]
        super()._apply(fn, recurse)
        for name in on_meta:
            buf = self._buffers[name]
            if buf.device.type != "meta":
                self._buffers[name] = derivers[name]().to(device=buf.device, dtype=buf.dtype)
        return self


class Delta(DerivedBuffers):
    """One adapter on one layer. Subclasses hold parameters named as PEFT names them, so
    ``delta.state_dict()`` is already the checkpoint fragment of this layer."""

    is_transform: ClassVar[bool] = False
    # Whether inference (no gradient wanted) should fold this delta into a cached effective weight
    # (one GEMM per call instead of the adapter path). Worth it where the adapter path costs about
    # a GEMM itself (FourierFT, RandLoRA, BAT); not for a cheap low-rank path.
    cache_in_inference: ClassVar[bool] = False

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec

    # additive deltas -------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW in (out, in) layout (for Conv2d: (out, in·kh·kw))."""
        raise NotImplementedError

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        """x·ΔWᵀ for a batch; the default builds ΔW, methods override with their fast path."""
        dw = self.delta_weight()
        return F.linear(x.to(dw.dtype), dw)

    # weight transforms -----------------------------------------------------
    def transform(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transformed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x·T(W)ᵀ + bias; a method may override it with a leaner autograd."""
        new = self.transform(weight)
        return F.linear(x.to(new.dtype), new, None if bias is None else bias.to(new.dtype))

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x·(W + ΔW)ᵀ + bias in one go, for an additive delta that can fold the frozen weight into
        its own GEMMs; None (the default) means: run the base layer, then add ``delta_out``."""
        return None

    def has_nonfinite(self) -> bool:
        return any(not torch.isfinite(p).all() for p in self.parameters() if p.is_floating_point())


def _same_values(tensors: list[torch.Tensor], copies: list[torch.Tensor]) -> bool:
    if len(tensors) != len(copies):
        return False
    for t, c in zip(tensors, copies):
        if t.shape != c.shape or t.dtype != c.dtype or t.device != c.device:
            return False
        if t.device.type != "meta" and not torch.equal(t, c):
            return False
    return True


def is_sharded_tensor(t: Any) -> bool:
    """A DTensor: a parameter FSDP2 (``fully_shard``) holds sharded outside its module's forward."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # never imported: no DTensor can exist
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def merge_error(name: str) -> ValueError:
    return ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")


class Switchable:
    """Active-adapter and enable/disable bookkeeping shared by the wrappers (AdapterLayer,
    ModulesToSaveWrapper): which adapters run, and whether their parameters train."""

    def set_adapter(self, names: str | list[str], trainable: bool = True) -> None:
        self._select([names] if isinstance(names, str) else list(names))
        self._trainable = trainable
        self._refresh_requires_grad()

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled
        self._refresh_requires_grad()

    def _select(self, names: list[str]) -> None:
        raise NotImplementedError

    def _refresh_requires_grad(self) -> None:
        raise NotImplementedError


class AdapterLayer(Switchable, nn.Module):
    """Wraps one base layer and any number of named adapters on it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.spec = LayerSpec.of(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._trainable = True  # whether the active adapters train (False in inference mode)
        # see Delta.cache_in_inference; costs one weight copy per layer while used. None: on where
        # the weight lives in host memory (measured 3-30x faster there), off on accelerators, where
        # the copy would cost ~12 GiB for LLaMA-7B with all-linear targets and the adapter path is cheap
        self.inference_cache: Optional[bool] = None
        self._cache: Optional[tuple[tuple, torch.Tensor, list[torch.Tensor]]] = None

    # ------------------------------------------------------------ introspection
    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # PEFT code reads per-adapter state as ``layer.<attr>[adapter]``; offer the same view.
            # read through __dict__: DeepSpeed's zero.Init probes attributes before nn.Module.__init__
            # has created _modules, and self._modules would recurse into this method
            adapters = self.__dict__.get("_modules", {}).get("adapters")
            if adapters is not None and any(name in d._parameters or name in d._buffers for d in adapters.values()):
                return {k: getattr(d, name) for k, d in adapters.items() if hasattr(d, name)}
            raise

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapters}, merged={self.merged_adapters}"

    # ------------------------------------------------------------ adapters
    def add_adapter(self, name: str, delta: Delta) -> None:
        self.adapters[name] = delta

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) {[name]} while they are merged. Please unmerge them first.")
        if name in self.adapters:
            del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def is_empty(self) -> bool:
        return len(self.adapters) == 0

    def _select(self, names: list[str]) -> None:
        self.active_adapters = names

    def _refresh_requires_grad(self) -> None:
        for name, delta in self.adapters.items():
            train = self._trainable and not self.disable_adapters and name in self.active_adapters
            for p in delta.parameters():
                p.requires_grad_(train)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs and self._cache_applies():
            return self._cached_forward(x)
        self._cache = None  # training again: do not hold the inference copy
        return self._forward_with(x, self.active_adapters, *args, **kwargs)

    # ------------------------------------------------------------ inference cache
    def _active_deltas(self) -> list[Delta]:
        return [self.adapters[n] for n in self.active_adapters if n in self.adapters]

    def _cache_applies(self) -> bool:
        on = self.inference_cache
        if on is None:
            on = self.base_layer.weight.device.type == "cpu"
        if not on or self.spec.kind == "conv2d" or self.spec.quantized:
            return False  # a quantized base keeps its own kernels: W_eff would be a float copy
        deltas = self._active_deltas()
        if not deltas or not any(d.cache_in_inference for d in deltas):
            return False
        if not torch.is_grad_enabled():
            return True
        return not self.base_layer.weight.requires_grad and not any(p.requires_grad for d in deltas for p in d.parameters())

    def _cached_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·W_effᵀ + b with W_eff = T…(W) + ΣΔW built once and reused while nothing it was built
        from changed: the base weight's storage, version counter, dtype and device, and the adapter
        tensors' values (compared against a copy: writes through ``.data`` bypass version counters,
        and adapter tensors are small). An in-place write to the frozen base weight through ``.data``
        is the one change it cannot see; set ``inference_cache = False`` for code that does that."""
        w = self.base_layer.weight
        tensors = [t for d in self._active_deltas() for t in (*d.parameters(), *d.buffers())]
        key = (tuple(self.active_adapters), w.data_ptr(), w._version, w.dtype, w.device)
        if self._cache is None or self._cache[0] != key or not _same_values(tensors, self._cache[2]):
            with torch.no_grad(), no_autocast(x):
                eff = self._weight_oi().float()
                for d in self._active_deltas():
                    if d.is_transform:
                        eff = d.transform(eff).float()
                for d in self._active_deltas():
                    if not d.is_transform:
                        eff = eff + d.delta_weight().float()
            self._cache = (key, eff.to(w.dtype).contiguous(), [t.detach().clone() for t in tensors])
        out = F.linear(x.to(w.dtype), self._cache[1], self.base_layer.bias)  # autocast casts it as for any layer
        return out if autocast_dtype(x) else out.to(x.dtype)

    def _forward_with(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The unmerged forward with the adapters ``names`` active.

        Under autocast the result has the autocast dtype, as a plain layer's would: the frozen GEMM
        runs in that dtype (cast once, explicitly), the adapter maths with autocast off in the
        adapter's own dtype (fp32 master parameters get fp32 gradients). A quantized base runs its
        own forward; only a weight transform (BAT) reads its dequantized W.
        """
        deltas = [self.adapters[n] for n in names if n in self.adapters]
        additive = [d for d in deltas if not d.is_transform]
        transforms = [d for d in deltas if d.is_transform]
        ac = autocast_dtype(x)
        if transforms:
            with no_autocast(x):
                weight = self._weight_oi().detach()
                for d in transforms[:-1]:
                    weight = d.transform(weight)
                if self.spec.kind == "conv2d":
                    out = self._apply_weight(x, transforms[-1].transform(weight))
                else:
                    out = transforms[-1].transformed_linear(x, weight, self.base_layer.bias)
            out = out.to(ac or x.dtype)  # transforms compute in the adapter dtype; callers get a layer's dtype
        elif args or kwargs or self.spec.kind == "conv2d" or self.spec.quantized:
            out = self.base_layer(x, *args, **kwargs)  # its own forward; autocast applies as usual
        else:
            xc, w, b = x, self._weight_oi(), self.base_layer.bias
            if ac is not None:  # the casts autocast would make for the frozen GEMM, made once here
                xc, w, b = x.to(ac), w.to(ac), None if b is None else b.to(ac)
            with no_autocast(x):
                fused = additive[0].fused_linear(xc, w, b) if len(additive) == 1 else None
                if fused is not None:
                    return fused.to(xc.dtype)
                out = self.base_layer(x) if ac is None else F.linear(xc, w, b)
        with no_autocast(x):
            for d in additive:
                out = out + d.delta_out(x).to(out.dtype)
        return out

    def _mixed_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} samples"
            )
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` while adapters are merged; unmerge them first.")
        out: Optional[torch.Tensor] = None
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            idx = torch.tensor(rows, device=x.device)
            part = self._forward_with(x[idx], [] if name == BASE_NAME else [name], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out[idx] = part
        assert out is not None
        return out

    def _weight_oi(self) -> torch.Tensor:
        """The base weight as (out, in) (a view; Conv2d flattened to (out, in·kh·kw); a quantized
        weight dequantized, a fresh tensor)."""
        scheme = self._quant_scheme()
        if scheme is not None:
            return scheme.dequantize(self.base_layer).reshape(self.spec.weight_shape)
        w = self.base_layer.weight
        if self.spec.kind == "conv1d":
            return w.T
        if self.spec.kind == "conv2d":
            return w.reshape(w.shape[0], -1)
        return w

    def _apply_weight(self, x: torch.Tensor, weight_oi: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.spec.kind == "conv2d":
            w = weight_oi.reshape(self.spec.weight_shape)
            return base._conv_forward(x, w.to(x.dtype), base.bias)
        bias = base.bias
        return F.linear(x, weight_oi.to(x.dtype), None if bias is None else bias.to(x.dtype))

    # ------------------------------------------------------------ merge / unmerge
    def _merged_additive(self) -> Optional[torch.Tensor]:
        total = None
        for n in self.merged_adapters:
            d = self.adapters[n]
            if not d.is_transform:
                dw = d.delta_weight().float()
                total = dw if total is None else total + dw
        return total

    def _compose(self, weight: torch.Tensor, delta: Delta, invert: bool) -> torch.Tensor:
        """New (out, in) fp32 weight after merging (or un-merging) ``delta`` into ``weight``."""
        w = weight.float()
        if not delta.is_transform:
            dw = delta.delta_weight().float()
            return w - dw if invert else w + dw
        # keep W = T(W0) + A true, where A is the sum of merged additive deltas (see module doc)
        added = self._merged_additive()
        core = w if added is None else w - added
        core = delta.inverse(core) if invert else delta.transform(core)
        return (core if added is None else core + added).float()

    def _quant_scheme(self) -> Optional[QuantScheme]:
        return quant_scheme(self.base_layer) if self.spec.quantized else None

    def check_mergeable(self, action: str) -> None:
        """ValueError where the base weight cannot be written."""
        scheme = self._quant_scheme()
        if scheme is not None and scheme.requantize is None:
            raise ValueError(
                f"Cannot {action} adapters into this {type(self.base_layer).__name__}: its weight is quantized "
                f"({self.spec.quantized}), which deltatune cannot re-quantize. Load the base model unquantized "
                "(fp32/bf16), load the adapter there and merge, or keep the adapter unmerged."
            )
        # a sharded weight would need a collective gather and scatter per layer; refuse it clearly
        # instead of failing deep inside DTensor (or silently working for some methods only)
        sharded = [n for n, t in [("base_layer.weight", self.base_layer.weight), *self.adapters.named_parameters()] if is_sharded_tensor(t)]
        if sharded:
            raise ValueError(
                f"Cannot {action} adapters of this {type(self.base_layer).__name__}: {', '.join(sharded[:3])} are sharded "
                "by FSDP (DTensor). Save the adapter (deltatune.integrations.distributed.save_on_main) and merge it "
                "into an unsharded model."
            )

    def _write_weight(self, new_oi: torch.Tensor) -> None:
        scheme = self._quant_scheme()
        if scheme is not None:
            # dequantize (in _weight_oi), compose, re-quantize: W + ΔW is rounded to the back end's grid
            warnings.warn(
                f"Merging into a quantized layer ({self.spec.quantized}) re-quantizes its weight: outputs move by "
                "up to the quantization noise, and unmerging does not give the original weight back bit for bit."
            )
            scheme.requantize(self.base_layer, new_oi.reshape(self.spec.weight_shape))
            return
        w = self.base_layer.weight
        new = new_oi.T if self.spec.kind == "conv1d" else new_oi.reshape(w.shape)
        with torch.no_grad():
            w.copy_(new.to(w.dtype))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        todo = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        already = [n for n in names if n in self.merged_adapters]
        if already and not todo:
            warnings.warn("All adapters are already merged, nothing to do.")
            return
        if todo:
            self.check_mergeable("merge")
        if already:
            warnings.warn(f"Already following adapters were merged {','.join(already)}. You are now additionally merging {','.join(todo)}.")
        for name in todo:
            new = self._compose(self._weight_oi(), self.adapters[name], invert=False)
            if safe_merge and not torch.isfinite(new).all():
                raise merge_error(name)
            self._write_weight(new)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, keep: int = 0) -> None:
        """Undo merges, newest first, until ``keep`` merged adapters remain."""
        if not self.merged:
            if keep == 0:
                warnings.warn("Already unmerged. Nothing to do.")
            return
        self.check_mergeable("unmerge")
        while len(self.merged_adapters) > keep:
            name = self.merged_adapters.pop()  # LIFO: transforms do not commute
            self._write_weight(self._compose(self._weight_oi(), self.adapters[name], invert=True))


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` registered inside the block on the meta device (buffers stay
    real: they are not in checkpoints, e.g. FourierFT positions). Used by ``low_cpu_mem_usage``."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
