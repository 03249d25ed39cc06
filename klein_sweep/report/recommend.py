"""`python -m klein_sweep.report NAME --recommend data.max_images=15 train.rank=32`: the fitted
boundary read at the user's own dataset size and rank, per learning rate of the sweep's grid,
with its band, "safe up to" in steps and in repeats per image. Inside the measured range only:
a setting outside it is refused in one line, not extrapolated.

It reads the fit from the study when one is at hand (sweeps/NAME/study.db or --storage), else
from the committed sweeps/NAME/report.json alone (which stores the fit's bootstrap refits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from klein_sweep.boundary.fit import AXES, BoundaryFit
from klein_sweep.errors import KleinSweepError


class RecommendError(KleinSweepError):
    """A recommendation that cannot be given: no fit, a bad setting, or one outside the measured range."""


@dataclass(frozen=True)
class Basis:
    """What a recommendation reads: the fit, the grid's learning rates and images per step."""

    name: str
    fit: BoundaryFit
    grid_lrs: list[float]
    images_per_step: int  # batch_size x grad_accum: repeats per image = steps x this / images
    longest_step: int  # the longest training's last step


@dataclass(frozen=True)
class Recommendation:
    lr: float
    fitted: float  # the fitted collapse step
    low: float  # the band's ends; low is "safe up to"
    high: float
    safe_repeats: float  # low in repeats per image
    extrapolated: bool  # the fitted step lies past every training the sweep ran


def parse_settings(pairs: list[str]) -> dict[str, float]:
    """["data.max_images=15", "train.rank=32"] -> {"images": 15.0, "rank": 32.0}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in AXES:
            raise RecommendError(f"--recommend: '{pair}' is not KEY=VALUE with KEY one of {', '.join(AXES)}")
        try:
            number = float(value)
        except ValueError:
            raise RecommendError(f"--recommend: {key}={value!r} is not a number") from None
        if not number > 0:
            raise RecommendError(f"--recommend: {key}={value} must be above 0")
        out[AXES[key]] = number
    return out


def recommend(basis: Basis, wanted: dict[str, float]) -> list[Recommendation]:
    """Per grid lr: the fitted collapse step and band at `wanted` ({"images": 15, "rank": 32}).
    Axes the sweep held constant default to their one value; axes it varied must be given."""
    fit = basis.fit
    key_of = {name: key for key, name in AXES.items()}
    at = {}
    for name in fit.ranges:
        if name == "lr":
            continue
        lo, hi = fit.ranges[name]
        if name in wanted:
            at[name] = wanted[name]
        elif lo == hi:
            at[name] = lo
        else:
            raise RecommendError(f"--recommend: give {key_of[name]}=N: the sweep measured {name} from {lo:g} to {hi:g}")
    unknown = sorted(set(wanted) - set(at))
    if unknown:
        raise RecommendError(f"--recommend: {key_of[unknown[0]]} was not measured by sweep {basis.name}")
    for name, value in at.items():
        lo, hi = fit.ranges[name]
        if not lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9):
            measured = f"only at {lo:g}" if lo == hi else f"from {lo:g} to {hi:g}"
            raise RecommendError(f"--recommend: {key_of[name]}={value:g} is outside the range sweep {basis.name} measured "
                                 f"({name} {measured}); the fit does not extrapolate")
    out = []
    for lr in basis.grid_lrs:
        fit_at = {k: v for k, v in at.items() if k in fit.exponents}
        low, high = fit.interval_at(lr, fit_at)
        out.append(Recommendation(lr, fit.step_at(lr, fit_at), low, high, low * basis.images_per_step / at["images"],
                                  fit.step_at(lr, fit_at) > basis.longest_step))
    return out


def format_recommendation(basis: Basis, wanted: dict[str, float], rows: list[Recommendation]) -> str:
    from klein_sweep.report.boundary import at_label, fit_formula

    fit = basis.fit
    where = at_label(dict(sorted(wanted.items()))) or "the sweep's own settings"
    pct = round(fit.confidence * 100)
    lines = [f"collapse boundary of sweep {basis.name} at {where} ({fit_formula(fit)}; {pct}% band from "
             f"{len(fit.bootstrap)} bootstrap refits)",
             f"  {'lr':>8}  {'fitted collapse step':>20}  {f'{pct}% band':>17}  {'safe up to':>11}  {'= repeats per image':>19}"]
    for r in rows:
        past = "  (past every training: extrapolated along the lr)" if r.extrapolated else ""
        lines.append(f"  {r.lr:>8g}  {r.fitted:>20,.0f}  {f'{r.low:,.0f} - {r.high:,.0f}':>17}  {r.low:>11,.0f}  "
                     f"{r.safe_repeats:>19,.1f}{past}")
    lines.append("safe up to: the band's lower end (that many steps stay below the fitted boundary in "
                 f"{round((1 + fit.confidence) / 2 * 100)}% of the refits)")
    return "\n".join(lines)


def basis_from_report(path: Path) -> Basis:
    """From a committed report.json alone."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecommendError(f"--recommend: cannot read {path}: {exc}") from None
    fit = (report.get("boundary") or {}).get("fit")
    if not fit:
        raise RecommendError(f"--recommend: {path} has no boundary fit (collapses at fewer than two learning rates)")
    if not fit.get("bootstrap") or not fit.get("ranges"):
        raise RecommendError(f"--recommend: {path} was written before reports kept the fit's band; rebuild it from "
                             f"its study: python -m klein_sweep.report {path.parent}")
    basis = report["boundary"].get("recommend_basis") or {}
    return Basis(report.get("name", path.parent.name), BoundaryFit.from_json(fit), list(basis.get("grid_lrs") or []),
                 int(basis.get("images_per_step") or 1), int(basis.get("longest_step") or 0))


def basis_from_results(results) -> Basis:
    """From a study's results (the fit as the report computes it)."""
    from klein_sweep.report.boundary import boundary_fit, recommend_basis

    _, fit = boundary_fit(results)
    if fit is None:
        raise RecommendError(f"--recommend: sweep {results.name} has no boundary fit (collapses at fewer than two learning rates)")
    basis = recommend_basis(results)
    return Basis(results.name, fit, basis["grid_lrs"], basis["images_per_step"], basis["longest_step"])
