"""Collapse, decided by a machine. Pure functions over typed checkpoint rows (klein_sweep.record):
no torch, no I/O, so the rules can be tested on synthetic tables and re-applied to stored results.

Every rule is a ratio on a scale measured at the sweep's start (BaseStats), never a distance in
one network's units, so one threshold means the same on the mini net, Inception, DINOv2, CLIP
or ArcFace:

  identity   0 = the base model's trigger samples, 1 = the training images' similarity to each
             other: (id_sim - base) / (reference - base)
  leak       0 = the base model's no-trigger samples, 1 = the training images' own similarity:
             (leak - base leak) / (reference - base leak). Replacing k of n no-trigger samples with
             training images moves it by k/n.
  KIDs       factors of the trial's best, with floors that are fractions of what the base model
             measures (its KID to the training images; its prior samples' KID to them, or its own
             seed noise)
  variety    0 = the training images' mean pairwise similarity, 1 = identical copies

A row's `metrics` hold id_sim, kid, prior_kid, leak, sample_sim, nan_frac, flat_frac, noise_frac
(missing where not measured); loss and lora_norm are its own fields. With screening, a row judged
on the full evaluation (`row.full`) is measured against the full recipe's base statistics, any
other row against the screening recipe's.

States, first match wins:
  collapsed  non-finite loss or weights; a share of flat, noise or non-finite samples at least
             `degenerate_frac` above the base model's; identity fell more than `id_drop_frac`
             below the trial's running best; reference KID or prior KID rose past a factor of
             the trial's best; relative concept leak above `leak_frac`. Sticky: every later
             checkpoint of the trial is collapsed too. With screening, a collapse is declared
             only on the full evaluation's values: a screened checkpoint that looks collapsed is
             `suspect` until the full evaluation has judged it (the recorder runs it at once).
  overfit    identity is up but the samples have lost the training images' variety.
  underfit   identity has come less than `underfit_frac` of the way from the base model's.
  good       otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from klein_sweep.config.schema import CollapseThresholds
from klein_sweep.record import STATES, BaseStats, CheckpointRow

__all__ = ["STATES", "classify", "collapse_reason", "soft_state", "first_collapse_step", "best_checkpoint",
           "identity_progress", "relative_leak", "variety_lost", "suspect_collapse"]

NO_BASE = BaseStats()
# Below this the scale has no length (the base already draws the training images): no ratio.
_MIN_SCALE = 1e-6


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(value, start, end) -> float | None:
    if not (_finite(value) and _finite(start) and _finite(end)) or end - start < _MIN_SCALE:
        return None
    return (value - start) / (end - start)


def identity_progress(id_sim, base: BaseStats) -> float | None:
    """How far identity has come: 0 at the base model, 1 at the training images' own similarity."""
    return _ratio(id_sim, base.id_sim, base.reference_id_sim)


def relative_leak(leak, base: BaseStats) -> float | None:
    """How far the no-trigger samples have moved towards the training images: 0 at the base
    model's leak, 1 at the training images' own similarity."""
    return _ratio(leak, base.leak, base.reference_id_sim)


def variety_lost(sample_sim, base: BaseStats) -> float | None:
    """0 when the samples vary as much as the training images do, 1 for identical copies."""
    return _ratio(sample_sim, base.reference_sample_sim, 1.0)


def classify(rows: list[CheckpointRow], base: BaseStats | None, th: CollapseThresholds,
             base_full: BaseStats | None = None) -> list[CheckpointRow]:
    """Rows (any order) -> copies sorted by step, with `state` and `reason` set. `base_full`:
    with screening, the full recipe's base statistics; a collapse is then declared only on a row
    that carries the full evaluation."""
    base = base or NO_BASE
    out = []
    best_id = best_kid = best_prior = None
    collapsed_at = None
    for row in sorted(rows, key=lambda r: r.step):
        if collapsed_at is not None:
            out.append(dataclasses.replace(row, state="collapsed", reason=f"collapsed since step {collapsed_at}"))
            continue
        row_base = base_full if (base_full is not None and row.full is not None) else base
        decisive = base_full is None or row.full is not None
        reason = collapse_reason(row, row_base, th, best_id, best_kid, best_prior)
        if reason and (decisive or reason.startswith("non-finite")):
            collapsed_at = row.step
            out.append(dataclasses.replace(row, state="collapsed", reason=reason))
            continue
        state, why = soft_state(row, row_base, th)
        if reason:  # screening saw a collapse the full evaluation has not confirmed
            why = f"screening suspects a collapse ({reason}); not confirmed by the full evaluation"
        out.append(dataclasses.replace(row, state=state, reason=why))
        m = row.judged_metrics
        if (progress := identity_progress(m.get("id_sim"), row_base)) is not None:
            best_id = progress if best_id is None else max(best_id, progress)
        if _finite(m.get("kid")):
            best_kid = m["kid"] if best_kid is None else min(best_kid, m["kid"])
        if _finite(m.get("prior_kid")):
            best_prior = m["prior_kid"] if best_prior is None else min(best_prior, m["prior_kid"])
    return out


