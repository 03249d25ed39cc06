"""Experiment tracking behind a small protocol, so the training loop never imports mlflow.

`NullTracker` is the default; `MlflowTracker` writes to any MLflow store (sqlite file, server).
Metrics are buffered and sent in batches: one sqlite write per step would cost more than a
tiny model's training step.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from klein_sweep.errors import KleinSweepError
from klein_sweep.redaction import redact

PARENT_RUN_TAG = "mlflow.parentRunId"
SERVER_DOC = "docs/multi_worker.md"


class TrackingError(KleinSweepError):
    """The tracking store failed or cannot be reached. Not the trial's fault: a sweep marks the
    trial interrupted (its cell runs again on the next start) and stops this worker."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before anything is written when the MLflow store cannot be opened: a server URL that
    does not answer, a database that takes no connection within seconds, a sqlite file (or a
    folder store) whose folder cannot be created. Creates nothing."""
    if not uri.startswith(("http://", "https://")):
        from klein_sweep.stores import store_problem

        problem = store_problem(uri)
        if problem:
            raise TrackingError(f"tracking.uri: cannot open the MLflow store {redact(uri)}: {problem}")
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except OSError as exc:
        reason = str(getattr(exc, "reason", exc))
    raise TrackingError(
        f"tracking.uri: no MLflow server answers at {redact(uri)} ({redact(reason)}). Start one "
        f"(see {SERVER_DOC}: mlflow server --backend-store-uri postgresql://... --host 127.0.0.1 --port 5000) "
        "or track to a local file with tracking.uri=sqlite:///mlflow.db"
    )


def store_identity(uri: str) -> str:
    """The MLflow store `uri` names, spelled so that two commands on one machine that mean the
    same store compare equal - a sqlite file or a folder by its absolute path (sqlite:///mlflow.db
    is relative to the folder a command starts in), a server without its trailing slash - and
    redacted, as a study keeps it and messages show it."""
    import os

    from klein_sweep.stores import local_path, scheme

    path = local_path(uri)
    kind = scheme(uri)
    if path is not None:
        absolute = os.path.abspath(path)
        if kind == "sqlite":
            query = uri.partition("?")[2]
            uri = f"sqlite:///{absolute}" + (f"?{query}" if query else "")
        else:
            uri = f"file://{absolute}" if kind == "file" else absolute
    elif kind in ("http", "https"):
        uri = uri.rstrip("/")
    return redact(uri)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_image(self, image, key: str, step: int) -> None: ...

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
        self.images: list[tuple[str, int, tuple[int, int]]] = []  # key, step, (width, height)
        self.status: str | None = None

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.extend((step, k, float(v)) for k, v in metrics.items())

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_artifact(self, local_path, artifact_path=None):
        self.artifacts.append((str(local_path), artifact_path))

    def log_image(self, image, key, step):
        self.images.append((key, int(step), image.size))

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

    @contextlib.contextmanager
    def _guard(self, what: str):
        with _tracking_errors(self.client.tracking_uri, what):
            yield

    @classmethod
    def start(
        cls, uri: str, experiment: str, run_name: str | None = None, parent_run_id: str | None = None, tags: dict | None = None
    ) -> "MlflowTracker":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run_tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
        if parent_run_id:
            run_tags[PARENT_RUN_TAG] = parent_run_id
        with _tracking_errors(uri, "creating a run"):
            experiment_id = get_or_create_experiment(client, experiment)
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        return cls(client, run.info.run_id, experiment_id)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> "MlflowTracker":
        """Reopen an existing run (a sweep's parent, from another worker)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        with _tracking_errors(uri, f"opening run {run_id}"):
            run = client.get_run(run_id)
        return cls(client, run_id, run.info.experiment_id)

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        with self._guard("logging params"):
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self._pending) >= self.MAX_BATCH:
            self.flush()

    def flush(self):
        with self._guard("logging metrics"):
            while self._pending:
                # Sent before it leaves the buffer: a failed send keeps the metrics for a retry.
                self.client.log_batch(self.run_id, metrics=self._pending[: self.MAX_BATCH])
                del self._pending[: self.MAX_BATCH]

    def set_tags(self, tags):
        from mlflow.entities import RunTag

        with self._guard("setting tags"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_artifact(self, local_path, artifact_path=None):
        with self._guard(f"uploading {Path(local_path).name}"):
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_image(self, image, key, step):
        """A PIL image by key and step: MLflow's image viewer compares steps and runs side by side."""
        with self._guard(f"logging image {key}"):
            self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)

    def finish(self, status="FINISHED"):
        self.flush()
        with self._guard("ending the run"):
            self.client.set_terminated(self.run_id, status=status)

    def describe(self) -> str:
        return f"run {self.run_id} (experiment id {self.experiment_id}) at {redact(self.client.tracking_uri)}"

    def share_runs_view(self, columns: list[str], order_by: str, chart_sections: list[tuple[str, bool]] = ()) -> str:
        """Store a view of the experiment's runs table - these columns, sorted by `order_by`
        (e.g. "params.`train.lr`") - as MLflow's own "Share view" button does: a JSON view state
        in the experiment tag mlflow.sharedViewState.<key>. Sorting by anything but start time
        makes MLflow list child runs flat instead of folded under their parent. `chart_sections`:
        the chart view's sections in this order, (metric prefix, expanded?) - see chart_view_state.
        Returns the UI route that opens it."""
        state = {"selectedColumns": columns, "orderByKey": order_by, "orderByAsc": True, "searchFilter": ""}
        if chart_sections:
            state.update(chart_view_state(chart_sections))
        with self._guard("saving the runs view"):
            self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW_TAG + SHARED_VIEW_KEY, json.dumps(state))
        return runs_view_route(self.experiment_id)


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # the MLflow UI's prefix for a shared runs-table view
SHARED_VIEW_KEY = "klein_sweep"


