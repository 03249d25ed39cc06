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
                 f"gold = best, dashed = fit with its band; grey = not evaluated (training stopped at the collapse)", fontsize=10)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _draw_fit(ax, fit, results, labels, columns) -> None:
    """The fitted boundary and its band, in the heatmap's index coordinates (log-interpolated
    between columns; beyond the last column it leaves the plot)."""
    import numpy as np

    logc = np.log10([float(c) for c in columns])
    index = np.arange(len(columns))

    def x_of(step: float) -> float:
        return float(np.interp(math.log10(step), logc, index, left=-0.5, right=len(columns) - 0.5))

    from klein_sweep.report.boundary import Lineage, fitted_values

    plan = results.plan
    rows = []
    for t in results.grid:
        lr, label = t.setting.get("train.lr"), setting_label(t.setting)
        if lr is not None and label in labels:
            at = fitted_values(Lineage(t), fit, plan)
            low, high = fit.interval_at(lr, at)
            rows.append((labels.index(label), x_of(fit.step_at(lr, at)), x_of(low), x_of(high)))
    rows = sorted(set(rows))
    if len(rows) >= 2:
        y, mid, low, high = (np.array(v) for v in zip(*rows))
        ax.fill_betweenx(y, low, high, color="red", alpha=0.15, linewidth=0)
        ax.plot(mid, y, "--", color="red", linewidth=1.5)


def plot_boundary(path: Path, results, lines, fit) -> None:
    """boundary.png: collapse step against lr on log axes. Each training's collapse as the
    interval between its last fine and first collapsed checkpoint; a training still fine at its
    end as a triangle pointing up; the fit and its band."""
    points = [(line, o) for line in lines if (o := line.observation(results.plan)) is not None]
    if not points:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from klein_sweep.report.boundary import at_label

    names = {"grid": "grid", "extend": "continued past the grid", "bisect": "bisected lr"}
    markers = {"grid": "x", "extend": "o", "bisect": "s"}
    # One colour per measured value of the fit's other axes (images 5, 10, 20), shared by the
    # points and their curve; one colour per source where the fit has no other axis.
    axes = fit.axes if fit is not None else []
    groups = sorted({tuple((k, o.covariates[k]) for k in axes) for _, o in points})
    by_group = len(groups) > 1
    source_colors = {"grid": "black", "extend": "tab:blue", "bisect": "tab:orange"}

    def group_color(group):
        return plt.get_cmap("viridis")(groups.index(group) / max(1, len(groups) - 1) * 0.85) if by_group else "red"

    fig, ax = plt.subplots(figsize=(6.8, 4.8))
    shown = set()
    for line, o in points:
        group = tuple((k, o.covariates[k]) for k in axes)
        color = group_color(group) if by_group else source_colors[o.source]
        label = names[o.source] if o.source not in shown else None
        shown.add(o.source)
        if o.censored:
            ax.scatter([o.lr], [o.low], marker="^", s=70, facecolors="none", edgecolors=color, label=label)
        else:
            low = o.low if o.low > 0 else o.high / 2
            ax.plot([o.lr, o.lr], [low, o.high], color=color, linewidth=2.5, alpha=0.8)
            ax.scatter([o.lr], [o.high], marker=markers[o.source], color=color, label=label)
    lrs = [o.lr for _, o in points]
    if fit is not None:
        xs = np.geomspace(min(lrs) / 1.2, max(lrs) * 1.2, 60)
        for i, group in enumerate(groups):
            at = dict(group)
            color = group_color(group)
            where = f" at {at_label(at)}" if group else ""
            band = np.array([fit.interval_at(x, at) for x in xs])
            ax.fill_between(xs, band[:, 0], band[:, 1], color=color, alpha=0.12, linewidth=0,
                            label=f"{round(fit.confidence * 100)}% band" if i == 0 else None)
            ax.plot(xs, [fit.step_at(x, at) for x in xs], "--", color=color,
                    label=f"fit: steps ~ lr^{fit.slope:.2f}{where}")
    if results.meta and results.meta.step_values:
        ax.axhline(max(results.meta.step_values), color="grey", linestyle=":", linewidth=1, label="grid's last step")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("first collapsed step")
    exponents = "".join(f" x {k}^{c:.2f}" for k, c in (fit.exponents.items() if fit is not None else []))
    ax.set_title(f"{results.name}: collapse boundary{f' (steps ~ lr^{fit.slope:.2f}{exponents})' if exponents else ''}\n"
                 "bars: between the last fine and the first collapsed checkpoint;\ntriangles: never collapsed, fine up to there",
                 fontsize=8)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