def suspect_collapse(rows: list[CheckpointRow], base: BaseStats | None, th: CollapseThresholds,
                     base_full: BaseStats | None = None) -> bool:
    """Does the last row, screened only, look collapsed? Then it needs the full evaluation."""
    judged = classify(rows, base, th, base_full)
    return bool(judged) and judged[-1].full is None and judged[-1].reason.startswith("screening suspects")


def collapse_reason(row: CheckpointRow, base: BaseStats, th: CollapseThresholds, best_id, best_kid, best_prior) -> str | None:
    """Why this checkpoint is collapsed, given the trial's best so far (best_id on the identity
    scale); None when it is not."""
    for key in ("loss", "lora_norm"):
        value = getattr(row, key)
        if value is not None and not _finite(value):
            return f"non-finite {key}"
    m = row.judged_metrics
    degenerate = sum(m.get(k) or 0.0 for k in ("nan_frac", "flat_frac", "noise_frac"))
    base_degenerate = base.degenerate or 0.0
    if degenerate - base_degenerate >= th.degenerate_frac:
        return f"degenerate images ({degenerate:.0%} flat, noise or NaN; base model {base_degenerate:.0%})"
    if "id_sim" in m and not _finite(m["id_sim"]):
        return "non-finite identity similarity"
    progress = identity_progress(m.get("id_sim"), base)
    if best_id is not None and progress is not None and progress < best_id - th.id_drop_frac:
        return (f"identity {m['id_sim']:.3f} fell to {progress:.2f} of the way from the base model to the training images, "
                f"more than {th.id_drop_frac} below the trial's best {best_id:.2f}")
    if best_kid is not None and _finite(m.get("kid")):
        floor = th.kid_floor_frac * base.kid if _finite(base.kid) else 0.0
        limit = th.kid_factor * max(best_kid, floor)
        if m["kid"] > limit:
            return f"KID {m['kid']:.4f} > {th.kid_factor} x max(best {best_kid:.4f}, floor {floor:.4f})"
    if best_prior is not None and _finite(m.get("prior_kid")):
        floor = max(th.prior_kid_floor_frac * base.prior_reference_kid if _finite(base.prior_reference_kid) else 0.0,
                    base.prior_kid_noise or 0.0)
        limit = th.prior_kid_factor * max(best_prior, floor)
        if m["prior_kid"] > limit:
            return f"prior KID {m['prior_kid']:.4f} > {limit:.4f}: the base model's prior is lost"
    leak = relative_leak(m.get("leak"), base)
    if leak is not None and leak > th.leak_frac:
        return (f"concept leak {m['leak']:.3f}: {leak:.2f} of the way from the base model's {base.leak:.3f} "
                f"to the training images' {base.reference_id_sim:.3f} (> {th.leak_frac})")
    return None


def soft_state(row: CheckpointRow, base: BaseStats, th: CollapseThresholds) -> tuple[str, str]:
    m = row.judged_metrics
    progress = identity_progress(m.get("id_sim"), base)
    lost = variety_lost(m.get("sample_sim"), base)
    if lost is not None and lost >= th.overfit_frac and (progress is None or progress >= th.underfit_frac):
        return "overfit", f"samples {m['sample_sim']:.3f} alike: {lost:.2f} of the way from the training images' variety to copies"
    if progress is not None and progress < th.underfit_frac:
        return "underfit", f"identity {m['id_sim']:.3f}: {progress:.2f} of the way from the base model to the training images"
    return "good", ""


def first_collapse_step(rows: list[CheckpointRow]) -> int | None:
    """The boundary of one setting: its first collapsed step."""
    steps = [r.step for r in rows if r.state == "collapsed"]
    return min(steps) if steps else None


def best_checkpoint(rows: list[CheckpointRow], objective: str, direction: str) -> CheckpointRow | None:
    """The best non-collapsed checkpoint by `objective` (a metric key such as id_sim). With
    screening, among the checkpoints the full evaluation judged (screened values are noisier
    than full ones, so the two are not ranked against each other)."""
    usable = [r for r in rows if r.state != "collapsed" and _finite(r.value(objective))]
    if any(r.full is not None for r in usable):
        usable = [r for r in usable if r.full is not None]
    if not usable:
        return None
    pick = max if direction == "maximize" else min
    return pick(usable, key=lambda r: r.value(objective))
