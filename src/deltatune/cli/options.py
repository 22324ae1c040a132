"""Method names and adapter-config fields for the command line, built from the method registry.

Nothing here names a method or a config field. The methods a user can pick are the ones registered
in :data:`deltatune.core.registry.METHODS` (lower-cased ``peft_type``), plus ``head``, the head-only
baseline (no adapter, only the classification head trains). Each method declares next to its
config class what the command line needs (:func:`preset_of`):

* ``CLI_PRESET`` (a class attribute, a plain dict): ``fields`` -- default config values for the
  CLI's models (MiniLM classifier, SmolLM2); ``lr`` -- the adapter learning rate; ``why`` -- one
  line for ``deltatune methods``; ``aliases`` -- extra method names that fix some fields (Bone
  declares ``bat`` = ``init_weights="bat"``);
* ``cli_derived(values, steps)`` (an optional classmethod): fields that follow from the others
  or from the number of optimizer steps, filled unless the user set them (RandLoRA's alpha from
  r, AdaLoRA's schedule from ``--steps``).

A method without them runs with its config's defaults and lr :data:`DEFAULT_LR`.

Every field of a method's config dataclass can be set with ``--set field=value`` (the value is
parsed as JSON, and taken as a plain string when it is not JSON) or read from a PEFT-format
``adapter_config.json`` (``--config``). ``--set`` wins over the file, and the file wins over
the CLI's defaults. A mistake -- an unknown method, a field of another method, a value the config
rejects -- raises :class:`UsageError`, which ``deltatune`` prints as one line (exit code 2).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HEAD = "head"

# The fields every adapter config shares are the library's business, not the user's.
_INTERNAL_FIELDS = {"peft_type", "peft_version", "auto_mapping", "revision", "inference_mode"}

HEAD_LR = 5e-3
"""Learning rate of the new classification head (``--head-lr``), with or without an adapter."""

DEFAULT_LR = 1e-3
"""Adapter learning rate for a registered method without a preset."""


class UsageError(ValueError):
    """A bad command line or option; printed as one line, exit code 2."""


@dataclass(frozen=True)
class Preset:
    """CLI defaults of one method, as its config class declares them (see the module docstring)."""

    fields: dict[str, Any] = field(default_factory=dict)
    lr: float = DEFAULT_LR
    why: str = ""
    aliases: dict[str, dict[str, Any]] = field(default_factory=dict)
    derive: Optional[Callable[[dict[str, Any], Optional[int]], dict[str, Any]]] = None


def preset_of(config_cls: type) -> Preset:
    """The :class:`Preset` a config class declares (``CLI_PRESET``, ``cli_derived``)."""
    data = getattr(config_cls, "CLI_PRESET", None)
    derive = getattr(config_cls, "cli_derived", None)
    data = dict(data or {})
    unknown = set(data) - {"fields", "lr", "why", "aliases"}
    if unknown:
        raise TypeError(f"{config_cls.__name__}.CLI_PRESET has unknown keys {sorted(unknown)}; "
                        f"allowed: fields, lr, why, aliases")
    return Preset(dict(data.get("fields") or {}), float(data.get("lr", DEFAULT_LR)), str(data.get("why", "")),
                  {str(k).lower(): dict(v) for k, v in (data.get("aliases") or {}).items()}, derive)


@dataclass(frozen=True)
class MethodSpec:
    """What a method name on the command line means."""

    name: str  # as the CLI prints it, lower case
    peft_type: Optional[str]  # None: head-only baseline
    implied: dict[str, Any] = field(default_factory=dict)  # fields the name fixes (bat)

    @property
    def is_head(self) -> bool:
        return self.peft_type is None

    @property
    def preset(self) -> Preset:
        return Preset() if self.peft_type is None else preset_of(registered_methods()[self.peft_type].config_cls)


# --------------------------------------------------------------------------- registry


def registered_methods() -> dict[str, Any]:
    """``peft_type -> Method`` of every method that registered itself.

    Every public module of :mod:`deltatune.methods` is imported first, so a method file that
    lands later joins the CLI without any change here. A module that fails to import is
    skipped with a warning (the other methods keep working).
    """
    import deltatune  # noqa: F401  # registers the methods the package imports
    import deltatune.methods as methods_pkg
    from deltatune.core.registry import METHODS

    for info in pkgutil.iter_modules(methods_pkg.__path__):
        if info.name.startswith("_"):
            continue
        name = f"{methods_pkg.__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except Exception as error:  # a broken method must not take the whole CLI down
            warnings.warn(f"deltatune: skipping method module {name}: {type(error).__name__}: {error}")
    return dict(METHODS)


def aliases() -> dict[str, tuple[str, dict[str, Any]]]:
    """``alias -> (peft_type, fields it fixes)`` of every registered method (``bat`` -> Bone)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    methods = registered_methods()
    for peft_type in sorted(methods):
        for alias, implied in preset_of(methods[peft_type].config_cls).aliases.items():
            if alias == HEAD or alias.upper() in methods or alias in out:
                raise TypeError(f"{methods[peft_type].config_cls.__name__}: CLI alias {alias!r} is already a method name")
            out[alias] = (peft_type, implied)
    return out


