"""Files on disk: atomic writes, the two-file checkpoint protocol, folder resolution, and safe
tensor reads (no pickle).

Each file is written to a temporary name in the destination folder, flushed to disk, then renamed
over the target: a process killed at any point leaves the old file or the new one, never half a
file.

A checkpoint is two files, ``adapter_config.json`` and ``adapter_model.safetensors``, and no
filesystem renames two files at once. :func:`save_checkpoint` therefore

1. writes the new weights and config under temporary names;
2. keeps the pair a loader would use now as hidden backups (``.adapter_model.safetensors.prev``,
   a hard link, and ``.adapter_config.json.prev``, a copy);
3. renames the weights into place, then the config;
4. deletes the backups.

The weights record in their safetensors metadata the SHA-256 of the config file they belong to. A
kill between the two renames of step 3 leaves new weights beside the old config; the loader
(:func:`checkpoint_files`) sees that the digest does not match, finds the backup whose config is
that very file, and loads the backup pair. Every kill point thus leaves the old checkpoint or the
new one, and the committed folder is plain PEFT format (PEFT ignores the extra metadata key).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .._version import __version__

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
WEIGHT_NAMES = (SAFETENSORS_NAME, BIN_NAME)  # the loader's order of preference, as in PEFT
# safetensors metadata key: SHA-256 (hex) of the adapter_config.json bytes saved with the weights
CONFIG_DIGEST_KEY = "deltatune_config_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, or not matching the model."""


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- single files


def _temp_prefix(name: str) -> str:
    # the pid lets a later save delete what a killed writer left behind (see _remove_stale_temps)
    return f".{name}.{os.getpid()}."


def _write_temp(folder: str, name: str, data: bytes) -> str:
    """``data`` in a new, fsynced temporary file next to ``folder/name``; returns its path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f"{_temp_prefix(name)}{secrets.token_hex(4)}.tmp")
        try:
            # 0o666 minus the umask, like any file the user writes (mkstemp would make it 0600)
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _remove_stale_temps(folder: str) -> None:
    """Delete temporary checkpoint files whose writer process no longer exists (killed mid-save)."""
    names = "|".join(re.escape(n) for n in (*WEIGHT_NAMES, CONFIG_NAME, "README.md"))
    pattern = re.compile(rf"^\.(?:{names})\.(\d+)\.[^.]+\.tmp$")
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = pattern.match(entry.name)
            if not match or not entry.is_file(follow_symlinks=False):
                continue
            pid = int(match.group(1))
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            except (PermissionError, OverflowError, OSError):
                pass  # alive under another user, or not a pid: leave it


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _write_temp(folder, os.path.basename(path), data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def serialize_tensors(
    tensors: dict[str, torch.Tensor], safe_serialization: bool = True, metadata: Optional[dict[str, str]] = None
) -> bytes:
    """The bytes of a safetensors file (metadata ``{"format": "pt", **metadata}``) or a torch ``.bin``."""
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy
    seen: set[int] = set()
    clean: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(ptr)
        clean[key] = t.to("cpu")
    if safe_serialization:
        from safetensors.torch import save

        return save(clean, metadata={"format": "pt", **(metadata or {})})
    import io

    buf = io.BytesIO()
    torch.save(clean, buf)
    return buf.getvalue()


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, safe_serialization: bool = True,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write ``tensors`` atomically as safetensors (default) or a torch ``.bin``."""
    atomic_write_bytes(path, serialize_tensors(tensors, safe_serialization, metadata))


# ---------------------------------------------------------------------------------- checkpoint pairs


def config_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _backup_name(name: str) -> str:
    return f".{name}.prev"


@dataclass(frozen=True)
class CheckpointFiles:
    """The config and weights files that form one consistent checkpoint in a folder."""

    folder: str
    config: str
    weights: Optional[str]  # None: the folder holds no weights file
    backup: bool = False  # True: the pair an interrupted save kept (see the module docstring)


