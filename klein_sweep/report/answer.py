"""The sweep's answer as MLflow metrics and tags of its parent run, so the runs table and chart
view show it without opening report.md.

  parent metrics   sweep/best_value, sweep/best_step, sweep/trials_finished, sweep/trials_failed,
                   cost/measured_train_seconds, cost/measured_eval_seconds, cost/measured_eval_share,
                   sweep/settings_collapsed, collapse_step/<setting> (one per training that
                   collapsed, refinement included, e.g. collapse_step/lr_0.0004), boundary/slope,
                   boundary/slope_low, boundary/slope_high, boundary/intercept, boundary/sigma,
                   boundary/n_points, boundary/n_censored (the fit, when there is one),
                   boundary/exponent_<axis>[_low|_high] (images, rank: where the sweep varied them),
                   boundary/safe_steps/<lr>[_<axis>_<value>] (the lower end of the band at each grid lr)
  parent tags      klein.best_cell (the best setting and step), klein.boundary (the fit in words),
                   mlflow.note.content (the run's description in MLflow's UI: the best cell, the
                   boundary per training and the fit, in a few lines of markdown)
"""

from __future__ import annotations

import math
import re

from klein_sweep.boundary.fit import BoundaryFit
from klein_sweep.record import CheckpointRow
from klein_sweep.report.results import SweepResults, TrialResult, fmt_value, setting_label

DESCRIPTION_TAG = "mlflow.note.content"  # MLflow's UI shows this tag as the run's description (markdown)


def setting_slug(setting: dict) -> str:
    """{'train.lr': 0.0004, 'train.rank': 16} -> 'lr_0.0004_rank_16' (MLflow's metric-name characters)."""
    text = "_".join(f"{k.split('.')[-1]}_{v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}_{v}"
                    for k, v in sorted(setting.items()))
    return re.sub(r"[^\w.\-/ ]", "_", text) or "default"


def sweep_answer(results: SweepResults, lines: list, fit: BoundaryFit | None,
                 best: tuple[TrialResult, CheckpointRow] | None) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) for the parent run; `lines`: the trainings (report.boundary.Lineage)."""
    from klein_sweep.report.boundary import fit_formula, safe_steps

    points = [(line.setting, line.collapse_step) for line in lines]
    metrics: dict[str, float] = {
        "sweep/trials_finished": len(results.trials),
        "sweep/trials_failed": len(results.failed),
        "sweep/settings_collapsed": sum(1 for _, step in points if step is not None),
    }
    train_s = sum(t.record.train_seconds or 0.0 for t in results.trials)
    eval_s = sum(t.record.eval_seconds or 0.0 for t in results.trials)
    if train_s + eval_s > 0:  # measured, beside the cost preview's prediction (cost/predicted_*)
        metrics.update({"cost/measured_train_seconds": train_s, "cost/measured_eval_seconds": eval_s,
                        "cost/measured_eval_share": eval_s / (train_s + eval_s)})
    tags: dict[str, str] = {}
    for setting, step in points:
        if step is not None:
            metrics[f"collapse_step/{setting_slug(setting)}"] = step
    if best is not None:
        trial, row = best
        value = row.value(results.objective)
        if value is not None and math.isfinite(value):
            metrics["sweep/best_value"] = value
        metrics["sweep/best_step"] = row.step
        tags["klein.best_cell"] = f"{setting_slug(trial.setting)} at step {row.step} (trial {trial.number})"
    if fit is not None:
        metrics.update({"boundary/slope": fit.slope, "boundary/slope_low": fit.slope_interval[0],
                        "boundary/slope_high": fit.slope_interval[1], "boundary/intercept": fit.intercept,
                        "boundary/sigma": fit.sigma, "boundary/n_points": fit.n_points, "boundary/n_censored": fit.n_censored})
        for name, c in fit.exponents.items():
            lo, hi = fit.exponent_intervals[name]
            metrics.update({f"boundary/exponent_{name}": c, f"boundary/exponent_{name}_low": lo, f"boundary/exponent_{name}_high": hi})
        for row in safe_steps(results, lines, fit):
            where = "".join(f"_{k}_{v:g}" for k, v in row.at.items())
            metrics[f"boundary/safe_steps/lr_{row.lr:g}{where}"] = round(row.low)
        tags["klein.boundary"] = fit_formula(fit, digits=3)
    tags[DESCRIPTION_TAG] = answer_description(results, lines, fit, best)
    return metrics, tags


def answer_description(results: SweepResults, lines: list, fit: BoundaryFit | None,
                       best: tuple[TrialResult, CheckpointRow] | None) -> str:
    """The answer in markdown, for the parent run's description: the best cell, each training's
    collapse step with the fitted "safe up to" at its lr, and the fit. report.md has the rest."""
    from klein_sweep.report.boundary import exponent_lines, fitted_values, safe_steps

    objective = results.objective
    out = [f"**Sweep `{results.name}`**: {len(results.trials)} trials finished "
           f"({len(results.refinement)} of them refinement past the grid), {len(results.failed)} failed.", ""]
    if best is not None:
        trial, row = best
        out.append(f"**Best cell**: {setting_label(trial.setting)} at step {row.step} (trial {trial.number}): "
                   f"{objective} {fmt_value(row.value(objective))}, state {row.state}.")
    else:
        out.append("**Best cell**: no usable checkpoint.")
    safe = {row.key: row for row in safe_steps(results, lines, fit)}
    plan = results.plan
    if lines:
        out += ["", "| setting | first collapsed step | found by | safe up to (fit) |", "|---|---|---|---|"]
        for line in lines:
            step = line.collapse_step if line.collapse_step is not None else f"none up to {line.last_step}"
            key = (line.setting.get("train.lr"), *sorted(fitted_values(line, fit, plan).items())) if fit else None
            at = safe.get(key) if line.trial.refine is None else None
            out.append(f"| {setting_label(line.setting)} | {step} | {line.found_by} | {f'{at.low:,.0f} steps' if at else '-'} |")
    if fit is not None:
        lo, hi = fit.slope_interval
        out += ["", f"**Boundary fit**: collapse step ~ lr^{fit.slope:.2f} ({round(fit.confidence * 100)}% interval of the "
                    f"slope {lo:.2f} ... {hi:.2f}), through {fit.n_points} trainings ({fit.n_censored} still fine at their "
                    "last step). Safe up to: the lower end of the fit's band at that lr."]
        if fit.exponents:
            out += ["", *exponent_lines(fit)]
    else:
        out += ["", "**Boundary fit**: none (a line needs collapses at two learning rates)."]
    out += ["", "The full report is this run's artifact `report/report.md`."]
    return "\n".join(out)
