"""Stability across training seeds: with train.seed swept, the report compares each setting's
first collapsed step and best checkpoint per seed."""

from __future__ import annotations

from klein_sweep.record import CheckpointRow, TrialRecord
from klein_sweep.report.results import SweepResults, TrialResult
from klein_sweep.report.stability import seed_comparison, stability_section


def trial(number, lr, seed, collapse_at=None, id_sims=(0.6, 0.7, 0.8, 0.75)):
    rows = []
    for step, v in zip((500, 1000, 1500, 2000), id_sims):
        state = "collapsed" if collapse_at is not None and step >= collapse_at else "good"
        rows.append(CheckpointRow(step=step, metrics={"id_sim": v}, state=state))
    return TrialResult(number, {"train.lr": lr, "train.seed": seed},
                       TrialRecord(state=rows[-1].state, steps=2000, rows=rows, collapse_step=collapse_at))


def test_the_report_says_how_far_the_boundary_moves_between_seeds():
    results = SweepResults("s", None, [trial(0, 1e-4, 0, collapse_at=2000), trial(1, 1e-4, 1, collapse_at=1500),
                                       trial(2, 4e-4, 0, collapse_at=1000), trial(3, 4e-4, 1),
                                       trial(4, 5e-5, 0), trial(5, 5e-5, 1)])
    by_lr = {c.setting["train.lr"]: c for c in seed_comparison(results)}
    assert by_lr[1e-4].collapse_step == {0: 2000, 1: 1500} and by_lr[1e-4].shift == 500
    assert by_lr[4e-4].shift is None and by_lr[4e-4].disagree
    assert by_lr[1e-4].best_value == {0: 0.8, 1: 0.7} and by_lr[1e-4].best_step == {0: 1500, 1: 1000}
    text = "\n".join(stability_section(results, seed_comparison(results)))
    assert "| lr=1.00e-04 | 2000 | 1500 | 500 steps |" in text
    assert "| lr=4.00e-04 | 1000 | none | one seed only |" in text
    assert "moved by up to 500 steps" in text and "lr=4.00e-04 collapsed at some seeds and not at others" in text


def test_one_seed_has_no_stability_section():
    results = SweepResults("s", None, [trial(0, 1e-4, 0, collapse_at=2000), trial(1, 4e-4, 0)])
    assert seed_comparison(results) == [] and stability_section(results, []) == []

