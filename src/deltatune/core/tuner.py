"""The method-level model (PEFT's ``BoneModel``, ``FourierFTModel``, …): injection and lifecycle.

:class:`AdapterModel` selects modules (:mod:`.targeting`), asks the method for one
:class:`~deltatune.core.layer.Delta` per module, wraps the modules in
:class:`~deltatune.core.layer.AdapterLayer`, and runs every model-wide operation (set_adapter,
merge_and_unload, delete_adapter, …). A method subclass only supplies ``make_delta`` and, where it
keeps model-level state, the small hooks below.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, ClassVar, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..config import TunerConfig
from .layer import BASE_NAME, AdapterLayer, Delta, LayerSpec, is_adapter_parameter, merge_error, parameters_on_meta
from .modules_to_save import ModulesToSaveWrapper, wrap_modules_to_save
from .targeting import DEFAULT_TARGETS, select_targets

HALF_DTYPES = (torch.float16, torch.bfloat16)


class UnsupportedModuleError(TypeError, ValueError):
    """A targeted module's type is not supported by the method (a TypeError and a ValueError, as
    PEFT raises one or the other depending on the method)."""


def _is_wrapper(module: nn.Module) -> bool:
    return isinstance(module, AdapterLayer)


_WRAPPED = ("base_model", "module", "_fsdp_wrapped_module", "_orig_mod")  # where wrappers keep the wrapped model


def peel(model: Any) -> Iterator[nn.Module]:
    """``model`` and the modules its wrappers hold, outermost first: DDP, DeepSpeed and accelerate
    (``.module``), FSDP1 (``._fsdp_wrapped_module``), ``torch.compile`` (``._orig_mod``), a PeftModel
    (``.base_model``)."""
    seen = model
    for _ in range(8):
        yield seen
        children = getattr(seen, "__dict__", {}).get("_modules", {})
        seen = next((children[k] for k in _WRAPPED if children.get(k) is not None), None)
        if seen is None:
            return


def find_tuner(model: Any, cls: Optional[type["AdapterModel"]] = None) -> "AdapterModel":
    """The ``<Method>Model`` (an instance of ``cls``, default any) inside ``model`` and its wrappers."""
    cls = cls or AdapterModel
    found = next((m for m in peel(model) if isinstance(m, cls)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} holds no deltatune {cls.__name__}")
    return found


def _replace(model: nn.Module, key: str, new: nn.Module) -> None:
    parent, _, child = key.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapter_modules(model: nn.Module) -> list[tuple[str, Union[AdapterLayer, ModulesToSaveWrapper]]]:
    """Every module of ``model`` that holds per-adapter tensors, with its path."""
    return [(k, m) for k, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]


def adapter_parts(module: Union[AdapterLayer, ModulesToSaveWrapper]) -> nn.ModuleDict:
    """adapter name -> its tensors' module, in an AdapterLayer or a ModulesToSaveWrapper."""
    return module.adapters if isinstance(module, AdapterLayer) else module.modules_to_save


