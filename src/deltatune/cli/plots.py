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
    values = [counts[n] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.28 * len(names) + 1.2)), layout="constrained")
    ax.barh(range(len(names)), values, color="#4C72B0")
    for i, v in enumerate(values):  # the exact count at the end of each bar
        ax.text(v, i, f" {v:,}", va="center", fontsize=8)
    ax.set_xlim(0, max(values + [1]) * 1.15)
    ax.set_yticks(range(len(names)), [labels[n] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("trainable parameters (count; stored frozen bases excluded)")
    ax.set_ylabel("module")
    ax.set_title(f"{title}\n{len(names)} modules, {sum(values):,} parameters in all", fontsize=10)
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
    slanted = max(len(c) for c in cols) > 8  # short names ("query", "value") read best upright
    ax.set_xticks(range(len(cols)), cols, rotation=30 if slanted else 0, ha="right" if slanted else "center", fontsize=9)
    ax.set_yticks(range(len(rows)), ylabels, fontsize=8)
    ax.set_xlabel("module type")
    ax.set_ylabel(row_label)
    ax.set_title(f"{title}\n{sum(kept.values())} ranks kept in {len(kept)} modules", fontsize=10)
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
    left.set_xlabel("coefficient rank (sorted by |c|, largest first)")
    unit = (f"magnitude |c| (no unit; ΔW = {scaling:g}·Re IDFT2(c))" if scaling
            else "magnitude |c| of the spectral coefficient (no unit)")
    left.set_ylabel(unit)
    left.set_title("sorted coefficient magnitudes per module")
    left.grid(alpha=0.3, which="both")
    if len(names) <= 16:
        left.legend(fontsize=7, ncol=2)
    means = [float(spectra[n].detach().float().abs().mean()) for n in names]
    right.barh(range(len(names)), means, color="#DD8452")
    right.set_yticks(range(len(names)), [labels[n] for n in names], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("mean |c| over the module's coefficients (no unit)")
    right.set_ylabel("module")
    right.set_title("mean magnitude per module")
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def compare_plot(rows: list[dict[str, Any]], path: Path, title: str,
                 reference: Optional[dict[str, float]] = None, reference_label: str = "PEFT reference") -> Path:
    """Five panels, one bar per run: accuracy, trainable parameters, step time, peak memory, adapter size.

    ``reference`` (method -> accuracy in %) marks each run's reference figure on the accuracy panel,
    with the band of +-1.5 points around it; a dashed line marks the head-only accuracy + 3 points.
    """
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import NullFormatter

    labels = [r["label"] for r in rows]
    palette = {"head": "#8C8C8C", "deltatune": "#4C72B0", "peft": "#DD8452"}
    colors = [palette["head"] if r["method"] == "head" else palette[r["backend"]] for r in rows]
    cpu = any(r.get("step_cpu_s") for r in rows)
    panels = [
        ("accuracy", "test accuracy (%)", lambda r: 100 * r["accuracy"], "{:.1f}"),
        ("params", "trainable parameters (count)", lambda r: r["trainable_params"], "{:,.0f}"),
        ("step", "time per training step (s; median" + (", CPU time of the main thread)" if cpu else ", wall clock)"),
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
            marks = [(i, reference[r["method"]]) for i, r in enumerate(rows) if reference and r["method"] in reference]
            low = min(values + [m for _, m in marks])
            high = max(values + [m for _, m in marks])
            ax.set_xlim(max(0.0, low - 10), min(100.0, high + 5))
            for i, mark in marks:  # the reference figure and its +-1.5-point band, over the bar
                ax.plot([mark - 1.5, mark + 1.5], [i, i], color="black", lw=1, alpha=0.6, zorder=3)
                ax.plot([mark], [i], marker="|", markersize=16, mew=2, color="black", zorder=4)
            head = next((v for v, r in zip(values, rows) if r["method"] == "head"), None)
            if head is not None and len(rows) > 1:
                ax.axvline(head + 3, color="#8C8C8C", ls="--", lw=1, zorder=1)
        else:
            ax.set_xlim(0, max(values + [1e-9]) * 1.25)
        for i, v in enumerate(values):
            text = (f"{v:,.0f}" if v >= 100 else f"{v:.1f}") if fmt == "size" else fmt.format(v)
            if key == "accuracy":  # inside the bar, at its start: the bar's end is left to the reference marks
                ax.text(ax.get_xlim()[0], i, f"  {text}", va="center", ha="left", fontsize=8, color="white",
                        fontweight="bold", zorder=5)
            else:
                ax.text(v, i, " " + text, va="center", ha="left", fontsize=8)
        ax.set_yticks(range(len(rows)), labels, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    legend_ax = axes[-1]
    legend_ax.axis("off")
    used = {"head": "head only (baseline)", "deltatune": "deltatune", "peft": "PEFT"}
    kinds = {"head" if r["method"] == "head" else r["backend"] for r in rows}
    handles: list[Any] = [Patch(color=palette[k], label=used[k]) for k in used if k in kinds]
    if reference and any(r["method"] in reference for r in rows):
        handles.append(Line2D([], [], color="black", marker="|", markersize=12, mew=2, lw=1, alpha=0.8,
                              label=f"{reference_label} ± 1.5 points (accuracy panel)"))
    if any(r["method"] == "head" for r in rows) and len(rows) > 1:
        handles.append(Line2D([], [], color="#8C8C8C", ls="--", lw=1, label="head-only accuracy + 3 points"))
    legend_ax.legend(handles=handles, loc="center", title="colours and marks", frameon=False)
    fig.suptitle(title)
    return _save(fig, path)
