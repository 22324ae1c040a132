"""``deltatune train``: fine-tune a local model with one adapter method, evaluate it, save the adapter.

The loop is deliberately plain (AdamW, linear warm-up and decay, one optimizer step per batch) so
that ``deltatune compare`` can run every method -- and, with ``--peft``, the real PEFT -- through
the very same code: same data, seed, batches, schedule and clock.

Two tasks:

* ``classify`` (default): a sequence classifier (all-MiniLM-L6-v2 with a new head unless
  ``--model``) on Rotten Tomatoes critic snippets split by movie, or on a local CSV/JSONL file.
* ``lm``: a causal LM (SmolLM2-135M-Instruct from GGUF unless ``--model``) answering
  ``"Review: …\\nSentiment:"`` with the label name; accuracy = the right answer token ranks first.

Measurements (for ``compare``): step time as the median over steps of wall time and of the main
thread's CPU time (the CPU clock is the honest one on a shared machine; with one intra-op thread
it is the whole cost of the step), and peak tensor memory of one training step from the
profiler's allocator events, on top of the weights and optimizer state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .options import HEAD, MethodSpec, UsageError, build_config, learning_rates, method_from_config_file, read_config_file, resolve_method

CLASSIFY, LM = "classify", "lm"
HEAD_MODULES = ("classifier", "score")  # what PEFT's SEQ_CLS wrapper trains and saves with the adapter
HEAD_FILE = "head_model.safetensors"
METRICS_FILE = "metrics.json"

# Per-task defaults for the options left unset (a 135M causal LM is ~20x slower per step than MiniLM).
TASK_DEFAULTS = {
    CLASSIFY: {"steps": 300, "batch_size": 32, "max_length": 64, "eval_limit": None},
    LM: {"steps": 60, "batch_size": 8, "max_length": 96, "eval_limit": 200},
}


@dataclass
class TrainArgs:
    """Everything ``deltatune train`` takes (``None`` = the task's or method's default)."""

    method: Optional[str] = None
    model: Optional[str] = None
    task: str = "auto"
    data: Optional[str] = None
    test_data: Optional[str] = None
    text_column: str = "text"
    label_column: str = "label"
    limit: Optional[int] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    max_length: Optional[int] = None
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup: float = 0.1
    seed: int = 0
    eval_limit: Optional[int] = None
    eval_batch_size: int = 128
    output: Optional[str] = None
    threads: Optional[int] = None
    sets: dict[str, Any] = field(default_factory=dict)
    config_file: Optional[str] = None
    peft: bool = False
    progress: bool = True
    group_by_length: bool = False
    eval_before: bool = False
    baseline: bool = False
    measure_memory: bool = True
    save: bool = True
    quiet: bool = False


# --------------------------------------------------------------------------- data and model


@dataclass
class Task:
    kind: str
    train: list[dict]
    test: list[dict]
    label_names: list[str]
    source: str  # words for the output


def load_task_data(args: TrainArgs, kind: str) -> Task:
    from . import data as cli_data

    if args.test_data and not args.data:
        raise UsageError("--test-data needs --data (the training file)")
    if args.data:
        try:
            train, test, names = cli_data.load_local_dataset(
                args.data, args.test_data, args.text_column, args.label_column, seed=0
            )
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        if args.limit:
            train, test = train[: args.limit], test[: max(1, args.limit // 4)]
        source = f"{Path(args.data).name}" + (f" / {Path(args.test_data).name}" if args.test_data else " (split 80/20)")
    else:
        # the split seed is fixed: every training seed is evaluated on the same reviews
        train, test = cli_data.load_rotten_tomatoes(test_fraction=0.2, seed=0, limit=args.limit)
        names = list(cli_data.ROTTEN_TOMATOES_LABELS)
        source = "Rotten Tomatoes critic snippets, split by movie"
    if len(set(r["label"] for r in train)) < 2 and kind == CLASSIFY:
        raise UsageError(f"the training data has a single label ({names[train[0]['label']]!r}): nothing to learn")
    return Task(kind, train, test, names, source)


def detect_task(args: TrainArgs) -> str:
    """``classify`` or ``lm``: from ``--task``, else from the model (a GGUF or a *ForCausalLM is an LM)."""
    if args.task in (CLASSIFY, LM):
        return args.task
    if args.task != "auto":
        raise UsageError(f"--task must be classify, lm or auto, got {args.task!r}")
    if args.model is None:
        return CLASSIFY
    from .models import resolve_model_path

    folder, gguf_file = resolve_model_path(args.model)
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


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "deltatune"


def load_model(args: TrainArgs, task: Task) -> tuple[Any, Any]:
    from . import models as cli_models

    if task.kind == CLASSIFY:
        return cli_models.load_classifier(args.model, len(task.label_names), task.label_names)
    return cli_models.load_causal_lm(args.model, cache_dir=cache_dir() / "gguf-dense" if args.model is None else None)


# --------------------------------------------------------------------------- wrapping


def resolve_spec(args: TrainArgs) -> tuple[MethodSpec, Optional[dict]]:
    file_data = read_config_file(args.config_file) if args.config_file else None
    if args.method is None:
        spec = method_from_config_file(file_data, args.config_file) if file_data else resolve_method("bone")
    else:
        spec = resolve_method(args.method)
        if file_data is not None and file_data.get("peft_type"):
            from_file = method_from_config_file(file_data, args.config_file)
            if from_file.peft_type != spec.peft_type:
                raise UsageError(
                    f"--config {args.config_file} holds a {from_file.name} config, but --method is {spec.name}"
                )
    if spec.is_head and file_data is not None:
        raise UsageError("method 'head' (head only) takes no adapter config (--config)")
    return spec, file_data


def peft_config_for(config: Any) -> Any:
    """The real PEFT's config for one of ours (Bone becomes PEFT's MiSS, its successor: same maths)."""
    import dataclasses

    import peft

    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    data.pop("peft_version", None)
    if data.get("peft_type") == "BONE" and "BONE" not in peft.PeftType.__members__:
        data["peft_type"] = "MISS"
    config_cls = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[data["peft_type"]]
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in data.items() if k in names})


def wrap_model(model: Any, spec: MethodSpec, config: Any, use_peft: bool) -> Any:
    """The model to train: adapter-wrapped (deltatune or PEFT), or the base with only its head trainable."""
    if spec.is_head:
        heads = [n for n in HEAD_MODULES if hasattr(model, n)]
        if not heads:
            raise UsageError("method 'head' trains the classification head, but the model has none (classifier/score)")
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads)
        return model
    if use_peft:
        import peft

        return peft.get_peft_model(model, peft_config_for(config))
    import deltatune as dt

    return dt.get_peft_model(model, config)


def param_groups(model: Any, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    adapter, head = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = ".modules_to_save." in name or name.split(".")[0] in HEAD_MODULES
        (head if is_head else adapter).append(p)
    groups = []
    if adapter:
        groups.append({"params": adapter, "lr": lr, "weight_decay": weight_decay, "name": "adapter"})
    if head:
        groups.append({"params": head, "lr": head_lr, "weight_decay": weight_decay, "name": "head"})
    if not groups:
        raise UsageError("nothing to train: the model has no trainable parameter")
    return groups


def trainable_by_module(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module = name.rsplit(".", 1)[0]
            counts[module] = counts.get(module, 0) + p.numel()
    return counts


# --------------------------------------------------------------------------- batches and evaluation


GROUP_CHUNK = 50  # batches per length-sorted chunk with --group-by-length (as transformers' LengthGroupedSampler)


def length_grouped_order(rows: list[dict], batch_size: int, seed: int) -> list[int]:
    """A seeded order whose consecutive ``batch_size`` rows have similar lengths.

    Random order, cut into chunks of 50 batches, each chunk sorted by text length and cut into
    batches, then the batches shuffled: every batch still comes from a random sample of the data,
    but it pads to a length close to its rows' own (about half the tokens on Rotten Tomatoes).
    """
    import random

    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    chunk = GROUP_CHUNK * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order) - batch_size + 1, chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(rows[i]["text"]))
        batches += [part[i : i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def train_batches(task: Task, tokenizer: Any, batch_size: int, max_length: int, seed: int,
                  group_by_length: bool = False) -> Iterator[dict]:
    """Endless batches, a new seeded order every epoch (the same for every method)."""
    from . import data as cli_data

    if len(task.train) < batch_size:
        raise UsageError(f"--batch-size {batch_size} is larger than the {len(task.train)} training examples")
    epoch = 0
    while True:
        if group_by_length:
            rows = [task.train[i] for i in length_grouped_order(task.train, batch_size, seed + epoch)]
            shuffle = False
        else:
            rows, shuffle = task.train, True
        if task.kind == CLASSIFY:
            yield from cli_data.make_batches(tokenizer, rows, batch_size, max_length, seed=seed + epoch,
                                             shuffle=shuffle, drop_last=True)
        else:
            lm_rows = cli_data.build_sentiment_lm_rows(rows, task.label_names)
            yield from cli_data.make_lm_batches(tokenizer, lm_rows, batch_size, max_length, seed=seed + epoch,
                                                shuffle=shuffle, drop_last=True)
        epoch += 1


def evaluate(model: Any, tokenizer: Any, task: Task, rows: list[dict], batch_size: int, max_length: int, progress: bool) -> float:
    """Accuracy on ``rows``; rows are batched by length (less padding, same result)."""
    import torch

    from . import data as cli_data

    order = sorted(rows, key=lambda r: len(r["text"]))
    was_training = model.training
    model.eval()
    correct = total = 0
    if task.kind == LM:
        lm_rows = cli_data.build_sentiment_lm_rows(order, task.label_names)
        choices = cli_data.lm_choice_token_ids(tokenizer, task.label_names)
        batches = cli_data.make_lm_batches(tokenizer, lm_rows, batch_size, max_length, shuffle=False)
    else:
        batches = cli_data.make_batches(tokenizer, order, batch_size, max_length, shuffle=False)
    bar = _bar(math.ceil(len(rows) / batch_size), "evaluating", progress, unit="batch", leave=False)
    with torch.no_grad():
        for batch in batches:
            if task.kind == LM:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                predicted, truth = cli_data.lm_choice_predictions(logits, batch["labels"], choices)
            else:
                labels = batch.pop("labels")
                predicted, truth = model(**batch).logits.argmax(-1), labels
            correct += int((predicted == truth).sum())
            total += int(truth.numel())
            bar.update(1)
    bar.close()
    model.train(was_training)
    return correct / max(total, 1)


def _bar(total: int, desc: str, enabled: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr, **kwargs)


# --------------------------------------------------------------------------- measuring


def step_memory_bytes(step: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``step`` under the profiler; the peak of live tensor bytes it allocated (CPU allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_to_devnull():  # kineto prints "profiler_start/stop" lines straight to fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return result, peak


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def resident_bytes(model: Any, optimizer: Any) -> int:
    """Weights, buffers and optimizer state held between steps (each storage counted once)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()

    for t in model.parameters():
        add(t)
    for t in model.buffers():
        add(t)
    for state in optimizer.state.values():
        for t in state.values():
            add(t)
    return total


