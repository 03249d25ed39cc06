"""heatmaps.png: one heatmap per metric over the lr x steps table, state markers, the best cell
boxed, the boundary and its fit drawn."""

from __future__ import annotations

import math
from pathlib import Path

from klein_sweep.fileio import replaced_atomically
from klein_sweep.report.results import fmt_value, setting_label

HEATMAP_METRICS = (("id_sim", "identity similarity (higher is better)"), ("kid", "KID to reference (lower)"),
                   ("prior_kid", "prior KID, LoRA vs base (lower)"), ("leak", "concept leak (lower)"))
STATE_MARK = {"good": "G", "underfit": "U", "overfit": "O", "collapsed": "X"}


def plot_heatmaps(path: Path, results, axis, columns, labels, cells, fit, best) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(HEATMAP_METRICS), figsize=(4.2 * len(HEATMAP_METRICS), 1.2 + 0.45 * len(labels)), squeeze=False)
    for ax, (metric, title) in zip(axes[0], HEATMAP_METRICS):
        grid = np.full((len(labels), len(columns)), np.nan)
        for (label, c), r in cells.items():
            v = r.value(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                grid[labels.index(label), columns.index(c)] = v
        cmap = "viridis" if metric == "id_sim" else "viridis_r"
        ax.set_facecolor("#b0b0b0")  # cells known collapsed but not evaluated (training stopped)
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
        for (label, c), r in cells.items():
            i, j = labels.index(label), columns.index(c)
            ax.text(j, i, STATE_MARK.get(r.state, "?"), ha="center", va="center",
                    color="white" if r.state == "collapsed" else "black", fontsize=9, fontweight="bold")
            before = cells.get((label, columns[j - 1])) if j > 0 else None
            if r.state == "collapsed" and (before is None or before.state != "collapsed"):
                ax.plot([j - 0.5, j - 0.5], [i - 0.5, i + 0.5], color="red", linewidth=3)
        if best:
            t, r = best
            label = setting_label(t.setting)
            col = r.step if axis == "steps" else r.repeats
            if label in labels and col in columns:
                ax.add_patch(plt.Rectangle((columns.index(col) - 0.5, labels.index(label) - 0.5), 1, 1, fill=False, edgecolor="gold", linewidth=3))
        if fit is not None and axis == "steps":
            _draw_fit(ax, fit, results, labels, columns)
        ax.set_xticks(range(len(columns)), [fmt_value(c) for c in columns], rotation=45)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0][0] else [""] * len(labels))
        ax.set_xlabel(axis)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{results.name}: G good, U underfit, O overfit, X collapsed; yellow = better; red = boundary, "
                 f"gold = best, dashed = fit; grey = not evaluated (training stopped at the collapse)", fontsize=10)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _draw_fit(ax, fit, results, labels, columns) -> None:
    """The fitted boundary, in the heatmap's index coordinates (log-interpolated between columns)."""
    import numpy as np

    xs, ys = [], []
    logc = np.log10([float(c) for c in columns])
    for t in results.trials:
        lr = t.setting.get("train.lr")
        label = setting_label(t.setting)
        if lr is None or label not in labels:
            continue
        step = math.log10(fit.step_at(lr))
        xs.append(float(np.interp(step, logc, np.arange(len(columns)), left=-0.5, right=len(columns) - 0.5)))
        ys.append(labels.index(label))
    if len(xs) >= 2:
        order = np.argsort(ys)
        ax.plot(np.array(xs)[order], np.array(ys)[order], "--", color="red", linewidth=1.5)
