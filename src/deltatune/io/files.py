"""Files on disk: atomic writes, local-folder resolution, and safe tensor reads (no pickle).

Each write goes to a temporary file in the destination folder, is flushed to disk, then renamed
over the target: a process killed at any point leaves the old file or the new one, never half a
file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, or not matching the model."""


def _fsync_dir(path: str) -> None:
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, safe_serialization: bool = True) -> None:
    """Write ``tensors`` atomically as safetensors (default) or a torch ``.bin``."""
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

        data = save(clean, metadata={"format": "pt"})
    else:
        import io

        buf = io.BytesIO()
        torch.save(clean, buf)
        data = buf.getvalue()
    atomic_write_bytes(path, data)


def load_tensors(folder: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read an adapter's weights: ``adapter_model.safetensors`` if present, else ``adapter_model.bin``
    through ``torch.load(weights_only=True)`` (never an unrestricted pickle)."""
    folder = os.fspath(folder)
    st = os.path.join(folder, SAFETENSORS_NAME)
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(st, device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{st} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    binf = os.path.join(folder, BIN_NAME)
    if os.path.isfile(binf):
        try:
            data = torch.load(binf, map_location=device, weights_only=True)
        except Exception as exc:  # the restricted unpickler raises many types
            raise CheckpointError(
                f"{binf} could not be read with torch.load(weights_only=True), so it was not loaded (deltatune never "
                f"runs an unrestricted pickle). Convert it to safetensors with a tool you trust. Cause: {exc}"
            ) from exc
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
            raise CheckpointError(f"{binf} does not hold a dict of named tensors")
        return data
    raise FileNotFoundError(f"No {SAFETENSORS_NAME} or {BIN_NAME} found in {folder}")


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


def write_model_card(folder: str, base_model: Optional[str]) -> None:
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        return
    lines = ["---", "library_name: peft"]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    lines += ["tags:", "- deltatune", "---", "", "# Adapter", "", "Saved with deltatune in PEFT's format.", ""]
    atomic_write_text(path, "\n".join(lines))


def ensure_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"Provided path ({p}) should be a directory, not a file")
    p.mkdir(parents=True, exist_ok=True)
    return p
