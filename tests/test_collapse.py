"""Collapse rules on synthetic metric tables."""

from __future__ import annotations

import dataclasses
import math

from klein_sweep.config import CollapseThresholds
from klein_sweep.evaluation.collapse import best_checkpoint, classify, first_collapse_step, suspect_collapse
from klein_sweep.record import BaseStats, CheckpointRow

# The base model's and the training images' own figures: each rule's scale runs between them.
BASE = BaseStats(id_sim=0.50, leak=0.40, degenerate=0.0, reference_id_sim=1.0, reference_sample_sim=0.6, kid=0.1,
                 prior_reference_kid=0.5)
TH = CollapseThresholds()


def row(step, id_sim, kid=0.05, prior_kid=0.01, leak=0.40, loss=0.5, lora_norm=1.0, **kw):
    metrics = {"id_sim": id_sim, "kid": kid, "prior_kid": prior_kid, "leak": leak, "sample_sim": 0.6,
               "nan_frac": 0.0, "flat_frac": 0.0, "noise_frac": 0.0, **kw}
    return CheckpointRow(step=step, loss=loss, lora_norm=lora_norm, metrics=metrics)


def states(rows):
    return [r.state for r in classify(rows, BASE, TH)]


def test_steadily_improving_run():
    rows = [row(s, 0.5 + 0.05 * i, kid=0.06 - 0.005 * i) for i, s in enumerate([250, 500, 750, 1000])]
    assert states(rows) == ["underfit", "good", "good", "good"]
    assert first_collapse_step(classify(rows, BASE, TH)) is None
    assert best_checkpoint(classify(rows, BASE, TH), "id_sim", "maximize").step == 1000


def test_flat_run_stays_underfit():
    assert states([row(s, 0.51) for s in (250, 500, 750)]) == ["underfit"] * 3


def test_peak_then_drop_collapses_and_stays_collapsed():
    rows = [row(500, 0.70), row(1000, 0.80), row(1500, 0.65), row(2000, 0.79)]
    out = classify(rows, BASE, TH)
    assert [r.state for r in out] == ["good", "good", "collapsed", "collapsed"]  # sticky
    assert "fell" in out[2].reason and first_collapse_step(out) == 1500
    assert best_checkpoint(out, "id_sim", "maximize").step == 1000


def test_nan_run():
    rows = [row(500, 0.7), row(1000, 0.7, loss=float("nan"))]
    out = classify(rows, BASE, TH)
    assert [r.state for r in out] == ["good", "collapsed"] and "non-finite loss" in out[1].reason
    assert classify([CheckpointRow(step=3, loss=math.inf)], BASE, TH)[0].state == "collapsed"


def test_prior_kid_leak_degenerate_and_overfit():
    prior = classify([row(1, 0.7, prior_kid=0.01), row(2, 0.7, prior_kid=0.2)], BASE, TH)
    assert prior[1].state == "collapsed" and "prior KID" in prior[1].reason
    # Each rule on one checkpoint, on both sides of its threshold (a detector that flags
    # everything, or nothing, fails one side).
    scale = BASE.reference_id_sim - BASE.leak
    leak = classify([row(1, 0.7, leak=BASE.leak + (TH.leak_frac + 0.05) * scale)], BASE, TH)
    assert leak[0].state == "collapsed" and "leak" in leak[0].reason
    assert classify([row(1, 0.7, leak=BASE.leak + (TH.leak_frac - 0.05) * scale)], BASE, TH)[0].state == "good"
    noisy = classify([row(1, 0.7, noise_frac=TH.degenerate_frac + 0.25)], BASE, TH)
    assert noisy[0].state == "collapsed"
    assert classify([row(1, 0.7, noise_frac=TH.degenerate_frac - 0.25)], BASE, TH)[0].state == "good"
    assert classify([row(1, 0.7, nan_frac=1.0)], BASE, TH)[0].state == "collapsed"
    assert classify([row(1, 0.7, loss=2.5)], BASE, TH)[0].state == "good"  # a high but finite loss is no collapse
    assert classify([row(1, BASE.id_sim)], BASE, TH)[0].state == "underfit"
    # a base model that already makes noise does not count against the LoRA
    assert classify([row(1, 0.7, noise_frac=0.75)], dataclasses.replace(BASE, degenerate=0.75), TH)[0].state == "good"
    kid = classify([row(1, 0.7, kid=0.01), row(2, 0.7, kid=0.05)], BASE, TH)
    assert kid[1].state == "collapsed" and "KID" in kid[1].reason
    assert states([row(1, 0.8, sample_sim=0.99)]) == ["overfit"]


def test_the_rules_are_ratios_of_the_measured_scale():
    """The same checkpoint measured by a network whose cosines are compressed towards 1 (another
    network's units) gets the same verdicts, because every rule is a ratio of what the base model
    and the training images measure on that network."""
    def squeezed(x):  # a network that reads every cosine as 0.8 + 0.2 x
        return 0.8 + 0.2 * x

    base2 = dataclasses.replace(BASE, id_sim=squeezed(BASE.id_sim), leak=squeezed(BASE.leak),
                                reference_id_sim=squeezed(BASE.reference_id_sim), reference_sample_sim=squeezed(BASE.reference_sample_sim))
    rows = [row(500, 0.70, leak=0.45), row(1000, 0.80, leak=0.48), row(1500, 0.62, leak=0.52), row(2000, 0.75, leak=0.60)]
    rows2 = [dataclasses.replace(r, metrics={**r.metrics, **{k: squeezed(r.metrics[k]) for k in ("id_sim", "leak", "sample_sim")}})
             for r in rows]
    one, two = classify(rows, BASE, TH), classify(rows2, base2, TH)
    assert [r.state for r in one] == [r.state for r in two] == ["good", "good", "collapsed", "collapsed"]
    # An absolute margin would not transfer: 0.15 cosine above the base leak is more than the
    # whole base-to-training-images scale of the squeezed network.
    assert base2.reference_id_sim - base2.leak < 0.15


def test_with_screening_a_collapse_is_declared_on_full_values_only():
    screened_base = dataclasses.replace(BASE, leak=0.45)  # the screening recipe's own base statistics
    looks_collapsed = row(1000, 0.7, leak=0.9)
    out = classify([row(500, 0.7), looks_collapsed], screened_base, TH, base_full=BASE)
    assert out[1].state == "good" and out[1].reason.startswith("screening suspects a collapse")
    assert suspect_collapse([row(500, 0.7), looks_collapsed], screened_base, TH, base_full=BASE)
    # The full evaluation at that checkpoint decides, against the full recipe's base statistics.
    fine = dataclasses.replace(looks_collapsed, full={**looks_collapsed.metrics, "leak": 0.45})
    assert classify([row(500, 0.7), fine], screened_base, TH, base_full=BASE)[1].state == "good"
    confirmed = dataclasses.replace(looks_collapsed, full={**looks_collapsed.metrics, "leak": 0.9})
    judged = classify([row(500, 0.7), confirmed], screened_base, TH, base_full=BASE)
    assert judged[1].state == "collapsed" and "leak" in judged[1].reason
    assert not suspect_collapse([row(500, 0.7), confirmed], screened_base, TH, base_full=BASE)
    # The best checkpoint is chosen among the fully evaluated ones, on their full values.
    rows = [dataclasses.replace(row(500, 0.95), state="good"), dataclasses.replace(row(1000, 0.7), full={"id_sim": 0.8}, state="good")]
    assert best_checkpoint(rows, "id_sim", "maximize").step == 1000
