"""``deltatune inspect``: what an adapter folder holds, read from its files alone.

Generic for every method, PEFT's or ours: the config is the raw ``adapter_config.json``; modules
and parameter counts come from the checkpoint keys (``base_model.model.<module>.<tensor>``).
Method-specific views appear when their tensors exist:

* ``lora_E`` and a ``rank_pattern`` in the config (AdaLoRA) -> kept ranks per module, as a heat map;
* ``fourierft_spectrum`` (FourierFT) -> coefficient magnitudes per module.

With ``--base``, the config is also matched against a local base model (which modules it selects).
PNG files go next to the adapter unless ``--plots-dir`` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

from .options import UsageError, read_json

MODEL_PREFIX = "base_model.model."
# Checkpoint tensors that are stored but never trained (RandLoRA's shared random bases, kept in
# every layer as PEFT writes them, and once at model level).
FROZEN_TENSORS = {"randlora_A", "randlora_B"}
HEAD_TENSORS = {"weight", "bias"}  # a module saved whole: modules_to_save (the head) or a trained bias


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from deltatune.io.files import load_tensors

    config_path = folder / "adapter_config.json"
    if not folder.is_dir():
        raise UsageError(f"adapter folder {str(folder)!r} does not exist")
    if not config_path.is_file():
        raise UsageError(f"{str(folder)!r} has no adapter_config.json: not an adapter folder")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise UsageError(f"{config_path} must hold a JSON object")
    return config, load_tensors(folder)


def group_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """Sort checkpoint tensors into adapter modules, saved whole modules and shared tensors."""
    adapter: dict[str, dict[str, int]] = {}
    whole: dict[str, dict[str, int]] = {}
    shared: dict[str, int] = {}
    for key, tensor in tensors.items():
        if not key.startswith(MODEL_PREFIX):  # model-level tensors (RandLoRA's base_model.randlora_A)
            shared[key] = tensor.numel()
            continue
        module, _, name = key[len(MODEL_PREFIX):].rpartition(".")
        if name in HEAD_TENSORS and not module.endswith("base_layer"):
            whole.setdefault(module, {})[name] = tensor.numel()
        elif name in HEAD_TENSORS:  # a trained bias of an adapted layer (bias="<method>_only")
            adapter.setdefault(module[: -len(".base_layer")], {})["base_layer." + name] = tensor.numel()
        else:
            adapter.setdefault(module, {})[name] = tensor.numel()
    return {"adapter": adapter, "whole": whole, "shared": shared}


def trainable_count(params: dict[str, int]) -> int:
    return sum(n for name, n in params.items() if name not in FROZEN_TENSORS)


def kept_ranks(config: dict[str, Any], tensors: dict[str, Any]) -> dict[str, int]:
    """AdaLoRA: kept rank per module, from ``rank_pattern`` (else the saved ``lora_E`` rows)."""
    pattern = config.get("rank_pattern") or {}
    kept: dict[str, int] = {}
    for key, tensor in tensors.items():
        if not key.endswith(".lora_E"):
            continue
        module = key[len(MODEL_PREFIX):].rpartition(".")[0] if key.startswith(MODEL_PREFIX) else key.rpartition(".")[0]
        flags = pattern.get(f"{module}.lora_E")
        kept[module] = sum(bool(f) for f in flags) if isinstance(flags, list) else int(tensor.shape[0])
    return kept


def matched_modules(config_data: dict[str, Any], base: str) -> list[str]:
    """Modules of a local base model that the config selects (PEFT's matching rules)."""
    import deltatune as dt
    from deltatune.core.targeting import select_targets

    from .options import registered_methods
    from .tasks import detect_task

    methods = registered_methods()
    peft_type = config_data.get("peft_type")
    if peft_type not in methods:
        raise UsageError(f"--base: deltatune has no {peft_type!r} method to match modules with; known: {sorted(methods)}")
    config = dt.PeftConfig.from_peft_type(**{k: v for k, v in config_data.items() if k != "peft_version"})
    task = detect_task("auto", base, config.task_type)
    model = task.load_model(base, ["0", "1"])[0]  # the head is not adapted: any label count will do
    selection = select_targets(model, config, lambda m: False, methods[peft_type].model_cls.default_targets)
    return list(selection.targets)


def run_inspect(
    adapter: str,
    base: Optional[str] = None,
    plots_dir: Optional[str] = None,
    plots: bool = True,
    as_json: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    folder = Path(adapter).expanduser()
    config, tensors = read_adapter(folder)
    groups = group_tensors(tensors)
    peft_type = str(config.get("peft_type", "?"))
    per_module = {m: trainable_count(p) for m, p in groups["adapter"].items()}
    report: dict[str, Any] = {
        "adapter": str(folder),
        "peft_type": peft_type,
        "config": {k: v for k, v in sorted(config.items()) if v not in (None, {}, [])},
        "modules": groups["adapter"],
        "saved_whole": groups["whole"],
        "shared": groups["shared"],
        "trainable_params": sum(per_module.values()) + sum(trainable_count(p) for p in groups["whole"].values()),
        "adapter_params": sum(per_module.values()),
        "stored_tensors": len(tensors),
        "plots": [],
    }
    ranks = kept_ranks(config, tensors)
    if ranks:
        report["kept_ranks"] = ranks
    spectra = {k[len(MODEL_PREFIX):].rpartition(".")[0]: t for k, t in tensors.items() if k.endswith(".fourierft_spectrum")}
    if base is not None:
        report["matched_modules"] = matched_modules(config, base)

    if plots:
        from . import plots as cli_plots

        out = Path(plots_dir).expanduser() if plots_dir else folder
        out.mkdir(parents=True, exist_ok=True)
        name = peft_type.lower()
        if per_module:
            report["plots"].append(str(cli_plots.params_per_module(
                per_module, out / "inspect_params.png", f"{name}: trainable parameters per adapted module")))
        if ranks:
            init_r = config.get("init_r")
            report["plots"].append(str(cli_plots.rank_heatmap(
                ranks, init_r if isinstance(init_r, int) else None, out / "inspect_rank_pattern.png",
                f"{name}: kept rank per module (target_r = {config.get('target_r', '?')} on average)")))
        if spectra:
            scaling = config.get("scaling")
            report["plots"].append(str(cli_plots.spectrum_plot(
                spectra, out / "inspect_spectrum.png", f"{name}: spectral coefficients (n_frequency = "
                f"{config.get('n_frequency', '?')} per module)", scaling if isinstance(scaling, (int, float)) else None)))

    if as_json:
        log(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        for line in report_lines(report):
            log(line)
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"adapter {report['adapter']}: {report['peft_type']}", "config:"]
    for key, value in report["config"].items():
        lines.append(f"  {key}: {json.dumps(value, default=str)}")
    modules = report["modules"]
    lines.append(f"adapted modules ({len(modules)}), parameters per module (tensors from the checkpoint):")
    ranks = report.get("kept_ranks", {})
    for module, params in modules.items():
        parts = ", ".join(f"{name} {n:,}" + (" (frozen)" if name in FROZEN_TENSORS else "") for name, n in params.items())
        rank = f"  kept rank {ranks[module]}" if module in ranks else ""
        lines.append(f"  {module}: {trainable_count(params):,} ({parts}){rank}")
    if report["saved_whole"]:
        lines.append("modules saved whole (modules_to_save, e.g. the new head):")
        for module, params in report["saved_whole"].items():
            lines.append(f"  {module}: {sum(params.values()):,}")
    if report["shared"]:
        lines.append("model-level tensors (shared by all layers, not trained):")
        for key, n in report["shared"].items():
            lines.append(f"  {key}: {n:,}")
    lines.append(f"trainable parameters: {report['trainable_params']:,} "
                 f"(adapter {report['adapter_params']:,} + saved modules)")
    if "matched_modules" in report:
        matched = report["matched_modules"]
        lines.append(f"modules the config selects in the base model ({len(matched)}):")
        lines += [f"  {m}" for m in matched]
        missing = sorted(set(matched) - set(modules))
        if missing:
            lines.append(f"  selected but not in the checkpoint: {', '.join(missing)}")
    for path in report["plots"]:
        lines.append(f"wrote {path}")
    return lines
