"""Soak: 200 tiny trials over 4 worker processes on PostgreSQL, tracked to an MLflow server over
PostgreSQL. Every cell exactly once, every trial recorded in both stores, no lost metrics.
Prints trials per minute (run with -s to see it)."""

from __future__ import annotations

import time

import pytest
from conftest import run_cli
from sweep_helpers import COMMON, run_worker

pytestmark = pytest.mark.slow

N_WORKERS = 4
LRS = [f"{x:.2e}" for x in (5e-5 * 1.25**i for i in range(20))]  # 20 values, 5e-5 ... ~3.5e-3
RANKS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]  # x 20 lrs = 200 cells
STEPS = 3


def test_200_trials_over_4_workers(tmp_path, postgres, mlflow_server):
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from klein_sweep.sweep.plan import cell_key
    from test_workers import study_at

    storage = postgres.create_database("soak")
    args = [
        "+sweep=rank_vs_lr", *COMMON, f"data.cache_dir={tmp_path / 'cache'}", "sweep.name=soak",
        f"sweep.params.train.lr.values=[{','.join(LRS)}]", f"sweep.params.train.rank.values=[{','.join(map(str, RANKS))}]",
        f"sweep.params.train.steps.values=[{STEPS}]", "sweep.heartbeat_seconds=5",
        f"sweep.storage={storage}", f"tracking.uri={mlflow_server.url}",
    ]
    prepared = run_cli(*args, "sweep.role=prepare", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    start = time.perf_counter()
    workers = [run_worker([*args, "sweep.role=work", f"sweep.worker={i}"], cwd=tmp_path) for i in range(N_WORKERS)]
    outs = [w.communicate(timeout=3600) for w in workers]
    wall = time.perf_counter() - start
    for w, (_, err) in zip(workers, outs):
        assert w.returncode == 0, err[-4000:]

    study = study_at(storage, "soak")
    done = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    cells = [cell_key(t.user_attrs["cell"]) for t in done]
    assert len(done) == 200 and len(set(cells)) == 200, "every cell exactly once"
    assert all(t.user_attrs.get("checkpoints") and t.user_attrs.get("mlflow_run_id") for t in done)
    per_worker = {}
    for t in done:
        per_worker[t.user_attrs["worker"]] = per_worker.get(t.user_attrs["worker"], 0) + 1

    client = MlflowClient(tracking_uri=mlflow_server.url)
    (experiment,) = [e for e in client.search_experiments() if e.name == "soak"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children = {r.info.run_id: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(children) == 200 and all(r.info.status == "FINISHED" for r in children.values())
    assert {t.user_attrs["mlflow_run_id"] for t in done} == set(children)
    for run in children.values():  # no lost metrics
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == STEPS
        assert len(client.get_metric_history(run.info.run_id, "eval/id_sim")) == 1
    discarded = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    print(f"\nsoak: 200 trials ({STEPS} steps + 1 evaluation each) on {N_WORKERS} workers in {wall:.0f} s = "
          f"{200 / wall * 60:.1f} trials/min; per worker {sorted(per_worker.values())}; "
          f"discarded asks (surplus/duplicate) {len(discarded)}")
