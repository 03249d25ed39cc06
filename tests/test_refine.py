"""Refinement past the grid (sweep.refine, on in lr_vs_steps): continuations resume the grid's
saved training, are marked in the study, MLflow and the report, and never take a grid cell's
place; the study-side queue plans each refinement once however often it is asked."""

from __future__ import annotations

import json

import pytest

from sweep_helpers import COMMON, compose_plan, finish, load_study

GRID = ["+sweep=lr_vs_steps", *COMMON, "sweep.params.train.lr.values=[1e-4,4e-4]", "sweep.params.train.steps.values=[2,4]",
        "sweep.refine_every=2", "sweep.workers=1"]


def test_lr_vs_steps_continues_each_safe_training_past_the_grid(tmp_path):
    from klein_sweep.sweep.worker import run_sweep

    folder = tmp_path / "sweeps" / "lr_vs_steps"
    plan = compose_plan([*GRID, f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={folder}",
                         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert run_sweep(plan, progress=False).failed == []
    study = load_study(folder)
    trials = sorted(study.trials, key=lambda t: t.number)
    grid = [t for t in trials if "refine" not in t.user_attrs]
    refined = [t for t in trials if "refine" in t.user_attrs]
    # The tiny model does not collapse in 4 steps: both lrs continue from step 4 to 2 x 4, once each.
    assert [t.user_attrs["cell"]["train.lr"] for t in grid] == [1e-4, 4e-4]
    assert sorted((t.user_attrs["refine"]["cell"]["train.lr"], t.user_attrs["refine"]["from_trial"]) for t in refined) == [
        (1e-4, grid[0].number), (4e-4, grid[1].number)]
    for t in refined:
        assert t.user_attrs["refine"]["kind"] == "extend" and t.user_attrs["refine"]["to_step"] == 8
        assert [c["step"] for c in t.user_attrs["checkpoints"]] == [6, 8]  # evaluated after its start only
        assert (folder / "trials" / f"{t.user_attrs['refine']['from_trial']:04d}" / "train_state.pt").exists()
    # MLflow marks them; the grid's runs stay the grid's
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lr_vs_steps")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags.get("klein.refine", "grid") for r in children) == ["extend", "extend", "grid", "grid"]
    assert all("refine extend" in r.data.tags["mlflow.runName"] for r in children if "klein.refine" in r.data.tags)
    # a continuation reads as its lr: the grid trial's setting tag and colour, and its curves start
    # where the grid trial's ended (its last checkpoint's values at the step it continues from)
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    for t in refined:
        run, grid_run = by_trial[t.number], by_trial[t.user_attrs["refine"]["from_trial"]]
        assert run.data.tags["klein.setting"] == grid_run.data.tags["klein.setting"] == f"lr_{t.user_attrs['cell']['train.lr']:g}"
        assert run.data.tags["mlflow.runColor"] == grid_run.data.tags["mlflow.runColor"]
        for key in ("eval/id_sim", "val/prior_loss"):
            grid_history = client.get_metric_history(grid_run.info.run_id, key)
            assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)][0] == (4, grid_history[-1].value)
    assert len({r.data.tags["mlflow.runColor"] for r in children}) == 2
    # the report: the grid table as asked (2 rows of 2 steps), the continuations in their own section
    report = json.loads((folder / "report.json").read_text())
    assert report["rows"] == ["lr=1.00e-04", "lr=4.00e-04"] and report["columns"] == [2, 4]
    assert [b["found_by"] for b in report["boundary"]["trainings"]] == ["grid, continued past step 4"] * 2
    assert [b["fine_at"] for b in report["boundary"]["trainings"]] == [8, 8]
    text = (folder / "report.md").read_text()
    assert "## Refinement past the grid" in text and "continue lr=0.0001 from step 4" in text
    assert (folder / "boundary.png").exists()


def test_the_study_queues_each_refinement_once_and_bisects_after_the_grid(tmp_path):
    from optuna.trial import TrialState

    from klein_sweep.sweep.refinement import queue_refinement
    from klein_sweep.sweep.study import open_study

    plan = compose_plan(["+sweep=lr_vs_steps", *COMMON, "sweep.params.train.lr.values=[1e-4,4e-4]",
                         f"sweep.output_dir={tmp_path / 'sweep'}", "tracking=none"])
    study = open_study(plan)
    good = [{"step": s, "id_sim": 0.8, "state": "good"} for s in (500, 1000, 1500, 2000, 2500)]
    finish(study, {"train.lr": 1e-4}, good)
    study.enqueue_trial({"train.lr": 4e-4}, user_attrs={"cell": {"train.lr": 4e-4}})  # still queued
    assert queue_refinement(study, plan) == 1  # the finished lr continues; no bisection while the grid runs
    assert queue_refinement(study, plan) == 0  # asked again: nothing twice
    waiting = study.get_trials(states=(TrialState.WAITING,))
    grid_cell = waiting[0]
    study._storage.set_trial_state_values(grid_cell._trial_id, state=TrialState.FAIL)  # stand-in for "taken"
    collapsed = good[:3] + [{"step": 2000, "id_sim": 0.3, "state": "collapsed", "reason": "identity"}]
    finish(study, {"train.lr": 4e-4}, collapsed)
    assert queue_refinement(study, plan) == 1  # now the bracket (1e-4, 4e-4] is known: one bisection
    specs = [t.user_attrs["refine"] for t in study.get_trials(states=(TrialState.WAITING,))]
    assert sorted(s["kind"] for s in specs) == ["bisect", "extend"]
    (bisect,) = [s for s in specs if s["kind"] == "bisect"]
    assert bisect["cell"] == {"train.lr": pytest.approx(2e-4)} and bisect["to_step"] == 2500


