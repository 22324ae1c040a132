"""``deltatune merge``: base model + adapter -> a plain transformers model folder.

The folder is complete: ``transformers.AutoModelFor*.from_pretrained(folder)`` alone builds the
merged model, every weight (head and pooler included) comes from the folder, and its outputs are
deltatune's. That holds because the CLI trains transformers' own classes, unchanged (its default
classifier is MiniLM as ``BertForSequenceClassification``, the head on the CLS pooler; see
:mod:`.models`), and merging leaves only their own modules; :func:`check_plain` refuses a model
holding any module transformers would not build from the config.

The adapter is loaded with :meth:`deltatune.PeftModel.from_pretrained` and merged in place
(``merge_and_unload``: every method, additive or weight transform, through the library's one merge
path, with the NaN/inf check first). The weights are then written *streaming*: the safetensors
header is computed from shapes and dtypes alone, and each tensor's bytes go to disk one after the
other, so no second copy of the model (nor a serialized blob of it) is ever held in memory. Each
file is written to a temporary name in the destination folder, flushed, and renamed over the
target (the same atomic protocol as :func:`deltatune.io.files.atomic_write_bytes`): an interrupted
merge leaves either the previous file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .options import UsageError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"123"`` (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UsageError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    size = int(number * base ** "_KMGT".index(unit or "_"))
    if size <= 0:
        raise UsageError(f"--max-shard-size must be positive, got {text!r}")
    return size


# --------------------------------------------------------------------------- streaming safetensors


@contextlib.contextmanager
def atomic_stream(path: Path) -> Iterator[Any]:
    """A binary file handle whose content replaces ``path`` only once it is complete and on disk."""
    from deltatune.io.files import fsync_dir

    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; a model folder is shared like any other file
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(str(folder))


def _dtype_name(tensor: Any) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"cannot write tensor of dtype {tensor.dtype} to safetensors")
    return _DTYPES[name]


def write_safetensors_streaming(path: Path, tensors: list[tuple[str, Any]], metadata: Optional[dict] = None) -> int:
    """Write ``(name, tensor)`` pairs as one safetensors file, one tensor at a time; returns its size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _dtype_name(tensor), "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    import torch

    with atomic_stream(path) as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for _, tensor in tensors:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                handle.write(memoryview(flat.view(torch.uint8).numpy()))
    return 8 + len(raw) + offset


def unique_state(model: Any) -> list[tuple[str, Any]]:
    """The model's state dict with tied tensors kept once (the first name; transformers re-ties them)."""
    seen: set[tuple[int, int, tuple]] = set()
    out = []
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return out


