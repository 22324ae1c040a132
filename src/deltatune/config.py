"""Adapter configurations: dataclasses with PEFT's field names, defaults and JSON format.

A method's config subclasses :class:`TunerConfig` and sets ``PEFT_TYPE``. The JSON written by
:meth:`PeftConfig.save_pretrained` is the ``adapter_config.json`` PEFT reads, and PEFT's files load
here: keys we do not know are dropped with one warning (forward compatibility).

Every field is checked against its annotation when a config is built (:func:`check_field_types`),
so a method's config gets type errors naming the field and the value for free; value ranges stay
in the method's ``__post_init__``.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import enum
import functools
import json
import math
import os
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from ._version import PEFT_VERSION_RECORD
from .core.registry import method_for
from .io.files import atomic_write_text, resolve_local_dir

CONFIG_NAME = "adapter_config.json"


class _StrEnum(str, enum.Enum):
    """A string enum as PEFT's (``PeftType.BONE == "BONE"``, ``.value``), whose ``str()`` and
    f-string form are the bare value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# PEFT 0.21.2's PeftType members, plus BONE (PEFT <= 0.18.1). deltatune implements FOURIERFT,
# RANDLORA, ADALORA, BONE and MISS; the other names exist so that code naming them imports.
PeftType = _StrEnum("PeftType", {name: name for name in (
    "PROMPT_TUNING MULTITASK_PROMPT_TUNING P_TUNING PREFIX_TUNING LORA ADALORA ADAMSS BOFT ADAPTION_PROMPT IA3 BEFT "
    "LILY LOHA LOKR OFT POLY LN_TUNING VERA FROD PVERA FOURIERFT GLORA XLORA HRA VBLORA UNILORA CPT BONE MISS "
    "RANDLORA ROAD TRAINABLE_TOKENS HIRA SHIRA C3A WAVEFT OSF DELORA GRALORA CARTRIDGE TINYLORA PSOFT PEANUT SHADOW "
    "SUPERTUNING DEFT"
).split()}, module=__name__)
PeftType.__doc__ = "The adapter methods PEFT names (PEFT's ``PeftType``); a config's ``peft_type`` is one of them."

TaskType = _StrEnum("TaskType", {name: name for name in (
    "SEQ_CLS SEQ_2_SEQ_LM CAUSAL_LM TOKEN_CLS QUESTION_ANS FEATURE_EXTRACTION"
).split()}, module=__name__)
TaskType.__doc__ = "The task a model is tuned for (PEFT's ``TaskType``); it picks the PeftModel subclass."

TASK_TYPES = tuple(t.value for t in TaskType)

class MissingConfigKeysError(TypeError, ValueError):
    """An adapter_config.json without the keys every config needs (PEFT raises a TypeError; a
    ValueError too, as for every other unusable file here)."""


