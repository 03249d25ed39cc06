"""How far the boundary moves with the training seed alone: when `train.seed` is swept, every
other setting is trained once per seed, and the report compares their first collapsed steps and
best checkpoints (the seed changes the LoRA's init, the data order and the noise, nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from klein_sweep.evaluation import collapse
from klein_sweep.report.boundary import lineages
from klein_sweep.report.results import SweepResults, fmt_value, setting_label, setting_order

SEED = "train.seed"


@dataclass
class SeedComparison:
    """One setting (the swept values other than the seed) at each training seed."""

    setting: dict
    collapse_step: dict[int, int | None] = field(default_factory=dict)  # seed -> first collapsed step (None: never)
    best_value: dict[int, float | None] = field(default_factory=dict)  # seed -> the objective at the best checkpoint
    best_step: dict[int, int | None] = field(default_factory=dict)

    @property
    def shift(self) -> int | None:
        """Largest minus smallest first collapsed step across the seeds that collapsed; None
        unless every seed collapsed."""
        steps = list(self.collapse_step.values())
        if not steps or any(s is None for s in steps):
            return None
        return max(steps) - min(steps)

    @property
    def disagree(self) -> bool:
        """Some seeds collapsed within the sweep and others did not."""
        steps = list(self.collapse_step.values())
        return any(s is None for s in steps) and any(s is not None for s in steps)


def seed_comparison(results: SweepResults) -> list[SeedComparison]:
    """Per setting, its trials by seed; empty unless the sweep trained at least two seeds."""
    if len({t.setting.get(SEED) for t in results.grid if SEED in t.setting}) < 2:
        return []
    by_setting: dict[str, SeedComparison] = {}
    for line in lineages(results):
        t = line.trial
        if t.refine is not None:
            continue  # a bisected lr is not trained at every seed
        rest = {k: v for k, v in t.setting.items() if k != SEED}
        seed = int(t.setting[SEED])
        c = by_setting.setdefault(setting_label(rest), SeedComparison(rest))
        best = collapse.best_checkpoint(t.rows, results.objective, results.direction)
        c.collapse_step[seed] = line.collapse_step  # refinement's continuation included
        c.best_value[seed] = best.value(results.objective) if best else None
        c.best_step[seed] = best.step if best else None
    return list(by_setting.values())


def stability_section(results: SweepResults, comparisons: list[SeedComparison]) -> list[str]:
    if not comparisons:
        return []
    seeds = sorted({s for c in comparisons for s in c.collapse_step})
    lines = ["", "## Stability across training seeds", "",
             f"Each setting trained with seeds {', '.join(map(str, seeds))} (`train.seed`: the LoRA's init, the data order "
             f"and the noise). First collapsed step and best `{results.objective}` (at its step) per seed:", "",
             "| setting | " + " | ".join(f"collapse, seed {s}" for s in seeds) + " | shift | "
             + " | ".join(f"best, seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * (2 * len(seeds) + 1)]
    for c in comparisons:
        collapsed = [str(c.collapse_step.get(s)) if c.collapse_step.get(s) is not None else "none" for s in seeds]
        shift = f"{c.shift} steps" if c.shift is not None else ("one seed only" if c.disagree else "-")
        best = [f"{fmt_value(c.best_value.get(s))} ({c.best_step.get(s)})" for s in seeds]
        lines.append(f"| {setting_label(c.setting)} | " + " | ".join(collapsed) + f" | {shift} | " + " | ".join(best) + " |")
    shifts = [c.shift for c in comparisons if c.shift is not None]
    disagree = [setting_label(c.setting) for c in comparisons if c.disagree]
    summary = []
    if shifts:
        summary.append(f"where every seed collapsed, the first collapsed step moved by up to {max(shifts)} steps")
    if disagree:
        summary.append(f"{', '.join(disagree)} collapsed at some seeds and not at others within the sweep")
    if not shifts and not disagree:
        summary.append("no setting collapsed at any seed")
    lines += ["", "Between seeds: " + "; ".join(summary) + ". The grid's step spacing bounds what a shift can show."]
    return lines


def stability_json(comparisons: list[SeedComparison]) -> list[dict]:
    return [{"setting": c.setting, "collapse_step": c.collapse_step, "best_value": c.best_value, "best_step": c.best_step,
             "shift": c.shift} for c in comparisons]