def _first_file(folder: str, names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _read_bytes(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _recorded_digest(weights: str) -> Optional[str]:
    """The config digest the weights were saved with; None if they record none (PEFT's files,
    ``.bin``); "" if the file cannot be read."""
    if not weights.endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as fh:
            return (fh.metadata() or {}).get(CONFIG_DIGEST_KEY)
    except Exception:  # corrupted: the loader reports it (unless a backup pair is used)
        return ""


def weights_metadata(weights: Optional[str]) -> dict[str, str]:
    """The safetensors metadata of a weights file ({} for ``.bin`` files and unreadable ones)."""
    if weights is None or not weights.endswith((".safetensors", ".safetensors.prev")):
        return {}
    try:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # corrupted: the loader reports it
        return {}


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def checkpoint_files(folder: str | os.PathLike, warn: bool = True) -> CheckpointFiles:
    """The consistent checkpoint pair in ``folder``: normally the plain files; the hidden backups
    when a save was interrupted between its two renames (new weights beside the old config)."""
    folder = os.fspath(folder)
    config = os.path.join(folder, CONFIG_NAME)
    weights = _first_file(folder, WEIGHT_NAMES)
    main = CheckpointFiles(folder, config, weights)
    config_bytes = _read_bytes(config) if os.path.isfile(config) else None
    if config_bytes is None or weights is None:
        return main  # nothing consistent to choose: the loader reports what is missing
    recorded = _recorded_digest(weights)
    if recorded and recorded == config_digest(config_bytes):
        return main
    backup_config = os.path.join(folder, _backup_name(CONFIG_NAME))
    backup_weights = _first_file(folder, tuple(_backup_name(n) for n in WEIGHT_NAMES))
    # the backup belongs to an interrupted save iff its config is byte-identical to the live one
    # (the save had not yet replaced the config) and the live weights are not the backed-up ones
    if (
        backup_weights is not None
        and os.path.isfile(backup_config)
        and _read_bytes(backup_config) == config_bytes
        and not _same_file(backup_weights, weights)
    ):
        if warn:
            warnings.warn(
                f"{folder} holds a save that was interrupted before {CONFIG_NAME} was replaced; loading the previous "
                f"complete checkpoint ({os.path.basename(backup_config)}, {os.path.basename(backup_weights)})"
            )
        return CheckpointFiles(folder, backup_config, backup_weights, backup=True)
    if recorded and warn:
        warnings.warn(
            f"{config} differs from the config {os.path.basename(weights)} was saved with (edited after saving?); "
            "loading them together"
        )
    return main


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _keep_backup(current: CheckpointFiles) -> None:
    """Hidden copies of the live pair ``current``: a hard link of the weights (no copy of the
    data: the save replaces, never rewrites, the live file) and a copy of the config (so that an
    in-place edit of the live config cannot change the backup)."""
    folder = current.folder
    for name in (*WEIGHT_NAMES, CONFIG_NAME):
        _remove(os.path.join(folder, _backup_name(name)))
    assert current.weights is not None
    name = os.path.basename(current.weights)
    tmp = os.path.join(folder, f"{_temp_prefix(name)}link.tmp")
    _remove(tmp)
    try:
        os.link(current.weights, tmp)
    except OSError:  # a filesystem without hard links
        tmp = _write_temp(folder, name, Path(current.weights).read_bytes())
    os.replace(tmp, os.path.join(folder, _backup_name(name)))
    config_bytes = Path(current.config).read_bytes()
    os.replace(_write_temp(folder, CONFIG_NAME, config_bytes), os.path.join(folder, _backup_name(CONFIG_NAME)))
    fsync_dir(folder)  # the backups are on disk before the live files change


def save_checkpoint(
    folder: str | os.PathLike, config_text: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write one adapter's ``adapter_config.json`` and weights so that a process killed at any point
    leaves a folder that loads as the old checkpoint or the new one (protocol in the module docstring)."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temps(folder)
    config_bytes = config_text.encode("utf-8")
    weights_name = SAFETENSORS_NAME if safe_serialization else BIN_NAME
    data = serialize_tensors(tensors, safe_serialization, {**(metadata or {}), CONFIG_DIGEST_KEY: config_digest(config_bytes)})
    temps = [_write_temp(folder, weights_name, data), _write_temp(folder, CONFIG_NAME, config_bytes)]
    try:
        current = checkpoint_files(folder, warn=False)
        complete = current.weights is not None and os.path.isfile(current.config)
        if complete and not current.backup:
            _keep_backup(current)
        elif not complete:  # no old checkpoint: backups left by anything else must not be used
            for name in (*WEIGHT_NAMES, CONFIG_NAME):
                _remove(os.path.join(folder, _backup_name(name)))
        os.replace(temps[0], os.path.join(folder, weights_name))
        # the loader prefers safetensors: never leave weights of the other format beside the new ones
        for other in WEIGHT_NAMES:
            if other != weights_name:
                _remove(os.path.join(folder, other))
        os.replace(temps[1], os.path.join(folder, CONFIG_NAME))
        fsync_dir(folder)
    except BaseException:
        for tmp in temps:
            _remove(tmp)
        raise
    for name in (*WEIGHT_NAMES, CONFIG_NAME):
        _remove(os.path.join(folder, _backup_name(name)))
    fsync_dir(folder)


# ---------------------------------------------------------------------------------- reading


def _unpickler_cause(exc: BaseException) -> str:
    """The informative line of torch's weights_only error (without its advice to unpickle freely)."""
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s+Please use|\n\n|$)", text, re.S)
    cause = match.group(1) if match else text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return " ".join(cause.split()).rstrip(".")


def load_weights_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of one weights file: safetensors, or a ``.bin`` through ``torch.load(weights_only=True)``
    (never an unrestricted pickle)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No weights file at {path}")
    if not path.endswith((".bin", ".bin.prev")):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # the restricted unpickler raises many types
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True), so it was not loaded: deltatune never "
            f"runs an unrestricted pickle, which could execute code. Cause: {_unpickler_cause(exc)}. If you trust the "
            "file, convert it to safetensors; otherwise ask its author for adapter_model.safetensors."
        ) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{path} does not hold a dict of named tensors (it holds a {type(data).__name__})")
    return data


