"""The ``deltatune`` command: ``train``, ``compare``, ``merge``, ``inspect``, ``methods``, ``demo``.

Everything runs offline from local files. A usage mistake (unknown method, a field of another
method, a missing data column, a model folder that does not exist, ...) prints one line
``deltatune <command>: error: …`` and exits with code 2; set ``DELTATUNE_DEBUG=1`` for the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

EXIT_USAGE = 2

DEMO_FLAGS = ["--threads", "2", "--group-by-length", "--eval-before", "--baseline", "--output", "runs/demo"]
"""What ``deltatune demo`` (and ``make demo``) adds to a plain ``deltatune train``."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- parser


def _task_names() -> list[str]:
    from .tasks import TASKS

    return ["auto", *TASKS]


def _task_defaults(key: str) -> str:
    from .tasks import TASKS

    return ", ".join(f"{name}: {task.defaults[key]}" for name, task in TASKS.items())


def _add_train_options(p: argparse.ArgumentParser, compare: bool = False) -> None:
    data = p.add_argument_group("data and model (defaults: Rotten Tomatoes + all-MiniLM-L6-v2, offline)")
    data.add_argument("--model", help="local transformers folder or .gguf file (sequence classifier or causal LM)")
    data.add_argument("--task", default="auto", choices=_task_names(),
                      help="classify (new head) or lm (answer the label name); auto: lm for causal-LM models")
    data.add_argument("--data", help="local training table (.csv, .tsv, .jsonl, .json); default: Rotten Tomatoes")
    data.add_argument("--test-data", help="local test table; default: 20%% of --data (or the movie split)")
    data.add_argument("--text-column", default="text")
    data.add_argument("--label-column", default="label")
    data.add_argument("--limit", type=int, help="use at most this many examples (quick runs)")
    run = p.add_argument_group("training")
    run.add_argument("--steps", type=int, help="optimizer steps (" + _task_defaults("steps") + ")")
    run.add_argument("--batch-size", type=int, help=_task_defaults("batch_size"))
    run.add_argument("--max-length", type=int, help="tokens per example (" + _task_defaults("max_length") + ")")
    run.add_argument("--lr", type=float, help="adapter learning rate (default: per method, see `deltatune methods`)")
    run.add_argument("--head-lr", type=float, help="learning rate of the new classification head (default 5e-3)")
    run.add_argument("--weight-decay", type=float, default=0.0)
    run.add_argument("--warmup", type=float, default=0.1, help="fraction of steps with a linear warm-up (then linear decay)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--group-by-length", action="store_true",
                     help="batches of similar-length texts (random chunks of 50 batches sorted by length): "
                     "about half the padding, so about twice as fast")
    run.add_argument("--eval-limit", type=int, help="evaluate on the first N test examples (default: all; lm: 200)")
    run.add_argument("--eval-batch-size", type=int, default=128)
    run.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice" + ("; compare: 1)" if compare else ")"))
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--peft", action="store_true",
                     help="also train each method with the real PEFT (Bone runs as PEFT's MiSS)" if compare
                     else "train with the real PEFT instead of deltatune (same loop; Bone runs as PEFT's MiSS)")
    cfg = p.add_argument_group("adapter config (every field of the method's config)")
    cfg.add_argument("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
                     help="set a config field; VALUE is JSON (r=8, target_modules='[\"query\",\"key\"]')"
                     + ("; prefix with a method to scope it: bone:r=32" if compare else ""))
    if not compare:
        cfg.add_argument("--config", dest="config_file", metavar="adapter_config.json",
                         help="read the config from a PEFT-format adapter_config.json (--set wins)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning (FourierFT, RandLoRA, AdaLoRA, Bone/BAT), offline.",
        epilog="`deltatune methods` lists the methods, their defaults and config fields.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("train", help="fine-tune with one method, evaluate, save the adapter",
                       description="Fine-tune a model with one method, evaluate it and save the adapter in PEFT's format.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--method", help="head or any registered method or alias (`deltatune methods` lists them; "
                   "case-insensitive); default: bone, or the peft_type of --config")
    _add_train_options(p)
    p.add_argument("--output", "-o", help="adapter folder (default: runs/<method>)")
    p.add_argument("--eval-before", action="store_true", help="also evaluate the untrained model")
    p.add_argument("--baseline", action="store_true", help="also train the head-only baseline on the same batches")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="`train` with the demo's flags: " + " ".join(DEMO_FLAGS),
                       description="The demo: deltatune train " + " ".join(DEMO_FLAGS) + " (other train options pass through).")
    p.add_argument("-m", "--method")
    _add_train_options(p)
    p.add_argument("--output", "-o", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="train the head-only baseline and several methods on the same batches; table + plot",
                       description="Train the head-only baseline and several methods on the same data, seed and batches; "
                       "write compare.md, compare.json and compare.png.")
    p.add_argument("-m", "--methods", nargs="+", help="methods to compare (default: head and every registered method); "
                   "commas also separate")
    _add_train_options(p, compare=True)
    p.add_argument("--output", "-o", default="runs/compare", help="folder for the table, plot and adapters")
    p.add_argument("--replot", action="store_true",
                   help="no training: rewrite compare.md and compare.png from the compare.json in --output")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("merge", help="base model + adapter -> merged model folder (safetensors)",
                       description="Merge an adapter into its base model and write a complete transformers model "
                       "folder: transformers.AutoModelForSequenceClassification (classify) or AutoModelForCausalLM "
                       "(lm) .from_pretrained(folder) alone rebuilds the merged model -- every weight, head and "
                       "pooler included, comes from the folder -- with deltatune's outputs. This is why the CLI "
                       "trains transformers' own classes unchanged: its default classifier is all-MiniLM-L6-v2 as "
                       "BertForSequenceClassification, the head on BERT's CLS pooler (the checkpoint's weights), "
                       "not on sentence-transformers' mean pooling, which no transformers BERT classifier has. "
                       "A merged model holding any module transformers would not rebuild is refused.")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + weights)")
    p.add_argument("--base", help="local base model folder or .gguf (default: the adapter's base_model_name_or_path, "
                   "else all-MiniLM-L6-v2)")
    p.add_argument("--output", "-o", required=True, help="folder for the merged model")
    p.add_argument("--task", default="auto", choices=_task_names(),
                   help="auto: from the adapter's task_type (SEQ_CLS: classify, CAUSAL_LM: lm)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    p.add_argument("--no-safe-merge", action="store_true", help="skip the check for NaN/inf before merging")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="config, targeted modules, parameters per module, plots",
                       description="Describe an adapter: config, targeted modules, trainable parameters per module, "
                       "and plots written next to it (AdaLoRA rank pattern, FourierFT spectrum, parameters).")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--base", help="also list which modules of this local base model the config selects")
    p.add_argument("--plots-dir", help="where to write the PNG files (default: the adapter folder)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("methods", help="list the methods, their CLI defaults and config fields")
    p.add_argument("method", nargs="?", help="show the fields of one method")
    p.set_defaults(func=cmd_methods)
    return parser


# --------------------------------------------------------------------------- commands


def cmd_train(ns: argparse.Namespace) -> int:
    import time

    from .train import TrainArgs, run_train, summary_lines

    start = time.perf_counter()
    result = run_train(TrainArgs.from_namespace(ns))
    print("\n".join(["", *summary_lines(result), f"total time: {time.perf_counter() - start:.0f} s"]))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    if ns.threads is None:
        ns.threads = 2
    ns.group_by_length = True
    ns.eval_before = ns.baseline = True
    print(f"deltatune demo = deltatune train {' '.join(DEMO_FLAGS)}", flush=True)
    return cmd_train(ns)


def cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import run_compare

    run_compare(ns)
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from .merge import run_merge

    run_merge(ns.adapter, ns.output, base=ns.base, task=ns.task, max_shard_size=ns.max_shard_size,
              safe_merge=not ns.no_safe_merge)
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    from .inspect import run_inspect

    run_inspect(ns.adapter, base=ns.base, plots_dir=ns.plots_dir, plots=not ns.no_plots, as_json=ns.json)
    return 0


def cmd_methods(ns: argparse.Namespace) -> int:
    from .options import config_class, describe_methods, resolve_method, settable_fields

    if ns.method is None:
        print("methods (name: config class, CLI defaults, learning rate):")
        print(describe_methods())
        print("\n`deltatune methods NAME` lists a method's config fields; set them with --set FIELD=VALUE.")
        return 0
    spec = resolve_method(ns.method)
    if spec.is_head:
        print("head: the head-only baseline (no adapter config)")
        return 0
    cls = config_class(spec)
    print(f"{spec.name}: {cls.__name__} fields (--set FIELD=VALUE, JSON values)")
    for name, f in settable_fields(cls).items():
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        value = spec.implied.get(name, spec.preset.fields.get(name, default))
        print(f"  {name:<24} {value!r}")
    return 0


# --------------------------------------------------------------------------- entry point


def _quiet_libraries() -> None:
    import warnings

    # deprecation notices of transformers/PEFT internals say nothing about the user's command
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = _one_line_warning
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # e.g. the "classifier newly initialised" report
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar


def _one_line_warning(message: Any, category: type, filename: str, lineno: int, line: Optional[str] = None) -> str:
    return f"deltatune: warning: {' '.join(str(message).split())}\n"


def _known_errors() -> tuple[type[BaseException], ...]:
    from deltatune.cli.data import MissingPackageError
    from deltatune.cli.models import ModelLoadError, ModelNotFoundError

    from .options import UsageError

    return (UsageError, MissingPackageError, ModelNotFoundError, ModelLoadError, ValueError, OSError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    ns, extras = parser.parse_known_args(argv)
    prog = f"deltatune {ns.command}" if ns.command else "deltatune"
    if extras:  # argparse would name the top-level parser; say which command did not take them
        parser.exit(EXIT_USAGE, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see {prog} --help)\n")
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(ns.func(ns) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("DELTATUNE_DEBUG") or not isinstance(error, _known_errors()):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
