"""The validation losses in the report: do the cheap, dense signals track what sampling measures?

  validation_correlation  Spearman between val/* and the sampled metrics at the checkpoints
                          where both were measured, across all trials
  validation_section      that table in report.md, with what the dense points add
  plot_validation         validation.png: both losses by step, a line per setting, the sampled
                          collapse step marked
"""

from __future__ import annotations

import math
from pathlib import Path

from klein_sweep.fileio import replaced_atomically
from klein_sweep.report.results import SweepResults, setting_label, setting_order, spearman, spearman_table

# (validation loss, the sampled metric it should track): forgetting (prior_loss up with prior KID
# and leak), fitting (fit_loss down as identity rises and KID to the training images falls)
PAIRS = (("prior_loss", "prior_kid"), ("prior_loss", "leak"), ("fit_loss", "id_sim"), ("fit_loss", "kid"))


def validation_correlation(results: SweepResults) -> dict[str, dict]:
    """{"<loss> vs <metric>": {rho, p, n}} over every evaluated checkpoint that has both."""
    out = {}
    for loss, metric in PAIRS:
        pairs = []
        for t in results.trials:
            by_step = {v.step: v for v in t.record.validation}
            for r in t.rows:
                v = by_step.get(r.step)
                if v is not None and _finite(getattr(v, loss)) and _finite(r.value(metric)):
                    pairs.append((getattr(v, loss), r.value(metric)))
        if (c := spearman(pairs)) is not None:
            out[f"{loss} vs {metric}"] = c
    return out


def validation_section(results: SweepResults, corr: dict[str, dict]) -> list[str]:
    points = sum(len(t.record.validation) for t in results.trials)
    if not points:
        return []
    lines = ["", "## Validation losses: do the cheap signals track the sampled metrics?", "",
             "`val/fit_loss`: the flow-matching loss on fixed training images, fixed noise and noise levels (falls as the "
             "LoRA fits). `val/prior_loss`: the LoRA model's loss on the base model's own prior samples minus the base "
             "model's (rises as the prior is forgotten). Forward passes only, identical inputs in every trial; "
             f"{points} points in this sweep, plotted by step in validation.png. Spearman rank correlation with the "
             "sampled metrics at the checkpoints where both were measured:", ""]
    lines += spearman_table(corr, "validation loss vs metric", "too few evaluated checkpoints")
    triggered = [(t, v.step) for t in sorted(results.trials, key=setting_order) for v in t.record.validation if v.triggered]
    if triggered:
        where = ", ".join(f"{setting_label(t.setting)} at {step}" for t, step in triggered)
        lines += ["", f"Sampled evaluations added where `val/prior_loss` moved (eval.validation_trigger): {len(triggered)} ({where})."]
    lines += ["", "The collapse rules judge the sampled metrics only; the validation losses are reported beside them."]
    return lines


def plot_validation(path: Path, results: SweepResults) -> bool:
    """Both losses by step, one line per setting; a cross where the sampled rules first found
    collapse. Returns False (nothing written) when no trial has validation points."""
    trials = [t for t in sorted(results.trials, key=setting_order) if t.record.validation]
    if not trials:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "fit_loss", "val/fit_loss: fit to the training images (lower: fits)"),
                           (axes[1], "prior_loss", "val/prior_loss: forgetting vs the base model (higher: forgets)")):
        for t in trials:
            pts = sorted(t.record.validation, key=lambda v: v.step)
            line, = ax.plot([v.step for v in pts], [getattr(v, key) for v in pts], marker=".", markersize=3,
                            label=setting_label(t.setting))
            at = next((v for v in pts if t.collapse_step is not None and v.step == t.collapse_step), None)
            if at is not None:
                ax.plot([at.step], [getattr(at, key)], marker="x", markersize=10, color=line.get_color(), markeredgewidth=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="black", linewidth=0.6)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{results.name}: validation losses by step (x: first collapsed checkpoint by the sampled rules)", fontsize=10)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
