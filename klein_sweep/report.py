"""The sweep report, rebuilt from the Optuna storage alone (no retraining, no MLflow needed):

  report.md      the lr x steps table people argue about (identity / KID / state per cell), the
                 collapse boundary per setting and its fit across lr, the best cell, whether
                 training loss tracks quality (Spearman), failed trials
  heatmaps.png   one heatmap per metric, state markers, best cell boxed, boundary drawn
  report.json    the same numbers for notebooks and scripts

    python -m klein_sweep.report lr_vs_steps            # reads sweeps/lr_vs_steps/study.db
    python -m klein_sweep.report path/to/folder --storage postgresql://...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from klein_sweep import collapse
from klein_sweep.fileio import replaced_atomically

HEATMAP_METRICS = (("id_sim", "identity similarity (higher is better)"), ("kid", "KID to reference (lower)"),
                   ("prior_kid", "prior KID, LoRA vs base (lower)"), ("leak", "concept leak (lower)"))
QUALITY_METRICS = ("id_sim", "kid", "prior_kid", "fid", "is", "leak")
STATE_MARK = {"good": "G", "underfit": "U", "overfit": "O", "collapsed": "X"}


@dataclass
class TrialResult:
    number: int
    setting: dict  # swept params other than the step axis
    rows: list[dict]  # checkpoint rows with state
    steps: int | None
    collapse_step: int | None
    best_step: int | None
    state: str
    base: dict = field(default_factory=dict)


@dataclass
class SweepResults:
    name: str
    meta: dict
    trials: list[TrialResult]
    failed: list[tuple[int, dict, str]]  # number, cell, reason


def load_results(study) -> SweepResults:
    from optuna.trial import TrialState

    meta = study.user_attrs.get("meta", {})
    axis_key = "train.steps"
    trials, failed = [], []
    for t in study.get_trials(deepcopy=False):
        cell = dict(t.user_attrs.get("cell") or {})
        if t.state == TrialState.FAIL:
            if "failure_reason" in t.user_attrs:
                failed.append((t.number, cell, t.user_attrs["failure_reason"]))
            continue
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or "checkpoints" not in t.user_attrs:
            continue
        rows = [{k: _num(v) for k, v in r.items()} for r in t.user_attrs["checkpoints"]]
        steps = t.user_attrs.get("steps")
        setting = {k: v for k, v in cell.items() if k != axis_key}
        trials.append(TrialResult(t.number, setting, rows, steps, t.user_attrs.get("collapse_step"),
                                  t.user_attrs.get("best_step"), t.user_attrs.get("state", "?"), t.user_attrs.get("base", {})))
    return SweepResults(study.study_name, meta, trials, failed)


def _num(v):
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


# --- the table ----------------------------------------------------------------------------------


def axis_of(results: SweepResults) -> tuple[str, list]:
    """('steps' or 'repeats', the column values)."""
    meta = results.meta
    if meta.get("step_axis") == "repeats":
        return "repeats", list(meta.get("repeats_values") or [])
    if meta.get("step_values"):
        return "steps", list(meta["step_values"])
    # Steps trained separately (a schedule that depends on the total, or a searched step count):
    # each trial is one column, its own step count.
    return "steps", sorted({t.steps for t in results.trials if t.steps})


def cell_row(trial: TrialResult, axis: str, value, steps_are_checkpoints: bool) -> dict | None:
    """The checkpoint row standing for (trial's setting, axis value). A trial stopped by collapse
    before that point is collapsed there too."""
    key = "step" if axis == "steps" else "repeats"
    if axis == "steps" and not steps_are_checkpoints and trial.steps is not None and trial.steps != value:
        return None  # steps trained separately: only the trial's own final step is its cell
    for r in trial.rows:
        if r.get(key) is not None and math.isclose(float(r[key]), float(value), rel_tol=1e-6):
            return r
    if trial.collapse_step is not None:
        last = max(r.get(key) or 0 for r in trial.rows)
        if value > last:
            return {"state": "collapsed", "reason": "after the collapse"}
    return None


def _setting_order(trial: TrialResult) -> list:
    """Rows in numeric order of the swept values (lr 5e-5 before 1e-4), then by trial."""
    return [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for _, v in sorted(trial.setting.items())] + [(0, trial.number, "")]


def setting_label(setting: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[-1]}={_fmt(v)}" for k, v in sorted(setting.items())) or "(default)"


def build_table(results: SweepResults) -> tuple[str, list, list[str], dict]:
    """(axis, columns, row labels, {(label, column): row})."""
    axis, columns = axis_of(results)
    sac = bool(results.meta.get("steps_are_checkpoints"))
    labels, cells = [], {}
    for t in sorted(results.trials, key=_setting_order):
        label = setting_label(t.setting)
        if label not in labels:
            labels.append(label)
        for c in columns:
            row = cell_row(t, axis, c, sac)
            if row is not None:
                cells[(label, c)] = row
    return axis, columns, labels, cells


def boundary_points(results: SweepResults) -> tuple[list[tuple], collapse.BoundaryFit | None]:
    """Per setting: its first collapsed step. Fitted against lr when lr is swept."""
    points = []
    for t in results.trials:
        points.append((t.setting, t.collapse_step))
    lr_points = [(s.get("train.lr"), step) for s, step in points if s.get("train.lr") is not None and step is not None]
    return points, collapse.fit_boundary(lr_points)


def best_cell(results: SweepResults) -> tuple[TrialResult, dict] | None:
    objective = results.meta.get("objective", "eval/id_sim").split("/", 1)[-1]
    direction = results.meta.get("direction", "maximize")
    best = None
    for t in results.trials:
        row = collapse.best_checkpoint(t.rows, objective, direction)
        if row is None:
            continue
        better = best is None or (row[objective] > best[1][objective] if direction == "maximize" else row[objective] < best[1][objective])
        if better:
            best = (t, row)
    return best


def loss_quality_correlation(results: SweepResults) -> dict[str, dict]:
    """Spearman rank correlation between training loss and each metric across all checkpoints:
    does the loss curve say anything about quality?"""
    from scipy.stats import spearmanr

    out = {}
    for m in QUALITY_METRICS:
        pairs = [(r["loss"], r[m]) for t in results.trials for r in t.rows
                 if isinstance(r.get("loss"), (int, float)) and isinstance(r.get(m), (int, float))
                 and math.isfinite(r["loss"]) and math.isfinite(r[m])]
        if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
            rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
            out[m] = {"rho": float(rho), "p": float(p), "n": len(pairs)}
    return out


# --- writing ------------------------------------------------------------------------------------


def write_report(folder: str | Path, study=None, storage: str | None = None, study_name: str | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if study is None:
        study = load_study(folder, storage, study_name)
    results = load_results(study)
    axis, columns, labels, cells = build_table(results)
    points, fit = boundary_points(results)
    best = best_cell(results)
    corr = loss_quality_correlation(results)
    _atomic_write(folder / "report.md", render_markdown(results, axis, columns, labels, cells, points, fit, best, corr))
    _atomic_write(folder / "report.json", json.dumps(_as_json(results, axis, columns, labels, cells, points, fit, best, corr), indent=2, default=str))
    if labels and columns:
        plot_heatmaps(folder / "heatmaps.png", results, axis, columns, labels, cells, fit, best)
    return folder


def render_markdown(results, axis, columns, labels, cells, points, fit, best, corr) -> str:
    meta = results.meta
    lines = [f"# Sweep `{results.name}`", ""]
    lines += [f"Objective: `{meta.get('objective', '?')}` ({meta.get('direction', '?')}) over non-collapsed checkpoints. "
              f"{len(results.trials)} trials finished, {len(results.failed)} failed."]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    base = next((t.base for t in results.trials if t.base), {})
    if base:
        lines.append(f"- base model (no LoRA): identity similarity {_fmt(base.get('id_sim'))}, leak {_fmt(base.get('leak'))}")
    lines += ["", f"## Identity / KID / state by {axis}", "",
              "| setting | " + " | ".join(f"{axis} {_fmt(c)}" for c in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for label in labels:
        out = []
        for c in columns:
            r = cells.get((label, c))
            if r is None:
                out.append("-")
            elif "id_sim" not in r:
                out.append(f"**{r.get('state', '?')}**")
            else:
                mark = " **best**" if best and setting_label(best[0].setting) == label and _same(best[1], r) else ""
                out.append(f"{_fmt(r.get('id_sim'))} / {_fmt(r.get('kid'))} / {r.get('state')}{mark}")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    lines += ["", "## Collapse boundary", "", "| setting | first collapsed step | reason |", "|---|---|---|"]
    for t in sorted(results.trials, key=_setting_order):
        reason = next((r.get("reason", "") for r in t.rows if r.get("state") == "collapsed"), "")
        lines.append(f"| {setting_label(t.setting)} | {t.collapse_step if t.collapse_step is not None else 'none'} | {reason} |")
    if fit is not None:
        lines += ["", f"Fit across learning rates: log10(step) = {fit.intercept:.2f} + {fit.slope:.2f} * log10(lr) "
                      f"(r = {fit.r_value:.2f}, {fit.n_points} points): doubling the lr moves the boundary by a "
                      f"factor of {2 ** fit.slope:.2f}."]
    else:
        lines += ["", "No boundary fit: fewer than two learning rates collapsed within the sweep."]
    lines += ["", "## Best cell", ""]
    if best:
        t, r = best
        lines.append(f"{setting_label(t.setting)} at step {r['step']}: identity {_fmt(r.get('id_sim'))}, "
                     f"KID {_fmt(r.get('kid'))}, prior KID {_fmt(r.get('prior_kid'))}, state {r.get('state')} (trial {t.number}).")
    else:
        lines.append("No usable checkpoint.")
    lines += ["", "## Does training loss track quality?", "",
              "Spearman rank correlation between the training loss and each metric across all checkpoints.", "",
              "| metric | rho | p | n |", "|---|---|---|---|"]
    for m, c in corr.items():
        lines.append(f"| {m} | {c['rho']:+.2f} | {c['p']:.3g} | {c['n']} |")
    if not corr:
        lines.append("| (too few checkpoints) | | | |")
    lines += full_evaluation_section(results)
    lines += strength_section(results)
    lines += transfer_section(results)
    if results.failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {n} ({setting_label(cell)}): {reason}" for n, cell, reason in results.failed]
    lines += ["", "States: G good, U underfit, O overfit, X collapsed (see DESIGN.md for the rules). "
              "Rebuild: `python -m klein_sweep.report " + results.name + "`", ""]
    return "\n".join(lines)


def checkpoints_with(results: SweepResults, key: str) -> list[tuple[TrialResult, dict]]:
    """(trial, checkpoint row) for every row carrying `key` (scales, full, distilled), in table order."""
    return [(t, r) for t in sorted(results.trials, key=_setting_order) for r in t.rows if r.get(key)]


def strength_section(results: SweepResults) -> list[str]:
    """With eval.lora_scales: every checkpoint that collapsed at strength 1.0, and what the same
    LoRA does at the other strengths - is it still usable weaker?"""
    strengths = sorted({s for t in results.trials for r in t.rows for s in r.get("scales", {})}, key=float)
    if not strengths:
        return []
    lines = ["", "## LoRA strength: is a collapsed checkpoint usable weaker?", "",
             "Checkpoints that collapsed at strength 1.0, evaluated at the other strengths "
             "(identity / state by the same collapse rules).", "",
             "| setting | step | 1.0 | " + " | ".join(strengths) + " |", "|---|---|---|" + "---|" * len(strengths)]
    usable = 0
    collapsed_rows = [(t, r) for t, r in checkpoints_with(results, "scales") if r.get("state") == "collapsed"]
    for t, r in collapsed_rows:
        cells = []
        for s in strengths:
            at = r["scales"].get(s, {})
            cells.append(f"{_fmt(at.get('id_sim'))} / {at.get('state', '-')}")
        usable += any(r["scales"].get(s, {}).get("state") in ("good", "underfit", "overfit") for s in strengths)
        lines.append(f"| {setting_label(t.setting)} | {r['step']} | {_fmt(r.get('id_sim'))} / collapsed | " + " | ".join(cells) + " |")
    if not collapsed_rows:
        lines.append("| (no checkpoint collapsed at strength 1.0) | | | " + " | ".join("" for _ in strengths) + " |")
    else:
        lines += ["", f"{usable} of {len(collapsed_rows)} collapsed checkpoints are not collapsed at some lower or higher strength."]
    return lines


def full_evaluation_section(results: SweepResults) -> list[str]:
    """With screening: the checkpoints that got the full evaluation, screening vs full values."""
    rows = checkpoints_with(results, "full")
    if not rows:
        return []
    lines = ["", "## Full evaluation of the deciding checkpoints", "",
             "Every checkpoint was screened with fewer samples (eval.screening_seeds); the two best screened checkpoints and "
             "the two around the first collapse were evaluated in full; the best checkpoint and the objective use the full values.", "",
             "| setting | step | state (screening) | identity screening | identity full | KID full | prior KID full |",
             "|---|---|---|---|---|---|---|"]
    for t, r in rows:
        f = r["full"]
        lines.append(f"| {setting_label(t.setting)} | {r['step']} | {r.get('state', '?')} | {_fmt(r.get('id_sim'))} | "
                     f"{_fmt(f.get('id_sim'))} | {_fmt(f.get('kid'))} | {_fmt(f.get('prior_kid'))} |")
    return lines


def transfer_section(results: SweepResults) -> list[str]:
    """With eval.also_distilled: each checkpoint's identity on the base model it was trained on
    and on the distilled model (4 steps, no CFG) - does the LoRA transfer?"""
    rows = checkpoints_with(results, "distilled")
    if not rows:
        return []
    lines = ["", "## Base -> distilled transfer", "",
             "Identity similarity of each checkpoint's LoRA on the base model (its own recipe) and on the "
             "distilled model (4 steps, no CFG); KID to the training images on the distilled model.", "",
             "| setting | step | identity on base | identity on distilled | KID on distilled | state on base |",
             "|---|---|---|---|---|---|"]
    for t, r in rows:
        d = r["distilled"]
        lines.append(f"| {setting_label(t.setting)} | {r['step']} | {_fmt(r.get('id_sim'))} | {_fmt(d.get('id_sim'))} | "
                     f"{_fmt(d.get('kid'))} | {r.get('state', '?')} |")
    gaps = [r["distilled"]["id_sim"] - r["id_sim"] for _, r in rows
            if isinstance(r.get("id_sim"), (int, float)) and isinstance(r["distilled"].get("id_sim"), (int, float))]
    if gaps:
        lines += ["", f"Mean identity change from base to distilled: {sum(gaps) / len(gaps):+.3f} over {len(gaps)} checkpoints."]
    return lines


def plot_heatmaps(path: Path, results, axis, columns, labels, cells, fit, best) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(HEATMAP_METRICS), figsize=(4.2 * len(HEATMAP_METRICS), 1.2 + 0.45 * len(labels)), squeeze=False)
    for ax, (metric, title) in zip(axes[0], HEATMAP_METRICS):
        grid = np.full((len(labels), len(columns)), np.nan)
        for (label, c), r in cells.items():
            v = r.get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                grid[labels.index(label), columns.index(c)] = v
        cmap = "viridis" if metric == "id_sim" else "viridis_r"
        ax.set_facecolor("#b0b0b0")  # cells known collapsed but not evaluated (training stopped)
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
        for (label, c), r in cells.items():
            i, j = labels.index(label), columns.index(c)
            ax.text(j, i, STATE_MARK.get(r.get("state"), "?"), ha="center", va="center",
                    color="white" if r.get("state") == "collapsed" else "black", fontsize=9, fontweight="bold")
            if r.get("state") == "collapsed" and (j == 0 or cells.get((label, columns[j - 1]), {}).get("state") != "collapsed"):
                ax.plot([j - 0.5, j - 0.5], [i - 0.5, i + 0.5], color="red", linewidth=3)
        if best:
            t, r = best
            label = setting_label(t.setting)
            col = r["step"] if axis == "steps" else r.get("repeats")
            if label in labels and col in columns:
                ax.add_patch(plt.Rectangle((columns.index(col) - 0.5, labels.index(label) - 0.5), 1, 1, fill=False, edgecolor="gold", linewidth=3))
        if fit is not None and axis == "steps":
            _draw_fit(ax, fit, results, labels, columns)
        ax.set_xticks(range(len(columns)), [_fmt(c) for c in columns], rotation=45)
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


def _as_json(results, axis, columns, labels, cells, points, fit, best, corr) -> dict:
    return {
        "name": results.name,
        "meta": results.meta,
        "axis": axis,
        "columns": columns,
        "rows": labels,
        "cells": [{"setting": l, axis: c, **{k: v for k, v in r.items()}} for (l, c), r in cells.items()],
        "boundary": [{"setting": s, "collapse_step": step} for s, step in points],
        "fit": fit.__dict__ if fit else None,
        "best": {"trial": best[0].number, "setting": best[0].setting, **best[1]} if best else None,
        "loss_vs_quality_spearman": corr,
        "failed": [{"trial": n, "cell": c, "reason": r} for n, c, r in results.failed],
    }


def _same(a: dict, b: dict) -> bool:
    return a.get("step") == b.get("step")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _atomic_write(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:  # two workers finishing together do not trip over each other
        tmp.write_text(text)


def load_study(folder: Path, storage: str | None = None, study_name: str | None = None):
    import optuna

    from klein_sweep.errors import KleinSweepError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{folder / 'study.db'}"
    if storage is None and not (folder / "study.db").exists():
        raise KleinSweepError(f"no study in {folder}: expected {folder / 'study.db'} (or pass --storage URL)")
    names = optuna.study.get_all_study_names(url)
    name = study_name or (folder.name if folder.name in names else (names[0] if len(names) == 1 else None))
    if name is None:
        raise KleinSweepError(f"storage {url} holds studies {names}; name one with --study")
    return optuna.load_study(study_name=name, storage=url)


def main(argv: list[str] | None = None) -> int:
    from klein_sweep.errors import KleinSweepError

    parser = argparse.ArgumentParser(prog="python -m klein_sweep.report", description="Rebuild a sweep's report from its study storage.")
    parser.add_argument("sweep", help="sweep name (reads sweeps/NAME/) or a folder holding study.db")
    parser.add_argument("--storage", help="Optuna storage URL, if not the folder's study.db")
    parser.add_argument("--study", help="study name, if the storage holds several")
    args = parser.parse_args(argv)
    folder = Path(args.sweep) if Path(args.sweep).is_dir() else Path("sweeps") / args.sweep
    try:
        out = write_report(folder, storage=args.storage, study_name=args.study)
    except KleinSweepError as exc:
        print(f"klein_sweep.report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {out / 'report.md'} and {out / 'heatmaps.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
