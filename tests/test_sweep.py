"""Sweeps end to end on the tiny model: every committed sweep, resume after a kill, two workers
on one study, the report rebuilt from storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, repo_pythonpath, run_cli, run_python
from sweep_helpers import DEBUG_SIZE, completed_cells, compose_plan, load_study, run_worker, sweep_args


@pytest.mark.parametrize("name", sorted(DEBUG_SIZE))
def test_every_sweep_runs_at_debug_size(tmp_path, name):
    """In-process (the command line itself is covered by the lr_vs_steps test below)."""
    from klein_sweep.sweep.worker import run_sweep

    folder = tmp_path / "sweeps" / name
    summary = run_sweep(compose_plan([*sweep_args(name, tmp_path), f"sweep.output_dir={folder}", "tracking=none"]), progress=False)
    assert summary.failed == []
    assert (folder / "report.md").exists() and (folder / "heatmaps.png").exists()
    study = load_study(folder)
    assert len(completed_cells(study)) == 2
    report = json.loads((folder / "report.json").read_text())
    assert report["cells"] and all("state" in c for c in report["cells"])
    if name == "lr_vs_steps_seeds":  # one lr at two training seeds, compared
        assert [c["setting"] for c in report["seed_stability"]] == [{"train.lr": 1e-4}]
        assert "## Stability across training seeds" in (folder / "report.md").read_text()


def test_lr_vs_steps_tracks_parent_children_and_tags(tmp_path):
    proc = run_cli(*sweep_args("lr_vs_steps", tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lr_vs_steps")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2  # one training per lr: steps are checkpoints
    assert parents[0].info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")} >= {"report/report.md", "report/heatmaps.png"}
    # the UI opens the experiment on its runs, and the parent carries the sweep's answer
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the link the CLI prints opens a runs view with each trial's state, sorted by lr (trials listed flat)
    view = json.loads(exp.tags["mlflow.sharedViewState.klein_sweep"])
    assert view["orderByKey"] == "params.`train.lr`" and "metrics.`trial/state`" in view["selectedColumns"]
    # its chart view: the trials' curves first and open, the parent's single values last and closed
    sections = [(s["name"], s["display"]) for s in view["compareRunSections"]]
    assert sections[:3] == [("eval", True), ("val", True), ("train", True)] and view["isAccordionReordered"], sections
    assert sections[-5:] == [(name, False) for name in ("sweep", "boundary", "boundary/safe_steps", "collapse_step", "cost")]
    assert f"#/experiments/{exp.experiment_id}/runs?viewStateShareKey=klein_sweep" in proc.stdout
    answer = json.loads((tmp_path / "sweeps" / "lr_vs_steps" / "report.json").read_text())
    pm, ptags = parents[0].data.metrics, parents[0].data.tags
    assert pm["sweep/trials_finished"] == 2 and pm["sweep/trials_failed"] == 0
    # the cost preview's prediction beside what was measured
    cost = json.loads((tmp_path / "sweeps" / "lr_vs_steps" / "cost.json").read_text())
    assert pm["cost/predicted_eval_share"] == pytest.approx(cost["eval_share"], abs=1e-3)
    trials = load_study(tmp_path / "sweeps" / "lr_vs_steps").trials
    train_s, eval_s = (sum(t.user_attrs[k] for t in trials) for k in ("train_seconds", "eval_seconds"))
    assert pm["cost/measured_eval_share"] == pytest.approx(eval_s / (train_s + eval_s), rel=1e-6)
    best = answer["best"]
    assert pm["sweep/best_value"] == pytest.approx(best["id_sim"]) and pm["sweep/best_step"] == best["step"]
    assert ptags["klein.best_cell"].startswith(f"lr_{best['setting']['train.lr']:g} at step {best['step']}")
    # the answer as the parent run's description; the settings every trial shares as its params
    assert ptags["mlflow.note.content"] == answer["answer"]["tags"]["mlflow.note.content"]
    assert f"**Best cell**: lr={best['setting']['train.lr']:.2e} at step {best['step']}" in ptags["mlflow.note.content"]
    assert parents[0].data.params["model.name"] == "tiny" and parents[0].data.params["train.rank"] == "16"
    collapsed = {p["setting"]["train.lr"]: p["collapse_step"] for p in answer["boundary"]["trainings"] if p["collapse_step"] is not None}
    assert {k: v for k, v in pm.items() if k.startswith("collapse_step/")} == {f"collapse_step/lr_{lr:g}": s for lr, s in collapsed.items()}
    for child in children:
        tags, rid = child.data.tags, child.info.run_id
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id and "optuna.trial" in tags
        assert tags["klein.state"] in ("underfit", "good", "overfit", "collapsed")
        assert "klein.collapse_step" in tags and "klein.best_step" in tags
        states = ("underfit", "good", "overfit", "collapsed")
        assert child.data.metrics["trial/state"] == states.index(tags["klein.state"])
        assert child.data.metrics["trial/collapsed"] == float(tags["klein.collapse_step"] != "none")
        if tags["klein.best_step"] != "none":
            assert child.data.metrics["trial/best_step"] == int(tags["klein.best_step"])
        for key in ("eval/id_sim", "eval/kid", "eval/prior_kid", "eval/fid", "eval/is", "eval/leak"):
            steps = [m.step for m in client.get_metric_history(rid, key)]
            assert steps and set(steps) <= {2, 4}, key
        # params: what tells the trials apart (MLflow prints them all above each sample grid); the
        # whole resolved config in config.yaml
        assert child.data.params == {"train.lr": child.data.params["train.lr"], "train.steps": "4"}
        assert child.data.params["train.lr"] in ("0.0001", "0.0004")
        config = yaml.safe_load(open(client.download_artifacts(rid, "config.yaml", str(tmp_path))))
        assert config["train"]["lr"] == float(child.data.params["train.lr"]) and config["eval"]["seeds"] == [0, 1]
        arts = {a.path for a in client.list_artifacts(rid)}
        assert {"images", "lora"} <= arts
        # sample grids by key and step (MLflow's image viewer): one key per prompt set, each checkpoint
        logged = {a.path.split("/")[-1].split("+timestamp")[0] for a in client.list_artifacts(rid, "images") if a.path.endswith(".png")}
        steps = [m.step for m in client.get_metric_history(rid, "eval/id_sim")]
        assert logged == {f"samples~{name}+step+{s}" for name in ("trigger", "prior") for s in [0, *steps]}  # 0: the base model
        assert [a.path for a in client.list_artifacts(rid, "lora/last")] == [
            "lora/last/klein_lora_comfyui.safetensors", "lora/last/pytorch_lora_weights.safetensors"]


def test_killed_sweep_resumes_every_cell_once(tmp_path):
    args = sweep_args("lr_vs_steps", tmp_path, "sweep.params.train.lr.values=[1e-4,2e-4,4e-4]",
                      "sweep.params.train.steps.values=[150,300]", "tracking=none", "sweep.workers=1",
                      "sweep.lanes=1")  # one trial at a time: one finished while the next runs
    worker = run_worker(args, cwd=tmp_path)
    db = tmp_path / "sweeps" / "lr_vs_steps" / "study.db"
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and worker.poll() is None:
        if db.exists():
            from optuna.trial import TrialState

            try:
                study = load_study(db.parent)
                states = [t.state for t in study.get_trials()]
            except Exception:
                states = []
            if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                worker.send_signal(signal.SIGKILL)  # no cleanup: the trial stays RUNNING in storage
                killed = True
                break
        time.sleep(0.2)
    worker.wait(timeout=30)
    assert killed, "the worker finished before it could be killed"
    rerun = run_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    study = load_study(db.parent)
    cells = completed_cells(study)
    assert len(cells) == 3 and len(set(cells)) == 3
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1


@pytest.mark.slow  # the default run covers this on PostgreSQL with three workers (test_workers.py)
def test_two_workers_never_run_a_cell_twice(tmp_path):
    args = sweep_args("lr_vs_steps", tmp_path, "sweep.params.train.lr.values=[5e-5,1e-4,1.5e-4,2e-4,4e-4]",
                      "sweep.params.train.steps.values=[5,10]", "tracking=none",
                      "sweep.lanes=1")  # two commands that each think they are alone: lanes would let one take all
    # prepare the cache once so both workers start at the same time
    workers = [run_worker(args, cwd=tmp_path) for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err[-4000:]
    study = load_study(tmp_path / "sweeps" / "lr_vs_steps")
    cells = completed_cells(study)
    assert len(cells) == 5 and len(set(cells)) == 5
    workers_used = {t.user_attrs.get("worker") for t in study.get_trials() if t.user_attrs.get("cell")}
    assert len(workers_used) == 2  # both workers took cells: the queue was shared, not run twice
    from optuna.trial import TrialState

    ran = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(ran) == 5 and all(t.user_attrs.get("worker") and t.user_attrs.get("checkpoints") for t in ran)
    assert not [t for t in study.get_trials() if t.user_attrs.get("duplicate_of") is not None and "checkpoints" in t.user_attrs]


def test_report_rebuilds_from_storage_alone(tmp_path):
    proc = run_cli(*sweep_args("reproduce_2500_2e-4", tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = tmp_path / "sweeps" / "reproduce_2500_2e-4"
    before = (folder / "report.md").read_text()
    for f in ("report.md", "report.json", "heatmaps.png"):
        (folder / f).unlink()
    (tmp_path / "mlflow.db").unlink()
    import shutil

    shutil.rmtree(tmp_path / "mlruns", ignore_errors=True)

    out = run_python("klein_sweep.report", "reproduce_2500_2e-4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (folder / "report.md").read_text() == before
    assert (folder / "heatmaps.png").exists()
    missing = run_python("klein_sweep.report", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "no study in sweeps/nope" in missing.stderr


@pytest.mark.parametrize("schedule,cells,checkpoints", [("constant", 3, True), ("constant_with_warmup", 3, True), ("cosine", 12, False), ("linear", 12, False)])
def test_steps_are_checkpoints_only_when_the_schedule_allows(schedule, cells, checkpoints):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from klein_sweep.config import CONF_DIR, build_settings, register_resolvers
    from klein_sweep.sweep.plan import plan_sweep

    register_resolvers()
    overrides = ["+sweep=reproduce_2500_2e-4", f"train.lr_schedule={schedule}"]
    if schedule == "constant_with_warmup":
        overrides.append("train.warmup_steps=10")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    plan = plan_sweep(build_settings(cfg), cfg)
    assert len(plan.cells) == cells and plan.steps_are_checkpoints is checkpoints
    assert plan.step_values == ([1000, 1500, 2000, 2500] if checkpoints else [])
    assert ("steps are checkpoints" if checkpoints else "trained separately") in plan.notes[0]


RELEASE_SCRIPT = """
import gc, sys, weakref
import klein_sweep.training.trial as trial
from klein_sweep.sweep.worker import run_sweep
from sweep_helpers import COMMON, compose_plan
models, real = [], trial.prepare_model
def spy(*args, **kwargs):
    prepared = real(*args, **kwargs)
    models.append(weakref.ref(prepared.pipe.transformer))
    return prepared
