"""``deltatune compare``: the head-only baseline and several methods on the same data, seed and batches.

Every run goes through :func:`deltatune.cli.train.train_method` with identical arguments except the
method (and, with ``--peft``, the library: each adapter method is trained a second time with the
real PEFT right after deltatune's run). Results: ``compare.json`` (every metric of every run),
``compare.md`` (the table) and ``compare.png`` (accuracy, trainable parameters, step time, peak
memory, adapter file size), in ``--output``.

Step time is the median over steps of the main thread's CPU time with one intra-op thread by
default (``--threads 1``): on a shared machine wall-clock time swings with the neighbours' load,
the CPU time of a single-threaded step does not.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .options import HEAD, UsageError, default_compare_methods, parse_sets, read_json, resolve_method, settable_fields

# PEFT 0.21.2's figures on the default task (300 steps, batch 32, max length 64, seed 0, adapters on
# query/value), from the issue that asked for this command; shown when the run uses those settings.
PEFT_REFERENCE = {"head": 75.4, "bone": 80.5, "fourierft": 78.9, "randlora": 80.9, "adalora": 79.7, "lora": 80.3}


def split_methods(values: list[str] | None) -> list[str]:
    names = [n for v in values or [] for n in v.split(",") if n.strip()] or default_compare_methods()
    specs = [resolve_method(n) for n in names]  # unknown names fail here, before any training
    out: list[str] = []
    for spec in specs:
        if spec.name not in out:
            out.append(spec.name)
    return out


def scoped_sets(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--set bone:r=32`` applies to bone only; ``--set r=32`` to every method whose config has ``r``."""
    per: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        scope, sep, rest = item.partition(":")
        if sep and "=" not in scope:
            target = resolve_method(scope).name
            if target not in per:
                raise UsageError(f"--set {item!r}: method {target!r} is not among the compared methods {methods}")
            per[target].update(parse_sets([rest]))
            continue
        sets = parse_sets([item])
        takers = [m for m in methods if not resolve_method(m).is_head
                  and set(sets) <= set(settable_fields(_config_cls(m)))]
        if not takers:
            field_name = next(iter(sets))
            raise UsageError(f"--set {item!r}: no compared method has a field {field_name!r} (methods: {', '.join(methods)})")
        for m in takers:
            per[m].update(sets)
    return per


def _config_cls(method: str) -> type:
    from .options import config_class

    return config_class(resolve_method(method))


def reference_settings(args: Any) -> bool:
    return (args.model is None and args.data is None and args.limit is None and args.steps == 300
            and args.batch_size == 32 and args.max_length == 64 and args.seed == 0 and args.eval_limit is None)


def reference_from_results(results: list[dict[str, Any]]) -> bool:
    """:func:`reference_settings` read back from ``compare.json`` (for ``--replot``)."""
    if not results:
        return False
    r = results[0]
    if not (r.get("model") == "all-MiniLM-L6-v2" and str(r.get("data", "")).startswith("Rotten Tomatoes")
            and (r.get("steps"), r.get("batch_size"), r.get("max_length"), r.get("seed")) == (300, 32, 64, 0)):
        return False
    from .data import load_rotten_tomatoes

    return r.get("eval_examples") == len(load_rotten_tomatoes(test_fraction=0.2, seed=0)[1])  # all of the test split


def replot(ns: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``compare --replot``: rewrite compare.md and compare.png from ``--output``'s compare.json (no training)."""
    out = Path(ns.output).expanduser()
    path = out / "compare.json"
    if not path.is_file():
        raise UsageError(f"--replot: {str(path)!r} does not exist (run `deltatune compare -o {out}` first)")
    results = read_json(path, "--replot: ")
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) and "accuracy" in r for r in results):
        raise UsageError(f"--replot: {path} does not hold the results of `deltatune compare`")
    reference = reference_from_results(results)
    write_reports(results, out, reference)
    log(markdown_table(results, reference))
    log(f"wrote {out / 'compare.md'}, {out / 'compare.png'}")
    return results


