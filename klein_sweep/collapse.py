"""Collapse, decided by a machine. Pure functions over metric tables (lists of dicts): no torch,
no I/O, so the rules can be tested on synthetic tables and re-applied to stored results.

A checkpoint row holds: step, id_sim, kid, prior_kid, leak, sample_sim, nan_frac, flat_frac,
noise_frac, loss, lora_norm (missing or None where not measured). `base` holds the base model's
id_sim and leak on the same prompts and seeds.

States, first match wins:
  collapsed  non-finite loss or weights; identity fell more than `id_drop` below the trial's
             running best; reference KID or prior KID rose past a factor of the trial's best;
             concept leak more than `leak_margin` above the base model's; or a share of
             flat, noise or non-finite samples at least `degenerate_frac` above the base model's.
             Sticky: every later checkpoint of the trial is collapsed too.
  overfit    identity is up but samples are near copies of each other (sample_sim high).
  underfit   identity similarity still within `underfit_margin` of the base model's.
  good       otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

STATES = ("underfit", "good", "overfit", "collapsed")


@dataclass(frozen=True)
class Thresholds:
    id_drop: float = 0.10
    kid_factor: float = 3.0
    prior_kid_factor: float = 3.0
    prior_kid_floor: float = 0.02
    kid_floor: float = 1e-3
    leak_margin: float = 0.15
    degenerate_frac: float = 0.5
    underfit_margin: float = 0.05
    overfit_sample_sim: float = 0.97

    @classmethod
    def from_eval(cls, eval_cfg) -> "Thresholds":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: getattr(eval_cfg, k) for k in names if hasattr(eval_cfg, k)})


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def classify(rows: list[dict], base: dict, th: Thresholds) -> list[dict]:
    """Rows (sorted by step) -> the same rows with `state` and `reason` added."""
    out = []
    best_id = best_kid = best_prior = None
    collapsed_at = None
    for row in sorted(rows, key=lambda r: r["step"]):
        row = dict(row)
        if collapsed_at is not None:
            row["state"], row["reason"] = "collapsed", f"collapsed since step {collapsed_at}"
            out.append(row)
            continue
        reason = collapse_reason(row, base, th, best_id, best_kid, best_prior)
        if reason:
            collapsed_at = row["step"]
            row["state"], row["reason"] = "collapsed", reason
        else:
            row["state"], row["reason"] = soft_state(row, base, th)
            if _finite(row.get("id_sim")):
                best_id = row["id_sim"] if best_id is None else max(best_id, row["id_sim"])
            if _finite(row.get("kid")):
                best_kid = row["kid"] if best_kid is None else min(best_kid, row["kid"])
            if _finite(row.get("prior_kid")):
                best_prior = row["prior_kid"] if best_prior is None else min(best_prior, row["prior_kid"])
        out.append(row)
    return out


def collapse_reason(row: dict, base: dict, th: Thresholds, best_id, best_kid, best_prior) -> str | None:
    """Why this checkpoint is collapsed, given the trial's best so far; None when it is not."""
    for key in ("loss", "lora_norm"):
        if key in row and row[key] is not None and not _finite(row[key]):
            return f"non-finite {key}"
    degenerate = sum(row.get(k) or 0.0 for k in ("nan_frac", "flat_frac", "noise_frac"))
    base_degenerate = base.get("degenerate") or 0.0
    if degenerate - base_degenerate >= th.degenerate_frac:
        return f"degenerate images ({degenerate:.0%} flat, noise or NaN; base model {base_degenerate:.0%})"
    if "id_sim" in row and not _finite(row["id_sim"]):
        return "non-finite identity similarity"
    if best_id is not None and _finite(row.get("id_sim")) and row["id_sim"] < best_id - th.id_drop:
        return f"identity similarity {row['id_sim']:.3f} fell > {th.id_drop} below best {best_id:.3f}"
    if best_kid is not None and _finite(row.get("kid")) and row["kid"] > th.kid_factor * max(best_kid, th.kid_floor):
        return f"KID {row['kid']:.4f} > {th.kid_factor} x best {best_kid:.4f}"
    if best_prior is not None and _finite(row.get("prior_kid")):
        floor = max(th.prior_kid_floor, base.get("prior_kid_noise") or 0.0)
        limit = th.prior_kid_factor * max(best_prior, floor)
        if row["prior_kid"] > limit:
            return f"prior KID {row['prior_kid']:.4f} > {limit:.4f}: the base model's prior is lost"
    if _finite(row.get("leak")) and _finite(base.get("leak")) and row["leak"] - base["leak"] > th.leak_margin:
        return f"concept leak {row['leak']:.3f} > base {base['leak']:.3f} + {th.leak_margin}"
    return None


def soft_state(row: dict, base: dict, th: Thresholds) -> tuple[str, str]:
    id_sim, base_id = row.get("id_sim"), base.get("id_sim")
    if _finite(row.get("sample_sim")) and row["sample_sim"] >= th.overfit_sample_sim and (
        not _finite(base_id) or not _finite(id_sim) or id_sim > base_id + th.underfit_margin
    ):
        return "overfit", f"samples {row['sample_sim']:.3f} similar to each other: diversity gone"
    if _finite(id_sim) and _finite(base_id) and id_sim - base_id < th.underfit_margin:
        return "underfit", f"identity {id_sim:.3f} within {th.underfit_margin} of base {base_id:.3f}"
    return "good", ""


def first_collapse_step(rows: list[dict]) -> int | None:
    """The boundary of one setting: its first collapsed step."""
    steps = [r["step"] for r in rows if r.get("state") == "collapsed"]
    return min(steps) if steps else None


def best_checkpoint(rows: list[dict], objective: str, direction: str) -> dict | None:
    """The best non-collapsed checkpoint by `objective` (a row key such as id_sim)."""
    usable = [r for r in rows if r.get("state") != "collapsed" and _finite(r.get(objective))]
    if not usable:
        return None
    pick = max if direction == "maximize" else min
    return pick(usable, key=lambda r: r[objective])


@dataclass(frozen=True)
class BoundaryFit:
    """log10(collapse step) = intercept + slope * log10(lr), fitted across learning rates."""

    slope: float
    intercept: float
    r_value: float
    n_points: int

    def step_at(self, lr: float) -> float:
        return 10 ** (self.intercept + self.slope * math.log10(lr))


def fit_boundary(points: list[tuple[float, int]]) -> BoundaryFit | None:
    """Fit (lr, first collapsed step) points; None with fewer than two distinct learning rates."""
    from scipy.stats import linregress

    pts = [(lr, s) for lr, s in points if lr and s and lr > 0 and s > 0]
    if len({lr for lr, _ in pts}) < 2:
        return None
    fit = linregress([math.log10(lr) for lr, _ in pts], [math.log10(s) for _, s in pts])
    return BoundaryFit(float(fit.slope), float(fit.intercept), float(fit.rvalue), len(pts))