def load_tensors(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an adapter's weights: ``adapter_model.safetensors`` if present, else ``adapter_model.bin``
    through ``torch.load(weights_only=True)`` (never an unrestricted pickle)."""
    files = checkpoint_files(folder)
    if files.weights is None:
        raise FileNotFoundError(f"No {SAFETENSORS_NAME} or {BIN_NAME} found in {os.fspath(folder)}")
    return load_weights_file(files.weights, device)


def resolve_local_dir(path: str | os.PathLike, subfolder: Optional[str] = None) -> str:
    """A local folder for ``path``. Hub ids are fetched only when ``huggingface_hub`` is installed and
    the hub is reachable; otherwise the error says so in one line."""
    path = os.fspath(path)
    local = os.path.join(path, subfolder) if subfolder else path
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise ValueError(f"{local} is a file; from_pretrained needs the folder that holds adapter_config.json")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.isabs(path)
    if looks_like_hub_id and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(path, allow_patterns=["adapter_*", "*/adapter_*"], etag_timeout=5)
            local = os.path.join(folder, subfolder) if subfolder else folder
            if os.path.isdir(local):
                return local
        except Exception as exc:  # any hub failure becomes the one clear message below
            raise FileNotFoundError(
                f"{path!r} is not a local folder and could not be fetched from the Hugging Face Hub ({type(exc).__name__}). "
                "Pass the path of a folder containing adapter_config.json."
            ) from None
    raise FileNotFoundError(
        f"{local!r} is not a local folder (and the Hugging Face Hub is not used offline). "
        "Pass the path of a folder containing adapter_config.json."
    )


_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation", "SEQ_2_SEQ_LM": "text2text-generation", "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification", "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction",
}


def model_card_text(config: dict) -> str:
    """A model card (README.md) as PEFT writes one: Hub metadata (library, base model, tags,
    pipeline), then the adapter's method, base model, config and how to load it."""
    base = config.get("base_model_name_or_path")
    method = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    task = config.get("task_type")
    task = None if task is None else str(getattr(task, "value", task))
    meta = ["---", "library_name: peft"]
    if base:
        meta.append(f"base_model: {json.dumps(base)}")
    tags = ([f"base_model:adapter:{base}"] if base else []) + [method.lower(), "deltatune"]
    meta.append("tags:")
    meta += [f"- {json.dumps(t)}" for t in tags]
    if task in _PIPELINE_TAGS:
        meta.append(f"pipeline_tag: {_PIPELINE_TAGS[task]}")
    meta.append("---")
    shown = {k: (sorted(v) if isinstance(v, set) else getattr(v, "value", v)) for k, v in config.items()}
    body = [
        "",
        f"# {method} adapter" + (f" for {base}" if base else ""),
        "",
        f"A {method} adapter in Hugging Face PEFT's format (`adapter_config.json`, `adapter_model.safetensors`)"
        + (f" for the base model `{base}`" if base else "") + (f", task `{task}`" if task else "") + ".",
        "",
        "## How to load",
        "",
        "```python",
        "from peft import PeftModel  # or: from deltatune import PeftModel",
        "",
        f"model = PeftModel.from_pretrained(base_model, {json.dumps('path/to/this/folder')})",
        "```",
        "",
        "## Adapter config",
        "",
        "```json",
        json.dumps(shown, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "### Framework versions",
        "",
        f"- deltatune {__version__}",
        "",
    ]
    return "\n".join(meta + body)


def write_model_card(folder: str, config: dict) -> None:
    """``folder/README.md`` for an adapter saved there; a README already there is kept."""
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        return
    atomic_write_text(path, model_card_text(config))


def ensure_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"Provided path ({p}) should be a directory, not a file")
    p.mkdir(parents=True, exist_ok=True)
    return p
