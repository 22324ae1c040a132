"""Checkpoints from strangers and saves that get killed.

- No pickle: a .bin is read only through torch.load(weights_only=True); a malicious one runs no code.
- Atomic saves: a real saving process SIGKILLed at every filesystem call of a save, and at random
  points of a save loop, always leaves a folder that loads as the old or the new checkpoint.
- Every bad input gets one clear error, and the model is exactly as before (fresh base model with
  from_pretrained, live PeftModel with load_adapter).
- Compatibility: unknown fields from newer versions, PEFT reading our configs, legacy MiSS files.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from conftest import build, out_of
from models import ConvNet, randomize_adapters

HERE = Path(__file__).resolve().parent
CHECKPOINT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def _bone(r=2, targets=("lin0", "lin1"), **kw):
    return dt.BoneConfig(r=r, target_modules=list(targets), **kw)


def _saved(folder, config=None, seed=1, **save_kw):
    base, inputs = build("mlp")
    model = dt.get_peft_model(base, config or _bone())
    randomize_adapters(model, seed=seed)
    if config is None or isinstance(config, dt.BoneConfig):  # the Bone format these tests name (default: MiSS)
        save_kw.setdefault("peft_format", "BONE")
    model.save_pretrained(folder, **save_kw)
    return model, inputs


def _adapter_state(model, name="default"):
    return dt.get_peft_model_state_dict(model.base_model, name)


def _identical(a, b):
    """Bit-for-bit equal values, NaN included."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _same_tensors(a, b):
    return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)


def _caught(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in seen]


# ==================================================================================== snapshots


class Snapshot:
    """Everything a failed load must leave as it was."""

    def __init__(self, model, inputs):
        self.model, self.inputs = model, inputs
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.modules = [(k, type(m)) for k, m in model.named_modules()]
        self.grads = {n: p.requires_grad for n, p in model.named_parameters()}
        self.training = [m.training for m in model.modules()]
        self.out = out_of(model, inputs).detach().clone()
        self.peft = dict(model.peft_config) if isinstance(model, dt.PeftModel) else None
        self.active = list(model.active_adapters) if isinstance(model, dt.PeftModel) else None
        self.has_attr = "peft_config" in model.__dict__

    def check(self):
        m = self.model
        assert [(k, type(x)) for k, x in m.named_modules()] == self.modules
        state = m.state_dict()
        assert state.keys() == self.state.keys()
        assert all(_identical(state[k], v) for k, v in self.state.items())
        assert {n: p.requires_grad for n, p in m.named_parameters()} == self.grads
        assert [x.training for x in m.modules()] == self.training
        assert _identical(out_of(m, self.inputs), self.out)
        if self.peft is not None:
            assert m.peft_config == self.peft and m.active_adapters == self.active
        assert ("peft_config" in m.__dict__) == self.has_attr


