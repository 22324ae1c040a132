"""``deltatune train``: fine-tune a local model with one adapter method, evaluate it, save the adapter.

One run is :func:`train_method`: resolve the method and its config (:mod:`.options`), load the
task's data and model (:mod:`.tasks`), wrap it (:mod:`.backends`: deltatune, the real PEFT with
``--peft``, or the head alone), train and evaluate (:mod:`.loop`, the same for every method, so that
``deltatune compare`` compares like with like), save. :func:`run_train` adds the head-only baseline
(``--baseline``) as a second, independent run on the same batches.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from . import backends
from .options import HEAD, MethodSpec, UsageError, build_config, learning_rates, method_from_config_file, read_config_file, resolve_method
from .tasks import Task, TaskData, detect_task, load_data

HEAD_FILE = "head_model.safetensors"
METRICS_FILE = "metrics.json"


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

    @classmethod
    def from_namespace(cls, ns: Any, **overrides: Any) -> "TrainArgs":
        """The arguments of ``train``/``demo``/``compare`` as parsed by :mod:`.main` (``sets`` parsed here)."""
        from .options import parse_sets

        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in vars(ns).items() if k in names and k != "sets"}
        if "sets" not in overrides:
            values["sets"] = parse_sets(getattr(ns, "sets", None))
        values["progress"] = not getattr(ns, "no_progress", False)
        values.update(overrides)
        return cls(**values)



@dataclass
class Plan:
    """What :func:`prepare` validated: the method, its config file's data, the task."""

    spec: MethodSpec
    file_data: Optional[dict]
    task: Task


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


def prepare(args: TrainArgs) -> Plan:
    """Validate what needs no model (fast failure before any loading); fill the task's defaults in ``args``."""
    spec, file_data = resolve_spec(args)
    if not args.data:  # the built-in data: a column option naming anything else is a mistake, not a no-op
        for option, column, default in (("text", args.text_column, "text"), ("label", args.label_column, "label")):
            if column != default:
                raise UsageError(f"Rotten Tomatoes (the default data): no {option} column {column!r}; available "
                                 f"columns: 'text', 'label' (--{option}-column names a column of a --data file)")
    task = detect_task(args.task, args.model)
    if spec.is_head and not task.has_head:
        raise UsageError(f"method 'head' (head only) needs a classification task; the {task.name} task has no new head")
    for key, value in task.defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "batch_size", "max_length", "eval_batch_size"):
        if getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if args.peft and not spec.is_head:
        backends.check_peft()
    _config(args, spec, file_data, task, quiet=True)  # a bad field fails now, not after minutes of loading
    return Plan(spec, file_data, task)


def _config(args: TrainArgs, spec: MethodSpec, file_data: Optional[dict], task: Task, quiet: bool = False) -> Any:
    return build_config(spec, args.sets, file_data, task.task_type, args.steps,
                        file_name=args.config_file or "--config", quiet=quiet)


def train_method(args: TrainArgs, log: Callable[[str], None] = print, data: Optional[TaskData] = None) -> dict[str, Any]:
    """Train, evaluate and save one method; returns the metrics (also written to ``metrics.json``)."""
    import torch

    from .loop import evaluate, train_batches, train_loop

    log = (lambda _msg: None) if args.quiet else log
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = prepare(args)
    spec, task = plan.spec, plan.task
    data = data or load_data(task, args.data, args.test_data, args.text_column, args.label_column, args.limit)
    eval_rows = data.test[: args.eval_limit] if args.eval_limit else data.test

    torch.manual_seed(args.seed)  # the new head's initialisation
    start = time.perf_counter()
    base, tokenizer = task.load_model(args.model, data.label_names)
    load_s = time.perf_counter() - start
    config = _config(args, spec, plan.file_data, task)
    backend = "peft" if args.peft and not spec.is_head else "deltatune"
    label = spec.name + (" (PEFT)" if backend == "peft" else "")
    log(f"[{label}] {data.source}: {len(data.train):,} training / {len(data.test):,} test examples; "
        f"model loaded in {load_s:.1f} s")

    def accuracy_of(model: Any) -> float:
        return evaluate(model, tokenizer, task, eval_rows, data.label_names, args.eval_batch_size, args.max_length,
                        args.progress)

    accuracy_before = None
    if args.eval_before:
        accuracy_before = accuracy_of(base)
        log(f"[{label}] accuracy before training: {100 * accuracy_before:.1f} % ({_eval_words(data, eval_rows)})")

    torch.manual_seed(args.seed)  # adapter initialisation (FourierFT spectrum, RandLoRA bases, ...)
    model = backends.wrap_model(base, spec, config, backend == "peft")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    log(f"[{label}] {_describe(spec, config, model)}: {trainable:,} trainable parameters "
        f"({100 * trainable / total_params:.3f} % of {total_params:,})")

    lr, head_lr = learning_rates(spec, args.lr, args.head_lr)
    optimizer = torch.optim.AdamW(backends.param_groups(model, lr, head_lr, args.weight_decay), lr=lr)
    after_step = backends.after_step_hook(model, optimizer)
    torch.manual_seed(args.seed)  # dropout
    batches = train_batches(task, tokenizer, data.train, data.label_names, args.batch_size, args.max_length,
                            args.seed, args.group_by_length)
    stats = train_loop(model, optimizer, batches, args.steps, args.warmup, after_step, args.measure_memory,
                       args.progress, label)
    accuracy = accuracy_of(model)
    log(f"[{label}] accuracy after {args.steps} steps: {100 * accuracy:.1f} % ({_eval_words(data, eval_rows)}); "
        f"training took {stats.train_wall_s:.0f} s")

    result: dict[str, Any] = {
        "method": spec.name,
        "backend": backend,
        "peft_type": spec.peft_type,
        "config": _config_summary(config),
        "settings": settings(spec, config, args.steps),
        "peft_type_run": _run_type(model) if backend == "peft" else spec.peft_type,
        "task": task.name,
        "data": data.source,
        "model": args.model or task.default_model,
        "accuracy": accuracy,
        "accuracy_before": accuracy_before,
        "eval_examples": len(eval_rows),
        "label_names": data.label_names,
        "trainable_params": trainable,
        "total_params": total_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
        "group_by_length": args.group_by_length,
        "lr": lr if not spec.is_head else None,
        "head_lr": head_lr if task.has_head else None,
        "threads": torch.get_num_threads(),
        "step_wall_s": stats.step_wall_s,
        "step_cpu_s": stats.step_cpu_s,
        "train_wall_s": stats.train_wall_s,
        "final_loss": stats.final_loss,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "adapter_bytes": None,
        "output": None,
    }
    if args.save:
        out = Path(args.output or Path("runs") / (spec.name + ("-peft" if backend == "peft" else "")))
        files = backends.save_adapter(model, spec, out, HEAD_FILE)
        result["output"] = str(out)
        result["adapter_bytes"] = sum((out / n).stat().st_size for n in files if (out / n).is_file())
        write_json(out / METRICS_FILE, result)
        what = HEAD_FILE if spec.is_head else "adapter_model.safetensors + adapter_config.json"
        log(f"[{label}] saved {what} to {out} ({result['adapter_bytes'] / 1e6:.2f} MB)")
    return result


