"""The boundary as the report shows it: each training's evidence (its grid trial and the
continuation refinement ran past the grid), the fitted curve with its band, and the answer to
"at my lr, how many steps are safe?"."""

from __future__ import annotations

from dataclasses import dataclass, field

from klein_sweep.boundary.fit import AXES, BoundaryFit, Observation, fit_boundary
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

    def axis_values(self, plan: dict) -> dict:
        """This training's value of each fit axis: {"images": N, "rank": r}. The number of images
        is the one it trained on (data.max_images, or what its repeats per image say)."""
        out = {}
        for key, name in AXES.items():
            value = self.setting.get(key, plan.get(key))
            if name == "images" and value is None:
                value = images_trained_on(self.rows, {**plan, **self.setting})
            if value is not None:
                out[name] = float(value)
        return out

    def observation(self, plan: dict | None = None) -> Observation | None:
        """(fine at low, collapsed at high]; high None when still fine at its last step."""
        lr = self.setting.get(LR)
        if lr is None or not self.rows:
            return None
        collapse = self.collapse_step
        label = setting_label(self.setting)
        source = "bisect" if self.trial.refine is not None else ("extend" if self.extension else "grid")
        axes = self.axis_values(plan or {})
        if collapse is None:
            return Observation(float(lr), float(self.last_step), None, source, label, axes)
        before = [r.step for r in self.rows if r.step < collapse]
        return Observation(float(lr), float(max(before, default=0)), float(collapse), source, label, axes)


def images_trained_on(rows: list, settings: dict) -> int | None:
    """N from a checkpoint's repeats per image: repeats = step x batch x grad_accum / N."""
    row = next((r for r in rows if r.repeats), None)
    if row is None:
        return None
    per_step = int(settings.get("train.batch_size") or 1) * int(settings.get("train.grad_accum") or 1)
    return round(row.step * per_step / row.repeats)


def lineages(results: SweepResults) -> list[Lineage]:
    """Grid and bisection trainings in table order, each with its continuation if one ran."""
    extensions = {t.refine.from_trial: t for t in results.refinement if t.refine.kind == "extend"}
    roots = [t for t in results.trials if t.refine is None or t.refine.kind == "bisect"]
    return [Lineage(t, extensions.get(t.number)) for t in sorted(roots, key=setting_order)]


def boundary_fit(results: SweepResults) -> tuple[list[Lineage], BoundaryFit | None]:
    lines = lineages(results)
    return lines, fit_boundary([o for line in lines if (o := line.observation(results.plan)) is not None])


@dataclass
class SafeSteps:
    lr: float
    observed: str  # what the trainings at this lr showed
    fitted: float
    low: float
    high: float
    extrapolated: bool  # beyond the longest training at any lr
    at: dict = field(default_factory=dict)  # the other fitted axes' values, e.g. {"images": 10.0}

    @property
    def key(self) -> tuple:
        return (self.lr, *sorted(self.at.items()))


def safe_steps(results: SweepResults, lines: list[Lineage], fit: BoundaryFit | None) -> list[SafeSteps]:
    """For each of the grid's learning rates (and each measured value of the fit's other axes):
    the fitted collapse step and its band."""
    if fit is None:
        return []
    plan = results.plan
    longest = max((line.last_step for line in lines), default=0)
    values = {id(line): fitted_values(line, fit, plan) for line in lines}
    out = []
    for lr in results.grid_lrs:
        for at in sorted({tuple(sorted(v.items())) for v in values.values()}):
            at = dict(at)
            seen = [line for line in lines if line.setting.get(LR) == lr and line.trial.refine is None and values[id(line)] == at]
            observed = ", ".join(f"collapsed at {line.collapse_step}" if line.collapse_step is not None
                                 else f"fine at {line.last_step}" for line in seen) or "-"
            low, high = fit.interval_at(lr, at)
            step = fit.step_at(lr, at)
            out.append(SafeSteps(lr, observed, step, low, high, step > longest, at))
    return out


def fitted_values(line: Lineage, fit: BoundaryFit, plan: dict) -> dict:
    """The training's values of the axes the fit has exponents for."""
    values = line.axis_values(plan)
    return {k: values[k] for k in fit.axes if k in values}


def at_label(at: dict) -> str:
    """{"images": 10.0, "rank": 16.0} -> "images 10, rank 16"."""
    return ", ".join(f"{k} {v:g}" for k, v in at.items())


def images_verdict_kind(low: float, high: float) -> str:
    """steps | repeats | between | undecided | below | above: what the exponent of the number of
    images, by its interval, says the boundary counts."""
    holds_0, holds_1 = low <= 0 <= high, low <= 1 <= high
    if holds_0 != holds_1:
        return "steps" if holds_0 else "repeats"
    if holds_0:
        return "undecided"
    return "between" if 0 < low and high < 1 else ("below" if high < 0 else "above")