def chart_view_state(sections: list[tuple[str, bool]]) -> dict:
    """The chart view's part of a shared view state, as MLflow 3's UI stores it (its experiment
    page UI state): the sections in the order given, each expanded or collapsed. A section is a
    metric key's prefix (`eval` holds eval/id_sim, eval/kid, ...; `samples` the images). With the
    sections fixed ("reordered") the UI keeps their order, adds a chart per metric into the
    section of its prefix, and appends sections it does not know at the end; without them it
    would sort sections by name and open on the parent run's single values (boundary, cost).
    Every run is shown (not MLflow's first 10 rows), so a setting's training and its
    continuation both draw."""
    return {
        "compareRunSections": [{"uuid": f"klein-{name}", "name": name, "display": expanded, "isReordered": False,
                                "deleted": False, "isGenerated": True} for name, expanded in sections],
        "compareRunCharts": [],  # filled by the UI from the runs' metric keys
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
        "runsHiddenMode": "SHOW_ALL",
    }


def mlflow_ui_command(uri: str) -> str:
    """The command that browses `uri` (redacted). Without MLflow's job runner, which klein_sweep
    never uses, `mlflow ui` starts faster and idles lighter (README); the variable-before-command
    form is a POSIX shell's, so Windows gets the plain command."""
    command = f"mlflow ui --backend-store-uri {redact(uri)}"
    return command if os.name == "nt" else f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false {command}"


def runs_view_route(experiment_id: str) -> str:
    """The MLflow UI route (after the server's address) of the sweep's runs view."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={SHARED_VIEW_KEY}"


# MLflow 3's UI opens an experiment by its kind; without the tag it may open in GenAI mode on an
# empty traces page. A sweep is model training: open on the runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id; created (as a model-training experiment) if missing. Tolerates
    another process creating it first."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if not any(existing.tags.get(k) for k in EXPERIMENT_KIND):  # created by an older version
            for k, v in EXPERIMENT_KIND.items():
                client.set_experiment_tag(existing.experiment_id, k, v)
        return existing.experiment_id
    try:
        return client.create_experiment(name, tags=EXPERIMENT_KIND)
    except Exception:
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


@contextlib.contextmanager
def _tracking_errors(uri: str, what: str):
    """Any failure of the MLflow client (after its own HTTP retries) as one TrackingError."""
    try:
        yield
    except KleinSweepError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise TrackingError(f"tracking: MLflow at {redact(uri)} failed while {what}: {exc.__class__.__name__}: {redact(first)}") from exc


def _param_value(value: Any) -> str:
    text = "null" if value is None else redact(str(value))  # a URI param never carries its password
    return text if len(text) <= 6000 else text[:5997] + "..."
