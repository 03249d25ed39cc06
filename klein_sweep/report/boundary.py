"""The boundary as the report shows it: each training's evidence (its grid trial and the
continuation refinement ran past the grid), the fitted curve with its band, and the answer to
"at my lr, how many steps are safe?"."""

from __future__ import annotations

from dataclasses import dataclass

from klein_sweep.boundary.fit import BoundaryFit, Observation, fit_boundary
from klein_sweep.boundary.refine import Finished, bracket
from klein_sweep.report.results import SweepResults, TrialResult, fmt_value, setting_label, setting_order

LR = "train.lr"


@dataclass
class Lineage:
    """One training from step 0: a grid cell or a bisected lr, and its continuation past the grid."""

    trial: TrialResult
    extension: TrialResult | None = None

    @property
    def setting(self) -> dict:
        return self.trial.setting

    @property
    def rows(self) -> list:
        return sorted(self.trial.rows + (self.extension.rows if self.extension else []), key=lambda r: r.step)

    @property
    def collapse_step(self) -> int | None:
        if self.trial.collapse_step is not None:
            return self.trial.collapse_step
        return self.extension.collapse_step if self.extension else None

    @property
    def last_step(self) -> int:
        return max((r.step for r in self.rows), default=0)

    @property
    def found_by(self) -> str:
        how = "bisection" if self.trial.refine is not None else "grid"
        return f"{how}, continued past step {self.extension.refine.from_step}" if self.extension else how

    @property
    def reason(self) -> str:
        return next((r.reason for r in self.rows if r.state == "collapsed"), "")

    def observation(self) -> Observation | None:
        """(fine at low, collapsed at high]; high None when still fine at its last step."""
        lr = self.setting.get(LR)
        if lr is None or not self.rows:
            return None
        collapse = self.collapse_step
        label = setting_label(self.setting)
        source = "bisect" if self.trial.refine is not None else ("extend" if self.extension else "grid")
        if collapse is None:
            return Observation(float(lr), float(self.last_step), None, source, label)
        before = [r.step for r in self.rows if r.step < collapse]
        return Observation(float(lr), float(max(before, default=0)), float(collapse), source, label)


def lineages(results: SweepResults) -> list[Lineage]:
    """Grid and bisection trainings in table order, each with its continuation if one ran."""
    extensions = {t.refine.from_trial: t for t in results.refinement if t.refine.kind == "extend"}
    roots = [t for t in results.trials if t.refine is None or t.refine.kind == "bisect"]
    return [Lineage(t, extensions.get(t.number)) for t in sorted(roots, key=setting_order)]


def boundary_fit(results: SweepResults) -> tuple[list[Lineage], BoundaryFit | None]:
    lines = lineages(results)
    return lines, fit_boundary([o for line in lines if (o := line.observation()) is not None])


@dataclass
class SafeSteps:
    lr: float
    observed: str  # what the trainings at this lr showed
    fitted: float
    low: float
    high: float
    extrapolated: bool  # beyond the longest training at any lr


def safe_steps(results: SweepResults, lines: list[Lineage], fit: BoundaryFit | None) -> list[SafeSteps]:
    """For each of the grid's learning rates: the fitted collapse step and its band."""
    if fit is None:
        return []
    longest = max((line.last_step for line in lines), default=0)
    out = []
    for lr in sorted({t.setting[LR] for t in results.grid if LR in t.setting}):
        seen = [line for line in lines if line.setting.get(LR) == lr and line.trial.refine is None]
        observed = ", ".join(f"collapsed at {line.collapse_step}" if line.collapse_step is not None
                             else f"fine at {line.last_step}" for line in seen) or "-"
        low, high = fit.interval_at(lr)
        step = fit.step_at(lr)
        out.append(SafeSteps(lr, observed, step, low, high, step > longest))
    return out


