"""The sweep's answer as MLflow metrics and tags of its parent run, so the runs table and chart
view show it without opening report.md.

  parent metrics   sweep/best_value, sweep/best_step, sweep/trials_finished, sweep/trials_failed,
                   cost/measured_train_seconds, cost/measured_eval_seconds, cost/measured_eval_share,
                   sweep/settings_collapsed, collapse_step/<setting> (one per training that
                   collapsed, refinement included, e.g. collapse_step/lr_0.0004), boundary/slope,
                   boundary/slope_low, boundary/slope_high, boundary/intercept, boundary/sigma,
                   boundary/n_points, boundary/n_censored (the fit, when there is one),
                   boundary/safe_steps/<lr> (the lower end of the band at each grid lr)
  parent tags      klein.best_cell (the best setting and step), klein.boundary (the fit in words)
"""

from __future__ import annotations

import math
import re

from klein_sweep.boundary.fit import BoundaryFit
from klein_sweep.record import CheckpointRow
from klein_sweep.report.results import SweepResults, TrialResult


def setting_slug(setting: dict) -> str:
    """{'train.lr': 0.0004, 'train.rank': 16} -> 'lr_0.0004_rank_16' (MLflow's metric-name characters)."""
    text = "_".join(f"{k.split('.')[-1]}_{v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}_{v}"
                    for k, v in sorted(setting.items()))
    return re.sub(r"[^\w.\-/ ]", "_", text) or "default"


def sweep_answer(results: SweepResults, lines: list, fit: BoundaryFit | None,
                 best: tuple[TrialResult, CheckpointRow] | None) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) for the parent run; `lines`: the trainings (report.boundary.Lineage)."""
    from klein_sweep.report.boundary import safe_steps

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
        for row in safe_steps(results, lines, fit):
            metrics[f"boundary/safe_steps/lr_{row.lr:g}"] = round(row.low)
        tags["klein.boundary"] = f"log10(collapse step) = {fit.intercept:.3f} + {fit.slope:.3f} * log10(lr)"
    return metrics, tags
