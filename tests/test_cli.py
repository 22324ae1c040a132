"""The ``deltatune`` command line: train / compare / merge / inspect on a tiny random BERT, offline.

The tiny model (2 layers, hidden 16) is saved once per session with the real MiniLM tokenizer, next
to a small CSV whose label is a word of the text. Methods come from the registry: a method that
lands later is tested here without edits (give it a tiny size in ``TINY_SETS`` if its defaults do
not fit a 16-wide model).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import deltatune as dt
from deltatune.cli import options
from deltatune.cli.main import main
from peft_compat import PEFT018

HIDDEN = 16
# sizes that fit the tiny model's 16x16 projections (the CLI's defaults are for MiniLM's 384)
TINY_SETS = {
    "bone": ["r=8"], "bat": ["r=8"], "miss": ["r=8"], "fourierft": ["n_frequency=24"], "randlora": ["r=4"],
    "adalora": ["init_r=4", "target_r=2"],
}
METHODS = options.method_names()  # head, every registered method, aliases (bat)
ADAPTERS = [m for m in METHODS if m != options.HEAD]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from deltatune.cli.models import minilm_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    good, bad = ["great", "superb", "moving", "lovely"], ["dull", "awful", "boring", "tedious"]
    lines = ["text,label"] + [f"a {(good if i % 2 else bad)[i % 4]} film number {i},{'pos' if i % 2 else 'neg'}"
                              for i in range(80)]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return folder


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def train_args(tiny: Path, method: str, out: Path, steps: int = 3, extra: tuple = ()) -> list:
    sets = [x for s in TINY_SETS.get(method, []) for x in ("--set", s)]
    return ["train", "-m", method, "--model", tiny, "--data", tiny / "data.csv", "--steps", steps, "--batch-size", 8,
            "--max-length", 16, "--no-progress", "--threads", 1, "-o", out, *sets, *extra]


@pytest.fixture(scope="session")
def trained(tiny, tmp_path_factory):
    """``trained(method) -> (exit code, stdout, adapter folder)``: 3 steps on the tiny model, once per session."""
    cache: dict[str, tuple[int, str, Path]] = {}
    root = tmp_path_factory.mktemp("trained")

    def get(method: str) -> tuple[int, str, Path]:
        if method not in cache:
            out = root / method
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = main([str(a) for a in train_args(tiny, method, out, steps=3, extra=("--lr", "5e-2"))])
            cache[method] = (code, buf.getvalue(), out)
        return cache[method]

    return get


@pytest.fixture(scope="session")
def trained_bone(trained) -> Path:
    code, _, out = trained("bone")
    assert code == 0
    return out


def tiny_inputs(tiny: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    return dict(tokenizer(["a superb film", "an awful, boring film"], padding=True, return_tensors="pt"))


def load_base(tiny: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(tiny).eval()


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize("method", METHODS)
def test_train_every_method_saves_a_loadable_adapter(method, tiny, trained):
    code, out, folder = trained(method)
    assert code == 0
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["method"] == method and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["trainable_params"] > 0 and metrics["step_wall_s"] is not None
    assert metrics["peak_memory_bytes"] > 0 and metrics["label_names"] == ["neg", "pos"]
    assert f"accuracy after 3 steps" in out
    if method == options.HEAD:
        assert (folder / "head_model.safetensors").is_file()
        return
    saved = json.loads((folder / "adapter_config.json").read_text())
    spec = options.resolve_method(method)
    written = {"BONE": "MISS"}.get(spec.peft_type, spec.peft_type)  # Bone is written in today's PEFT format, MiSS
    assert saved["peft_type"] == written and saved["task_type"] == "SEQ_CLS"
    for key, value in spec.implied.items():
        assert saved[key] == value
    model = dt.PeftModel.from_pretrained(load_base(tiny), folder)
    assert model.peft_type == written  # the file's method: a Bone adapter comes back as MiSS, the same maths


def test_train_reads_peft_config_file_and_set_wins(tiny, tmp_path, capsys):
    config = {"peft_type": "BONE", "r": 4, "target_modules": ["query"], "task_type": "SEQ_CLS", "some_future_field": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    args = ["train", "--config", tmp_path / "adapter_config.json", "--set", "r=8", "--model", tiny, "--data",
            tiny / "data.csv", "--steps", 2, "--batch-size", 8, "--no-progress", "-o", tmp_path / "out"]
    with pytest.warns(UserWarning, match="some_future_field"):
        code, _, err = run_cli(args, capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["target_modules"] == ["query"]  # --set over the file, file over defaults


def test_options_are_generic_over_the_registry():
    for method in ADAPTERS:
        spec = options.resolve_method(method.upper())  # case-insensitive
        config = options.build_config(spec, {}, None, "SEQ_CLS", steps=300)
        assert config.peft_type == spec.peft_type and config.task_type == "SEQ_CLS"
        for key, value in spec.preset.fields.items():
            if key in options.settable_fields(type(config)):
                assert getattr(config, key) == value
    assert options.resolve_method("BaT").implied == {"init_weights": "bat"}
    assert options.parse_sets(['r=8', 'target_modules=["q","v"]', "init_weights=bat", "x=null"]) == {
        "r": 8, "target_modules": ["q", "v"], "init_weights": "bat", "x": None}


def test_derived_fields_of_registered_methods():
    """RandLoRA's alpha follows r (20·r); AdaLoRA's schedule follows the steps; the user's value wins."""
    def schedule(steps):
        return options.resolve_method("adalora").preset.derive({}, steps)

    registered = options.registered_methods()
    if "RANDLORA" in registered:
        spec = options.resolve_method("randlora")
        assert options.build_config(spec, {"r": 16}).randlora_alpha == 320
        assert options.build_config(spec, {}).randlora_alpha == 640
        assert options.build_config(spec, {"r": 16, "randlora_alpha": 64}).randlora_alpha == 64
    if "ADALORA" in registered:
        spec = options.resolve_method("adalora")
        config = options.build_config(spec, {}, None, "SEQ_CLS", steps=300)
        assert (config.total_step, config.tinit, config.tfinal, config.deltaT) == (300, 30, 90, 9)
        assert options.build_config(spec, {"tinit": 5}, None, None, steps=300).tinit == 5
        assert options.build_config(spec, {}, None, None, steps=3).total_step == 3
    assert schedule(300) == {"total_step": 300, "tinit": 30, "tfinal": 90, "deltaT": 9}
    assert schedule(2) == {"total_step": 2, "tinit": 0, "tfinal": 0, "deltaT": 1}