def boundary_section(results: SweepResults, lines: list[Lineage], fit: BoundaryFit | None) -> list[str]:
    out = ["", "## Collapse boundary", "",
           "Each training's first collapsed checkpoint and the last checkpoint before it (the collapse happened in between).", "",
           "| setting | first collapsed step | fine at | found by | reason |", "|---|---|---|---|---|"]
    for line in lines:
        obs = line.observation()
        fine = fmt_value(int(obs.low)) if obs is not None and obs.low > 0 else "-"
        step = line.collapse_step if line.collapse_step is not None else f"none up to {line.last_step}"
        out.append(f"| {setting_label(line.setting)} | {step} | {fine} | {line.found_by} | {line.reason} |")
    if fit is None:
        collapsed = len({line.setting.get(LR) for line in lines if line.collapse_step is not None})
        out += ["", f"No boundary fit: collapses at {collapsed} learning rate{'s' * (collapsed != 1)}; a line needs two."]
        return out
    pct = round(fit.confidence * 100)
    lo, hi = fit.slope_interval
    out += ["", f"Fit: log10(collapse step) = {fit.intercept:.2f} {fit.slope:+.2f} x log10(lr), slope {pct}% interval "
                f"[{lo:.2f}, {hi:.2f}]: doubling the lr moves the boundary by a factor of {2 ** fit.slope:.2f}. "
                f"{fit.n_points} points ({fit.n_collapsed} collapsed, {fit.n_censored} still fine at their last step, "
                "counted as 'later than that'), each collapse an interval between two checkpoints; maximum likelihood "
                f"(residual sigma {fit.sigma:.3f} in log10 steps); band: {len(fit.bootstrap)} bootstrap refits over the points.",
            "", "### Safe steps by learning rate", "",
            f"| lr | trainings showed | fitted collapse step | {pct}% interval | safe up to |", "|---|---|---|---|---|"]
    for row in safe_steps(results, lines, fit):
        note = " (extrapolated past every training)" if row.extrapolated else ""
        out.append(f"| {fmt_value(row.lr)} | {row.observed} | {row.fitted:,.0f}{note} | {row.low:,.0f} - {row.high:,.0f} | "
                   f"{row.low:,.0f} steps |")
    out += ["", f"'Safe up to' is the lower end of the band: at that lr, a training that long stays on the safe side "
                f"of the fitted boundary in {round((1 + fit.confidence) / 2 * 100)}% of the refits."]
    return out


def refinement_section(results: SweepResults, lines: list[Lineage]) -> list[str]:
    trials = sorted(results.refinement, key=lambda t: t.number)
    if not trials:
        return []
    plan = results.meta.plan if results.meta else {}
    grid_s = sum((t.record.train_seconds or 0) + (t.record.eval_seconds or 0) for t in results.grid)
    refine_s = sum((t.record.train_seconds or 0) + (t.record.eval_seconds or 0) for t in trials)
    out = ["", "## Refinement past the grid", "",
           f"sweep.refine: trainings that did not collapse continued from their saved state to step "
           f"{max(t.refine.to_step for t in trials)}, evaluated every {plan.get('sweep.refine_every', '?')} steps; learning "
           f"rates bisected (log space) between the highest safe and the lowest collapsed lr at the grid's last step, "
           f"to within a factor of {plan.get('sweep.refine_lr_tolerance', '?')}. They are not cells of the table above.", "",
           "| trial | refinement | steps | result |", "|---|---|---|---|"]
    for t in trials:
        result = f"collapsed at {t.collapse_step}" if t.collapse_step is not None else f"fine at {max((r.step for r in t.rows), default=0)}"
        out.append(f"| {t.number} | {t.refine.describe()} | {t.refine.from_step}-{t.refine.to_step} | {result} |")
    brackets = bisection_brackets(results, lines)
    for group, (lo, hi) in brackets.items():
        where = f" ({group})" if group else ""
        if lo is not None and hi is not None:
            out.append("")
            out.append(f"At step {max(results.meta.step_values) if results.meta and results.meta.step_values else '?'}{where}: "
                       f"highest lr fine {fmt_value(lo)}, lowest collapsed {fmt_value(hi)} (a factor of {hi / lo:.2f}).")
    if grid_s > 0:
        out += ["", f"Measured compute: refinement {refine_s:,.0f} s of training and evaluation, the grid {grid_s:,.0f} s "
                    f"(+{refine_s / grid_s:.0%}; worker-seconds, not wall time)."]
    return out


def bisection_brackets(results: SweepResults, lines: list[Lineage]) -> dict[str, tuple]:
    """Per group of the other swept values: (highest lr fine at the grid's last step, lowest
    collapsed by it), as the refinement planner brackets them."""
    grid_steps = max(results.meta.step_values) if results.meta and results.meta.step_values else None
    if grid_steps is None:
        return {}
    groups: dict[str, list[Finished]] = {}
    for line in lines:
        if LR in line.setting:
            rest = {k: v for k, v in line.setting.items() if k != LR}
            groups.setdefault(setting_label(rest) if rest else "", []).append(
                Finished(line.trial.number, line.setting, line.trial.refine, line.collapse_step, line.last_step))
    return {key: bracket(group, grid_steps) for key, group in groups.items()}


def boundary_json(lines: list[Lineage], fit: BoundaryFit | None, results: SweepResults) -> dict:
    return {
        "trainings": [{"setting": line.setting, "trial": line.trial.number,
                       "continued_by": line.extension.number if line.extension else None, "collapse_step": line.collapse_step,
                       "fine_at": (o.low if (o := line.observation()) else None), "found_by": line.found_by} for line in lines],
        "fit": fit.to_json() if fit else None,
        "safe_steps": [row.__dict__ for row in safe_steps(results, lines, fit)],
        "refinement": [{"trial": t.number, **t.refine.to_json(), "collapse_step": t.collapse_step} for t in results.refinement],
    }