@dataclass
class PeftConfig:
    """Fields common to every adapter config (PEFT's ``PeftConfig``)."""

    PEFT_TYPE: ClassVar[str] = ""

    peft_type: Optional[str] = None
    auto_mapping: Optional[dict] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    task_type: Optional[str] = None
    inference_mode: bool = False
    peft_version: Optional[str] = None

    def __post_init__(self) -> None:
        check_field_types(self)
        # as PEFT: a config's own method wins over a peft_type passed in (files are checked on load)
        self.peft_type = PeftType(self.PEFT_TYPE) if self.PEFT_TYPE else (
            None if self.peft_type is None else _enum_or_str(PeftType, self.peft_type)
        )
        if self.task_type is not None:
            task = str(getattr(self.task_type, "value", self.task_type))
            if task not in TASK_TYPES:
                raise ValueError(
                    f"Invalid task type: '{task}'. Must be one of the following task types: "
                    f"{', '.join(TASK_TYPES)}."
                )
            self.task_type = TaskType(task)
        if self.peft_version is None:
            self.peft_version = PEFT_VERSION_RECORD

    @property
    def is_prompt_learning(self) -> bool:
        """False: every method here adapts weights (PEFT's prompt-learning configs say True)."""
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, set):
                out[k] = sorted(v)
            elif isinstance(v, enum.Enum):
                out[k] = v.value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update(kwargs)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> "PeftConfig":
        peft_type = kwargs.get("peft_type")
        config_cls = config_class_for(peft_type)
        return config_cls._from_known_keys(kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any):
        path = resolve_local_dir(pretrained_model_name_or_path, subfolder)
        return cls.from_config_file(os.path.join(path, CONFIG_NAME), **kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The JSON object of a config file, as a dict (PEFT's behaviour; see :meth:`from_config_file`
        for the config). A ``runtime_config`` key is dropped with a warning."""
        if not os.path.isfile(path_json_file):
            if os.path.exists(path_json_file):
                raise ValueError(f"Adapter config {path_json_file} is not a file")
            raise FileNotFoundError(f"No adapter config found at {path_json_file}")
        try:
            with open(path_json_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"Cannot read adapter config {path_json_file}: {exc}") from None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, too-long integers, absurd nesting
            raise ValueError(f"Adapter config {path_json_file} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Adapter config {path_json_file} must hold a JSON object, got {type(data).__name__}")
        if "runtime_config" in data:
            warnings.warn("The configuration file contains a `runtime_config` key. This is ignored.")
            data.pop("runtime_config")
        return data

    @classmethod
    def from_config_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> "PeftConfig":
        """The config an ``adapter_config.json`` describes; ``kwargs`` override its fields. The file must
        name its ``peft_type`` (as PEFT requires); a subclass refuses another method's file."""
        data = cls.from_json_file(path_json_file)
        data.update(kwargs)
        if "peft_type" not in data:
            raise MissingConfigKeysError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"(file: {path_json_file})"
            )
        config_cls = config_class_for(data["peft_type"])
        if cls.PEFT_TYPE and not issubclass(config_cls, cls):
            raise ValueError(
                f"{path_json_file} holds a {data['peft_type']} adapter, not {cls.PEFT_TYPE} ({cls.__name__})"
            )
        return config_cls._from_known_keys(data)

    @classmethod
    def _from_known_keys(cls, data: dict[str, Any]) -> "PeftConfig":
        data = cls._convert_legacy(dict(data))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. The "
                "configuration was probably written by a newer version of PEFT or deltatune."
            )
        kept = {k: v for k, v in data.items() if k in names}
        version = kept.pop("peft_version", None)
        try:
            config = cls(**kept)
        except TypeError as exc:  # a field of the wrong kind that the dataclass itself rejects
            raise ValueError(f"Invalid {cls.__name__}: {exc}") from exc
        if isinstance(version, str):  # informational only: a malformed value is not worth an error
            config.peft_version = version
        return config

    @classmethod
    def _convert_legacy(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook for configs whose on-disk form differs from the dataclass (e.g. MiSS into Bone)."""
        return data

    def copy(self) -> "PeftConfig":
        return copy.deepcopy(self)


def _enum_or_str(enum_cls: type[enum.Enum], value: Any) -> Any:
    value = getattr(value, "value", value)
    try:
        return enum_cls(value)
    except ValueError:
        return value


def config_class_for(peft_type: Any) -> type[PeftConfig]:
    return method_for(peft_type).config_cls


# ------------------------------------------------------------------------ field types from annotations

_ATOMS: dict[type, str] = {bool: "a bool", int: "an int", float: "a number", str: "a string", dict: "a dict", list: "a list"}
_PLURALS: dict[type, str] = {bool: "bools", int: "ints", float: "numbers", str: "strings", dict: "dicts", list: "lists"}


@functools.lru_cache(maxsize=None)
def _field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotation of every dataclass field of ``cls`` that can be resolved."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a name only importable under TYPE_CHECKING: resolve field by field
        hints = {}
        for klass in reversed(cls.__mro__):
            module = sys.modules.get(klass.__module__)
            for name, ann in vars(klass).get("__annotations__", {}).items():
                try:
                    hints[name] = eval(ann, vars(module) if module else {}) if isinstance(ann, str) else ann
                except Exception:
                    hints.pop(name, None)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint``; annotations this checker does not understand accept anything."""
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    base = origin or hint
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:  # ints are numbers too; nan and inf never mean anything in an adapter config
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if base is str:
        return isinstance(value, str)
    if base in (list, tuple, set, frozenset, collections.abc.Sequence):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        item = args[0] if args and (base is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else Any
        return all(_matches(v, item) for v in value)
    if base in (dict, collections.abc.Mapping):
        if not isinstance(value, collections.abc.Mapping):
            return False
        key, val = args if len(args) == 2 else (Any, Any)
        return all(_matches(k, key) and _matches(v, val) for k, v in value.items())
    return True


def _describe(hint: Any) -> str:
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        # scalars first, None last: "a string or a list of strings or None"
        ordered = sorted(args, key=lambda a: (a is type(None), typing.get_origin(a) is not None))
        return " or ".join(_describe(a) for a in ordered)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    base = origin or hint
    if base in (list, tuple, set, frozenset, collections.abc.Sequence) and args and args[0] in _PLURALS:
        return f"a list of {_PLURALS[args[0]]}"
    if base in (dict, collections.abc.Mapping) and len(args) == 2 and args[0] in _PLURALS and args[1] in _PLURALS:
        return f"a dict mapping {_PLURALS[args[0]]} to {_PLURALS[args[1]]}"
    if base is float:
        return "a finite number"
    return _ATOMS.get(base, getattr(base, "__name__", str(base)))


def check_field_types(config: "PeftConfig") -> None:
    """Check every field against its annotation (so each method's config is checked for free);
    value ranges are the method's business."""
    for name, hint in _field_hints(type(config)).items():
        value = getattr(config, name)
        if not _matches(value, hint):
            raise ValueError(
                f"{type(config).__name__}: `{name}` must be {_describe(hint)}, got {value!r} ({type(value).__name__})"
            )


def _check_str_list(name: str, value: Any, allow_str: bool = True) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            raise ValueError(f"`{name}` must be a list of strings, got the string {value!r}")
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return set(value) if name in ("target_modules", "exclude_modules") else list(value)
    raise ValueError(f"`{name}` must be a string or a list of strings, got {value!r}")


@dataclass
class TunerConfig(PeftConfig):
    """Targeting fields shared by every method (see :mod:`deltatune.core.targeting`)."""

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    bias: str = "none"

    # Methods that PEFT does not give a "layers_pattern requires layers_to_transform" check (Bone).
    CHECK_PATTERN_NEEDS_LAYERS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _check_str_list("target_modules", self.target_modules)
        self.exclude_modules = _check_str_list("exclude_modules", self.exclude_modules)
        self.modules_to_save = _check_str_list("modules_to_save", self.modules_to_save, allow_str=False)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.CHECK_PATTERN_NEEDS_LAYERS and self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")
        ltt = self.layers_to_transform
        if ltt is not None and not (
            (isinstance(ltt, int) and not isinstance(ltt, bool))
            or (isinstance(ltt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in ltt))
        ):
            raise ValueError(f"`layers_to_transform` must be an int or a list of ints, got {ltt!r}")
        if not isinstance(self.bias, str) or not (self.bias in ("none", "all") or self.bias.endswith("_only")):
            raise NotImplementedError(f"Requested bias: {self.bias}, is not implemented.")

def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` should be a positive integer value but the value passed is {value}")


def pattern_lookup(pattern: dict[str, Any], module_key: str, default: Any) -> Any:
    """PEFT's per-module override rule (``rank_pattern``-style dicts): a key matches a module path
    ending in ``.<key>`` (the key is a regex), tried in dict order; else an exact key; else default."""
    for key, value in pattern.items():
        if re.match(rf".*\.{key}$", module_key):
            return value
    return pattern.get(module_key, default)