def assert_refused_untouched(folder, error, match):
    """``folder`` fails with ``error``/``match`` in from_pretrained (fresh base) and load_adapter
    (live model); neither model changes. Returns the message."""
    base, inputs = build("mlp")
    snap = Snapshot(base, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match) as info:
            dt.PeftModel.from_pretrained(base, folder)
    snap.check()
    live_base, inputs = build("mlp")
    live = dt.get_peft_model(live_base, _bone(r=5, targets=["lin0"]))
    randomize_adapters(live, seed=7)
    snap = Snapshot(live, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            live.load_adapter(folder, adapter_name="incoming")
    snap.check()
    return str(info.value)


# ==================================================================================== 1. no pickle


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("container", ["torch.save", "raw-pickle"])
def test_malicious_pickle_runs_no_code_and_is_refused_clearly(container, tmp_path):
    _saved(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    payload = {"base_model.model.lin0.bone_block": _RunsCode(marker)}
    if container == "torch.save":
        torch.save(payload, tmp_path / "adapter_model.bin")
    else:
        (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(payload, protocol=2))
    message = assert_refused_untouched(
        tmp_path, dt.CheckpointError, r"could not be read with torch.load\(weights_only=True\), so it was not loaded"
    )
    assert not marker.exists(), "the pickle ran code"
    assert "never runs an unrestricted pickle" in message and "weights_only` set to `False`" not in message
    if container == "torch.save":
        assert "Unsupported global: GLOBAL exec" in message


def test_bin_checkpoints_load_and_non_dict_bins_are_refused(tmp_path):
    model, inputs = _saved(tmp_path, safe_serialization=False)
    loaded = dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path)
    assert _same_tensors(_adapter_state(loaded), _adapter_state(model))
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    assert_refused_untouched(tmp_path, dt.CheckpointError, "does not hold a dict of named tensors")


def test_safetensors_wins_over_bin_and_a_save_removes_the_other_format(tmp_path):
    model, _ = _saved(tmp_path, safe_serialization=False)
    model.save_pretrained(tmp_path)  # safetensors now: the old .bin must go (the loader prefers safetensors)
    assert {p.name for p in tmp_path.iterdir()} == CHECKPOINT_FILES
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.bin", "README.md"}


# ==================================================================================== 2. atomic saves


class Worker:
    """tests/save_worker.py: forks the saving processes that get killed."""

    def __init__(self, root: Path):
        self.target, self.refs = root / "ckpt", root / "refs"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        self.log = root / "worker.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "save_worker.py"), str(self.target), str(self.refs)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            )
        self.calls_per_save = float(self.read("ready"))
        self.expected = {}
        for name in ("A", "B"):
            config = dt.PeftConfig.from_pretrained(self.refs / name)
            self.expected[name] = (load_file(self.refs / name / "adapter_model.safetensors"), config.to_dict())

    def read(self, word: str) -> str:
        line = self.proc.stdout.readline().split()
        assert line and line[0] == word, f"save_worker said {line!r}, expected {word!r}; its stderr:\n{self.log.read_text()}"
        return " ".join(line[1:])

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line, f"save_worker exited; its stderr:\n{self.log.read_text()}"
        return line

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def identify(self) -> tuple[str, list[str]]:
        """Load the target with deltatune; return which complete checkpoint it is, and the warnings."""
        base, _ = build("mlp")
        model, messages = _caught(lambda: dt.PeftModel.from_pretrained(base, self.target))
        state = _adapter_state(model)
        config = model.peft_config["default"].to_dict()
        for name, (tensors, ref_config) in self.expected.items():
            if _same_tensors(state, tensors):
                assert config == ref_config, f"weights of {name} with another config"
                return name, messages
        raise AssertionError("the folder holds neither complete checkpoint")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("save_worker.py forks the processes it kills (POSIX only)")
    w = Worker(tmp_path_factory.mktemp("kill"))
    yield w
    w.close()


TRANSITIONS = [("A", "st", "B", "st"), ("B", "st", "A", "st"), ("A", "st", "B", "bin"), ("B", "bin", "A", "st")]


@pytest.mark.parametrize("old,old_fmt,new,new_fmt", TRANSITIONS, ids=["-".join(t) for t in TRANSITIONS])
def test_sigkill_at_every_filesystem_call_of_a_save_leaves_old_or_new(worker, old, old_fmt, new, new_fmt):
    outcomes, via_backup = [], 0
    for k in range(1, 200):
        assert worker.ask(f"save {old} {old_fmt}") == "saved"
        reply = worker.ask(f"die {new} {new_fmt} {k}")
        assert reply in ("died", "done"), reply
        name, messages = worker.identify()
        outcomes.append(name)
        via_backup += any("interrupted" in m for m in messages)
        if reply == "done":
            break
    else:
        raise AssertionError("the save never finished")
    assert outcomes[0] == old and outcomes[-1] == new
    # once the new checkpoint is visible, a later kill point never brings the old one back
    assert outcomes == sorted(outcomes, key=lambda n: n == new)
    if new_fmt == "st" or old_fmt == "st":
        assert via_backup, "no kill point fell between the two renames"


def test_sigkill_at_random_points_of_a_save_loop(worker):
    """Kills from outside at seeded random points of a loop of saves (A, B, A, ...), each starting
    from whatever the previous killed loop left: the worker's child stops at the chosen filesystem
    call and says so, then it is killed (no timing involved)."""
    rng = random.Random(8)
    seen = []
    for _ in range(40):  # the kill points span about two and a half saves
        k = rng.randint(1, int(2.5 * worker.calls_per_save))
        assert worker.ask(f"loop {k}").startswith("pid ")
        assert worker.ask("kill") == "killed"
        seen.append(worker.identify()[0])
    assert set(seen) == {"A", "B"}, seen
    # the next complete save removes what the killed processes left behind
    assert worker.ask("save A st") == "saved"
    assert {p.name for p in worker.target.iterdir()} == CHECKPOINT_FILES


def _replace_with(source, target):
    """What a save does to a live file: a new file renamed over it (never a write in place)."""
    shutil.copy(source, target.with_name("incoming.tmp"))
    os.replace(target.with_name("incoming.tmp"), target)


def test_interrupted_save_states_resolve_to_a_complete_pair(tmp_path):
    """The protocol's states, built by hand: between the renames, after the commit, edited by hand."""
    a, b = tmp_path / "a", tmp_path / "b"
    model_a, _ = _saved(a, _bone(r=2), seed=1)
    model_b, _ = _saved(b, _bone(r=4), seed=2)
    folder = tmp_path / "ckpt"
    shutil.copytree(a, folder)
    # killed between the two renames: B's weights beside A's config, A's pair kept as backups
    os.link(folder / "adapter_model.safetensors", folder / ".adapter_model.safetensors.prev")
    shutil.copy(folder / "adapter_config.json", folder / ".adapter_config.json.prev")
    _replace_with(b / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    loaded, messages = _caught(lambda: dt.PeftModel.from_pretrained(build("mlp")[0], folder))
    assert _same_tensors(_adapter_state(loaded), _adapter_state(model_a))
    assert any("interrupted before adapter_config.json was replaced" in m for m in messages)
    with pytest.warns(UserWarning, match="interrupted"):  # the CLI reads weights through load_tensors
        assert _same_tensors(dt.io.files.load_tensors(folder), load_file(a / "adapter_model.safetensors"))
    # killed after the commit, before the backups were deleted: the new pair is consistent and wins
    _replace_with(b / "adapter_config.json", folder / "adapter_config.json")
    loaded, messages = _caught(lambda: dt.PeftModel.from_pretrained(build("mlp")[0], folder))
    assert _same_tensors(_adapter_state(loaded), _adapter_state(model_b)) and not messages
    # a config edited by hand after saving (no backups): loaded as it is, with a warning
    for p in folder.glob(".*.prev"):
        p.unlink()
    data = json.loads((folder / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = "edited/by-hand"
    (folder / "adapter_config.json").write_text(json.dumps(data))
    loaded, messages = _caught(lambda: dt.PeftModel.from_pretrained(build("mlp")[0], folder))
    assert _same_tensors(_adapter_state(loaded), _adapter_state(model_b))
    assert any("differs from the config adapter_model.safetensors was saved with" in m for m in messages)
    # and the next save starts from that pair
    model_a.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES


def test_saved_pair_is_plain_peft_format_and_world_readable(tmp_path):
    _saved(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as fh:
        meta = fh.metadata()
    import hashlib

    digest = hashlib.sha256((tmp_path / "adapter_config.json").read_bytes()).hexdigest()
    assert meta.pop("deltatune_layer_shapes") == '{"base_model.model.lin0": [20, 10], "base_model.model.lin1": [8, 20]}'
    assert meta == {"format": "pt", "deltatune_config_sha256": digest}
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    _saved(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".adapter_model.safetensors.{dead}.abc123.tmp"
    mine = tmp_path / f".adapter_model.safetensors.{os.getpid()}.zzz.tmp"
    foreign = tmp_path / f".notes.{dead}.draft.tmp"  # not a checkpoint file: never touched
    for p in (stale, mine, foreign):
        p.write_bytes(b"x")
    _saved(tmp_path)
    assert not stale.exists() and mine.exists() and foreign.exists()


# ==================================================================================== 3. bad inputs


def _edit_config(**changes):
    def edit(folder):
        data = json.loads((folder / "adapter_config.json").read_text())
        for k, v in changes.items():
            if v is _DROP:
                data.pop(k, None)
            else:
                data[k] = v
        (folder / "adapter_config.json").write_text(json.dumps(data))

    return edit


_DROP = object()


def _write(name, data):
    def edit(folder):
        path = folder / name
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)

    return edit


def _remove(name):
    def edit(folder):
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return edit


def _config_is_a_folder(folder):
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").mkdir()


def _weights(change):
    def edit(folder):
        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    return edit


def _truncate(fraction):
    def edit(folder):
        path = folder / "adapter_model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])

    return edit


def _scramble_header(folder):
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00\xff" * 16
    path.write_bytes(bytes(data))


L0, L1 = "base_model.model.lin0.bone_block", "base_model.model.lin1.bone_block"

# id, edit of a saved Bone checkpoint (r=2 on lin0 and lin1), error, message (regex)
BAD_INPUTS = [
    ("config-missing", _remove("adapter_config.json"), FileNotFoundError, "No adapter config found at .*adapter_config.json"),
    ("config-is-a-folder", _config_is_a_folder, ValueError, "adapter_config.json is not a file"),
    ("config-not-utf8", _write("adapter_config.json", b"\xff\xfe{"), ValueError, "Cannot read adapter config .*utf-8"),
    ("config-invalid-json", _write("adapter_config.json", "{not json"), ValueError, "is not valid JSON"),
    ("config-deeply-nested", _write("adapter_config.json", "[" * 100000 + "]" * 100000), ValueError, "is not valid JSON"),
    ("config-not-an-object", _write("adapter_config.json", "[1, 2]"), ValueError, "must hold a JSON object, got list"),
    ("no-peft-type", _edit_config(peft_type=_DROP), ValueError, "missing required keys: \\{'peft_type'\\}"),
    ("unknown-peft-type", _edit_config(peft_type="LORA"), ValueError, "Unknown peft_type 'LORA'; deltatune supports"),
    ("peft-type-not-a-string", _edit_config(peft_type=7), ValueError, "Unknown peft_type '7'"),
    ("r-is-a-string", _edit_config(r="2"), ValueError, r"BoneConfig: `r` must be an int, got '2' \(str\)"),
    ("r-is-a-float", _edit_config(r=2.0), ValueError, r"`r` must be an int, got 2.0 \(float\)"),
    ("r-is-zero", _edit_config(r=0), ValueError, "`r` should be a positive integer value but the value passed is 0"),
    ("target-modules-int", _edit_config(target_modules=5), ValueError, "`target_modules` must be a string or a list of strings"),
    ("target-modules-mixed", _edit_config(target_modules=["lin0", 1]), ValueError, "`target_modules` must be a string or a list of strings"),
    ("inference-mode-string", _edit_config(inference_mode="yes"), ValueError, "`inference_mode` must be a bool"),
    ("bias-unknown", _edit_config(bias="weird"), NotImplementedError, "Requested bias: weird, is not implemented."),
    ("task-type-unknown", _edit_config(task_type="NOPE"), ValueError, "Invalid task type: 'NOPE'"),
    ("init-weights-unknown", _edit_config(init_weights="mini"), ValueError, "init_weights must be True, False or 'bat'"),
    ("miss-mini", _edit_config(peft_type="MISS", init_weights="mini", mini_r=2), ValueError, r"shape mismatch for base_model.model.lin0.miss_block: checkpoint \(2, 20\), model \(2, 2\)|init_weights='mini' cannot be added to a Bone model"),
    ("bat-not-divisible", _edit_config(init_weights="bat", r=3), ValueError, "must be fully divisible into \\[r, r\\] blocks. Module 'lin0'"),
    ("target-not-found", _edit_config(target_modules=["q_proj"]), ValueError, "Target modules .*q_proj.* not found in the base model"),
    ("target-unsupported-layer", _edit_config(target_modules=["lin0", "relu"]), dt.UnsupportedModuleError, "Target module 'relu' \\(ReLU\\) is not supported"),
    ("modules-to-save-missing", _edit_config(modules_to_save=["nope"]), ValueError, r"modules_to_save entries \['nope'\] match no module of MLP"),
    ("weights-missing", _remove("adapter_model.safetensors"), FileNotFoundError, "No adapter_model.safetensors or adapter_model.bin found"),
    ("weights-empty", _write("adapter_model.safetensors", b""), dt.CheckpointError, "is not a readable safetensors file .*header too small"),
    ("weights-truncated-header", _truncate(0.3), dt.CheckpointError, "is not a readable safetensors file"),
    ("weights-truncated-data", _truncate(0.97), dt.CheckpointError, "is not a readable safetensors file .*incomplete metadata"),
    ("weights-scrambled-header", _scramble_header, dt.CheckpointError, "is not a readable safetensors file"),
    ("missing-key", _weights(lambda t: t.pop(L1)), dt.CheckpointError, f"missing keys \\[{L1}\\] \\(the checkpoint was saved for other target modules"),
    ("unexpected-key", _weights(lambda t: t.update({"base_model.model.lin1.lora_A": torch.zeros(2, 2)})), dt.CheckpointError, r"unexpected keys \[base_model.model.lin1.lora_A\]"),
    ("shape-mismatch", _edit_config(r=4), dt.CheckpointError, rf"shape mismatch for {L0}: checkpoint \(2, 20\), model \(4, 20\) \(a different base model, or a config"),
    ("weights-of-another-model", _weights(lambda t: t.update({L0: torch.zeros(2, 64)})), dt.CheckpointError, rf"shape mismatch for {L0}: checkpoint \(2, 64\), model \(2, 20\)"),
    ("integer-weights", _weights(lambda t: t.update({L0: torch.zeros(2, 20, dtype=torch.int32)})), dt.CheckpointError, f"dtype mismatch for {L0}: checkpoint torch.int32, model torch.float32"),
    ("other-method-weights", _edit_config(peft_type="ADALORA", total_step=10), ValueError, ""),
]


@pytest.mark.parametrize("edit,error,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_one_clear_error_and_leaves_the_model_untouched(edit, error, match, tmp_path):
    _saved(tmp_path)
    edit(tmp_path)
    assert_refused_untouched(tmp_path, error, match)


def test_missing_folder_and_hub_ids_fail_clearly(tmp_path):
    assert_refused_untouched(tmp_path / "nowhere", FileNotFoundError, "is not a local folder")


def test_load_adapter_refusals_leave_the_live_model_untouched(tmp_path):
    _saved(tmp_path / "bone")
    _saved(tmp_path / "ada", dt.AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=["lin0"]))
    base, inputs = build("mlp")
    live = dt.get_peft_model(base, _bone(r=5, targets=["lin0"]))
    randomize_adapters(live, seed=3)
    snap = Snapshot(live, inputs)
    with pytest.raises(ValueError, match="Adapter with name 'default' already exists."):
        live.load_adapter(tmp_path / "bone", adapter_name="default")
    snap.check()
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types. Found BONE and ADALORA."):
        live.load_adapter(tmp_path / "ada", adapter_name="other")
    snap.check()
    # bias="all" makes every bias trainable when loaded for training: the refusal gives that back too
    _edit_config(bias="all", r=4)(tmp_path / "bone")
    with pytest.raises(dt.CheckpointError, match="shape mismatch"):
        live.load_adapter(tmp_path / "bone", adapter_name="other", is_trainable=True)
    snap.check()


ADD_REFUSALS = [
    (_bone(targets=["lin0", "relu"]), dt.UnsupportedModuleError, "Target module 'relu' \\(ReLU\\) is not supported"),
    (_bone(targets=["q_proj"]), dt.NoMatchingModuleError, "not found in the base model"),
    (_bone(r=3, init_weights="bat"), ValueError, "must be fully divisible into \\[r, r\\] blocks"),
    (dt.AdaLoraConfig(total_step=10, target_modules=["lin1"]), ValueError, "Cannot combine adapters with different peft types"),
    (_bone(modules_to_save=["nope"]), ValueError, "match no module"),
]


@pytest.mark.parametrize("config,error,match", ADD_REFUSALS)
def test_add_adapter_refusals_leave_the_model_untouched(config, error, match):
    base, inputs = build("mlp")
    live = dt.get_peft_model(base, _bone(r=5, targets=["lin0"]))
    randomize_adapters(live, seed=3)
    snap = Snapshot(live, inputs)
    with pytest.raises(error, match=match):
        live.add_adapter("other", config)
    snap.check()


def test_unsupported_layer_type_is_refused_before_any_change():
    base = ConvNet().eval()
    inputs = {"x": torch.ones(1, 3, 6, 6)}
    snap = Snapshot(base, inputs)
    with pytest.raises(dt.UnsupportedModuleError, match="Target module 'conv2d' \\(Conv2d\\) is not supported"):
        dt.get_peft_model(base, dt.BoneConfig(r=2, target_modules=["conv2d", "lin0"]))
    snap.check()


def test_nan_weights_load_with_a_warning_and_safe_merge_refuses_them(tmp_path):
    _saved(tmp_path)
    _weights(lambda t: t[L0].view(-1).__setitem__(3, float("inf")))(tmp_path)
    base, inputs = build("mlp")
    with pytest.warns(UserWarning, match=f"holds NaN or inf in \\[{L0}\\]"):
        model = dt.PeftModel.from_pretrained(base, tmp_path)
    snap = Snapshot(model, inputs)
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)
    snap.check()


def test_low_cpu_mem_usage_failure_leaves_the_model_untouched(tmp_path):
    _saved(tmp_path)
    _edit_config(r=4)(tmp_path)
    base, inputs = build("mlp")
    snap = Snapshot(base, inputs)
    with pytest.raises(dt.CheckpointError, match="shape mismatch"):
        dt.PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True, is_trainable=True)
    snap.check()


def test_every_config_field_is_type_checked_from_its_annotation():
    from deltatune.config import _field_hints
    from deltatune.core.registry import METHODS

    wrong = {int: "3", float: "x", bool: "yes", str: 5}
    checked = 0
    for method in METHODS.values():
        for name, hint in _field_hints(method.config_cls).items():
            if hint in wrong:
                with pytest.raises(ValueError, match=f"{method.config_cls.__name__}: `{name}` must be"):
                    method.config_cls._from_known_keys({name: wrong[hint], "target_modules": ["lin0"]})
                checked += 1
    assert checked >= 10


# ==================================================================================== 4. compatibility


def _as_written_by_peft(folder):
    """PEFT's weights carry no config digest (so the config may be edited without a warning)."""
    path = folder / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})


def test_fields_from_newer_versions_are_reported_once_per_load(tmp_path):
    _saved(tmp_path)
    _as_written_by_peft(tmp_path)
    _edit_config(a_future_field=1, another_one={"x": 2}, peft_version="9.0.0")(tmp_path)
    loaded, messages = _caught(lambda: dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path))
    assert messages == [
        "Unexpected keyword arguments ['a_future_field', 'another_one'] for class BoneConfig, these are ignored. "
        "The configuration was probably written by a newer version of PEFT or deltatune."
    ]
    assert loaded.peft_config["default"].peft_version == "9.0.0"


