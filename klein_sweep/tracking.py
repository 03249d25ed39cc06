"""Experiment tracking behind a small protocol, so the training loop never imports mlflow.

`NullTracker` is the default; `MlflowTracker` writes to any MLflow store (sqlite file, server).
Metrics are buffered and sent in batches: one sqlite write per step would cost more than a
tiny model's training step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

PARENT_RUN_TAG = "mlflow.parentRunId"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def flush(self) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records nothing; keeps the last metrics in memory (handy in tests and notebooks)."""

    run_id = None

    def __init__(self):
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, str, float]] = []
        self.tags: dict[str, Any] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.status: str | None = None

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.extend((step, k, float(v)) for k, v in metrics.items())

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_artifact(self, local_path, artifact_path=None):
        self.artifacts.append((str(local_path), artifact_path))

    def flush(self):
        pass

    def finish(self, status="FINISHED"):
        self.status = status


class MlflowTracker:
    """One MLflow run, driven through MlflowClient (explicit run ids: safe with several runs open,
    as a sweep's parent and child are)."""

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self._pending: list = []

    @classmethod
    def start(
        cls, uri: str, experiment: str, run_name: str | None = None, parent_run_id: str | None = None, tags: dict | None = None
    ) -> "MlflowTracker":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment_id = get_or_create_experiment(client, experiment)
        run_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            run_tags[PARENT_RUN_TAG] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        return cls(client, run.info.run_id, experiment_id)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> "MlflowTracker":
        """Reopen an existing run (a sweep's parent, from another worker)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        return cls(client, run_id, run.info.experiment_id)

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._pending) >= self.MAX_BATCH:
            self.flush()

    def flush(self):
        while self._pending:
            batch, self._pending = self._pending[: self.MAX_BATCH], self._pending[self.MAX_BATCH :]
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, local_path, artifact_path=None):
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def finish(self, status="FINISHED"):
        self.flush()
        self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"run {self.run_id} (experiment id {self.experiment_id}) at {self.client.tracking_uri}"


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id; created if missing. Tolerates another process creating it first."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
