"""Which modules an adapter config selects — PEFT's matching rules, written as pure functions.

Selecting modules is kept apart from wrapping them (see :mod:`deltatune.core.tuner`): a test can ask
``select_targets(model, config)`` what would be adapted without touching the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.nn as nn

# Default ``target_modules`` per transformers ``model_type`` (the LoRA table PEFT uses for Bone,
# RandLoRA and FourierFT; FourierFT overrides GPT-2 style models, AdaLoRA has its own table).
DEFAULT_TARGETS: dict[str, Any] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

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

ALL_LINEAR = "all-linear"


class NoMatchingModuleError(ValueError):
    """The config selects no module of the model (PEFT's ``NoMatchingPeftModuleError``)."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), detected without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _layer_index(key: str, layers_pattern: Any) -> int | None:
    if not layers_pattern:
        # the first numbered component after at least one dotted name: "model.layers.3.mlp" -> 3
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def matches_modules_to_save(key: str, modules_to_save: Iterable[str] | None) -> bool:
    """A module path lies inside a ``modules_to_save`` entry (dot boundary on both sides)."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def is_excluded(config: Any, key: str) -> bool:
    excl = getattr(config, "exclude_modules", None)
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return True
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return True
    return matches_modules_to_save(key, getattr(config, "modules_to_save", None))


def key_matches(config: Any, key: str, target_modules: Any) -> bool:
    """PEFT's rule for one module path, ignoring exclusions."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True  # an exact path is taken as given, without the layer-index filter (as PEFT does)
    if not any(key.endswith(f".{t}") for t in target_modules):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def output_embedding_names(model: nn.Module, task_type: str | None) -> set[str]:
    """Modules ``all-linear`` must leave alone: a transformers model's output embedding, or, for
    sequence classification without one, its ``score``/``classifier`` head."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out) and hasattr(model, "config"):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            names.update(n for n, m in model.named_modules() if m is head)
        elif task_type == "SEQ_CLS":
            for cand in ("score", "classifier"):
                if hasattr(model, cand):
                    names.add(cand)
                    break
    return names


def expand_all_linear(model: nn.Module, task_type: str | None, is_wrapper) -> set[str]:
    """The explicit set of linear module paths that ``"all-linear"`` stands for."""
    skip = output_embedding_names(model, task_type)
    found: set[str] = set()
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if is_wrapper(module):
            inside.append(name)
            found.add(name)
            continue
        if isinstance(module, nn.Linear) or is_conv1d(module):
            found.add(name)
    found -= {n for n in found if n in skip or any(n == s or n.endswith("." + s) for s in skip)}
    return found


def default_targets(model: nn.Module, table: dict[str, Any]) -> Any:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None and hasattr(model, "config") and isinstance(model.config, dict):
        model_type = model.config.get("model_type")
    if model_type not in table:
        raise ValueError("Please specify `target_modules` in `peft_config`")
    value = table[model_type]
    return set(value) if isinstance(value, list) else value


@dataclass
class Selection:
    targets: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)


def select_targets(model: nn.Module, config: Any, is_wrapper, default_table: dict[str, Any] | None = None) -> Selection:
    """The module paths ``config`` adapts in ``model`` (in module order).

    Resolves ``target_modules=None`` and ``"all-linear"`` first and writes the explicit value back
    into the config, as PEFT does, so the saved ``adapter_config.json`` says what was adapted.
    Raises :class:`NoMatchingModuleError` when nothing is selected.
    """
    target = config.target_modules
    if target is None:
        target = default_targets(model, DEFAULT_TARGETS if default_table is None else default_table)
        config.target_modules = target
    elif isinstance(target, str) and target.lower() == ALL_LINEAR:
        target = expand_all_linear(model, config.task_type, is_wrapper)
        config.target_modules = target
    selection = Selection()
    wrappers: list[str] = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(p + ".") for p in wrappers):
            continue
        if is_wrapper(module):
            wrappers.append(key)
        if is_excluded(config, key):
            selection.excluded.append(key)
            continue
        if key_matches(config, key, target):
            selection.targets.append(key)
    if not selection.targets:
        if any(key_matches(config, key, target) for key in selection.excluded):
            raise NoMatchingModuleError(
                "All modules were excluded. This is likely unintended. Check your `target_modules`, "
                "`exclude_modules` and `modules_to_save` configuration. "
                f"(target_modules={_show(target)}, exclude_modules={_show(config.exclude_modules)}, "
                f"modules_to_save={config.modules_to_save})"
            )
        note = ""
        if getattr(config, "layers_to_transform", None) is not None or getattr(config, "layers_pattern", None):
            note = (
                f" Note: layers_to_transform={config.layers_to_transform} and layers_pattern="
                f"{config.layers_pattern} restrict the match to numbered layers."
            )
        raise NoMatchingModuleError(
            f"Target modules {_show(target)} not found in the base model {type(model).__name__}. "
            f"Please check the target modules and try again.{note}"
        )
    return selection


def _show(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else value