def _peft_knows(peft_type):
    import peft

    return peft_type in {str(t.value) for t in peft.PeftType}


def test_peft_reads_our_checkpoints_without_warnings(tmp_path):
    import peft

    from deltatune.core.registry import METHODS

    configs = {
        "ADALORA": lambda: dt.AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=["lin0"]),
    }
    for peft_type, method in METHODS.items():
        if peft_type in configs or not _peft_knows(peft_type):
            continue
        small = {"FOURIERFT": {"n_frequency": 16}, "RANDLORA": {"r": 4}, "MISS": {"r": 4}}.get(peft_type, {})
        configs[peft_type] = lambda cls=method.config_cls, kw=small: cls(target_modules=["lin0"], **kw)
    assert "ADALORA" in configs
    for peft_type, make in configs.items():
        folder = tmp_path / peft_type
        _saved(folder, make())
        config, messages = _caught(lambda: peft.PeftConfig.from_pretrained(folder))
        assert str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type) == peft_type
        assert messages == [], (peft_type, messages)
        peft.PeftModel.from_pretrained(build("mlp")[0], folder)  # outputs: see each method's parity tests


def test_miss_checkpoints_load_as_miss(tmp_path):
    """PEFT >= 0.19 writes Bone as MiSS: peft_type MISS, keys ``miss_block``, extra fields."""
    model, inputs = _saved(tmp_path, _bone(r=2, init_weights="bat"))
    expected = out_of(model, inputs)
    tensors = {k.replace("bone_block", "miss_block"): v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _edit_config(peft_type="MISS", mini_r=1, miss_dropout=0.0, peft_version="0.21.2")(tmp_path)  # no digest: PEFT's
    loaded, messages = _caught(lambda: dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path))
    assert loaded.peft_config["default"].peft_type == "MISS" and not messages
    torch.testing.assert_close(out_of(loaded, inputs), expected)
    # MiSS keys under a BONE config (a renamed file) load too
    _edit_config(peft_type="BONE", mini_r=_DROP, miss_dropout=_DROP)(tmp_path)
    torch.testing.assert_close(out_of(dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path), inputs), expected)
    # MiSS dropout is kept (MiSS is its own method here): eval outputs do not change
    _edit_config(peft_type="MISS", miss_dropout=0.1)(tmp_path)
    loaded = dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path)
    torch.testing.assert_close(out_of(loaded, inputs), expected)