def run_train(args: TrainArgs, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``deltatune train``: :func:`train_method`, then with ``--baseline`` the head-only run on the same
    data, seed and batches (its metrics go under ``baseline`` in the first run's ``metrics.json``)."""
    plan = prepare(args)
    data = load_data(plan.task, args.data, args.test_data, args.text_column, args.label_column, args.limit)
    result = train_method(args, log, data)
    if not (args.baseline and not plan.spec.is_head and plan.task.has_head):
        return result
    log(f"[head] head-only baseline: the same data, seed and {args.steps} batches, no adapter")
    head_args = replace(args, method=HEAD, sets={}, config_file=None, eval_before=False, baseline=False, peft=False,
                        lr=None, save=False, output=None)
    baseline = train_method(head_args, log, data)
    result["baseline_accuracy"] = baseline["accuracy"]
    result["baseline"] = baseline
    if result["output"]:
        write_json(Path(result["output"]) / METRICS_FILE, result)
    return result


def _eval_words(data: TaskData, rows: list[dict]) -> str:
    what = "reviews" if data.source.startswith("Rotten") else "examples"
    if len(rows) < len(data.test):
        return f"first {len(rows):,} of {len(data.test):,} test {what}"
    return f"all {len(rows):,} test {what}"


def _config_summary(config: Any) -> Optional[dict]:
    if config is None:
        return None
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items() if v is not None}


def settings(spec: MethodSpec, config: Any, steps: Optional[int] = None) -> dict[str, Any]:
    """The config values the method's preset is about: its sizes, the fields its name fixes, the
    fields it derives (what ``compare`` shows in its settings column)."""
    if spec.is_head or config is None:
        return {}
    from .options import settable_fields

    keys = [*spec.preset.fields, *spec.implied]
    if spec.preset.derive is not None:
        keys += list(spec.preset.derive(config.to_dict(), steps))
    allowed = settable_fields(type(config))
    return {k: getattr(config, k) for k in dict.fromkeys(keys) if k in allowed}


def _run_type(model: Any) -> Optional[str]:
    """The peft_type the real PEFT ran (Bone runs as MiSS in PEFT >= 0.19)."""
    config = getattr(model, "peft_config", {}).get("default")
    peft_type = getattr(config, "peft_type", None)
    return None if peft_type is None else str(getattr(peft_type, "value", peft_type))


def _describe(spec: MethodSpec, config: Any, model: Any = None) -> str:
    if spec.is_head:
        return "head only"
    shown = settings(spec, config)
    targets = config.target_modules
    if targets is None:  # PEFT resolves its default targets in its own copy of the config
        live = getattr(model, "peft_config", None)
        targets = getattr(live.get("default"), "target_modules", None) if isinstance(live, dict) else None
    where = "default targets" if targets is None else ("on " + ", ".join(sorted(targets)) if not isinstance(targets, str) else f"on /{targets}/")
    return f"{type(config).__name__}({', '.join(f'{k}={v}' for k, v in shown.items())}) {where}"


def write_json(path: Path, data: dict) -> None:
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