trial.prepare_model = spy
tmp = sys.argv[1]
plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-4]",
                     "sweep.params.train.steps.values=[2]", f"data.cache_dir={tmp}/cache", f"sweep.output_dir={tmp}/sweep",
                     "tracking=none", "sweep.workers=1"])
summary = run_sweep(plan, progress=False)
gc.collect()
print("ran", summary.ran, "models alive", sum(ref() is not None for ref in models), "of", len(models))
"""


def test_the_model_is_released_when_an_in_process_sweep_returns(tmp_path):
    """A notebook or a test that runs a sweep in its own process gets the model's memory back (a
    9B held 17 GiB after the sweep on a GPU). A fresh interpreter, as a user's: the libraries the
    sweep imports for the first time kept the importing frames, run_sweep's among them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo_pythonpath(), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran [0] models alive 0 of 1" in proc.stdout, proc.stdout[-2000:]


def test_a_sweep_in_a_gpus_dtypes_trains_and_evaluates_on_the_cpu(tmp_path):
    """bf16 weights under bf16 autocast, as on a GPU: accelerate hands the evaluation float32
    predictions while the VAE is bf16 (the first checkpoint failed in the VAE on an H200 before
    the sampler decoded in the VAE's dtype). The CPU runs the same dtype path."""
    proc = run_cli(*sweep_args("lr_vs_steps", tmp_path, "sweep.refine=false", "sweep.lanes=1", "sweep.workers=1",
                               "model.dtype=bfloat16", "train.mixed_precision=bf16", "tracking=none"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ran 2 trials, 0 failed" in proc.stdout
    study = load_study(tmp_path / "sweeps" / "lr_vs_steps")
    assert all(t.user_attrs["checkpoints"] for t in study.trials)  # every checkpoint was evaluated