def _randlora_layouts(folder):
    """Our file (bases once, at model level) rewritten as PEFT 0.21.2 writes it (a copy under every
    layer as well) and as a per-layer-only file."""
    ours = load_file(folder / "adapter_model.safetensors")
    bases = {k: v for k, v in ours.items() if k.startswith("base_model.randlora_")}
    layers = sorted({k.rsplit(".", 1)[0] for k in ours if k.endswith(".randlora_lambda")})
    per_layer = {f"{layer}.{k.rsplit('.', 1)[1]}": v.clone() for layer in layers for k, v in bases.items()}
    rest = {k: v for k, v in ours.items() if k not in bases}
    return {"model-level": ours, "peft-0.21.2": {**ours, **per_layer}, "per-layer-only": {**rest, **per_layer}}


def test_randlora_bases_per_layer_or_at_model_level_both_load(tmp_path):
    config = dt.RandLoraConfig(r=4, target_modules=["lin0", "lin1"], init_weights=False)
    model, inputs = _saved(tmp_path, config)
    expected = out_of(model.eval(), inputs)
    layouts = _randlora_layouts(tmp_path)
    assert len(layouts["peft-0.21.2"]) > len(layouts["model-level"])
    for name, tensors in layouts.items():
        save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
        loaded = dt.PeftModel.from_pretrained(build("mlp")[0], tmp_path)
        got = out_of(loaded, inputs)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (name, (got - expected).abs().max())
    # copies that disagree are refused, and nothing changes
    tensors = layouts["per-layer-only"]
    key = next(k for k in tensors if k.endswith("lin1.randlora_B"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    base, inputs = build("mlp")
    snap = Snapshot(base, inputs)
    with pytest.raises(ValueError, match="different randlora_B copies under different layers"):
        dt.PeftModel.from_pretrained(base, tmp_path)
    snap.check()
