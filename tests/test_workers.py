"""Many workers on one study in a real PostgreSQL server, tracked to a real MLflow server:
prepare once, then N workers; every grid cell exactly once; TPE's constant liar; a worker that
dies on another machine is found by its silent heartbeat and its cell re-run."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import repo_pythonpath, run_cli
from sweep_helpers import completed_cells, run_worker, sweep_args


def study_at(url: str, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url)


def finish(workers, timeout=600):
    outs = [w.communicate(timeout=timeout) for w in workers]
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err[-4000:]
    return outs


def test_prepare_then_three_workers_run_every_cell_once(tmp_path, postgres, mlflow_server):
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    storage = postgres.create_database("grid3")
    args = sweep_args(
        "lr_vs_steps", tmp_path, "sweep.params.train.lr.values=[5e-5,1e-4,2e-4,4e-4]",
        "sweep.params.train.steps.values=[2,4]", f"sweep.storage={storage}", f"tracking.uri={mlflow_server.url}",
    )
    prepared = run_cli(*args, "sweep.role=prepare", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-4000:]
    assert "prepared" in prepared.stdout and "4 cells" in prepared.stdout

    finish([run_worker([*args, "sweep.role=work", f"sweep.worker={i}"], cwd=tmp_path) for i in range(3)])

    study = study_at(storage, "lr_vs_steps")
    cells = completed_cells(study)
    assert len(cells) == 4 and len(set(cells)) == 4
    ran = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(ran) == 4
    # The experiment and the parent run were made once, by the prepare step.
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiments = [e for e in client.search_experiments() if e.name == "lr_vs_steps"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == study.user_attrs["mlflow_parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    # No lost metrics: every step's loss, every checkpoint's evaluation.
    for r in children:
        assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 4
        assert len(client.get_metric_history(r.info.run_id, "eval/id_sim")) == 2


def test_tpe_workers_share_one_budget_with_constant_liar(tmp_path, postgres):
    from optuna.trial import TrialState

    storage = postgres.create_database("tpe3")
    args = sweep_args("search", tmp_path, "sweep.n_trials=4", f"sweep.storage={storage}", "tracking=none")
    assert run_cli(*args, "sweep.role=prepare", cwd=tmp_path).returncode == 0
    finish([run_worker([*args, "sweep.role=work"], cwd=tmp_path) for _ in range(3)])
    study = study_at(storage, "search")
    done = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4  # not 4 per worker, not 4 + the ones asked for concurrently
    surplus = [t for t in study.get_trials() if t.user_attrs.get("surplus")]
    assert all(t.state == TrialState.FAIL and "checkpoints" not in t.user_attrs for t in surplus)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for a second hostname")
def test_worker_dead_on_another_machine_is_found_by_heartbeat_and_rerun(tmp_path, postgres):
    """Worker A runs under another hostname (its own UTS namespace), so this host cannot see its
    process: only its heartbeat going silent tells that it died."""
    from optuna.trial import TrialState

    probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a UTS namespace here: {probe.stderr.decode()[-200:]}")
    storage = postgres.create_database("dead")
    args = sweep_args("lr_vs_steps", tmp_path, "sweep.params.train.lr.values=[1e-4,2e-4,4e-4]",
                      "sweep.params.train.steps.values=[200,400]", f"sweep.storage={storage}", "tracking=none",
                      "sweep.heartbeat_seconds=1")
    assert run_cli(*args, "sweep.role=prepare", cwd=tmp_path).returncode == 0
    inner = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "klein_sweep", *args, "sweep.role=work"])
    other_machine = subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", f"hostname machine-b && exec {inner}"], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": repo_pythonpath()},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    victim = None
    deadline = time.time() + 240
    while time.time() < deadline and other_machine.poll() is None:
        running = [t for t in study_at(storage, "lr_vs_steps").get_trials() if t.state == TrialState.RUNNING]
        if running and running[0].user_attrs.get("worker", "").startswith("machine-b:"):
            victim = running[0].number
            break
        time.sleep(0.2)
    assert victim is not None, other_machine.communicate()[1][-3000:]
    time.sleep(1.5)  # mid-trial, after a beat or two
    other_machine.send_signal(signal.SIGKILL)  # no goodbye: the trial stays RUNNING in the storage
    other_machine.wait(timeout=30)

    rescuer = run_cli(*args, "sweep.role=work", cwd=tmp_path)
    assert rescuer.returncode == 0, rescuer.stderr[-4000:]
    study = study_at(storage, "lr_vs_steps")
    assert study.trials[victim].state == TrialState.FAIL  # failed by the heartbeat check
    cells = completed_cells(study)
    assert len(cells) == 3 and len(set(cells)) == 3
    rerun = [t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
             if t.user_attrs["cell"] == study.trials[victim].user_attrs["cell"]]
    assert len(rerun) == 1 and not rerun[0].user_attrs["worker"].startswith("machine-b:")


def test_work_needs_a_prepared_study(tmp_path, postgres):
    storage = postgres.create_database("unprepared")
    proc = run_cli(*sweep_args("lr_vs_steps", tmp_path, f"sweep.storage={storage}", "tracking=none"), "sweep.role=work",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "sweep.role=prepare" in proc.stderr and "Traceback" not in proc.stderr


def test_workers_with_other_settings_than_the_prepared_study_are_refused(tmp_path, postgres):
    storage = postgres.create_database("mismatch")
    args = sweep_args("lr_vs_steps", tmp_path, f"sweep.storage={storage}", "tracking=none")
    assert run_cli(*args, "sweep.role=prepare", cwd=tmp_path).returncode == 0
    proc = run_cli(*args, "sweep.role=work", "train.rank=8", cwd=tmp_path)
    # the refusal names each differing key with both values
    assert proc.returncode == 2 and "train.rank: study 16, this command 8" in proc.stderr, proc.stderr
    # A `run` with another grid is refused before it queues anything into the prepared study.
    queued = len(study_at(storage, "lr_vs_steps").get_trials())
    other = run_cli(*args, "sweep.params.train.lr.values=[3e-4]", cwd=tmp_path)
    assert other.returncode == 2 and "sweep.params: study" in other.stderr and "sweep.cells: study" in other.stderr, other.stderr
    assert len(study_at(storage, "lr_vs_steps").get_trials()) == queued


def test_a_command_that_tracks_elsewhere_than_the_study_is_refused_before_any_work(tmp_path, postgres, monkeypatch):
    """The study's MLflow parent run lives in one store: a command tracking to another would log
    its trials apart from the study's runs (and fail late, reopening the parent run). The default
    tracking.uri=sqlite:///mlflow.db is such a store in each folder a command starts in."""
    from klein_sweep.sweep.worker import prepare_study
    from sweep_helpers import compose_plan

    storage = postgres.create_database("elsewhere")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    args = sweep_args("lr_vs_steps", tmp_path, f"sweep.storage={storage}")  # tracking: the default, relative sqlite:///mlflow.db
    monkeypatch.chdir(first)
    prepare_study(compose_plan([*args, "sweep.role=prepare"]))[1].flush()  # the first command's prepare, in this process
    monkeypatch.chdir(tmp_path)
    study = study_at(storage, "lr_vs_steps")
    before = (len(study.get_trials()), study.user_attrs)
    assert study.user_attrs["mlflow_tracking_uri"] == f"sqlite:///{first / 'mlflow.db'}"

    study_store = f"sqlite:///{first / 'mlflow.db'}"
    for extra in ([], ["sweep.role=work", f"tracking.uri=sqlite:///{second / 'other.db'}"]):
        proc = run_cli(*args, *extra, cwd=second)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"tracking.uri: study 'lr_vs_steps' tracks to the MLflow store {study_store} (its parent run " in proc.stderr, proc.stderr
        assert f"join the study with tracking.uri={study_store}" in proc.stderr and "Traceback" not in proc.stderr
        assert list(second.iterdir()) == []  # no mlflow.db, no sweeps/ folder in the second command's folder
    study = study_at(storage, "lr_vs_steps")
    assert (len(study.get_trials()), study.user_attrs) == before  # nothing queued, asked or recorded