def run_compare(ns: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from .train import TrainArgs, prepare, train_method

    if getattr(ns, "replot", False):
        return replot(ns, log)
    methods = split_methods(ns.methods)
    sets = scoped_sets(ns.sets, methods)
    if ns.threads is None:
        ns.threads = 1
    out = Path(ns.output).expanduser()
    base_args = TrainArgs.from_namespace(ns, sets={})
    runs: list[tuple[str, bool]] = []
    for method in methods:
        runs.append((method, False))
        if ns.peft and method != HEAD:
            runs.append((method, True))
    # every config is built (and every bad field reported) before the first minute of training
    planned = []
    for method, use_peft in runs:
        args = replace(base_args, method=method, sets=sets[method], peft=use_peft, eval_before=False, baseline=False,
                       output=str(out / (method + ("-peft" if use_peft else ""))))
        prepare(args)  # fills the task defaults in place
        planned.append(args)
    log(f"compare: {len(planned)} runs ({', '.join(a.method + (' (PEFT)' if a.peft else '') for a in planned)}) "
        f"into {out}")
    results = []
    for args in planned:
        results.append(train_method(args, log))
        write_reports(results, out, reference_settings(args))  # partial tables survive an interrupted comparison
    table = markdown_table(results, reference_settings(planned[0]))
    log("")
    log(table)
    log(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return results


def write_reports(results: list[dict[str, Any]], out: Path, reference: bool) -> None:
    """compare.json, compare.md and compare.png in ``out``; ``reference``: the run used the reference settings."""
    from deltatune.io.files import atomic_write_text

    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write_text(out / "compare.md", markdown_table(results, reference) + "\n")
    rows = [dict(r, label=_label(r)) for r in results]
    first = results[0]
    title = (f"{first['model']} on {first['data']}: {first['steps']} steps, batch {first['batch_size']}, "
             f"max length {first['max_length']}, seed {first['seed']}, {first['threads']} thread(s); "
             f"accuracy on {first['eval_examples']:,} test examples")
    plots.compare_plot(rows, out / "compare.png", title, reference=PEFT_REFERENCE if reference else None,
                       reference_label="PEFT 0.21.2 reference")


def _label(r: dict[str, Any]) -> str:
    return r["method"] + (" (PEFT)" if r["backend"] == "peft" else "")


def _sizes(r: dict[str, Any]) -> str:
    """The run's ``settings`` (its method's preset fields, written by ``train``)."""
    shown = r.get("settings") or {}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "-"


def markdown_table(results: list[dict[str, Any]], reference: bool) -> str:
    head = next((r["accuracy"] for r in results if r["method"] == HEAD), None)
    cpu = all(r.get("step_cpu_s") for r in results)
    columns = ["method", "library", "settings", "lr", "accuracy %", "vs head (points)"]
    if reference:
        columns.append("PEFT reference %")
    columns += ["trainable params", "step s (CPU)" if cpu else "step s (wall)", "peak memory MiB", "adapter file kB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in results:
        cells = [
            r["method"], _library(r), _sizes(r),
            f"{r['lr']:g}" if r.get("lr") else f"head {r['head_lr']:g}",
            f"{100 * r['accuracy']:.1f}",
            "-" if head is None or r["method"] == HEAD else f"{100 * (r['accuracy'] - head):+.1f}",
        ]
        if reference:
            ref = PEFT_REFERENCE.get(r["method"])
            cells.append(f"{ref:.1f}" if ref is not None else "-")
        step = r.get("step_cpu_s") if cpu else r.get("step_wall_s")
        cells += [
            f"{r['trainable_params']:,}",
            f"{step:.3f}" if step else "-",
            f"{r['peak_memory_bytes'] / 2**20:.0f}" if r.get("peak_memory_bytes") else "-",
            f"{r['adapter_bytes'] / 1e3:,.1f}" if r.get("adapter_bytes") else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    first = results[0]
    lines.append("")
    lines.append(f"{first['model']}, {first['data']}; {first['steps']} steps, batch {first['batch_size']}, "
                 f"max length {first['max_length']}, seed {first['seed']}, {first['threads']} thread(s); accuracy on "
                 f"{first['eval_examples']:,} test examples. Step time: median over steps"
                 + (" of the main thread's CPU time." if cpu else " of wall-clock time."))
    return "\n".join(lines)


def _library(r: dict[str, Any]) -> str:
    if r["backend"] != "peft":
        return "deltatune"
    ran = r.get("peft_type_run")
    return f"PEFT {_peft_version()}" + (f" (as {ran})" if ran and ran != r.get("peft_type") else "")


def _peft_version() -> str:
    try:
        import peft

        return peft.__version__
    except ImportError:  # pragma: no cover
        return "?"