def test_each_setting_has_its_colour_and_the_parent_run_describes_the_answer(tmp_path):
    """The grid's settings in order, then the bisected ones, each its own colour (a continuation
    is its setting's); the parent run's description (mlflow.note.content) gives the best cell,
    every training's collapse step with the fitted safe steps, and the fit."""
    from klein_sweep.report import write_report
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.trial_run import RUN_COLOURS, setting_colour

    plan = compose_plan(["+sweep=lr_vs_steps", *COMMON, "sweep.params.train.lr.values=[1e-4,4e-4]",
                         f"sweep.output_dir={tmp_path / 'sweep'}", "tracking=none"])
    study = open_study(plan)
    good = [{"step": s, "id_sim": 0.8 + s / 1e5, "state": "good"} for s in (500, 1000, 1500, 2000, 2500)]
    finish(study, {"train.lr": 1e-4}, good)
    finish(study, {"train.lr": 4e-4}, good[:3] + [{"step": 2000, "id_sim": 0.3, "state": "collapsed", "reason": "identity"}])
    finish(study, {"train.lr": 1e-4}, [{"step": 3000, "id_sim": 0.83, "state": "good"},
                                       {"step": 3500, "id_sim": 0.3, "state": "collapsed", "reason": "identity"}],
           refine={"kind": "extend", "cell": {"train.lr": 1e-4}, "to_step": 5000, "from_step": 2500, "from_trial": 0})
    finish(study, {"train.lr": 2e-4}, good[:4] + [{"step": 2500, "id_sim": 0.3, "state": "collapsed", "reason": "identity"}],
           refine={"kind": "bisect", "cell": {"train.lr": 2e-4}, "to_step": 2500})
    colours = [setting_colour(study, plan, {"train.lr": lr}) for lr in (1e-4, 4e-4, 2e-4, 3e-4)]
    assert colours == list(RUN_COLOURS[:4])  # 3e-4: not (yet) in the study, the next colour

    write_report(tmp_path / "sweep", study=study)
    text = json.loads((tmp_path / "sweep" / "report.json").read_text())["answer"]["tags"]["mlflow.note.content"]
    assert "**Best cell**: lr=1.00e-04 at step 2500 (trial 0): id_sim 0.825, state good." in text, text  # the grid's best
    assert "| lr=1.00e-04 | 3500 | grid, continued past step 2500 |" in text and "| lr=2.00e-04 | 2500 | bisection | - |" in text, text
    assert "| lr=4.00e-04 | 2000 | grid |" in text and " steps |" in text, text  # the fit's safe steps at the grid's lrs
    assert "**Boundary fit**: collapse step ~ lr^-" in text and "through 3 trainings (0 still fine" in text, text


def test_continuations_ready_together_train_as_lanes(tmp_path, caplog):
    """The grid's two trainings as lanes, then their two continuations as lanes too: each
    resumes its own saved state (tests/test_lanes.py checks the weights against training alone)
    and is recorded from the step it continues from."""
    import logging

    from klein_sweep.sweep.worker import run_sweep

    folder = tmp_path / "sweeps" / "lr_vs_steps"
    plan = compose_plan([*GRID, "sweep.lanes=2", f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={folder}", "tracking=none"])
    with caplog.at_level(logging.INFO, logger="klein_sweep"):
        assert run_sweep(plan, progress=False).failed == []
    grouped = [r.getMessage() for r in caplog.records if "trained as 2 lanes" in r.getMessage()]
    assert [m.split(":")[0] for m in grouped] == ["trials [0, 1]", "trials [2, 3]"], grouped
    refined = [t for t in load_study(folder).trials if "refine" in t.user_attrs]
    assert sorted(t.number for t in refined) == [2, 3]
    for t in refined:
        assert [c["step"] for c in t.user_attrs["checkpoints"]] == [6, 8]


def test_continuations_ready_together_are_shared_among_the_commands_workers(tmp_path, caplog):
    """Two continuations ready together and two workers on the study: each takes one (the tail
    of the sweep on both cores), where one worker alone takes both as lanes (above)."""
    import dataclasses
    import logging

    from klein_sweep.sweep.worker import run_sweep

    folder = tmp_path / "sweeps" / "lr_vs_steps"
    plan = compose_plan([*GRID, "sweep.lanes=2", f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={folder}", "tracking=none"])
    with caplog.at_level(logging.INFO, logger="klein_sweep"):
        assert run_sweep(dataclasses.replace(plan, peers=2), progress=False).failed == []
    grouped = [r.getMessage().split(":")[0] for r in caplog.records if "trained as 2 lanes" in r.getMessage()]
    assert grouped == ["trials [0, 1]"]  # the grid's lanes; the continuations one by one
    refined = [t for t in load_study(folder).trials if "refine" in t.user_attrs]
    assert sorted(t.number for t in refined) == [2, 3]
    for t in refined:
        assert [c["step"] for c in t.user_attrs["checkpoints"]] == [6, 8]
