"""Property-based tests (hypothesis) over configs and checkpoint contents.

Whatever a config or a checkpoint folder holds, deltatune either works or raises one of its
documented errors, and a failed load leaves the model exactly as it was:

- ValueError, with its subclasses CheckpointError (unusable checkpoint), NoMatchingModuleError
  (targets nothing) and UnsupportedModuleError (also a TypeError: a layer type the method cannot adapt);
- FileNotFoundError (no config or weights);
- NotImplementedError (an unknown ``bias`` value, as in PEFT).

Every method registered in ``deltatune.core.registry.METHODS`` is covered, including methods that
land later. Runs are derandomized (CI sees the same examples every time) and bounded; set
DELTATUNE_FUZZ_EXAMPLES=1000 DELTATUNE_FUZZ_RANDOM=1 for a deeper, random search.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.config import MissingConfigKeysError
import deltatune.methods
from conftest import build, out_of
from deltatune.config import _field_hints
from deltatune.core.registry import METHODS
from models import randomize_adapters
from test_reliability import Snapshot

DOCUMENTED = (ValueError, NotImplementedError, FileNotFoundError)

FUZZ = settings(
    max_examples=int(os.environ.get("DELTATUNE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    derandomize=not os.environ.get("DELTATUNE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def _register_all_methods() -> list[str]:
    """Import every public module of deltatune.methods so that methods not yet imported by the
    package register too."""
    for info in pkgutil.iter_modules(deltatune.methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"deltatune.methods.{info.name}")
    return sorted(METHODS)


PEFT_TYPES = _register_all_methods()
# small sizes that fit the test MLP (lin0 10→20, lin1 20→8); a new method works with {} or gets a line
SMALL = {"ADALORA": {"total_step": 10, "init_r": 4, "target_r": 2}, "BONE": {"r": 2}, "MISS": {"r": 2}, "FOURIERFT": {"n_frequency": 8}, "RANDLORA": {"r": 4}}


def baseline(peft_type: str) -> dict:
    cls = METHODS[peft_type].config_cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return json.loads(cls(target_modules=["lin0", "lin1"], **SMALL.get(peft_type, {})).to_json_string())


def attempt(fn):
    """(result, None) or (None, documented error); anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = fn()
            event("ok")
            return result, None
        except DOCUMENTED as exc:
            event(type(exc).__name__)
            if isinstance(exc, TypeError):  # only these two are both (PEFT raises TypeErrors for them)
                assert isinstance(exc, (dt.UnsupportedModuleError, MissingConfigKeysError)), repr(exc)
            assert str(exc), f"{type(exc).__name__} without a message"
            return None, exc


# ==================================================================================== values

