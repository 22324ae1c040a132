"""PNG plots for ``deltatune inspect`` and ``deltatune compare`` (matplotlib, Agg backend, lazy).

Every figure has labelled axes with units and a title saying what it shows; files are written
atomically (rendered to memory, then :func:`deltatune.io.files.atomic_write_bytes`).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")
_ANY_NUMBER = re.compile(r"\.(\d+)\.")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    from deltatune.io.files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def split_module(path: str) -> tuple[Optional[int], str]:
    """``"bert.encoder.layer.3.attention.self.query"`` -> ``(3, "attention.self.query")``."""
    match = _LAYER.search(path) or _ANY_NUMBER.search(path)
    if match is None:
        return None, path
    return int(match.group(1)), path[match.end():] or path


def short_names(paths: Sequence[str]) -> dict[str, str]:
    """Shortest dotted suffixes that still tell the modules apart (for axis labels)."""
    out = {}
    for path in paths:
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if parts[-n][:1].isdigit() and n < len(parts):
                continue  # "layer.0.query", not "0.query"
            if sum(1 for p in paths if p == cand or p.endswith("." + cand)) == 1:
                out[path] = cand
                break
        else:
            out[path] = path
    return out


def params_per_module(counts: dict[str, int], path: Path, title: str) -> Path:
    """Horizontal bars: stored adapter parameters of each module."""
    plt = _plt()
    names = list(counts)
    labels = short_names(names)
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.28 * len(names) + 1.2)), layout="constrained")
    ax.barh(range(len(names)), [counts[n] for n in names], color="#4C72B0")
    ax.set_yticks(range(len(names)), [labels[n] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("trainable parameters (count; stored frozen bases excluded)")
    ax.set_ylabel("module")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def rank_heatmap(kept: dict[str, int], init_r: Optional[int], path: Path, title: str) -> Path:
    """AdaLoRA's kept ranks as a (layer x module type) grid, each cell annotated with its rank."""
    plt = _plt()
    split = {m: split_module(m) for m in kept}
    layers = sorted({layer for layer, _ in split.values() if layer is not None})
    kinds = sorted({kind for _, kind in split.values()}, key=lambda k: min(m for m in kept if split[m][1] == k))
    if not layers or any(layer is None for layer, _ in split.values()):
        rows, row_label = list(kept), "module"  # no layer numbers: one row per module
        grid = [[kept[m]] for m in rows]
        cols = ["kept rank"]
        ylabels = list(short_names(rows).values())
    else:
        rows, row_label = layers, "layer"
        grid = [[float("nan")] * len(kinds) for _ in layers]
        for module, (layer, kind) in split.items():
            grid[layers.index(layer)][kinds.index(kind)] = kept[module]
        short = short_names(kinds)
        cols = [short[k] for k in kinds]
        ylabels = [str(layer) for layer in layers]
    top = init_r or max(max(kept.values()), 1)
    fig, ax = plt.subplots(figsize=(max(5.5, 2.8 + 1.1 * len(cols)), max(3.4, 1.5 + 0.42 * len(rows))), layout="constrained")
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=top, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not (isinstance(value, float) and math.isnan(value)):
                ax.text(j, i, f"{int(value)}", ha="center", va="center", color="white" if value < 0.6 * top else "black", fontsize=9)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), ylabels, fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel(row_label)
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"kept rank (of init_r = {top})")
    return _save(fig, path)


def spectrum_plot(spectra: dict[str, Any], path: Path, title: str, scaling: Optional[float] = None) -> Path:
    """FourierFT: coefficient magnitudes per module (sorted curves, and the mean per module)."""
    plt = _plt()
    names = list(spectra)
    labels = short_names(names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.26 * len(names) + 1.5)),
                                      gridspec_kw={"width_ratios": [1.4, 1]}, layout="constrained")
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        mags = spectra[name].detach().float().abs().flatten().sort(descending=True).values.numpy()
        left.plot(range(1, len(mags) + 1), mags, color=cmap(i / max(1, len(names) - 1)), lw=1, label=labels[name])
    left.set_yscale("log")
    left.set_xlabel("coefficient, sorted by magnitude (rank)")
    unit = f"|c| (ΔW = {scaling:g}·Re IDFT2(c))" if scaling else "|c| (spectral coefficient)"
    left.set_ylabel(unit)
    left.set_title("sorted coefficient magnitudes per module")
    left.grid(alpha=0.3, which="both")
    if len(names) <= 16:
        left.legend(fontsize=7, ncol=2)
    means = [float(spectra[n].detach().float().abs().mean()) for n in names]
    right.barh(range(len(names)), means, color="#DD8452")
    right.set_yticks(range(len(names)), [labels[n] for n in names], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("mean |c| over the module's coefficients")
    right.set_title("mean magnitude per module")
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def compare_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Five panels, one bar per run: accuracy, trainable parameters, step time, peak memory, adapter size."""
    plt = _plt()
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullFormatter

    labels = [r["label"] for r in rows]
    palette = {"head": "#8C8C8C", "deltatune": "#4C72B0", "peft": "#DD8452"}
    colors = [palette["head"] if r["method"] == "head" else palette[r["backend"]] for r in rows]
    cpu = any(r.get("step_cpu_s") for r in rows)
    panels = [
        ("accuracy", "test accuracy (%)", lambda r: 100 * r["accuracy"], "{:.1f}"),
        ("params", "trainable parameters (count)", lambda r: r["trainable_params"], "{:,.0f}"),
        ("step", "time per training step (s" + (", CPU time of 1 thread)" if cpu else ", wall clock)"),
         lambda r: (r.get("step_cpu_s") if cpu else r.get("step_wall_s")) or 0, "{:.3g}"),
        ("memory", "peak memory of a training step (MiB)", lambda r: (r.get("peak_memory_bytes") or 0) / 2**20, "size"),
        ("size", "saved weights file (kB)", lambda r: (r.get("adapter_bytes") or 0) / 1e3, "size"),
    ]
    fig, grid = plt.subplots(2, 3, figsize=(15, 2 * (0.38 * len(rows) + 1.3)), layout="constrained")
    axes = list(grid.flat)
    for ax, (key, xlabel, value, fmt) in zip(axes, panels):
        values = [float(value(r) or 0) for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        positive = [v for v in values if v > 0]
        if key in ("params", "size") and positive and max(positive) / min(positive) > 30:
            ax.set_xscale("log")  # a head has ~1e3 parameters, an adapter ~1e5: a linear axis hides one
            ax.xaxis.set_minor_formatter(NullFormatter())
            xlabel = xlabel[:-1] + ", log scale)"
            ax.set_xlim(min(positive) / 2, max(positive) * 8)
        elif key == "accuracy":
            ax.set_xlim(max(0.0, min(values) - 10), min(100.0, max(values) + 4))
        else:
            ax.set_xlim(0, max(values + [1e-9]) * 1.25)
        for i, v in enumerate(values):
            text = (f"{v:,.0f}" if v >= 100 else f"{v:.3g}") if fmt == "size" else fmt.format(v)
            ax.text(v, i, " " + text, va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), labels, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    legend_ax = axes[-1]
    legend_ax.axis("off")
    used = {"head": "head only (baseline)", "deltatune": "deltatune", "peft": "PEFT"}
    kinds = {"head" if r["method"] == "head" else r["backend"] for r in rows}
    legend_ax.legend(handles=[Patch(color=palette[k], label=used[k]) for k in used if k in kinds], loc="center",
                     title="bars", frameon=False)
    fig.suptitle(title)
    return _save(fig, path)
