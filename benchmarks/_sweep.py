"""The α sweep of the reproductions (`--alphas` with several values) in one figure: per loss, against α on a log
scale, each filter's paired acc1 difference to no filter (95% t interval over seeds; the oracle as a band), its
false-negative precision and recall against the labels, its filtered share of negatives (α itself as a line), and
precision against filtered share — the filters compared at equal filtered share, not at equal α.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks._reproduce import ALPHA_VARIANTS, COLORS, LOSSES, _figure, _save

PANELS = ("acc1 − none, paired (pts)", "FN precision", "FN recall", "filtered share of negatives",
          "FN precision at its filtered share")


def _paired(row: dict[str, Any]) -> tuple[float, float, float] | None:
    """(mean, below, above) of a row's paired acc1 difference in points (error bar lengths 0 without interval)."""
    paired = row.get("zeroshot_acc1_paired")
    if not paired or paired["mean"] is None:
        return None
    mean, ci = 100 * paired["mean"], paired["ci"]
    return (mean, 0.0, 0.0) if ci is None else (mean, mean - 100 * ci[0], 100 * ci[1] - mean)


def plot_sweep(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    """PNG: one row of PANELS per loss, a line per filter that reads α (points: the α swept, means over seeds)."""
    losses = [loss for loss in LOSSES if any(r["loss"] == loss and r["alpha"] is not None for r in rows)]
    if not losses:
        return None
    fig = _figure(len(PANELS), height=3.6 * len(losses))
    for i, loss in enumerate(losses):
        axes = [fig.add_subplot(len(losses), len(PANELS), i * len(PANELS) + k + 1) for k in range(len(PANELS))]
        mine = [r for r in rows if r["loss"] == loss]
        alphas = sorted({r["alpha"] for r in mine if r["alpha"] is not None})
        for variant in ALPHA_VARIANTS:
            line = sorted((r for r in mine if r["variant"] == variant), key=lambda r: r["alpha"])
            if not line:
                continue
            x, color = [r["alpha"] for r in line], COLORS[variant]
            paired = [(r["alpha"], p) for r in line if (p := _paired(r)) is not None]
            if paired:
                axes[0].errorbar([a for a, _ in paired], [p[0] for _, p in paired], color=color, marker="o",
                                 capsize=3, label=variant,
                                 yerr=[[p[1] for _, p in paired], [p[2] for _, p in paired]])
            for ax, key in ((axes[1], "fn_precision_mean"), (axes[2], "fn_recall_mean")):
                ax.plot(x, [r[key] for r in line], color=color, marker="o", label=variant)
            axes[3].plot(x, [100 * r["filtered_frac_mean"] for r in line], color=color, marker="o", label=variant)
            axes[4].plot([100 * r["filtered_frac_mean"] for r in line], [r["fn_precision_mean"] for r in line],
                         color=color, marker="o", label=variant)
        oracle = next((p for r in mine if r["variant"] == "oracle" and (p := _paired(r)) is not None), None)
        if oracle is not None:
            axes[0].axhspan(oracle[0] - oracle[1], oracle[0] + oracle[2], color=COLORS["oracle"], alpha=0.15, lw=0,
                            label="oracle (95% interval)")
        axes[0].axhline(0, color="k", lw=1)
        axes[3].plot(alphas, [100 * a for a in alphas], color="k", lw=1, ls="--", label="α")
        for k, ax in enumerate(axes):
            ax.set(title=f"{loss}: {PANELS[k]}", xscale="log")
            ax.set_xlabel("filtered % (log)" if k == 4 else "α (log)")
            ax.legend(fontsize=7)
        axes[3].set_yscale("log")
        for ax in axes[1:3] + axes[4:]:
            ax.set_ylim(0, 1.02)
    return _save(fig, path)