json_scalars = (
    st.none() | st.booleans() | st.integers(-3, 40) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
# plausible values reach the checks behind the type checks (ranges, targeting, injection)
names = st.sampled_from(["lin0", "lin1", "relu", "drop", "nope", "lin.*", "lin[01]", ".*", "lin0.base_layer", ""])
plausible = st.one_of(
    st.integers(-2, 24),
    st.floats(-1.0, 2.0),
    st.booleans(),
    st.none(),
    names,
    st.lists(names, max_size=3),
    st.sampled_from(["none", "all", "bone_only", "lora_only", "bat", "mini", "CAUSAL_LM", "SEQ_CLS", "gaussian", "pissa"]),
    st.dictionaries(names, st.integers(-1, 12), max_size=2),
    st.dictionaries(st.sampled_from(["lin0.lora_E", "lin1.lora_E"]), st.lists(st.booleans(), max_size=5), max_size=2),
)
field_values = st.one_of(json_values, plausible, plausible)


@st.composite
def config_dicts(draw):
    peft_type = draw(st.sampled_from(PEFT_TYPES))
    data = baseline(peft_type)
    fields = sorted(_field_hints(METHODS[peft_type].config_cls))
    for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        data[name] = draw(field_values)
    for name in draw(st.lists(st.text(min_size=1, max_size=6), max_size=2)):
        data.setdefault(f"future_{name}", draw(json_values))
    return data


# ==================================================================================== configs


@FUZZ
@given(data=config_dicts())
def test_random_config_fields_build_round_trip_or_fail_clearly(data):
    config, error = attempt(lambda: dt.PeftConfig.from_peft_type(**data))
    if error:
        return
    # whatever loads is written back as JSON and reads back the same
    text = config.to_json_string()
    again, error = attempt(lambda: dt.PeftConfig.from_peft_type(**json.loads(text)))
    assert error is None, f"{error!r} when reading back {text}"
    assert again.to_dict() == config.to_dict()
    # and either adapts the model or fails clearly, leaving a loadable checkpoint when it works
    base, inputs = build("mlp")
    model, error = attempt(lambda: dt.get_peft_model(base, config))
    if error:
        return
    randomize_adapters(model, seed=1)
    expected = out_of(model.eval(), inputs)
    folder = tempfile.mkdtemp()
    try:
        model.save_pretrained(folder)
        loaded, error = attempt(lambda: dt.PeftModel.from_pretrained(build("mlp")[0], folder))
        assert error is None, f"a config that builds must reload: {error!r}"
        torch.testing.assert_close(out_of(loaded, inputs), expected, rtol=1e-4, atol=1e-4, equal_nan=True)
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(config=st.one_of(json_values, config_dicts()), raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_random_config_files_load_or_fail_clearly_without_changing_the_model(config, raw):
    folder = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(_checkpoint("BONE"), folder, dirs_exist_ok=True)
        (folder / "adapter_config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
        _load_untouched(folder)
    finally:
        shutil.rmtree(folder)


# ==================================================================================== checkpoints

_CHECKPOINTS: dict[str, Path] = {}


def _checkpoint(peft_type: str) -> Path:
    """A saved, trained checkpoint of ``peft_type`` on the MLP (made once per session)."""
    if peft_type not in _CHECKPOINTS:
        folder = Path(tempfile.mkdtemp(prefix=f"fuzz-{peft_type}-"))
        base, _ = build("mlp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = dt.get_peft_model(base, dt.PeftConfig.from_peft_type(**baseline(peft_type)))
        randomize_adapters(model, seed=2)
        model.save_pretrained(folder)
        _CHECKPOINTS[peft_type] = folder
    return _CHECKPOINTS[peft_type]


@pytest.fixture(scope="module", autouse=True)
def _cleanup_checkpoints():
    yield
    for folder in _CHECKPOINTS.values():
        shutil.rmtree(folder, ignore_errors=True)
    _CHECKPOINTS.clear()


def _load_untouched(folder: Path, live: bool = False):
    """Load ``folder`` into a fresh base model (or a live PeftModel): it works, or fails with a
    documented error and the model is exactly as before."""
    base, inputs = build("mlp")
    if live:
        base = dt.get_peft_model(base, dt.BoneConfig(r=5, target_modules=["lin0"]))
        randomize_adapters(base, seed=3)
    snap = Snapshot(base, inputs)
    if live:
        result, error = attempt(lambda: base.load_adapter(folder, adapter_name="incoming"))
    else:
        result, error = attempt(lambda: dt.PeftModel.from_pretrained(base, folder))
    if error is not None:
        snap.check()
    else:
        out_of(result if not live else base, inputs)  # a loaded model runs
    return error


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool]


@st.composite
def state_dict_edits(draw):
    peft_type = draw(st.sampled_from(PEFT_TYPES))
    tensors = load_file(_checkpoint(peft_type) / "adapter_model.safetensors")
    keys = sorted(tensors)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "add", "reshape", "dtype", "nonfinite", "rename"]))
        key = draw(st.sampled_from(keys))
        if key not in tensors:
            continue
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        if op == "drop":
            tensors.pop(key)
        elif op == "add":
            tensors[draw(st.sampled_from([key + "_x", "base_model.model.lin0.extra", "x", key.replace("lin", "layer")]))] = torch.zeros(shape)
        elif op == "reshape":
            tensors[key] = torch.randn(shape) if tensors[key].numel() else torch.zeros(shape)
        elif op == "dtype":
            tensors[key] = tensors[key].to(draw(st.sampled_from(DTYPES)))
        elif op == "nonfinite" and tensors[key].is_floating_point() and tensors[key].numel():
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        elif op == "rename":
            tensors[key.replace("base_model.model.", draw(st.sampled_from(["", "base_model.", "model."])), 1)] = tensors.pop(key)
    return peft_type, tensors, draw(st.booleans())


@FUZZ
@given(edit=state_dict_edits())
def test_random_checkpoint_contents_load_or_fail_clearly_without_changing_the_model(edit):
    peft_type, tensors, live = edit
    folder = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(_checkpoint(peft_type), folder, dirs_exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        _load_untouched(folder, live=live and peft_type == "BONE")
    finally:
        shutil.rmtree(folder)


@st.composite
def byte_edits(draw):
    peft_type = draw(st.sampled_from(PEFT_TYPES))
    data = bytearray((_checkpoint(peft_type) / "adapter_model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    kind = draw(st.sampled_from(["truncate", "flip-header", "flip-anywhere", "append", "random"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind in ("flip-header", "flip-anywhere"):
        end = header if kind == "flip-header" else len(data)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=32))
    else:
        data = bytearray(draw(st.binary(max_size=256)))
    return peft_type, bytes(data), draw(st.booleans())


@FUZZ
@given(edit=byte_edits())
def test_corrupted_weight_bytes_load_or_fail_clearly_without_changing_the_model(edit):
    peft_type, data, as_bin = edit
    folder = Path(tempfile.mkdtemp())
    try:
        shutil.copytree(_checkpoint(peft_type), folder, dirs_exist_ok=True)
        if as_bin:  # the same bytes as a .bin: torch.load(weights_only=True) must refuse or read them safely
            (folder / "adapter_model.safetensors").unlink()
            (folder / "adapter_model.bin").write_bytes(data)
        else:
            (folder / "adapter_model.safetensors").write_bytes(data)
        error = _load_untouched(folder)
        if as_bin:
            assert isinstance(error, dt.CheckpointError), repr(error)
    finally:
        shutil.rmtree(folder)