def method_names(include_head: bool = True) -> list[str]:
    """CLI names of all methods: ``head``, then each registered method, then aliases."""
    methods = registered_methods()
    names = [HEAD] if include_head else []
    names += [t.lower() for t in sorted(methods)]
    names += list(aliases())
    return names


def default_compare_methods() -> list[str]:
    """``head`` and every registered method under its own name (aliases left out)."""
    return [HEAD] + [t.lower() for t in sorted(registered_methods())]


def resolve_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a case-insensitive CLI name; :class:`UsageError` if unknown."""
    key = str(name).strip().lower()
    if key == HEAD:
        return MethodSpec(HEAD, None)
    methods = registered_methods()
    named = aliases()
    if key in named:
        target, implied = named[key]
        return MethodSpec(key, target, dict(implied))
    for peft_type in methods:
        if peft_type.lower() == key:
            return MethodSpec(key, peft_type)
    raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")


def config_class(spec: MethodSpec) -> type:
    return registered_methods()[spec.peft_type].config_cls


def settable_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a config dataclass a user may set (the shared bookkeeping ones excluded)."""
    return {f.name: f for f in dataclasses.fields(config_cls) if f.name not in _INTERNAL_FIELDS}


def _owner_of(field_name: str) -> list[str]:
    return [
        peft_type.lower()
        for peft_type, method in sorted(registered_methods().items())
        if field_name in settable_fields(method.config_cls)
    ]


