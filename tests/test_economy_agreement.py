"""The economy recipe on the mini world (one screening seed at every checkpoint, the full recipe
where it decides) finds the full recipe's collapse. Slow: two mini trainings to 2000 steps
(`python -m pytest -m slow -n 0 tests/test_economy_agreement.py`, run by .ci/run)."""

from __future__ import annotations

import json

import pytest

from sweep_helpers import compose_plan

# lr 4e-4, the committed default sweep's earliest collapse: fine at 1500, collapsed at 2000
# (sweeps/lr_vs_steps/report.md; the same under both recipes, docs/evaluation_cost.md).
SMALL_SWEEP = ["+sweep=lr_vs_steps", "sweep.params.train.lr.values=[4e-4]", "sweep.params.train.steps.values=[1000,1500,2000]",
               "sweep.refine=false", "tracking=none", "sweep.workers=1"]


@pytest.mark.slow
def test_the_economy_recipe_finds_the_full_recipes_collapse_on_the_mini_world(tmp_path):
    from klein_sweep.sweep.worker import run_sweep

    reports = {}
    for recipe in ("full", "economy"):
        folder = tmp_path / recipe / "sweeps" / "lr_vs_steps"
        plan = compose_plan([*SMALL_SWEEP, f"eval.recipe={recipe}", f"sweep.output_dir={folder}",
                             f"data.cache_dir={tmp_path / 'cache'}"])
        assert run_sweep(plan, progress=False).failed == []
        reports[recipe] = json.loads((folder / "report.json").read_text())
    full, economy = reports["full"], reports["economy"]
    (full_training,), (economy_training,) = full["boundary"]["trainings"], economy["boundary"]["trainings"]
    assert full_training["collapse_step"] == 2000 and full_training["fine_at"] == 1500  # the committed reference
    assert (economy_training["collapse_step"], economy_training["fine_at"]) == (2000, 1500)
    assert [c["state"] for c in economy["cells"]] == [c["state"] for c in full["cells"]]
    # the best cell is the full recipe's, judged on the full evaluation's values (the economy row
    # keeps its one-seed screening values beside them, under "full")
    assert economy["best"]["step"] == full["best"]["step"]
    assert economy["best"]["full"]["id_sim"] == pytest.approx(full["best"]["id_sim"], abs=1e-6)
    assert economy["answer"]["metrics"]["sweep/best_value"] == pytest.approx(full["answer"]["metrics"]["sweep/best_value"], abs=1e-6)