def folder_bytes(folder: Path, names: tuple[str, ...]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


# --------------------------------------------------------------------------- the run


def prepare(args: TrainArgs) -> tuple[MethodSpec, Optional[dict], str]:
    """Validate the arguments that need no model (fast failure before any loading)."""
    spec, file_data = resolve_spec(args)
    if not args.data:  # the built-in data: a column option naming anything else is a mistake, not a no-op
        for option, column, default in (("text", args.text_column, "text"), ("label", args.label_column, "label")):
            if column != default:
                raise UsageError(f"Rotten Tomatoes (the default data): no {option} column {column!r}; available "
                                 f"columns: 'text', 'label' (--{option}-column names a column of a --data file)")
    kind = detect_task(args)
    if spec.is_head and kind == LM:
        raise UsageError("method 'head' (head only) needs a classification task; a causal LM has no new head")
    for key, value in TASK_DEFAULTS[kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "batch_size", "max_length", "eval_batch_size"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    # build the config once now so that a bad field fails before minutes of loading
    task_type = "SEQ_CLS" if kind == CLASSIFY else "CAUSAL_LM"
    build_config(spec, args.sets, file_data, task_type, args.steps, file_name=args.config_file or "--config", quiet=True)
    return spec, file_data, kind


def run_train(args: TrainArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and save one method; returns the metrics (also written to ``metrics.json``)."""
    import torch

    log = (lambda _msg: None) if args.quiet else log
    if args.threads:
        torch.set_num_threads(args.threads)
    spec, file_data, kind = prepare(args)
    if args.peft and not spec.is_head:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("--peft needs the peft package: pip install peft==0.21.2") from None
    task = load_task_data(args, kind)
    eval_rows = task.test[: args.eval_limit] if args.eval_limit else task.test

    torch.manual_seed(args.seed)  # the new head's initialisation
    start = time.perf_counter()
    base, tokenizer = load_model(args, task)
    load_s = time.perf_counter() - start
    task_type = "SEQ_CLS" if kind == CLASSIFY else "CAUSAL_LM"
    config = build_config(spec, args.sets, file_data, task_type, args.steps, file_name=args.config_file or "--config")
    backend = "peft" if args.peft and not spec.is_head else "deltatune"
    label = spec.name + (" (PEFT)" if backend == "peft" else "")
    log(f"[{label}] {task.source}: {len(task.train):,} training / {len(task.test):,} test examples; "
        f"model loaded in {load_s:.1f} s")

    accuracy_before = None
    if args.eval_before:
        accuracy_before = evaluate(base, tokenizer, task, eval_rows, args.eval_batch_size, args.max_length, args.progress)
        log(f"[{label}] accuracy before training: {100 * accuracy_before:.1f} % ({_eval_words(task, eval_rows)})")

    torch.manual_seed(args.seed)  # adapter initialisation (FourierFT spectrum, RandLoRA bases, ...)
    model = wrap_model(base, spec, config, backend == "peft")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    log(f"[{label}] {_describe(spec, config, model)}: {trainable:,} trainable parameters "
        f"({100 * trainable / total_params:.3f} % of {total_params:,})")

    lr, head_lr = learning_rates(spec, args.lr, args.head_lr)
    optimizer = torch.optim.AdamW(param_groups(model, lr, head_lr, args.weight_decay), lr=lr)
    warm = max(1, round(args.warmup * args.steps)) if args.warmup > 0 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warm, args.steps))
    allocate = _rank_allocation(model, optimizer)

    torch.manual_seed(args.seed)  # dropout
    model.train()
    batches = train_batches(task, tokenizer, args.batch_size, args.max_length, args.seed, args.group_by_length)
    walls: list[float] = []
    cpus: list[float] = []
    losses: list[float] = []
    peak_step = 0
    resident = 0
    bar = _bar(args.steps, f"training {label}", args.progress, unit="step")
    train_start = time.perf_counter()
    for step in range(args.steps):
        batch = next(batches)

        def one_step() -> float:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            if allocate is not None:
                allocate(step)
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        profiled = args.measure_memory and step == min(1, args.steps - 1)
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        if profiled:
            resident = resident_bytes(model, optimizer)
            loss_value, peak_step = step_memory_bytes(one_step)
        else:
            loss_value = one_step()
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
        if not math.isfinite(loss_value):
            bar.close()
            raise UsageError(f"the loss became {loss_value} at step {step + 1}: lower --lr (now {lr:g})")
        losses.append(loss_value)
        # the first steps allocate optimizer state and warm caches; the profiled step is slower
        if (step >= 2 or args.steps <= 3) and not (profiled and args.steps > 1):
            walls.append(wall)
            cpus.append(cpu)
        recent = losses[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", step_s=f"{wall:.2f}", refresh=False)
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - train_start
    if args.measure_memory and not resident:
        resident = resident_bytes(model, optimizer)

    accuracy = evaluate(model, tokenizer, task, eval_rows, args.eval_batch_size, args.max_length, args.progress)
    log(f"[{label}] accuracy after {args.steps} steps: {100 * accuracy:.1f} % ({_eval_words(task, eval_rows)}); "
        f"training took {train_s:.0f} s")

    result: dict[str, Any] = {
        "method": spec.name,
        "backend": backend,
        "peft_type": spec.peft_type,
        "config": _config_summary(config),
        "task": kind,
        "data": task.source,
        "model": args.model or ("all-MiniLM-L6-v2" if kind == CLASSIFY else "SmolLM2-135M-Instruct"),
        "accuracy": accuracy,
        "accuracy_before": accuracy_before,
        "eval_examples": len(eval_rows),
        "label_names": task.label_names,
        "trainable_params": trainable,
        "total_params": total_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "group_by_length": args.group_by_length,
        "lr": lr if not spec.is_head else None,
        "head_lr": head_lr if kind == CLASSIFY else None,
        "threads": torch.get_num_threads(),
        "step_wall_s": statistics.median(walls) if walls else None,
        "step_cpu_s": statistics.median(cpus) if cpus else None,
        "train_wall_s": train_s,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "peak_memory_bytes": resident + peak_step if args.measure_memory else None,
        "adapter_bytes": None,
        "output": None,
    }
    if args.save:
        out = Path(args.output or Path("runs") / (spec.name + ("-peft" if backend == "peft" else "")))
        result["output"] = str(out)
        result["adapter_bytes"] = save_result(model, spec, out, backend)
        _write_json(out / METRICS_FILE, result)
        what = HEAD_FILE if spec.is_head else "adapter_model.safetensors + adapter_config.json"
        log(f"[{label}] saved {what} to {out} ({result['adapter_bytes'] / 1e6:.2f} MB)")

    if args.baseline and not spec.is_head and kind == CLASSIFY:
        log(f"[head] head-only baseline: the same data, seed and {args.steps} batches, no adapter")
        del model, base, optimizer
        head_args = TrainArgs(**{**asdict(args), "method": HEAD, "sets": {}, "config_file": None, "eval_before": False,
                                 "baseline": False, "peft": False, "lr": None, "save": False, "output": None})
        baseline = run_train(head_args, log)
        result["baseline_accuracy"] = baseline["accuracy"]
        result["baseline"] = baseline
        if args.save:
            _write_json(Path(result["output"]) / METRICS_FILE, result)
    return result


def save_result(model: Any, spec: MethodSpec, out: Path, backend: str) -> int:
    """Write the adapter (PEFT format) or, for ``head``, the head's weights; returns the weight-file size."""
    from deltatune.io.files import ensure_dir, save_tensors

    ensure_dir(out)
    if spec.is_head:
        tensors = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in HEAD_MODULES}
        save_tensors(tensors, out / HEAD_FILE)
        return folder_bytes(out, (HEAD_FILE,))
    model.save_pretrained(str(out))
    return folder_bytes(out, ("adapter_model.safetensors", "adapter_model.bin"))


def _rank_allocation(model: Any, optimizer: Any) -> Optional[Callable[[int], None]]:
    """AdaLoRA's rank allocation, tied to the optimizer's steps.

    deltatune's AdaLoRA offers ``attach_optimizer`` (the allocation then runs inside
    ``optimizer.step()``); PEFT's needs ``update_and_allocate(step)`` after each step, before
    the gradients are cleared. Other methods have neither.
    """
    tuner = getattr(model, "base_model", None)
    if tuner is None or tuner is model:
        return None
    attach = getattr(type(tuner), "attach_optimizer", None)
    if attach is not None:
        tuner.attach_optimizer(optimizer)
        return None
    if getattr(type(tuner), "update_and_allocate", None) is not None:
        return tuner.update_and_allocate
    return None


def _lr_factor(step: int, warm: int, total: int) -> float:
    if warm and step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def _eval_words(task: Task, rows: list[dict]) -> str:
    what = "reviews" if task.source.startswith("Rotten") else "examples"
    if len(rows) < len(task.test):
        return f"first {len(rows):,} of {len(task.test):,} test {what}"
    return f"all {len(rows):,} test {what}"


def _config_summary(config: Any) -> Optional[dict]:
    if config is None:
        return None
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items() if v is not None}


def _describe(spec: MethodSpec, config: Any, model: Any = None) -> str:
    if spec.is_head:
        return "head only"
    from .options import settable_fields

    shown = {k: getattr(config, k) for k in spec.preset.fields if k in settable_fields(type(config))}
    shown.update(spec.implied)
    targets = config.target_modules
    if targets is None:  # PEFT resolves its default targets in its own copy of the config
        live = getattr(model, "peft_config", None)
        targets = getattr(live.get("default"), "target_modules", None) if isinstance(live, dict) else None
    where = "default targets" if targets is None else ("on " + ", ".join(sorted(targets)) if not isinstance(targets, str) else f"on /{targets}/")
    return f"{type(config).__name__}({', '.join(f'{k}={v}' for k, v in shown.items())}) {where}"


def _write_json(path: Path, data: dict) -> None:
    from deltatune.io.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The end-of-run report ``deltatune train`` prints."""
    lines = [f"method: {result['method']} ({result['backend']}), {result['trainable_params']:,} trainable parameters"]
    if result.get("accuracy_before") is not None:
        lines.append(f"accuracy before training:  {100 * result['accuracy_before']:5.1f} %")
    lines.append(f"accuracy after {result['steps']} steps: {100 * result['accuracy']:5.1f} %")
    if result.get("baseline_accuracy") is not None:
        lines.append(f"head-only baseline:        {100 * result['baseline_accuracy']:5.1f} %  (same data, seed and batches)")
    if result.get("eval_examples"):
        lines.append(f"evaluated on {result['eval_examples']:,} test examples")
    if result.get("step_wall_s"):
        cpu = f", {result['step_cpu_s']:.2f} s CPU" if result.get("step_cpu_s") else ""
        lines.append(f"step time: {result['step_wall_s']:.2f} s wall{cpu} ({result['threads']} thread(s))")
    if result.get("output"):
        lines.append(f"adapter: {result['output']}  (load with PeftModel.from_pretrained(base, {result['output']!r}))")
    return lines