def check_fields(spec: MethodSpec, names: list[str], source: str) -> None:
    """Refuse fields that the method's config does not have, saying whose field it is."""
    if spec.is_head:
        if names:
            raise UsageError(f"{source} sets {', '.join(names)}, but method 'head' (head only) has no adapter config")
        return
    allowed = settable_fields(config_class(spec))
    for name in names:
        if name in allowed:
            continue
        owners = _owner_of(name)
        if owners:
            raise UsageError(
                f"{source}: {name!r} is a field of {', '.join(owners)}, not of {spec.name}; "
                f"{spec.name} fields: {', '.join(sorted(allowed))}"
            )
        raise UsageError(f"{source}: unknown field {name!r} for {spec.name}; its fields: {', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------- values


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (``64``, ``true``, ``null``, ``["query","value"]``) or else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(items: Optional[list[str]]) -> dict[str, Any]:
    """``["r=8", "target_modules=[\\"q\\"]"]`` -> ``{"r": 8, "target_modules": ["q"]}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--set expects field=value (a JSON value), got {item!r}")
        out[name] = parse_value(value.strip())
    return out


def read_json(path: Path, prefix: str = "") -> Any:
    """The value a JSON file holds; an unreadable or malformed file is one usage error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise UsageError(f"{prefix}{path} is not a readable JSON file: {error}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object of a PEFT-format ``adapter_config.json`` (a folder holding one is accepted)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "adapter_config.json"
    if not path.is_file():
        raise UsageError(f"--config: adapter config file {str(path)!r} does not exist")
    data = read_json(path, "--config: ")
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def method_from_config_file(data: dict[str, Any], path: str) -> MethodSpec:
    peft_type = data.get("peft_type")
    if not peft_type:
        raise UsageError(f"--config: {path} has no 'peft_type'; pass --method as well")
    spec = resolve_method(str(peft_type))
    for alias, (target, implied) in aliases().items():  # a Bone file with init_weights="bat" is `bat`
        if target == spec.peft_type and all(data.get(k) == v for k, v in implied.items()):
            return resolve_method(alias)
    return spec


def build_config(
    spec: MethodSpec,
    sets: Optional[dict[str, Any]] = None,
    file_data: Optional[dict[str, Any]] = None,
    task_type: Optional[str] = None,
    steps: Optional[int] = None,
    file_name: str = "--config",
    quiet: bool = False,
) -> Any:
    """The adapter config of ``spec`` (``None`` for ``head``).

    Precedence: ``--set`` > the ``--config`` file > fields the method name implies (``bat``) >
    the method's ``CLI_PRESET`` > the dataclass defaults. Derived fields (``cli_derived``) are
    filled last, each only when the user did not set it.
    """
    if quiet:  # a validation pass: the real build says it (once)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_config(spec, sets, file_data, task_type, steps, file_name)
    sets = dict(sets or {})
    check_fields(spec, list(sets), "--set")
    if spec.is_head:
        return None
    config_cls = config_class(spec)
    allowed = settable_fields(config_cls)
    values: dict[str, Any] = {k: v for k, v in spec.preset.fields.items() if k in allowed}
    values.update(spec.implied)
    user: dict[str, Any] = {}
    if file_data:
        data = dict(file_data)
        if hasattr(config_cls, "_convert_legacy"):  # e.g. PEFT's MiSS file read as Bone
            data = config_cls._convert_legacy(data)
        data = {k: v for k, v in data.items() if k not in _INTERNAL_FIELDS}
        unknown = sorted(set(data) - set(allowed))
        if unknown:  # PEFT writes fields we may not have (newer versions): dropped, as PEFT does
            warnings.warn(f"{file_name}: fields {unknown} are not {spec.name} fields and are ignored")
        user.update({k: v for k, v in data.items() if k in allowed})
    user.update(sets)
    if "init_weights" in spec.implied and "init_weights" in user and user["init_weights"] != spec.implied["init_weights"]:
        raise UsageError(f"method {spec.name!r} implies init_weights={spec.implied['init_weights']!r}; do not set it to {user['init_weights']!r}")
    values.update(user)
    if spec.preset.derive is not None:
        for key, value in spec.preset.derive(dict(values), steps).items():
            if key in allowed and key not in user:
                values[key] = value
    if task_type is not None and "task_type" in allowed:
        values.setdefault("task_type", task_type)
        if user.get("task_type") is None:
            values["task_type"] = task_type
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. AdaLoRA's "r is not used" note on defaults we did not set
            return config_cls(**values)
    except (TypeError, ValueError, NotImplementedError) as error:
        raise UsageError(f"invalid {spec.name} config: {' '.join(str(error).split())}") from None


def learning_rates(spec: MethodSpec, lr: Optional[float], head_lr: Optional[float]) -> tuple[float, float]:
    """``(adapter lr, head lr)``: the user's values, else the method's preset and :data:`HEAD_LR`."""
    adapter_lr = lr if lr is not None else spec.preset.lr
    return float(adapter_lr), float(head_lr if head_lr is not None else HEAD_LR)


def describe_methods() -> str:
    """A few lines for ``--help``: each method, its default sizes and learning rate."""
    lines = [f"  {HEAD:<10} head-only baseline (no adapter), lr {HEAD_LR:g}"]
    for name in method_names(include_head=False):
        spec = resolve_method(name)
        cls = config_class(spec)
        allowed = settable_fields(cls)
        shown = {k: v for k, v in spec.preset.fields.items() if k in allowed}
        shown.update(spec.implied)
        sizes = ", ".join(f"{k}={v}" for k, v in shown.items()) or "config defaults"
        lines.append(f"  {name:<10} {cls.__name__}: {sizes}; lr {spec.preset.lr:g}")
    return "\n".join(lines)
