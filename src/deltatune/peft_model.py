"""``PeftModel``, its task wrappers and ``get_peft_model`` — PEFT's user-facing API.

The wrapper owns the method-level model as ``base_model`` (so parameter names start with
``base_model.model.``, as in PEFT) and adds checkpoint IO and adapter bookkeeping. Everything it
does to layers goes through :class:`~deltatune.core.tuner.AdapterModel`.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn

from .config import PeftConfig, TunerConfig
from .core.layer import AdapterLayer
from .core.modules_to_save import ModulesToSaveWrapper
from .core.registry import method_for
from .core.tuner import AdapterModel, set_requires_grad
from .io.files import (
    CheckpointFiles,
    checkpoint_files,
    ensure_dir,
    load_weights_file,
    resolve_local_dir,
    save_checkpoint,
    weights_metadata,
    write_model_card,
)
from .io.formats import as_method, export_checkpoint
from .io.state_dict import LAYER_SHAPES_KEY, check_layer_shapes, get_peft_model_state_dict, layer_shapes, load_adapter_state

SEQ_CLS_HEADS = ["classifier", "score"]


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _json_ready(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    return value


def _read_config(files: CheckpointFiles) -> TunerConfig:
    """The config of a checkpoint pair (a Bone adapter saved in the default format reads back as MiSS)."""
    return PeftConfig.from_config_file(files.config)


class _ModelState:
    """What a failed load must give back: the modules at each path, ``requires_grad`` flags and
    whether the model carried ``peft_config``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.grads = {n: p.requires_grad for n, p in model.named_parameters()}
        self.had_config = "peft_config" in model.__dict__

    def restore(self, model: nn.Module) -> None:
        for key in sorted(self.modules, key=lambda k: k.count(".")):  # outer modules first
            if not key:
                continue
            try:
                current = model.get_submodule(key)
            except AttributeError:
                continue
            if current is not self.modules[key]:
                parent, _, child = key.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, self.modules[key])
        if not self.had_config:
            model.__dict__.pop("peft_config", None)
        for n, p in model.named_parameters():
            p.requires_grad_(self.grads.get(n, p.requires_grad))


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for parameters reachable under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(name, first.setdefault(id(param), name))
    return {alias: name for alias, name in aliases.items() if alias != name}


def _drop_tied_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # a tied weight is kept once, under its first name, as transformers' save_pretrained does:
    # transformers' Trainer writes a non-PreTrainedModel's state_dict() with safetensors, which
    # refuses two names for one storage ("Some tensors share memory")
    for alias in _tied_aliases(module):
        state_dict.pop(prefix + alias, None)


def _fill_tied_aliases(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # the inverse for load_state_dict(strict=True): a missing alias takes its first name's tensor
    for alias, name in _tied_aliases(module).items():
        if prefix + alias not in state_dict and prefix + name in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + name]


def _adapter_of(name: str) -> Optional[str]:
    """The adapter a parameter belongs to (``...adapters.<name>...`` or ``...modules_to_save.<name>...``)."""
    parts = name.split(".")
    for marker in ("adapters", "modules_to_save"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1]
    return None


