"""Write a sweep's report folder (report.md, report.json, heatmaps.png) from its study."""

from __future__ import annotations

import json
from pathlib import Path

from klein_sweep.fileio import replaced_atomically
from klein_sweep.redaction import redact
from klein_sweep.report.answer import sweep_answer
from klein_sweep.report.markdown import render_markdown
from klein_sweep.report.plots import plot_heatmaps
from klein_sweep.report.boundary import boundary_fit, boundary_json
from klein_sweep.report.plots import plot_boundary
from klein_sweep.report.results import best_cell, build_table, load_results, loss_quality_correlation
from klein_sweep.report.stability import seed_comparison, stability_json
from klein_sweep.report.transfer import transfer_json
from klein_sweep.report.validation import plot_validation, validation_correlation


def write_report(folder: str | Path, study=None, storage: str | None = None, study_name: str | None = None) -> Path:
    folder = Path(folder)
    if study is None:
        study = load_study(folder, storage, study_name)
    results = load_results(study)  # decoded (and version-checked) before any file is written
    folder.mkdir(parents=True, exist_ok=True)
    axis, columns, labels, cells = build_table(results)
    lines, fit = boundary_fit(results)
    best = best_cell(results)
    corr = loss_quality_correlation(results)
    val_corr = validation_correlation(results)
    seeds = seed_comparison(results)
    _atomic_write(folder / "report.md", render_markdown(results, axis, columns, labels, cells, lines, fit, best, corr, val_corr, seeds))
    _atomic_write(folder / "report.json", json.dumps(_as_json(results, axis, columns, labels, cells, lines, fit, best, corr, val_corr, seeds),
                                                     indent=2, default=str))
    if labels and columns:
        plot_heatmaps(folder / "heatmaps.png", results, axis, columns, labels, cells, fit, best)
    plot_boundary(folder / "boundary.png", results, lines, fit)
    plot_validation(folder / "validation.png", results)
    return folder


def _as_json(results, axis, columns, labels, cells, lines, fit, best, corr, val_corr, seeds) -> dict:
    return {
        "name": results.name,
        "meta": results.meta.to_json() if results.meta else None,
        "axis": axis,
        "columns": columns,
        "rows": labels,
        "cells": [{"setting": l, axis: c, **r.to_json()} for (l, c), r in cells.items()],
        "boundary": boundary_json(lines, fit, results),
        "best": {"trial": best[0].number, "setting": best[0].setting, **best[1].to_json()} if best else None,
        "loss_vs_quality_spearman": corr,
        "validation_vs_sampled_spearman": val_corr,
        "seed_stability": stability_json(seeds),
        "transfer": transfer_json(results),
        "validation": [{"trial": t.number, "setting": t.setting, "points": [v.to_json() for v in t.record.validation]}
                       for t in results.trials if t.record.validation],
        "failed": [{"trial": n, "cell": c, "reason": r} for n, c, r in results.failed],
        # what the evaluation cost in units: checkpoints sampled, and of them evaluated in full (screening)
        "evaluations": {"sampled": sum(1 for t in results.trials for r in t.rows if r.metrics),
                        "full": sum(1 for t in results.trials for r in t.rows if r.full)},
        "answer": dict(zip(("metrics", "tags"), sweep_answer(results, lines, fit, best))),  # the parent run's
    }


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
    try:
        names = optuna.study.get_all_study_names(url)
    except Exception as exc:  # unreachable server, bad URL, missing driver
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise KleinSweepError(f"--storage: cannot open {redact(url)} ({exc.__class__.__name__}: {redact(first)})") from exc
    name = study_name or (folder.name if folder.name in names else (names[0] if len(names) == 1 else None))
    if name is None:
        raise KleinSweepError(f"storage {redact(url)} holds studies {names}; name one with --study")
    return optuna.load_study(study_name=name, storage=url)
