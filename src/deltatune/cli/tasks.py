"""The two tasks of the command line, each one object: its model, batches, predictions and defaults.

* :data:`CLASSIFY` -- a sequence classifier with a new head (all-MiniLM-L6-v2 unless ``--model``);
  the loss is the model's cross-entropy on the label, the prediction its arg-max logit.
* :data:`LM` -- a causal LM (SmolLM2-135M-Instruct from GGUF unless ``--model``) answering
  ``"Review: …\\nSentiment:"`` with the label name; the loss is the model's next-token loss on the
  answer, the prediction is right when the answer token ranks first among the label names.

The training loop (:mod:`.loop`) and the commands only call the :class:`Task` methods; a third
task is one more subclass and one entry in :data:`TASKS`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

from .options import UsageError


@dataclass
class TaskData:
    """The examples of a run: rows ``{"text", "label"}`` with integer labels into ``label_names``."""

    train: list[dict]
    test: list[dict]
    label_names: list[str]
    source: str  # words for the output


class Task:
    """What differs between the tasks; everything else (loop, schedule, saving) is shared."""

    name: ClassVar[str]
    task_type: ClassVar[str]  # PEFT's task_type of an adapter trained for this task
    default_model: ClassVar[str]  # words for the output and metrics.json
    defaults: ClassVar[dict[str, Any]]  # for the train options left unset
    has_head: ClassVar[bool]  # a new head trains (the head-only baseline makes sense)
    auto_class: ClassVar[str]  # the transformers Auto class that loads a merged model of this task

    def load_model(self, path: Optional[str], label_names: list[str]) -> tuple[Any, Any]:
        raise NotImplementedError

    def batches(self, tokenizer: Any, rows: list[dict], label_names: list[str], batch_size: int, max_length: int,
                seed: int = 0, shuffle: bool = False, drop_last: bool = False) -> Iterator[dict]:
        """Batches whose ``model(**batch).loss`` is the training loss."""
        raise NotImplementedError

    def predictions(self, model: Any, tokenizer: Any, batch: dict, label_names: list[str]) -> tuple[Any, Any]:
        """``(predicted, true)`` label ids of one evaluation batch."""
        raise NotImplementedError

    def check(self, data: TaskData) -> None:
        """Refuse data this task cannot learn from."""

    def __repr__(self) -> str:
        return f"<task {self.name}>"


class ClassifyTask(Task):
    name = "classify"
    task_type = "SEQ_CLS"
    default_model = "all-MiniLM-L6-v2"
    defaults = {"steps": 300, "batch_size": 32, "max_length": 64, "eval_limit": None}
    has_head = True
    auto_class = "AutoModelForSequenceClassification"

    def load_model(self, path: Optional[str], label_names: list[str]) -> tuple[Any, Any]:
        from . import models

        return models.load_classifier(path, len(label_names), label_names)

    def batches(self, tokenizer, rows, label_names, batch_size, max_length, seed=0, shuffle=False, drop_last=False):
        from . import data

        return data.make_batches(tokenizer, rows, batch_size, max_length, seed=seed, shuffle=shuffle, drop_last=drop_last)

    def predictions(self, model, tokenizer, batch, label_names):
        batch = dict(batch)
        labels = batch.pop("labels")
        return model(**batch).logits.argmax(-1), labels

    def check(self, data: TaskData) -> None:
        if len(set(r["label"] for r in data.train)) < 2:
            raise UsageError(f"the training data has a single label ({data.label_names[data.train[0]['label']]!r}): "
                             f"nothing to learn")


class CausalLMTask(Task):
    name = "lm"
    task_type = "CAUSAL_LM"
    default_model = "SmolLM2-135M-Instruct"
    # a 135M causal LM is ~20x slower per step than MiniLM
    defaults = {"steps": 60, "batch_size": 8, "max_length": 96, "eval_limit": 200}
    has_head = False
    auto_class = "AutoModelForCausalLM"

    def load_model(self, path: Optional[str], label_names: list[str]) -> tuple[Any, Any]:
        from . import models

        return models.load_causal_lm(path, cache_dir=cache_dir() / "gguf-dense" if path is None else None)

    def batches(self, tokenizer, rows, label_names, batch_size, max_length, seed=0, shuffle=False, drop_last=False):
        from . import data

        lm_rows = data.build_sentiment_lm_rows(rows, label_names)
        return data.make_lm_batches(tokenizer, lm_rows, batch_size, max_length, seed=seed, shuffle=shuffle,
                                    drop_last=drop_last)

    def predictions(self, model, tokenizer, batch, label_names):
        from . import data

        choices = data.lm_choice_token_ids(tokenizer, label_names)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return data.lm_choice_predictions(logits, batch["labels"], choices)


CLASSIFY, LM = ClassifyTask(), CausalLMTask()
TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFY, LM)}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "deltatune"


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"--task must be one of {', '.join([*TASKS, 'auto'])}, got {name!r}")
    return TASKS[name]


def detect_task(task: str = "auto", model: Optional[str] = None, task_type: Optional[str] = None) -> Task:
    """The :class:`Task`: ``task`` when named; else the one whose ``task_type`` is given (an adapter's);
    else from the model (a GGUF file or a ``*ForCausalLM`` folder is an LM); else classification."""
    if task != "auto":
        return task_named(task)
    for candidate in TASKS.values():
        if task_type is not None and candidate.task_type == task_type:
            return candidate
    if model is None:
        return CLASSIFY
    from .models import resolve_model_path

    folder, gguf_file = resolve_model_path(model)
    if gguf_file is not None:
        return LM
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return CLASSIFY
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return LM
    return CLASSIFY


def load_data(task: Task, data: Optional[str], test_data: Optional[str], text_column: str, label_column: str,
              limit: Optional[int]) -> TaskData:
    """A local table (``--data``, ``--test-data``), else Rotten Tomatoes split by movie."""
    from . import data as cli_data

    if test_data and not data:
        raise UsageError("--test-data needs --data (the training file)")
    if data:
        try:
            train, test, names = cli_data.load_local_dataset(data, test_data, text_column, label_column, seed=0)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        if limit:
            train, test = train[:limit], test[: max(1, limit // 4)]
        source = f"{Path(data).name}" + (f" / {Path(test_data).name}" if test_data else " (split 80/20)")
    else:
        # the split seed is fixed: every training seed is evaluated on the same reviews
        train, test = cli_data.load_rotten_tomatoes(test_fraction=0.2, seed=0, limit=limit)
        names = list(cli_data.ROTTEN_TOMATOES_LABELS)
        source = "Rotten Tomatoes critic snippets, split by movie"
    result = TaskData(train, test, names, source)
    task.check(result)
    return result
