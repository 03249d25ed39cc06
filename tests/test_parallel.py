"""A sweep on every CPU core: N single-threaded worker processes on one study, the same results
as one worker, one report, the MLflow parent closed once."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli
from sweep_helpers import compose_plan, load_study, sweep_args


def report_of(folder):
    report = json.loads((folder / "report.json").read_text())
    cells = {(c["setting"], c["steps"]): (c["state"], c["id_sim"]) for c in report["cells"]}
    return cells, report["best"]["setting"], report["best"]["step"]


def test_two_worker_processes_share_the_grid_and_find_what_one_worker_finds(tmp_path):
    from klein_sweep.sweep.worker import run_sweep

    args = sweep_args("lr_vs_steps", tmp_path, "sweep.params.train.lr.values=[1e-4,4e-4,1e-3]")
    # the reference: one worker, in this process (what the command runs with sweep.workers=1)
    run_sweep(compose_plan([*args, "sweep.workers=1", "sweep.name=one", f"sweep.output_dir={tmp_path / 'sweeps' / 'one'}",
                            "tracking=none"]), progress=False)
    two = run_cli(*args, "sweep.workers=2", "sweep.name=two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "sweep two: 2 workers ran 3 trials, 0 failed" in two.stdout

    study = load_study(tmp_path / "sweeps" / "two")
    workers = {t.user_attrs["worker"] for t in study.trials if "checkpoints" in t.user_attrs}
    assert len(workers) == 2 and str(os.getpid()) not in {w.split(":")[-1] for w in workers}  # two processes, both worked
    cells_one, best_one, step_one = report_of(tmp_path / "sweeps" / "one")
    cells_two, best_two, step_two = report_of(tmp_path / "sweeps" / "two")
    assert (best_two, step_two) == (best_one, step_one)
    assert cells_two.keys() == cells_one.keys()
    for key, (state, id_sim) in cells_one.items():  # one thread or two: floating-point noise at most
        assert cells_two[key][0] == state and cells_two[key][1] == pytest.approx(id_sim, abs=1e-4), key

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("two").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/trials_finished"] == 3
    assert sorted(r.info.status for r in runs if r is not parent) == ["FINISHED"] * 3
    # the cost prediction, logged by the first worker process: once, the preview's own numbers
    cost = json.loads((tmp_path / "sweeps" / "two" / "cost.json").read_text())
    assert parent.data.metrics["cost/predicted_eval_share"] == pytest.approx(cost["eval_share"], abs=1e-3)
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "cost/predicted_train_pflop")] == [0]


def test_auto_uses_every_core_for_long_cpu_trials_only(tmp_path):
    from klein_sweep.sweep.parallel import resolve_workers

    def plan(*extra):
        return compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", "tracking=none", f"sweep.output_dir={tmp_path}", *extra])

    cores = os.cpu_count() or 1
    assert resolve_workers(plan()) == min(cores, 5)  # the shipped mini sweep: 5 cells of 2500 steps
    assert resolve_workers(plan("sweep.params.train.steps.values=[2,4]")) == 1  # a process costs more than such a trial
    assert resolve_workers(plan("sweep.params.train.lr.values=[1e-4]")) == 1  # one cell
    assert resolve_workers(plan("sweep.workers=3")) == 3
    assert resolve_workers(plan("sweep.role=work")) == 1


def _take_all(plan, out) -> None:
    """A worker process: take queued cells with the sweep's own next_trial until none is left."""
    import optuna

    from klein_sweep.sweep.queue import next_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="race", storage=plan.storage_url)
    got = []
    while (trial := next_trial(study, plan, wait=False)) is not None:
        got.append((trial.number, trial.user_attrs["cell"]["x"]))
    out.put(got)


def test_two_processes_never_get_the_same_queued_trial_from_sqlite(tmp_path):
    """Without the lock, Optuna on SQLite handed 3 of 200 queued trials to both processes."""
    import multiprocessing

    import optuna
    from optuna.trial import TrialState

    from klein_sweep.sweep.queue import sync_grid_queue

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", "tracking=none", f"sweep.storage={url}",
                         f"sweep.output_dir={tmp_path}"])
    assert plan.storage_url == url and plan.sweep.sampler == "grid"
    study = optuna.create_study(study_name="race", storage=url)
    assert sync_grid_queue(study, [{"x": i} for i in range(200)]) == 200
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_take_all, args=(plan, out)) for _ in range(2)]
    for w in workers:
        w.start()
    first, second = (out.get(timeout=300) for _ in workers)
    for w in workers:
        w.join(timeout=60)
    # every queued cell taken once, by one process, as the trial that holds it; nothing left
    numbers = [n for n, _ in first + second]
    assert len(numbers) == len(set(numbers)) == 200
    assert sorted(x for _, x in first + second) == list(range(200))
    assert first and second  # both processes took cells
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_an_idle_worker_leaves_as_soon_as_the_last_running_trial_ends(tmp_path):
    """A worker with nothing queued watches the trials still running; it must see the last one
    end within seconds, not one heartbeat (30 s) later: every two-worker sweep ends waiting on it."""
    import threading
    import time

    from optuna.trial import TrialState

    from klein_sweep.sweep.queue import next_trial, wait_for_stale_cells
    from klein_sweep.sweep.worker import prepare_study

    plan = compose_plan([*sweep_args("lr_vs_steps", tmp_path), "tracking=none", f"sweep.output_dir={tmp_path / 'sweep'}"])
    assert plan.sweep.heartbeat_seconds == 30
    study, _ = prepare_study(plan)
    running = [next_trial(study, plan) for _ in plan.cells]  # every cell taken by "another worker"
    finisher = threading.Timer(1.0, lambda: [study.tell(t, state=TrialState.FAIL) for t in running])
    finisher.start()
    start = time.monotonic()
    assert wait_for_stale_cells(study, plan) is False  # nothing to run: this worker leaves
    finisher.join()
    assert time.monotonic() - start < 5