def images_verdict(low: float, high: float) -> str:
    return {
        "steps": "a number of **steps**: the exponent's interval holds 0 and not 1, more images do not buy more steps",
        "repeats": "a number of **repeats per image**: the exponent's interval holds 1 and not 0, the safe steps grow in "
                   "proportion to the images",
        "between": "**between** a number of steps and of repeats per image: the exponent's interval lies strictly between 0 and 1",
        "undecided": "**undecided**: the exponent's interval holds both 0 (steps) and 1 (repeats per image); more sizes "
                     "or trainings would narrow it",
        "below": f"neither steps nor repeats per image: the exponent's interval [{low:.2f}, {high:.2f}] lies below 0",
        "above": f"neither steps nor repeats per image: the exponent's interval [{low:.2f}, {high:.2f}] lies above 1",
    }[images_verdict_kind(low, high)]


def fit_formula(fit: BoundaryFit, digits: int = 2) -> str:
    terms = "".join(f" {c:+.{digits}f} x log10({k})" for k, c in fit.exponents.items())
    return f"log10(collapse step) = {fit.intercept:.{digits}f} {fit.slope:+.{digits}f} x log10(lr){terms}"


def exponent_lines(fit: BoundaryFit) -> list[str]:
    """The fit's exponents with their intervals, and what the number of images' exponent says."""
    pct = round(fit.confidence * 100)
    out = [f"- lr: {fit.slope:+.2f}, {pct}% interval [{fit.slope_interval[0]:.2f}, {fit.slope_interval[1]:.2f}]"]
    for name, c in fit.exponents.items():
        lo, hi = fit.exponent_intervals[name]
        lo_v, hi_v = fit.ranges[name]
        out.append(f"- {name}: {c:+.2f}, {pct}% interval [{lo:.2f}, {hi:.2f}] (measured at {lo_v:g} to {hi_v:g}): "
                   f"doubling the {name} moves the boundary by a factor of {2 ** c:.2f}")
    if "images" in fit.exponents:
        lo, hi = fit.exponent_intervals["images"]
        out += ["", f"The boundary is {images_verdict(lo, hi)}."]
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
    out += ["", f"Fit: {fit_formula(fit)}, slope {pct}% interval "
                f"[{lo:.2f}, {hi:.2f}]: doubling the lr moves the boundary by a factor of {2 ** fit.slope:.2f}. "
                f"{fit.n_points} points ({fit.n_collapsed} collapsed, {fit.n_censored} still fine at their last step, "
                "counted as 'later than that'), each collapse an interval between two checkpoints; maximum likelihood "
                f"(residual sigma {fit.sigma:.3f} in log10 steps); intervals and band: {len(fit.bootstrap)} bootstrap refits over the points."]
    if fit.exponents:
        out += ["", "### Exponents", "", "Collapse step ~ lr^a x ... : each exponent with its interval.", "", *exponent_lines(fit)]
    axes = fit.axes
    out += ["", "### Safe steps by learning rate", "",
            f"| lr | {''.join(f'{k} | ' for k in axes)}trainings showed | fitted collapse step | {pct}% interval | safe up to |",
            "|---|" + "---|" * len(axes) + "---|---|---|---|"]
    for row in safe_steps(results, lines, fit):
        note = " (extrapolated past every training)" if row.extrapolated else ""
        out.append(f"| {fmt_value(row.lr)} | {''.join(f'{row.at[k]:g} | ' for k in axes)}{row.observed} | {row.fitted:,.0f}{note} | "
                   f"{row.low:,.0f} - {row.high:,.0f} | {row.low:,.0f} steps |")
    out += ["", f"'Safe up to' is the lower end of the band: at that lr, a training that long stays on the safe side "
                f"of the fitted boundary in {round((1 + fit.confidence) / 2 * 100)}% of the refits."]
    return out


def refinement_section(results: SweepResults, lines: list[Lineage]) -> list[str]:
    trials = sorted(results.refinement, key=lambda t: t.number)
    if not trials:
        return []
    plan = results.plan
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
        "recommend_basis": recommend_basis(results),  # with the fit: what --recommend reads from this file alone
    }


def recommend_basis(results: SweepResults) -> dict:
    """The grid's learning rates and the images one step takes (batch x grad_accum), for
    --recommend's repeats per image."""
    plan = results.plan
    per_step = int(plan.get("train.batch_size") or 1) * int(plan.get("train.grad_accum") or 1)
    longest = max((r.step for t in results.trials for r in t.rows), default=0)
    return {"grid_lrs": results.grid_lrs, "images_per_step": per_step, "longest_step": longest}