def set_requires_grad(model: nn.Module, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
    """Make the named adapters' parameters (and their modules_to_save copies) trainable or frozen,
    whether or not they are active. The next ``set_adapter`` sets trainability afresh, as in PEFT."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = set().union(*(set(adapter_parts(m)) for _, m in adapter_modules(model))) if adapter_modules(model) else set()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"set_requires_grad: adapters {unknown} not found; known adapters: {sorted(known)}")
    for _, module in adapter_modules(model):
        parts = adapter_parts(module)
        for name in names:
            if name in parts:
                parts[name].requires_grad_(requires_grad)


class AdapterModel(nn.Module):
    """Base of every ``<Method>Model``. Construct as PEFT documents: ``BoneModel(model, config, "default")``."""

    prefix: ClassVar[str] = ""
    uses_shared_state: ClassVar[bool] = False  # PEFT's flag for methods inject_adapter_in_model refuses; none here
    config_cls: ClassVar[type[TunerConfig]] = TunerConfig
    default_targets: ClassVar[dict[str, Any]] = DEFAULT_TARGETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __init__(
        self,
        model: nn.Module,
        peft_config: TunerConfig | dict[str, TunerConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, TunerConfig] = {}
        self._active: list[str] = []
        self._trainable = True
        self.targeted_module_names: list[str] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        for name, config in configs.items():
            self.inject_adapter(self.model, name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        self.model.peft_config = self.peft_config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ================================================================ method hooks
    def make_delta(self, config: TunerConfig, adapter_name: str, base_layer: nn.Module, spec: LayerSpec, key: str) -> Delta:
        raise NotImplementedError

    def check_new_adapter(self, config: TunerConfig, adapter_name: str) -> None:
        """Reject an adapter that cannot coexist with those already present (before any change)."""

    def before_inject(self, model: nn.Module, config: TunerConfig, adapter_name: str, targets: list[str]) -> None:
        """Create model-level state for an adapter (RandLoRA's shared bases)."""

    def after_delete(self, adapter_name: str) -> None:
        """Drop model-level state of a deleted adapter."""

    # Checkpoint hooks. Keys are io's business: a hook sees a module's own tensor names.
    shared_tensor_names: ClassVar[tuple[str, ...]] = ()  # model-level tensors older files keep per layer

    def model_tensors(self, adapter_name: str) -> dict[str, tuple[nn.Module, str]]:
        """Model-level tensors ``adapter_name`` saves (not under a layer): ``{name: (owner module, attribute)}``."""
        return {}

    def fragments_for_save(self, fragments: dict[str, dict[str, torch.Tensor]], adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
        """What the checkpoint holds for ``adapter_name``, given each module's live tensors
        ``{module path: {name: tensor}}`` (AdaLoRA slices pruned ranks away)."""
        return fragments

    def before_load(self, adapter_name: str) -> None:
        """Make ``adapter_name``'s modules fit what its config says the checkpoint holds (AdaLoRA's ranks)."""

    def checkpoint_format(self, adapter_name: str) -> Optional[str]:
        """The PEFT name to write ``adapter_name`` under when the caller names none (None: the
        method's default format, see ``io.formats.DEFAULT_FORMAT``)."""
        return None

    def config_for_save(self, adapter_name: str) -> dict[str, Any]:
        return self.peft_config[adapter_name].to_dict()

    # ================================================================ injection
    def _check_bias(self, config: TunerConfig) -> None:
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError(
                f"{type(self).__name__} supports only 1 adapter with bias. When using multiple adapters, "
                "set bias to 'none' for all adapters."
            )

    def _adapter_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        if not base_dtype.is_floating_point:
            return torch.float32
        if self.autocast_adapter_dtype and base_dtype in HALF_DTYPES:
            return torch.float32
        return base_dtype

    def _place(self, delta: Delta, base_layer: nn.Module) -> None:
        weight = base_layer.weight
        dtype = self._adapter_dtype(weight.dtype)

        def move(t: torch.Tensor) -> torch.Tensor:
            # meta tensors (low_cpu_mem_usage) stay meta until the checkpoint is assigned; on a base
            # created on meta the adapter is meta too (materialised with the model by to_empty)
            device = t.device if t.device.type == "meta" else weight.device
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        delta._apply(move)

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, config: TunerConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self._check_bias(config)
        self.check_new_adapter(config, adapter_name)
        selection = select_targets(model, config, _is_wrapper, self.default_targets)
        self.before_inject(model, config, adapter_name, selection.targets)
        try:
            planned = self._plan(model, config, adapter_name, selection.targets, low_cpu_mem_usage)
        except Exception:
            self.after_delete(adapter_name)
            raise
        # nothing above touched the model: from here on the injection cannot fail half-way
        for key, module, delta in planned:
            layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
            if layer is not module:
                _replace(model, key, layer)
            layer.add_adapter(adapter_name, delta)
        self.peft_config[adapter_name] = config
        self.targeted_module_names.extend(k for k, _, _ in planned if k not in self.targeted_module_names)
        if config.modules_to_save:
            # the heads a sequence-classification wrapper adds may not all exist (PEFT: classifier, score)
            optional = {"classifier", "score"} if config.task_type == "SEQ_CLS" else set()
            try:
                wrap_modules_to_save(model, config.modules_to_save, adapter_name, optional)
            except BaseException:
                self.delete_adapter(adapter_name)  # unwraps what this adapter wrapped: no trace is left
                raise
        self._freeze_base(model)
        if not self._active:
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
        else:
            self.set_adapter(self._active, inference_mode=not self._trainable)
        self._apply_bias(model, config)

    def _plan(self, model, config, adapter_name, targets, low_cpu_mem_usage):
        planned = []
        for key in targets:
            module = model.get_submodule(key)
            base = module.base_layer if isinstance(module, AdapterLayer) else module
            try:
                spec, reason = LayerSpec.of(base), ""
            except TypeError as e:
                spec, reason = None, f" ({e})"
            if spec is None or spec.kind not in self.supported_kinds:
                raise UnsupportedModuleError(
                    f"Target module '{key}' ({type(base).__name__}) is not supported by {self.config_cls.PEFT_TYPE}"
                    f"{reason}. Supported layer types: {', '.join(_KIND_NAMES[k] for k in self.supported_kinds)}."
                )
            with parameters_on_meta() if low_cpu_mem_usage else contextlib.nullcontext():
                delta = self.make_delta(config, adapter_name, base, spec, key)
            delta.train(base.training)  # a model in eval mode gets no adapter dropout until .train()
            self._place(delta, base)
            planned.append((key, module, delta))
        return planned

    def _freeze_base(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if not is_adapter_parameter(name):
                p.requires_grad_(False)

    def _apply_bias(self, model: nn.Module, config: TunerConfig) -> None:
        if config.inference_mode:
            return
        if config.bias == "all":
            for name, p in model.named_parameters():
                if name == "bias" or name.endswith(".bias"):
                    p.requires_grad_(True)
        elif config.bias.endswith("_only"):
            for layer in self.adapter_layers():
                if layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)

    # ================================================================ walking
    def adapter_layers(self) -> Iterator[AdapterLayer]:
        for module in self.model.modules():
            if isinstance(module, AdapterLayer):
                yield module

    def _lifecycle_modules(self) -> Iterator[AdapterLayer | ModulesToSaveWrapper]:
        for module in self.model.modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                yield module

    # ================================================================ active adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found.")
        for layer in self.adapter_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
        self._active = names
        self._trainable = not inference_mode
        for module in self._lifecycle_modules():
            module.set_adapter(names, trainable=self._trainable)

    def _set_enabled(self, enabled: bool) -> None:
        for module in self._lifecycle_modules():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        for name in self._active:
            bias = self.peft_config[name].bias
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption."
                )
        self._set_enabled(False)

    # ================================================================ merging
    def _check_names(self, adapter_names: Optional[list[str]]) -> None:
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        for name in adapter_names or []:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist; known adapters: {sorted(self.peft_config)}")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_names(adapter_names)
        for key, module in self.model.named_modules():  # refuse before any weight is written
            if isinstance(module, AdapterLayer):
                try:
                    module.check_mergeable("merge")
                except ValueError as e:
                    raise ValueError(f"Module '{key}': {e}") from None
        if safe_merge:
            self._check_finite(adapter_names)
        done: list[tuple[AdapterLayer, int]] = []
        try:
            for layer in self.adapter_layers():
                done.append((layer, len(layer.merged_adapters)))
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        except ValueError:
            # a merged weight overflowed: take back what this call merged, newest first
            for layer, before in reversed(done):
                layer.unmerge(keep=before)
            raise

    def _check_finite(self, adapter_names: Optional[list[str]]) -> None:
        """Fail before touching any weight if an adapter to be merged holds NaN/inf."""
        for layer in self.adapter_layers():
            for name in adapter_names or layer.active_adapters:
                if name in layer.adapters and name not in layer.merged_adapters and layer.adapters[name].has_nonfinite():
                    raise merge_error(name)

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> nn.Module:
        return self._unload(True, progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self._unload(False, False, False, None)

    def _unload(self, merge: bool, progressbar: bool, safe_merge: bool, adapter_names: Optional[list[str]]) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        keys = [k for k, m in self.model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
        keys = [k for k in keys if not any(k.startswith(o + ".") for o in keys)]
        for key in _progress(keys, progressbar, "Unloading and merging model" if merge else "Unloading model"):
            module = self.model.get_submodule(key)
            if isinstance(module, AdapterLayer):
                if not merge and module.merged:
                    module.unmerge()
                new = module.base_layer
            else:
                new = module.active_module if not module.disable_adapters else module.original_module
            _replace(self.model, key, new)
        if "peft_config" in self.model.__dict__:
            del self.model.__dict__["peft_config"]
        return self.model

    # ================================================================ deleting
    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if any(adapter_name in layer.merged_adapters for layer in self.adapter_layers()):
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        del self.peft_config[adapter_name]
        for key, module in list(self.model.named_modules()):
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                module.delete_adapter(adapter_name)
                if module.is_empty():  # unwrap what no adapter uses any more: no trace is left
                    _replace(self.model, key, module.base_layer if isinstance(module, AdapterLayer) else module.original_module)
        self.targeted_module_names = [
            k for k in self.targeted_module_names if isinstance(self.model.get_submodule(k), AdapterLayer)
        ]
        self.after_delete(adapter_name)
        remaining = [a for a in self._active if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.")
        if remaining:
            # not set_adapter, which unmerges: an adapter that is merged and stays active stays merged
            self._active = remaining
            for module in self._lifecycle_modules():
                module.set_adapter(remaining, trainable=self._trainable)
        else:
            self._active = []
            for module in self._lifecycle_modules():
                module.set_adapter([], trainable=False)

    # ================================================================ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        with self.mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        with self.mixed_batch(adapter_names):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Optional[list[str]]) -> Iterator[None]:
        """Route sample i of every batch through adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE_NAME and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Unknown adapter names {unknown} in adapter_names; known: {sorted(self.peft_config)}")
        batch = len(adapter_names)

        def hook(module, args, kwargs):
            x = args[0] if args else None
            if x is None or x.shape[0] == batch:
                return args, {**kwargs, "adapter_names": adapter_names}
            # generate() with several sequences per prompt repeats each sample
            if x.shape[0] % batch == 0:
                rep = x.shape[0] // batch
                return args, {**kwargs, "adapter_names": [n for n in adapter_names for _ in range(rep)]}
            raise ValueError(f"adapter_names has {batch} entries but a layer received a batch of {x.shape[0]}")

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self._lifecycle_modules()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


_KIND_NAMES = {"linear": "torch.nn.Linear", "conv1d": "transformers Conv1D", "conv2d": "torch.nn.Conv2d"}


def _progress(items: list[str], enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return items
    return tqdm(items, desc=desc)
