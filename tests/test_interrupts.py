"""Ctrl-C and a worker killed right after it asked for a trial: one line, nothing left RUNNING,
and the same command resumes."""

from __future__ import annotations

import signal
import time

import pytest

from conftest import run_cli
from sweep_helpers import compose_plan, load_study, run_worker, sweep_args


# Two workers is the CPU default path (and the harder one: the signal is forwarded); one worker,
# the GPU path, runs with -m slow.
@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_ctrl_c_prints_one_line_closes_the_runs_and_the_same_command_resumes(tmp_path, workers):
    """Sent to the command's process alone (a terminal sends it to the worker processes too)."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    # A checkpoint at step 2 shows a trial is training; 800 steps keep both trials in flight
    # until the workers get the signal, which the command passes on at once, 1.5 s after both
    # were seen training: by then the first had trained 170-330 steps in three runs (2 cores
    # AVX-512, no other load; a loaded machine trains slower, the margin grows). The rerun trains
    # both cells to the end: every step here is paid twice.
    args = sweep_args("lr_vs_steps", tmp_path, "sweep.params.train.steps.values=[2,800]", f"sweep.workers={workers}")
    worker = run_worker(args, cwd=tmp_path)
    db = tmp_path / "sweeps" / "lr_vs_steps" / "study.db"
    deadline, in_flight = time.time() + 300, None
    while time.time() < deadline and worker.poll() is None:
        try:
            trials = load_study(db.parent).get_trials() if db.exists() else []
        except Exception:  # the study is being created
            trials = []
        running = [t for t in trials if t.state == TrialState.RUNNING]
        # both cells taken (one per worker, or both lrs as lanes of one worker's training) and
        # past their first checkpoint
        if len(running) == 2 and all(t.intermediate_values for t in running):
            in_flight = sorted(t.number for t in running)
            time.sleep(1.5)  # past the checkpoint's logging, inside the training loop
            worker.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    out, err = worker.communicate(timeout=120)
    assert in_flight is not None, "the sweep ended before both trials were running"
    assert worker.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("klein_sweep: interrupted")]
    assert len(lines) == 1 and "sweep lr_vs_steps stopped" in lines[0] and "The same command resumes" in lines[0]
    assert "every trial in flight is marked interrupted" in lines[0]  # two were: the line must not say one

    study = load_study(db.parent)
    # The command's own account (a worker terminated after the grace period, a storage error while
    # marking) is what tells why a trial stayed RUNNING.
    assert not study.get_trials(states=(TrialState.RUNNING,)), err[-3000:]
    # Exactly the two trials in flight are marked interrupted and failed, one per cell, and no
    # other trial was started or finished
    trials = study.get_trials()
    stopped = [t for t in trials if t.user_attrs.get("interrupted")]
    assert in_flight == [0, 1] and [t.number for t in trials] == [0, 1]
    assert [t.number for t in stopped] == in_flight and all(t.state == TrialState.FAIL for t in stopped)
    assert sorted(t.user_attrs["cell"]["train.lr"] for t in stopped) == [1e-4, 4e-4]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lr_vs_steps").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED" and all(r.info.status == "KILLED" for r in runs)  # none finished

    rerun = run_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = load_study(db.parent)
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert sorted(t.user_attrs["cell"]["train.lr"] for t in done) == [1e-4, 4e-4]


def test_a_trial_beats_from_the_moment_it_is_asked(tmp_path, monkeypatch):
    """A worker on another host killed between ask and its first trial-heartbeat: the trial must
    still be recovered after the grace period."""
    from optuna.trial import TrialState

    import klein_sweep.sweep.study as study_module
    from klein_sweep.sweep.queue import next_trial
    from klein_sweep.sweep.worker import prepare_study

    plan = compose_plan([*sweep_args("lr_vs_steps", tmp_path), "tracking=none", "sweep.heartbeat_seconds=1",
                         f"sweep.output_dir={tmp_path / 'sweep'}"])
    study, _ = prepare_study(plan)
    trial = next_trial(study, plan)  # asked, and then the worker "dies": no Heartbeat thread ever starts
    study._storage.set_trial_user_attr(trial._trial_id, "worker", "another-host:1")  # not a local PID to check
    time.sleep(6)  # past the grace period of 4 beats
    monkeypatch.setattr(study_module.socket, "gethostname", lambda: "this-host")
    assert study_module.recover_interrupted(study) == [trial.number]
    assert study.trials[trial.number].state == TrialState.FAIL