def test_a_new_method_joins_the_cli_through_its_config_alone(monkeypatch):
    """A method declares its CLI preset, alias and derived fields next to its config; no CLI file names it."""
    import dataclasses
    import re
    import types

    from deltatune.core import registry

    @dataclasses.dataclass
    class ToyConfig(dt.BoneConfig):
        PEFT_TYPE: ClassVar[str] = "VERA"  # a PEFT type deltatune does not implement
        CLI_PRESET: ClassVar[dict] = {"fields": {"r": 8}, "lr": 0.123, "why": "toy",
                                      "aliases": {"toybat": {"init_weights": "bat"}}}

        @classmethod
        def cli_derived(cls, values, steps=None):
            return {"target_modules": [f"q{values['r']}"] + ([f"s{steps}"] if steps else [])}

    monkeypatch.setitem(registry.METHODS, "VERA", types.SimpleNamespace(peft_type="VERA", config_cls=ToyConfig))
    assert {"vera", "toybat"} <= set(options.method_names())
    spec = options.resolve_method("ToyBat")
    assert (spec.peft_type, spec.implied) == ("VERA", {"init_weights": "bat"})
    config = options.build_config(spec, {}, None, "SEQ_CLS", steps=7)
    assert (config.r, config.init_weights, set(config.target_modules)) == (8, "bat", {"q8", "s7"})
    assert set(options.build_config(spec, {"r": 16}, None, None).target_modules) == {"q16"}  # from the user's r
    assert set(options.build_config(spec, {"target_modules": ["value"]}).target_modules) == {"value"}  # user wins
    assert options.learning_rates(spec, None, None) == (0.123, options.HEAD_LR)
    assert "toybat" in options.describe_methods() and "lr 0.123" in options.describe_methods()
    assert options.method_from_config_file({"peft_type": "VERA", "init_weights": "bat"}, "x").name == "toybat"

    # ... and the CLI's own code names no method
    cli = Path(options.__file__).parent
    registered = "|".join(sorted(options.registered_methods()))
    for path in sorted(cli.glob("*.py")):
        found = re.findall(rf"[\"']({registered})[\"']", path.read_text())
        assert not found, f"{path.name} names methods {found}"


# --------------------------------------------------------------------------- PEFT reads what we train