def write_weights(model: Any, output: Path, max_shard_bytes: int) -> list[str]:
    """Write the weights as ``model.safetensors`` or numbered shards plus an index; returns the file names."""
    from deltatune.io.files import atomic_write_text

    tensors = unique_state(model)
    shards: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for file_name, shard in zip(names, shards):
        write_safetensors_streaming(output / file_name, shard)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in tensors)},
            "weight_map": {name: file_name for file_name, shard in zip(names, shards) for name, _ in shard},
        }
        atomic_write_text(output / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    # weights from an earlier merge with another sharding must not be picked up next to the new ones
    keep = set(names) | ({INDEX_NAME} if len(shards) > 1 else set())
    for stale in [*output.glob("model*.safetensors"), output / INDEX_NAME, output / "pytorch_model.bin"]:
        if stale.is_file() and stale.name not in keep:
            stale.unlink()
    return names


# --------------------------------------------------------------------------- the command


def _task_of(config: Any, base: Optional[str], task: str) -> Any:
    from .tasks import TASKS, detect_task

    if task == "auto" and base is None and config.task_type not in {t.task_type for t in TASKS.values()}:
        raise UsageError(f"the adapter has no task_type: pass --task ({' or '.join(TASKS)}) and --base")
    return detect_task(task, base, config.task_type)


def check_plain(model: Any) -> None:
    """Refuse a merged model that transformers could not rebuild from its config alone: a module
    from outside transformers/torch (a replaced pooler, a leftover adapter layer) would be lost or
    re-initialised by ``from_pretrained``."""
    foreign = sorted({f"{name or '<root>'} ({type(m).__module__}.{type(m).__name__})"
                      for name, m in model.named_modules()
                      if not type(m).__module__.startswith(("transformers.", "torch."))})
    if foreign:
        raise UsageError(f"the merged model holds modules transformers does not build from config.json, so a "
                         f"saved folder would not reproduce it: {', '.join(foreign[:5])}")


def _base_path(config: Any, base: Optional[str]) -> Optional[str]:
    if base is not None:
        return base
    recorded = config.base_model_name_or_path
    if recorded and Path(recorded).expanduser().exists():
        return recorded
    return None  # the CLI's default model of the task


def _num_labels(folder: Path) -> tuple[int, Optional[list[str]]]:
    """Classes of the adapter's head (its saved weight), and label names if ``deltatune train`` wrote them."""
    from deltatune.io.files import load_tensors

    tensors = load_tensors(folder)
    rows = [t.shape[0] for k, t in tensors.items() if re.search(r"(^|\.)(classifier|score)(\.out_proj)?\.weight$", k)]
    names = None
    metrics = folder / "metrics.json"
    if metrics.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            names = json.loads(metrics.read_text(encoding="utf-8")).get("label_names")
    if not rows:
        raise UsageError(f"{folder}: the adapter holds no classification head (classifier/score); use --task lm")
    if names is not None and len(names) != rows[-1]:
        names = None
    return rows[-1], names


def run_merge(
    adapter: str,
    output: str,
    base: Optional[str] = None,
    task: str = "auto",
    max_shard_size: str = "5GB",
    safe_merge: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    import deltatune as dt
    from deltatune.io.files import atomic_write_text

    folder = Path(adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise UsageError(f"{str(folder)!r} is not an adapter folder (no adapter_config.json)")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} is a file, not a folder")
    max_bytes = parse_size(max_shard_size)
    from .options import registered_methods

    registered_methods()  # methods that landed as files but not in deltatune/__init__ register here
    config = dt.PeftConfig.from_pretrained(str(folder))
    base_path = _base_path(config, base)
    kind = _task_of(config, base_path, task)
    for protected in [folder, Path(base_path).expanduser() if base_path else None]:
        if protected is not None and out.resolve() == protected.resolve():
            raise UsageError(f"--output {str(out)!r} is the {'adapter' if protected == folder else 'base model'} folder; pick a new folder")

    if kind.has_head:
        num_labels, names = _num_labels(folder)
        model, tokenizer = kind.load_model(base_path, names or [f"LABEL_{i}" for i in range(num_labels)])
    else:
        model, tokenizer = kind.load_model(base_path, [])
    peft_model = dt.PeftModel.from_pretrained(model, str(folder))
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    merged.eval()
    check_plain(merged)

    out.mkdir(parents=True, exist_ok=True)
    files = write_weights(merged, out, max_bytes)
    config_json = merged.config.to_json_string(use_diff=True) if hasattr(merged.config, "to_json_string") else None
    if config_json is not None:
        if "quantization_config" in config_json:  # a dequantized GGUF model is plain floats now
            data = json.loads(config_json)
            data.pop("quantization_config", None)
            config_json = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write_text(out / "config.json", config_json)
    generation = getattr(merged, "generation_config", None)
    if generation is not None and not kind.has_head:
        atomic_write_text(out / "generation_config.json", generation.to_json_string(use_diff=True))
    tokenizer.save_pretrained(str(out))
    size = sum((out / f).stat().st_size for f in files)
    log(f"merged {config.peft_type} adapter {folder} into {base_path or kind.default_model}: "
        f"{out} ({', '.join(files)}, {size / 1e6:.1f} MB); load it with transformers.{kind.auto_class}.from_pretrained")
    return out
