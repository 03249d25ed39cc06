"""report.md: the lr x steps table people argue about, the boundary per setting and its fit,
the best cell, the loss-vs-quality correlation, and the sections the evaluation policies add
(full evaluation, LoRA strength, base -> distilled transfer)."""

from __future__ import annotations

from klein_sweep.report.boundary import boundary_section, refinement_section
from klein_sweep.report.results import SweepResults, checkpoints_with, fmt_value, setting_label, setting_order, spearman_table
from klein_sweep.report.stability import stability_section
from klein_sweep.report.transfer import transfer_section
from klein_sweep.report.validation import validation_section


def render_markdown(results, axis, columns, labels, cells, lines_, fit, best, corr, val_corr=None, seeds=None) -> str:
    """`lines_`: the trainings (report.boundary.Lineage) the boundary and its `fit` come from."""
    meta = results.meta
    lines = [f"# Sweep `{results.name}`", ""]
    lines += [f"Objective: `eval/{results.objective}` ({results.direction}) over non-collapsed checkpoints. "
              f"{len(results.trials)} trials finished ({len(results.refinement)} of them refinement past the grid), "
              f"{len(results.failed)} failed."]
    for note in meta.notes if meta else []:
        lines.append(f"- {note}")
    record = next((t.record for t in results.trials if t.base), None)
    if record:
        base = record.base_full or record.base  # the recipe that judges collapse
        lines.append(f"- base model (no LoRA): identity similarity {fmt_value(base.id_sim)}, leak {fmt_value(base.leak)}; "
                     f"the training images' own similarity {fmt_value(base.reference_id_sim)}: the collapse rules' scale runs "
                     "from the first to the second (docs/design.md)")
    lines += ["", f"## Identity / KID / state by {axis}", ""]
    if checkpoints_with(results, "full"):  # screened: two kinds of values share the table
        lines += ["Each checkpoint's values are the full evaluation's where it ran (the deciding checkpoints, listed under "
                  "\"Full evaluation of the deciding checkpoints\"), the screening's elsewhere; a collapse is declared on the "
                  "full values.", ""]
    lines += ["| setting | " + " | ".join(f"{axis} {fmt_value(c)}" for c in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for label in labels:
        out = []
        for c in columns:
            r = cells.get((label, c))
            if r is None:
                out.append("-")
            elif not r.evaluated:
                out.append(f"**{r.state or '?'}**")
            else:
                mark = " **best**" if best and setting_label(best[0].setting) == label and best[1].step == r.step else ""
                out.append(f"{fmt_value(r.value('id_sim'))} / {fmt_value(r.value('kid'))} / {r.state}{mark}")
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    lines += boundary_section(results, lines_, fit)
    lines += refinement_section(results, lines_)
    lines += stability_section(results, seeds or [])
    lines += ["", "## Best cell", ""]
    if best:
        t, r = best
        lines.append(f"{setting_label(t.setting)} at step {r.step}: identity {fmt_value(r.value('id_sim'))}, "
                     f"KID {fmt_value(r.value('kid'))}, prior KID {fmt_value(r.value('prior_kid'))}, state {r.state} (trial {t.number}).")
    else:
        lines.append("No usable checkpoint.")
    lines += ["", "## Does training loss track quality?", "",
              "Spearman rank correlation between the training loss and each metric across all checkpoints.", ""]
    lines += spearman_table(corr, "metric", "too few checkpoints")
    lines += validation_section(results, val_corr or {})
    lines += full_evaluation_section(results)
    lines += strength_section(results)
    lines += transfer_section(results)
    if results.failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {n} ({setting_label(cell)}): {reason}" for n, cell, reason in results.failed]
    lines += ["", "States: G good, U underfit, O overfit, X collapsed (the rules: docs/design.md in the klein_sweep repository). "
              "Rebuild: `python -m klein_sweep.report " + results.name + "`", "",
              f"In MLflow (`mlflow ui`, experiment `{results.name}`): the parent run carries this answer as metrics "
              "(`sweep/best_value`, `collapse_step/<setting>`, `boundary/*`); each trial's run (refinement trainings tagged `klein.refine`) its state, best step and "
              "collapse step (`trial/*`), the validation losses by step (`val/fit_loss`, `val/prior_loss`) and the sample grids by "
              "step (`samples/trigger`, `samples/prior`; step 0 is the base model). In optuna-dashboard: "
              f"`optuna-dashboard sqlite:///sweeps/{results.name}/study.db` (or the sweep.storage URL).", ""]
    return "\n".join(lines)


def strength_section(results: SweepResults) -> list[str]:
    """With eval.lora_scales: every checkpoint that collapsed at strength 1.0, and what the same
    LoRA does at the other strengths - is it still usable weaker?"""
    strengths = sorted({s for t in results.trials for r in t.rows for s in r.scales}, key=float)
    if not strengths:
        return []
    lines = ["", "## LoRA strength: is a collapsed checkpoint usable weaker?", "",
             "Checkpoints that collapsed at strength 1.0, evaluated at the other strengths "
             "(identity / state by the same collapse rules).", "",
             "| setting | step | 1.0 | " + " | ".join(strengths) + " |", "|---|---|---|" + "---|" * len(strengths)]
    usable = 0
    collapsed_rows = [(t, r) for t, r in checkpoints_with(results, "scales") if r.state == "collapsed"]
    for t, r in collapsed_rows:
        cells = []
        for s in strengths:
            at = r.scales.get(s)
            cells.append(f"{fmt_value(at.metrics.get('id_sim'))} / {at.state or '-'}" if at else "- / -")
        usable += any(r.scales[s].state in ("good", "underfit", "overfit") for s in strengths if s in r.scales)
        lines.append(f"| {setting_label(t.setting)} | {r.step} | {fmt_value(r.value('id_sim'))} / collapsed | " + " | ".join(cells) + " |")
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
             "| setting | step | state (judged on the full values) | identity screening | identity full | KID full | prior KID full |",
             "|---|---|---|---|---|---|---|"]
    for t, r in rows:
        f = r.full  # r.metrics: the screening's own values (r.value() would read the full ones)
        lines.append(f"| {setting_label(t.setting)} | {r.step} | {r.state or '?'} | {fmt_value(r.metrics.get('id_sim'))} | "
                     f"{fmt_value(f.get('id_sim'))} | {fmt_value(f.get('kid'))} | {fmt_value(f.get('prior_kid'))} |")
    return lines