_PEFT_SCRIPT = """
import json, sys, torch, peft
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification
tiny, adapters, inputs_file, version = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
assert peft.__version__ == version, peft.__version__
inputs = load_file(inputs_file)
for folder in adapters:
    base = AutoModelForSequenceClassification.from_pretrained(tiny)
    model = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        save_file({"logits": model(**inputs).logits.contiguous()}, folder + "/peft_logits.safetensors")
"""


def test_trained_adapters_load_in_peft_with_the_same_outputs(tiny, trained, tmp_path):
    """Every method's CLI adapter loads in the real PEFT (0.21.2; 0.18.1 for an adapter in the Bone format)."""
    from safetensors.torch import load_file, save_file

    inputs = tiny_inputs(tiny)
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")
    groups: dict[str, list[str]] = {}
    for method in ADAPTERS:
        code, _, folder = trained(method)
        assert code == 0
        saved_type = json.loads((Path(trained(method)[2]) / "adapter_config.json").read_text())["peft_type"]
        version = "0.18.1" if saved_type == "BONE" else "0.21.2"
        groups.setdefault(version, []).append(method)
    procs = {}
    for version, methods in groups.items():  # one PEFT process per version, running side by side
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        if version == "0.18.1":
            env["PYTHONPATH"] = str(PEFT018)
        folders = [str(trained(m)[2]) for m in methods]
        procs[version] = (methods, folders, subprocess.Popen(
            [sys.executable, "-c", _PEFT_SCRIPT, str(tiny), json.dumps(folders), str(tmp_path / "inputs.safetensors"), version],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for version, (methods, folders, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        for method, folder in zip(methods, folders):
            with torch.no_grad():
                ours = dt.PeftModel.from_pretrained(load_base(tiny), folder)(**inputs).logits
            theirs = load_file(Path(folder) / "peft_logits.safetensors")["logits"]
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4, msg=lambda m: f"{method}: {m}")


_PEFT_DEMO_SCRIPT = """
import json, sys, torch, peft
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification
from deltatune.cli.models import minilm_path
folder, inputs_file, version = sys.argv[1], sys.argv[2], sys.argv[3]
assert peft.__version__ == version, peft.__version__
torch.manual_seed(0)  # the head is saved with the adapter; this only fixes the throw-away init
base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)  # plain transformers
model = peft.PeftModel.from_pretrained(base, folder).eval()
assert type(model.base_model).__module__.startswith("peft."), type(model.base_model)
with torch.no_grad():
    save_file({"logits": model(**load_file(inputs_file)).logits.contiguous()}, folder + "/peft_logits.safetensors")
"""


def test_demo_adapter_loads_in_peft_with_the_same_outputs(tmp_path, capsys):
    """`deltatune demo` (its default method, on MiniLM + Rotten Tomatoes, a tiny subset) saves an adapter that
    the real PEFT loads -- 0.18.1 for Bone, the last release with it -- with deltatune's outputs."""
    from safetensors.torch import load_file, save_file

    from deltatune.cli.models import load_classifier

    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--limit", 80, "--steps", 2, "--batch-size", 8, "--max-length", 24,
                                 "--lr", "5e-2", "--threads", 1, "--no-progress", "-o", out], capsys)
    assert code == 0, err
    assert "accuracy before training" in stdout and "head-only baseline" in stdout
    saved = json.loads((out / "adapter_config.json").read_text())
    spec = options.resolve_method(saved["peft_type"])
    version = "0.18.1" if saved["peft_type"] == "BONE" else "0.21.2"
    base, tokenizer = load_classifier(None, 2)
    inputs = dict(tokenizer(["a superb, moving film", "dull and far too long", "it is a film"], padding=True,
                            return_tensors="pt"))
    save_file({k: v.contiguous() for k, v in inputs.items()}, tmp_path / "inputs.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    if version == "0.18.1":
        env["PYTHONPATH"] = str(PEFT018)
    proc = subprocess.Popen([sys.executable, "-c", _PEFT_DEMO_SCRIPT, str(out), str(tmp_path / "inputs.safetensors"),
                             version], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    model = dt.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        ours = model(**inputs).logits
        plain = load_classifier(None, 2)[0].eval()(**inputs).logits
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    theirs = load_file(out / "peft_logits.safetensors")["logits"]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, ours, atol=1e-3)  # the saved adapter and head do change the outputs


# --------------------------------------------------------------------------- merge


def test_merge_writes_a_model_with_the_adapters_outputs(trained_bone, tiny, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    code, out, err = run_cli(["merge", trained_bone, "--base", tiny, "-o", tmp_path / "merged"], capsys)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not [f for f in files if f.endswith(".tmp")]
    inputs = tiny_inputs(tiny)
    with torch.no_grad():
        expected = dt.PeftModel.from_pretrained(load_base(tiny), trained_bone)(**inputs).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        got = merged(**inputs).logits
        base = load_base(tiny)(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-4)  # the adapter did change the model
    assert merged.config.id2label == {0: "neg", 1: "pos"}

    assert_plain_load(AutoModelForSequenceClassification, tmp_path / "merged")

    # sharded: every tensor in some shard, an index naming them all, the single file gone
    code, _, err = run_cli(["merge", trained_bone, "--base", tiny, "-o", tmp_path / "merged", "--max-shard-size", "400kB"], capsys)
    assert code == 0, err
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert not (tmp_path / "merged" / "model.safetensors").exists()
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        resharded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(resharded(**inputs).logits, expected, atol=1e-5, rtol=1e-4)


def assert_plain_load(auto_class, folder: Path):
    """Plain transformers builds every weight of the merged model from the folder: nothing missing
    (newly initialised), nothing unexpected, nothing mismatched."""
    _, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_merge_of_the_default_classifier_is_a_complete_transformers_folder(tmp_path, capsys):
    """MiniLM (the CLI's default classifier) + adapter -> merge -> plain AutoModelForSequenceClassification:
    the pooler and head come from the folder and the logits are deltatune's."""
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from deltatune.cli.models import load_classifier

    out = tmp_path / "bone"
    code, _, err = run_cli(["train", "-m", "bone", "--limit", 40, "--steps", 2, "--batch-size", 8, "--max-length", 16,
                            "--lr", "5e-2", "--threads", 1, "--no-progress", "-o", out], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["merge", out, "-o", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert "AutoModelForSequenceClassification.from_pretrained" in stdout
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"} <= keys
    assert_plain_load(AutoModelForSequenceClassification, tmp_path / "merged")
    base, tokenizer = load_classifier(None, 2, ["rotten", "fresh"])
    inputs = dict(tokenizer(["a superb, moving film", "dull and far too long"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = dt.PeftModel.from_pretrained(base, out).eval()(**inputs).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        got = merged(**inputs).logits
        plain = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=2).eval()(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter and the trained head are in the folder


def minilm() -> Path:
    from deltatune.cli.models import minilm_path

    return minilm_path()


def test_merge_of_a_causal_lm_is_a_complete_transformers_folder(tiny_lm, tmp_path, capsys):
    """A causal LM (tied embeddings) + adapter -> merge -> plain AutoModelForCausalLM: same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(
        f"{'a superb' if i % 2 else 'an awful'} film {i},{'fresh' if i % 2 else 'rotten'}\n" for i in range(40)))
    out = tmp_path / "lm"
    code, _, err = run_cli(["train", "-m", "fourierft", "--set", "n_frequency=24", "--model", tiny_lm, "--data",
                            tmp_path / "reviews.csv", "--steps", 3, "--batch-size", 4, "--lr", "5e-2", "--no-progress",
                            "-o", out], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["merge", out, "--base", tiny_lm, "-o", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert "AutoModelForCausalLM.from_pretrained" in stdout
    assert_plain_load(AutoModelForCausalLM, tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    inputs = dict(tokenizer(["Review: a superb film\nSentiment:"], return_tensors="pt"))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
        expected = dt.PeftModel.from_pretrained(base, out).eval()(**inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        got = merged(**inputs).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()(**inputs).logits
    assert merged.config.tie_word_embeddings and merged.lm_head.weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-4)


def test_merge_refuses_a_model_transformers_cannot_rebuild():
    from transformers import BertConfig, BertForSequenceClassification

    from deltatune.cli.merge import check_plain
    from deltatune.cli.options import UsageError

    model = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=8, vocab_size=30))
    check_plain(model)

    class MeanPooler(torch.nn.Module):
        def forward(self, hidden):
            return hidden.mean(1)

    model.bert.pooler = MeanPooler()
    with pytest.raises(UsageError, match="bert.pooler"):
        check_plain(model)


def test_streaming_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    from deltatune.cli.merge import write_safetensors_streaming

    tensors = [("a", torch.randn(3, 5)), ("b", torch.arange(7, dtype=torch.int64)),
               ("c", torch.randn(4, 4).to(torch.bfloat16).t()), ("empty", torch.zeros(0, 3))]
    size = write_safetensors_streaming(tmp_path / "x.safetensors", tensors)
    assert size == (tmp_path / "x.safetensors").stat().st_size
    header_len = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0
    loaded = load_file(tmp_path / "x.safetensors")
    for name, tensor in tensors:
        assert torch.equal(loaded[name], tensor.contiguous())


# --------------------------------------------------------------------------- inspect


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_inspect_trained_adapter(trained_bone, tiny, capsys):
    code, out, err = run_cli(["inspect", trained_bone, "--base", tiny], capsys)
    assert code == 0, err
    assert "bert.encoder.layer.1.attention.self.value" in out and "miss_block" in out  # written as MiSS
    assert "modules the config selects in the base model (4)" in out
    assert _is_png(trained_bone / "inspect_params.png")
    code, out, _ = run_cli(["inspect", trained_bone, "--json", "--no-plots"], capsys)
    report = json.loads(out)
    assert report["adapter_params"] == 4 * 8 * HIDDEN and report["peft_type"] == "MISS"


def test_inspect_method_plots_from_checkpoint_keys(tmp_path, capsys):
    """AdaLoRA's rank heat map and FourierFT's spectrum come from the keys alone (no method needed)."""
    from safetensors.torch import save_file

    modules = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(3) for m in ("query", "value")]
    pattern = {f"{m}.lora_E": [j < 2 + (k % 3) for j in range(6)] for k, m in enumerate(modules)}
    ada = tmp_path / "ada"
    ada.mkdir()
    (ada / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "ADALORA", "init_r": 6, "target_r": 3, "rank_pattern": pattern, "task_type": "SEQ_CLS"}))
    tensors = {}
    for m in modules:
        k = sum(pattern[f"{m}.lora_E"])
        tensors.update({f"base_model.model.{m}.lora_A": torch.randn(k, 8), f"base_model.model.{m}.lora_B": torch.randn(8, k),
                        f"base_model.model.{m}.lora_E": torch.randn(k, 1)})
    save_file(tensors, ada / "adapter_model.safetensors")
    code, out, err = run_cli(["inspect", ada], capsys)
    assert code == 0, err
    assert "kept rank 4" in out and _is_png(ada / "inspect_rank_pattern.png")

    ff = tmp_path / "ff"
    ff.mkdir()
    (ff / "adapter_config.json").write_text(json.dumps({"peft_type": "FOURIERFT", "n_frequency": 50, "scaling": 150.0}))
    save_file({f"base_model.model.{m}.fourierft_spectrum": torch.randn(50) for m in modules}, ff / "adapter_model.safetensors")
    code, out, err = run_cli(["inspect", ff, "--plots-dir", tmp_path / "plots"], capsys)
    assert code == 0, err
    assert _is_png(tmp_path / "plots" / "inspect_spectrum.png") and _is_png(tmp_path / "plots" / "inspect_params.png")


# --------------------------------------------------------------------------- compare


def test_compare_two_methods(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(["compare", "-m", "head,bone", "--model", tiny, "--data", tiny / "data.csv", "--steps", 2,
                                 "--batch-size", 8, "--max-length", 16, "--no-progress", "--set", "bone:r=8", "-o", out], capsys)
    assert code == 0, err
    results = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in results] == ["head", "bone"]
    assert results[0]["threads"] == 1 and all(r["step_cpu_s"] for r in results)
    assert results[1]["config"]["r"] == 8
    table = (out / "compare.md").read_text()
    assert "| head |" in table and "| bone |" in table and "vs head" in table
    assert _is_png(out / "compare.png")
    assert (out / "bone" / "adapter_model.safetensors").is_file()

    # --replot: the table and plot again from compare.json alone (no training, no model)
    (out / "compare.md").unlink()
    (out / "compare.png").unlink()
    code, stdout, err = run_cli(["compare", "--replot", "-o", out], capsys)
    assert code == 0, err
    assert (out / "compare.md").read_text() == table and _is_png(out / "compare.png")
    assert "PEFT reference" not in table  # not the reference settings: no reference column or marks

    from deltatune.cli import compare, plots

    rows = [dict(r, label=r["method"]) for r in results]
    plots.compare_plot(rows, tmp_path / "ref.png", "reference marks", reference=compare.PEFT_REFERENCE)
    assert _is_png(tmp_path / "ref.png")


# --------------------------------------------------------------------------- bad arguments


def _other_methods_field() -> tuple[str, str]:
    """A field bone does not have: another registered method's, else an unknown one."""
    bone = set(options.settable_fields(options.config_class(options.resolve_method("bone"))))
    for peft_type, method in sorted(options.registered_methods().items()):
        extra = sorted(set(options.settable_fields(method.config_cls)) - bone)
        if extra:
            return extra[0], peft_type.lower()
    return "no_such_field", "unknown field"


BAD = {
    "unknown method": (["train", "-m", "lora9"], "unknown method 'lora9'"),
    "field of another method": (["train", "-m", "bone", "--set", f"{_other_methods_field()[0]}=3"], _other_methods_field()[1]),
    "bad --set": (["train", "--set", "r"], "field=value"),
    "bad config value": (["train", "-m", "bone", "--set", "r=-1"], "invalid bone config"),
    "missing data column": (["train", "--text-column", "review"], "no text column 'review'"),
    "missing column of the default data": (["train", "--label-column", "stars"], "no label column 'stars'"),
    "missing model folder": (["train", "--model", "/no/such/model"], "does not exist locally"),
    "missing data file": (["train", "--data", "/no/such/file.csv"], "not found"),
    "unknown option": (["train", "--stpes", "3"], "unrecognized arguments"),
    "head with adapter field": (["train", "-m", "head", "--set", "r=8"], "head"),
    "compare unknown method": (["compare", "-m", "head,nope"], "unknown method 'nope'"),
    "merge not an adapter": (["merge", "/no/such/adapter", "-o", "x"], "not an adapter folder"),
    "inspect missing": (["inspect", "/no/such/adapter"], "does not exist"),
    "compare replot without results": (["compare", "--replot", "-o", "/no/such/folder"], "does not exist"),
    "inspect unknown option": (["inspect", "/no/such/adapter", "--steps", "3"], "deltatune inspect: error: unrecognized"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_arguments_give_one_line_and_exit_2(case, tiny, tmp_path, capsys):
    args, expected = BAD[case]
    args = [a for a in args]
    if case in ("missing data column", "missing model folder"):
        args += ["--data", tiny / "data.csv"] + (["--model", tiny] if case == "missing data column" else [])
    if args[0] == "train":
        args += ["--steps", 1, "--no-progress", "-o", tmp_path / "out"]
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # failed before training


# --------------------------------------------------------------------------- Trainer example


def test_trainer_example_writes_adapter_only_checkpoints(tiny, tmp_path, monkeypatch):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "trainer_adapter_only.py"
    spec = importlib.util.spec_from_file_location("trainer_adapter_only", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    metrics = example.main(["--model", str(tiny), "--data", str(tiny / "data.csv"), "--max-steps", "4",
                            "--save-steps", "2", "--batch-size", "8", "--output", str(out)])
    assert "eval_accuracy" in metrics and "eval_loss" in metrics  # labels reached the model
    for folder in [out / "checkpoint-2", out / "checkpoint-4", out]:
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
        assert not names & {"model.safetensors", "pytorch_model.bin"}  # no base weights
    model = dt.PeftModel.from_pretrained(load_base(tiny), out / "checkpoint-4")
    assert model.peft_type == "BONE"
    # resuming reloads the adapter and continues to the new max_steps
    example.main(["--model", str(tiny), "--data", str(tiny / "data.csv"), "--max-steps", "6", "--save-steps", "2",
                  "--batch-size", "8", "--output", str(out), "--resume"])
    assert (out / "checkpoint-6" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- causal LM task


@pytest.fixture(scope="session")
def tiny_lm(tiny, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny)  # WordPiece: " fresh" and " rotten" are single tokens
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)  # as SmolLM2
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_train_causal_lm_task(tiny, tiny_lm, tmp_path, capsys):
    """A causal-LM folder is detected as the `lm` task: prompt -> label name, accuracy from the answer token."""
    (tmp_path / "reviews.csv").write_text("text,label\n" + "".join(
        f"{'a superb' if i % 2 else 'an awful'} film {i},{'fresh' if i % 2 else 'rotten'}\n" for i in range(40)))
    code, out, err = run_cli(["train", "-m", "bone", "--set", "r=8", "--model", tiny_lm, "--data", tmp_path / "reviews.csv",
                              "--steps", 3, "--batch-size", 4, "--no-progress", "-o", tmp_path / "lm"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "lm" / "metrics.json").read_text())
    assert metrics["task"] == "lm" and metrics["eval_examples"] == 8 and metrics["head_lr"] is None
    saved = json.loads((tmp_path / "lm" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["target_modules"] == ["q_proj", "v_proj"]
    code, _, err = run_cli(["train", "-m", "head", "--model", tiny_lm, "--data", tmp_path / "reviews.csv"], capsys)
    assert code == 2 and "classification task" in err