class PeftModel(nn.Module):
    """A base model with adapters. Built by :func:`get_peft_model` or :meth:`from_pretrained`."""

    def __init__(
        self,
        model: nn.Module,
        peft_config: TunerConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        self._prepare_config(peft_config)
        method = method_for(peft_config.peft_type)
        self.special_peft_forward_args = {"adapter_names"}
        self.base_model: AdapterModel = method.model_cls(
            model, {adapter_name: peft_config}, adapter_name,
            low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype,
        )
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            self._enable_input_grads(model)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "pretraining_tp"):
            cfg.pretraining_tp = 1
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_fill_tied_aliases)

    def _prepare_config(self, config: TunerConfig) -> None:
        """Task wrappers adjust the config here (sequence classification adds its head)."""

    @staticmethod
    def _enable_input_grads(model: nn.Module) -> None:
        # with gradient checkpointing and a frozen embedding, the checkpointed blocks would see no
        # input that requires grad and give the adapters no gradient
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    # ------------------------------------------------------------------ plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)  # not super(): PeftMixedModel borrows this method
        except AttributeError:
            if name == "base_model":
                raise
            try:
                return getattr(self.base_model, name)
            except AttributeError as exc:
                if f"'{name}'" not in str(exc):  # raised inside a property of the model: keep it
                    raise
                raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'") from None

    @property
    def peft_config(self) -> dict[str, TunerConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        active = self.base_model.active_adapters
        return active[-1] if active else ""

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def peft_type(self) -> str:
        return next(iter(self.peft_config.values())).peft_type if self.peft_config else ""

    @property
    def active_peft_config(self) -> TunerConfig:
        """The config of the active adapter."""
        return self.peft_config[self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether some adapter layer runs an adapter now (an active adapter, layers not disabled)."""
        return any(not m.disable_adapters and m.active_adapters for m in self.base_model.adapter_layers())

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Make the named adapters (and their modules_to_save copies) trainable or frozen, active or not."""
        set_requires_grad(self.base_model.model, adapter_names, requires_grad)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, peft_config: TunerConfig, low_cpu_mem_usage: bool = False, autocast_adapter_dtype: bool = True) -> None:
        if peft_config.peft_type != self.peft_type and self.peft_config:
            raise ValueError(
                f"Cannot combine adapters with different peft types. Found {self.peft_type} and {peft_config.peft_type}."
            )
        self._prepare_config(peft_config)
        previous = self.base_model.autocast_adapter_dtype
        self.base_model.autocast_adapter_dtype = autocast_adapter_dtype
        # adding an adapter leaves the others' trainability as it was (PEFT only sets the new
        # adapter's): a trainable adapter stays trainable after a frozen one is loaded beside it
        grads = {n: p.requires_grad for n, p in self.named_parameters()}
        try:
            self.base_model.inject_adapter(self.base_model.model, adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        finally:
            self.base_model.autocast_adapter_dtype = previous
        for n, p in self.named_parameters():
            if n in grads and _adapter_of(n) not in (None, adapter_name):
                p.requires_grad_(grads[n])

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without adapters inside the block; the previous state comes back after."""
        states = {m.disable_adapters for m in self.base_model._lifecycle_modules()}
        irregular = len(states) > 1
        if irregular:
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. "
                "This is most likely unintentional. After exiting the disable_adapter context, all adapters will be enabled"
            )
        was_enabled = False in states
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            if was_enabled or irregular:
                self.base_model.enable_adapter_layers()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            n = getattr(p, "ds_numel", p.numel())  # DeepSpeed ZeRO-3 leaves an empty tensor behind
            if type(p).__name__ == "Params4bit":
                n *= 2  # bitsandbytes packs two 4-bit values per byte
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: Optional[str] = None,
        peft_format: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as PEFT does: ``default`` in the folder, others in ``<folder>/<name>/``.

        ``peft_format``: the PEFT name to write the adapter under where a method has two (Bone
        adapters are written as MiSS unless ``peft_format="BONE"``, PEFT 0.18.1's format; see
        :mod:`deltatune.io.formats`). ``save_embedding_layers`` is ignored: no method here adapts
        embeddings; ``path_initial_model_for_weight_conversion`` (PiSSA/OLoRA) is refused."""
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError(
                "path_initial_model_for_weight_conversion converts PiSSA/CorDA/OLoRA LoRA adapters; deltatune's methods "
                "have no such conversion"
            )
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"You passed an invalid `selected_adapters` arguments, current supported adapter names are "
                f"{list(self.peft_config)} - got {unknown}."
            )
        if not is_main_process:
            return
        root = ensure_dir(save_directory)
        for name in names:
            folder = root if name == "default" else ensure_dir(root / name)
            tensors = get_peft_model_state_dict(self.base_model, adapter_name=name)
            data = {k: _json_ready(v) for k, v in self.base_model.config_for_save(name).items()}
            data, tensors = export_checkpoint(data, tensors, peft_format or self.base_model.checkpoint_format(name))
            metadata = {LAYER_SHAPES_KEY: json.dumps(layer_shapes(self.base_model, name), sort_keys=True)}
            data["inference_mode"] = True
            base = self.get_base_model()
            if data.get("base_model_name_or_path") is None:
                data["base_model_name_or_path"] = getattr(base, "name_or_path", None) or None
            if data.get("task_type") is None:
                data["auto_mapping"] = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
            # both files atomically as a pair: a kill at any point leaves the old or the new checkpoint
            save_checkpoint(folder, json.dumps(data, indent=2, sort_keys=True) + "\n", tensors, safe_serialization, metadata)
            write_model_card(str(folder), data)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[TunerConfig] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> "PeftModel":
        folder = resolve_local_dir(model_id, kwargs.pop("subfolder", None))
        files = checkpoint_files(folder)
        if config is None:
            config = _read_config(files)
        config.inference_mode = not is_trainable
        wrapper = TASK_WRAPPERS.get(config.task_type, PeftModel) if cls is PeftModel else cls
        before = _ModelState(model)
        try:
            peft_model = wrapper(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
            peft_model._load_weights(files, adapter_name, low_cpu_mem_usage, kwargs.get("torch_device"))
        except BaseException:
            before.restore(model)  # unwraps every module the failed attempt had wrapped
            raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def _load_weights(self, files: CheckpointFiles, adapter_name: str, assign: bool, device: Any = None) -> LoadResult:
        if files.weights is None:
            raise FileNotFoundError(f"No adapter_model.safetensors or adapter_model.bin found in {files.folder}")
        tensors = load_weights_file(files.weights, device=device or "cpu")
        recorded = weights_metadata(files.weights).get(LAYER_SHAPES_KEY)
        check_layer_shapes(self.base_model, adapter_name, recorded, files.weights)
        return LoadResult(*load_adapter_state(self.base_model, tensors, adapter_name, assign=assign))

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> LoadResult:
        folder = resolve_local_dir(model_id, kwargs.pop("subfolder", None))
        files = checkpoint_files(folder)
        config = _read_config(files)
        if self.peft_config and config.peft_type != self.peft_type:  # Bone and MiSS are one method
            converted = as_method(config.to_dict(), self.peft_type)
            if converted["peft_type"] != config.peft_type:
                config = PeftConfig.from_peft_type(**converted)
        config.inference_mode = not is_trainable
        known = set(self.peft_config)
        before = _ModelState(self.base_model.model)
        try:
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype)
            result = self._load_weights(files, adapter_name, low_cpu_mem_usage, torch_device)
        except BaseException:
            if adapter_name in self.peft_config and adapter_name not in known:
                self.base_model.delete_adapter(adapter_name)
            before.restore(self.base_model.model)
            raise
        if is_trainable:  # trainable at once, as in PEFT, not only once activated
            self.set_requires_grad(adapter_name, True)
        else:
            self.eval()
        return result  # a file is loaded strictly: a missing or unexpected key has raised

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write (or complete) ``output_dir/README.md`` for the active adapter, as PEFT does."""
        write_model_card(output_dir, self.base_model.config_for_save(self.active_adapter))

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> str:
        """Upload with ``huggingface_hub`` (save_pretrained into a temporary folder, then upload_folder)."""
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True", "ON", "on"):
            raise RuntimeError(
                f"push_to_hub({repo_id!r}): the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); "
                "save_pretrained(folder) and upload the folder later"
            )
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=kwargs.get("token"))
        api.create_repo(repo_id, private=kwargs.get("private"), exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=kwargs.get("commit_message") or "Upload model",
                revision=kwargs.get("revision"), create_pr=kwargs.get("create_pr", False),
            )
        return str(info)


class _TransformersForward:
    """Task wrappers name transformers' arguments, as PEFT's do: transformers' Trainer reads the
    signature of ``forward`` to decide which data set columns to keep."""

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Any:
        named = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                     token_type_ids=token_type_ids, output_attentions=output_attentions,
                     output_hidden_states=output_hidden_states, return_dict=return_dict)
        return self.base_model(**{k: v for k, v in named.items() if v is not None}, **kwargs)


class PeftModelForSequenceClassification(_TransformersForward, PeftModel):
    def _prepare_config(self, config: TunerConfig) -> None:
        # the head is new and must train and be saved with the adapter (PEFT extends the config too)
        names = list(config.modules_to_save or [])
        config.modules_to_save = names + [h for h in SEQ_CLS_HEADS if h not in names]


class PeftModelForCausalLM(_TransformersForward, PeftModel):
    pass


class PeftModelForSeq2SeqLM(_TransformersForward, PeftModel):
    pass


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    pass


class PeftModelForQuestionAnswering(_TransformersForward, PeftModel):
    def _prepare_config(self, config: TunerConfig) -> None:
        names = list(config.modules_to_save or [])
        config.modules_to_save = names + [h for h in ["qa_outputs"] if h not in names]


class PeftModelForFeatureExtraction(_TransformersForward, PeftModel):
    pass


TASK_WRAPPERS: dict[Optional[str], type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


# ------------------------------------------------------------------------------------ mixed adapters

# PEFT's PeftMixedModel accepts LORA, LOHA, LOKR, ADALORA, OFT and SHIRA adapters; of deltatune's
# methods that leaves AdaLoRA (FourierFT, RandLoRA, Bone and MiSS are refused by PEFT too)
PEFT_MIXED_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA", "OFT", "SHIRA")
MIXED_COMPATIBLE = ("ADALORA",)


def _check_mixed_compatible(config: TunerConfig) -> None:
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type not in MIXED_COMPATIBLE:
        raise ValueError(
            f"The provided `peft_type` '{peft_type}' is not compatible with the `PeftMixedModel`. Compatible types are: "
            f"{PEFT_MIXED_TYPES} (PEFT's list); deltatune implements {MIXED_COMPATIBLE[0]} of them (LoRA, LoHa, LoKr, "
            "OFT and SHiRA are not deltatune methods)"
        )


def _mixed_tuner_cls() -> type[AdapterModel]:
    """AdaLoRA's tuner without its training rules, as PEFT's MixedModel runs AdaLoRA layers: several
    adapters may be active (and trainable) at once, and the loss is left as the model returns it
    (no orthogonal regulariser; rank allocation is an AdaLoraModel feature, not a mixed-model one)."""
    global _MIXED_TUNER
    if _MIXED_TUNER is None:
        base = method_for("ADALORA").model_cls

        class MixedAdaLoraModel(base):  # type: ignore[misc, valid-type]
            def check_new_adapter(self, config: TunerConfig, adapter_name: str) -> None:
                _check_mixed_compatible(config)

            def forward(self, *args: Any, **kwargs: Any) -> Any:
                return AdapterModel.forward(self, *args, **kwargs)

        _MIXED_TUNER = MixedAdaLoraModel
    return _MIXED_TUNER


_MIXED_TUNER: Optional[type[AdapterModel]] = None


class PeftMixedModel(nn.Module):
    """Several adapters active together on one model, for inference (PEFT's ``PeftMixedModel``).

    As in PEFT: adapters are added with :meth:`add_adapter` or :meth:`load_adapter`, none becomes
    active until :meth:`set_adapter` names it (a list activates several), and saving is not
    supported. Among deltatune's methods only AdaLoRA adapters can be mixed (PEFT's list of mixable
    types holds no other of them)."""

    def __init__(self, model: nn.Module, peft_config: TunerConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_mixed_compatible(peft_config)
        self.base_model: AdapterModel = _mixed_tuner_cls()(model, {adapter_name: peft_config}, adapter_name)
        if getattr(model, "is_gradient_checkpointing", False):
            PeftModel._enable_input_grads(model)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "pretraining_tp"):
            cfg.pretraining_tp = 1

    __getattr__ = PeftModel.__getattr__
    get_nb_trainable_parameters = PeftModel.get_nb_trainable_parameters
    print_trainable_parameters = PeftModel.print_trainable_parameters
    get_base_model = PeftModel.get_base_model
    forward = PeftModel.forward
    generate = PeftModel.generate
    _load_weights = PeftModel._load_weights

    @property
    def peft_config(self) -> dict[str, TunerConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; every adapter layer is enabled after it."""
        try:
            self.base_model.disable_adapter_layers()
            yield
        finally:
            self.base_model.enable_adapter_layers()

    def _check_known(self, names: list[str]) -> None:
        unknown = set(names) - set(self.peft_config)
        if unknown:
            raise ValueError(f"Adapter(s) {sorted(unknown)} not found, available adapters: {sorted(self.peft_config)}")

    def add_adapter(self, adapter_name: str, peft_config: TunerConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter (not activated: :meth:`set_adapter` does that)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        _check_mixed_compatible(peft_config)
        previous = self.base_model.autocast_adapter_dtype
        self.base_model.autocast_adapter_dtype = autocast_adapter_dtype
        try:
            self.base_model.inject_adapter(self.base_model.model, adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        finally:
            self.base_model.autocast_adapter_dtype = previous

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate the named adapter(s); they run in the order they were added, whatever the order here."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        self.base_model.set_adapter(names, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        for name in names:
            self.base_model.delete_adapter(name)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.base_model.merge_and_unload(*args, **kwargs)

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.base_model.unload(*args, **kwargs)

    def get_layer_status(self) -> None:
        raise TypeError(f"get_layer_status is not supported for {type(self).__name__}.")

    def get_model_status(self) -> None:
        raise TypeError(f"get_model_status is not supported for {type(self).__name__}.")

    def create_or_update_model_card(self, output_dir: str) -> None:
        raise NotImplementedError(f"Model card creation is not supported for {type(self).__name__} (yet).")

    def save_pretrained(self, save_directory: str, safe_serialization: bool = False, selected_adapters: Optional[list[str]] = None,
                        **kwargs: Any) -> None:
        raise NotImplementedError(f"Saving is not supported for {type(self).__name__} (yet).")

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     low_cpu_mem_usage: bool = False, **kwargs: Any) -> None:
        """Add a saved adapter (an AdaLoRA folder written by PEFT or deltatune) under ``adapter_name``."""
        files = checkpoint_files(resolve_local_dir(model_id, kwargs.pop("subfolder", None)))
        config = _read_config(files)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            self._load_weights(files, adapter_name, low_cpu_mem_usage, kwargs.get("torch_device"))
        except BaseException:
            self.base_model.delete_adapter(adapter_name)
            raise

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[TunerConfig] = None, **kwargs: Any) -> "PeftMixedModel":
        files = checkpoint_files(resolve_local_dir(model_id, kwargs.pop("subfolder", None)))
        if config is None:
            config = _read_config(files)
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {config.__class__}")
        config.inference_mode = not is_trainable
        mixed = cls(model, config, adapter_name)
        mixed._load_weights(files, adapter_name, kwargs.get("low_cpu_mem_usage", False), kwargs.get("torch_device"))
        return mixed


def get_peft_model(
    model: nn.Module,
    peft_config: TunerConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: Optional[str] = None,
    low_cpu_mem_usage: bool = False,
) -> "PeftModel | PeftMixedModel":
    """Wrap ``model`` with a new adapter described by ``peft_config``; ``mixed=True`` gives a
    :class:`PeftMixedModel` (AdaLoRA only, as PEFT's mixed model among deltatune's methods)."""
    if mixed:
        _check_mixed_compatible(peft_config)
    if any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules()):
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before."
        )
    prefix = method_for(peft_config.peft_type).prefix
    if adapter_name in prefix:
        warnings.warn(
            f"Adapter name '{adapter_name}' should not be contained in the prefix '{prefix}'. "
            "This may lead to reinitialization of the adapter weights during loading."
        )
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "name_or_path", None)
    peft_config.base_model_name_or_path = name or None
    if revision is not None:
        peft_config.revision = revision
    if mixed:
        return PeftMixedModel(model, peft_config, adapter_name)
    wrapper = TASK_WRAPPERS.get(peft_config.task_type, PeftModel)
    return wrapper(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)
