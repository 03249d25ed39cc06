"""The MLflow server is down at the start (clear refusal, nothing written) or dies mid-sweep
(the trial in flight is marked interrupted, the worker stops with the reason, and a restart
after the server is back runs that cell again: nothing silently lost)."""

from __future__ import annotations

import time

import pytest

from conftest import run_cli
from services import MlflowServer, free_port
from sweep_helpers import completed_cells, load_study, run_worker, sweep_args


def test_unreachable_tracking_server_is_refused_before_anything_is_written(tmp_path):
    port = free_port()
    proc = run_cli(*sweep_args("lr_vs_steps", tmp_path, f"tracking.uri=http://127.0.0.1:{port}"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"tracking.uri: no MLflow server answers at http://127.0.0.1:{port}" in proc.stderr
    assert "mlflow server" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweeps").exists()
    single = run_cli("model=tiny", "data=tiny_character", f"tracking.uri=http://127.0.0.1:{port}", cwd=tmp_path)
    assert single.returncode == 2 and "no MLflow server answers" in single.stderr


@pytest.mark.slow  # the same machine-fault path runs by default in test_faults.py (a full disk)
def test_tracking_server_dying_mid_sweep_interrupts_the_trial_and_a_restart_finishes_it(tmp_path):
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    backend = f"sqlite:///{tmp_path / 'mlflow_server.db'}"
    server = MlflowServer(backend, tmp_path / "artifacts").start()
    args = sweep_args("lr_vs_steps", tmp_path, "sweep.params.train.lr.values=[1e-4,2e-4,4e-4]",
                      "sweep.params.train.steps.values=[60,120]", f"tracking.uri={server.url}",
                      "sweep.workers=1", "sweep.lanes=1")  # one trial at a time: one finished while the next runs
    # Fail fast in the test; users keep MLflow's default retries (minutes) for short outages.
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    try:
        worker = run_worker(args, cwd=tmp_path, env=env)
        db = tmp_path / "sweeps" / "lr_vs_steps" / "study.db"
        killed = False
        deadline = time.time() + 240
        while time.time() < deadline and worker.poll() is None:
            if db.exists():
                try:
                    states = [t.state for t in load_study(db.parent).get_trials()]
                except Exception:
                    states = []
                if TrialState.COMPLETE in states and TrialState.RUNNING in states:
                    server.stop()
                    killed = True
                    break
            time.sleep(0.2)
        out, err = worker.communicate(timeout=300)
        assert killed, "the sweep finished before the server could be stopped"
        assert worker.returncode == 2, err[-3000:]
        assert "tracking: MLflow at" in err and "marked interrupted" in err
        study = load_study(db.parent)
        interrupted = [t for t in study.get_trials() if t.user_attrs.get("interrupted")]
        assert len(interrupted) == 1 and interrupted[0].state == TrialState.FAIL
    finally:
        server.stop()  # a no-op once the test stopped it

    server = MlflowServer(backend, tmp_path / "artifacts", port=server.port).start()
    try:
        rerun = run_cli(*args, cwd=tmp_path, env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        study = load_study(db.parent)
        cells = completed_cells(study)
        assert len(cells) == 3 and len(set(cells)) == 3
        client = MlflowClient(tracking_uri=server.url)
        (experiment,) = [e for e in client.search_experiments() if e.name == "lr_vs_steps"]
        runs = client.search_runs([experiment.experiment_id])
        finished = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
        assert len(finished) == 3  # one complete run per cell; the interrupted one is not among them
        for r in finished:
            assert len(client.get_metric_history(r.info.run_id, "train/loss")) == 120
    finally:
        server.stop()
