"""Collapse, decided by a machine. Pure functions over typed checkpoint rows (klein_sweep.record):
no torch, no I/O, so the rules can be tested on synthetic tables and re-applied to stored results.

A row's metrics hold id_sim, kid, prior_kid, leak, sample_sim, nan_frac, flat_frac, noise_frac
(missing where not measured); loss and lora_norm are its own fields. `base` (BaseStats) holds the
base model's id_sim, leak, degenerate share and prior-KID noise on the same prompts and seeds.
The thresholds are eval config keys (CollapseThresholds).

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

import dataclasses
import math
from typing import Any

from klein_sweep.config.schema import CollapseThresholds
from klein_sweep.record import STATES, BaseStats, CheckpointRow

__all__ = ["STATES", "classify", "collapse_reason", "soft_state", "first_collapse_step", "best_checkpoint"]

NO_BASE = BaseStats()


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def classify(rows: list[CheckpointRow], base: BaseStats | None, th: CollapseThresholds) -> list[CheckpointRow]:
    """Rows (any order) -> copies sorted by step, with `state` and `reason` set."""
    base = base or NO_BASE
    out = []
    best_id = best_kid = best_prior = None
    collapsed_at = None
    for row in sorted(rows, key=lambda r: r.step):
        if collapsed_at is not None:
            out.append(dataclasses.replace(row, state="collapsed", reason=f"collapsed since step {collapsed_at}"))
            continue
        reason = collapse_reason(row, base, th, best_id, best_kid, best_prior)
        if reason:
            collapsed_at = row.step
            out.append(dataclasses.replace(row, state="collapsed", reason=reason))
            continue
        state, why = soft_state(row, base, th)
        out.append(dataclasses.replace(row, state=state, reason=why))
        m = row.metrics
        if _finite(m.get("id_sim")):
            best_id = m["id_sim"] if best_id is None else max(best_id, m["id_sim"])
        if _finite(m.get("kid")):
            best_kid = m["kid"] if best_kid is None else min(best_kid, m["kid"])
        if _finite(m.get("prior_kid")):
            best_prior = m["prior_kid"] if best_prior is None else min(best_prior, m["prior_kid"])
    return out


def collapse_reason(row: CheckpointRow, base: BaseStats, th: CollapseThresholds, best_id, best_kid, best_prior) -> str | None:
    """Why this checkpoint is collapsed, given the trial's best so far; None when it is not."""
    for key in ("loss", "lora_norm"):
        value = getattr(row, key)
        if value is not None and not _finite(value):
            return f"non-finite {key}"
    m = row.metrics
    degenerate = sum(m.get(k) or 0.0 for k in ("nan_frac", "flat_frac", "noise_frac"))
    base_degenerate = base.degenerate or 0.0
    if degenerate - base_degenerate >= th.degenerate_frac:
        return f"degenerate images ({degenerate:.0%} flat, noise or NaN; base model {base_degenerate:.0%})"
    if "id_sim" in m and not _finite(m["id_sim"]):
        return "non-finite identity similarity"
    if best_id is not None and _finite(m.get("id_sim")) and m["id_sim"] < best_id - th.id_drop:
        return f"identity similarity {m['id_sim']:.3f} fell > {th.id_drop} below best {best_id:.3f}"
    if best_kid is not None and _finite(m.get("kid")) and m["kid"] > th.kid_factor * max(best_kid, th.kid_floor):
        return f"KID {m['kid']:.4f} > {th.kid_factor} x best {best_kid:.4f}"
    if best_prior is not None and _finite(m.get("prior_kid")):
        floor = max(th.prior_kid_floor, base.prior_kid_noise or 0.0)
        limit = th.prior_kid_factor * max(best_prior, floor)
        if m["prior_kid"] > limit:
            return f"prior KID {m['prior_kid']:.4f} > {limit:.4f}: the base model's prior is lost"
    if _finite(m.get("leak")) and _finite(base.leak) and m["leak"] - base.leak > th.leak_margin:
        return f"concept leak {m['leak']:.3f} > base {base.leak:.3f} + {th.leak_margin}"
    return None


def soft_state(row: CheckpointRow, base: BaseStats, th: CollapseThresholds) -> tuple[str, str]:
    m = row.metrics
    id_sim, base_id = m.get("id_sim"), base.id_sim
    if _finite(m.get("sample_sim")) and m["sample_sim"] >= th.overfit_sample_sim and (
        not _finite(base_id) or not _finite(id_sim) or id_sim > base_id + th.underfit_margin
    ):
        return "overfit", f"samples {m['sample_sim']:.3f} similar to each other: diversity gone"
    if _finite(id_sim) and _finite(base_id) and id_sim - base_id < th.underfit_margin:
        return "underfit", f"identity {id_sim:.3f} within {th.underfit_margin} of base {base_id:.3f}"
    return "good", ""


def first_collapse_step(rows: list[CheckpointRow]) -> int | None:
    """The boundary of one setting: its first collapsed step."""
    steps = [r.step for r in rows if r.state == "collapsed"]
    return min(steps) if steps else None


def best_checkpoint(rows: list[CheckpointRow], objective: str, direction: str) -> CheckpointRow | None:
    """The best non-collapsed checkpoint by `objective` (a metric key such as id_sim)."""
    usable = [r for r in rows if r.state != "collapsed" and _finite(r.value(objective))]
    if not usable:
        return None
    pick = max if direction == "maximize" else min
    return pick(usable, key=lambda r: r.value(objective))
