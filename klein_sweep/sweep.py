"""The Optuna study's life cycle, driven from our own Hydra app (not the hydra-optuna-sweeper
plugin, which hides the trial and so cannot prune, and does not install with Optuna 5).

  plan_sweep          expand the search space, decide whether steps are checkpoints, check every
                      cell's settings and the data before anything is written
  open_study          storage (sqlite under sweeps/<name>/ or any URL), sampler, heartbeat
  recover_interrupted trials whose worker died are failed and their cells queued again
  sync_grid_queue     queue the grid cells that have no trial yet
  next_trial          pop a queued cell (atomic in the storage) or ask the sampler

Grid cells are queued trials, not Optuna's GridSampler: GridSampler re-runs cells when workers
race. Popping a queued trial is a compare-and-set in the storage, and a popped trial whose cell
another trial already holds is discarded, so no cell runs twice.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klein_sweep.config import Settings, SweepConfig, TOTAL_INDEPENDENT_SCHEDULES, build_settings
from klein_sweep.errors import ConfigError, KleinSweepError

log = logging.getLogger(__name__)

# Trial user attributes (JSON): what the report rebuilds from.
ATTR_CELL = "cell"  # the cell's params, dotted keys
ATTR_WORKER = "worker"  # host:pid of the process running it
ATTR_FAILURE = "failure_reason"
ATTR_INTERRUPTED = "interrupted"
ATTR_DUPLICATE = "duplicate_of"
ATTR_SURPLUS = "surplus"
# A running trial whose heartbeat is silent for this many intervals is taken as dead.
GRACE_BEATS = 4


@dataclass
class SweepPlan:
    sweep: SweepConfig
    base_cfg: dict  # the resolved config without the sweep, as the trials start from
    cells: list[dict]  # grid: every cell's params (without steps when steps are checkpoints)
    step_values: list[int]  # checkpoint steps every trial is evaluated at (steps axis)
    steps_are_checkpoints: bool
    output_dir: Path
    storage_url: str
    tracking: Any  # TrackingConfig: sweep-wide, the same for every cell
    n_trainings_saved: int = 0  # trainings avoided by evaluating steps as checkpoints
    notes: list[str] = field(default_factory=list)

    @property
    def study_name(self) -> str:
        return self.sweep.name


def plan_sweep(settings: Settings, resolved_cfg: dict) -> SweepPlan:
    """Expand and check the sweep. Raises ConfigError/DataError before anything is written."""
    from klein_sweep.data import load_examples

    sweep = settings.sweep
    base_cfg = {k: v for k, v in resolved_cfg.items() if k != "sweep"}
    params = dict(sweep.params)
    step_values: list[int] = []
    steps_are_checkpoints = False
    notes = []
    steps_spec = params.get("train.steps")
    if steps_spec is not None and steps_spec.type == "categorical":
        schedules = _swept_values(params, "train.lr_schedule", settings.train.lr_schedule)
        if all(s in TOTAL_INDEPENDENT_SCHEDULES for s in schedules):
            step_values = sorted(int(v) for v in steps_spec.values)
            steps_are_checkpoints = True
            del params["train.steps"]
            notes.append(
                f"steps are checkpoints: lr_schedule {'/'.join(schedules)} does not depend on the total step count, "
                f"so one training to {step_values[-1]} steps is evaluated at steps {step_values}"
            )
        else:
            notes.append(
                f"steps are trained separately: lr_schedule {'/'.join(schedules)} depends on the total step count, "
                "so the model at step s of a longer run is not the s-step model"
            )
    cells = _grid_cells(params) if sweep.sampler == "grid" else []
    if sweep.sampler == "grid" and not cells:
        raise ConfigError("sweep.params", sweep.params, "a grid with at least one cell")
    # Every cell must make valid settings: fail now, not after hours of other cells.
    for cell in cells or [{}]:
        cell_settings = apply_params(base_cfg, cell, output_dir="")
    for steps in step_values:  # checkpoint steps are not in the cells: check them on their own
        apply_params(base_cfg, {"train.steps": steps}, output_dir="")
    load_examples(cell_settings.data)
    if cell_settings.eval.enabled:
        from klein_sweep.real_networks import check_networks_available

        check_networks_available(cell_settings.eval, cell_settings.model.kind)
        if cell_settings.eval.also_distilled:
            from klein_sweep.distilled import distilled_model_config

            distilled_model_config(cell_settings)  # a name with no counterpart fails here, not mid-sweep
    output_dir = Path(sweep.output_dir or Path("sweeps") / sweep.name)
    storage_url = sweep.storage or f"sqlite:///{output_dir / 'study.db'}"
    n_saved = len(cells) * (len(step_values) - 1) if steps_are_checkpoints else 0
    return SweepPlan(
        sweep, base_cfg, cells, step_values, steps_are_checkpoints, output_dir, storage_url, settings.tracking, n_saved, notes
    )


def _swept_values(params: dict, key: str, default: Any) -> list:
    spec = params.get(key)
    return list(spec.values) if spec is not None and spec.type == "categorical" else [default]


def _grid_cells(params: dict) -> list[dict]:
    keys = sorted(params)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(params[k].values for k in keys))]


def apply_params(base_cfg: dict, params: dict, output_dir: str) -> Settings:
    """Settings of one cell: the dotted keys of `params` set in a copy of the config, validated."""
    cfg = copy.deepcopy(base_cfg)
    for dotted, value in params.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        if dotted == "train.repeats":
            node["steps"] = None
    return build_settings(cfg, output_dir=output_dir)


def cell_key(params: dict) -> str:
    """A canonical string for a cell, to compare cells across trials and processes."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


# --- the study -----------------------------------------------------------------------------


def open_study(plan: SweepPlan, create: bool = True):
    import warnings

    import optuna

    # We drive trials with ask/tell and record heartbeats ourselves (Heartbeat below), which
    # Optuna flags as experimental; the behaviour is tested here.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = plan.sweep
    if plan.storage_url.startswith("sqlite:///"):
        db = Path(plan.storage_url[len("sqlite:///") :])
        if not create and not db.exists():
            raise KleinSweepError(f"sweep.role=work: no study file {db}; run once with sweep.role=prepare (same overrides) first")
        db.parent.mkdir(parents=True, exist_ok=True)
    storage = _open_storage(plan)
    if sweep.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sweep.seed, constant_liar=True)
    else:  # grid cells come from the queue; random also samples what a TPE search would
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
    if not create:
        try:
            return optuna.load_study(study_name=plan.study_name, storage=storage, sampler=sampler)
        except KeyError:
            raise KleinSweepError(
                f"sweep.role=work: no study '{plan.study_name}' in {redact(plan.storage_url)}; "
                "run once with sweep.role=prepare (same overrides) before starting workers"
            ) from None
    return _retry_race(
        lambda: optuna.create_study(
            study_name=plan.study_name, storage=storage, sampler=sampler, direction=sweep.direction, load_if_exists=True
        )
    )


def _open_storage(plan: SweepPlan):
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if plan.storage_url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return _retry_race(
            lambda: optuna.storages.RDBStorage(
                plan.storage_url,
                engine_kwargs=kwargs,
                heartbeat_interval=plan.sweep.heartbeat_seconds,
                grace_period=GRACE_BEATS * plan.sweep.heartbeat_seconds,
            )
        )
    except ImportError as exc:  # the URL names a database whose driver is not installed
        raise KleinSweepError(
            f"sweep.storage: {redact(plan.storage_url)} needs a database driver that is not installed "
            f"({exc.name or str(exc).splitlines()[0][:120]}); for PostgreSQL: pip install 'klein_sweep[postgres]'"
        ) from exc
    except Exception as exc:  # unreachable server, bad URL
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise KleinSweepError(
            f"sweep.storage: cannot open Optuna storage {redact(plan.storage_url)} ({exc.__class__.__name__}: {first}); "
            "valid: sqlite:///path/study.db, or postgresql://user:password@host:port/database of a running server"
        ) from exc


def _retry_race(make, attempts: int = 8):
    """Workers starting together race to create the schema and the study; the loser of a race
    sees an integrity error and simply retries, finding what the winner made."""
    import random
    import time

    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            return make()
        except (IntegrityError, OperationalError) as exc:
            # A lost race shows as an integrity error, or in sqlite as "database is locked";
            # any other operational error (connection refused, bad password) will not heal.
            lost_race = isinstance(exc, IntegrityError) or "locked" in str(exc) or "already exists" in str(exc)
            if attempt == attempts - 1 or not lost_race:
                raise
            time.sleep(0.2 + random.random() * 0.5 * (attempt + 1))


def redact(url: str) -> str:
    """A storage URL without its password, for messages and logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def recover_interrupted(study) -> list[int]:
    """Fail RUNNING trials whose worker is gone: a dead process on this host, or (any host) a
    heartbeat older than the grace period. Returns their numbers; sync_grid_queue re-queues them."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(ATTR_WORKER, "")
        w_host, _, pid = worker.rpartition(":")
        if w_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            study._storage.set_trial_user_attr(t._trial_id, ATTR_INTERRUPTED, True)
            try:
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if ATTR_FAILURE not in t.user_attrs and ATTR_DUPLICATE not in t.user_attrs and ATTR_SURPLUS not in t.user_attrs:
            failed.append(t.number)  # failed by the heartbeat check above or in an earlier run
    return sorted(set(failed))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_holders(study) -> dict[str, list]:
    """cell key -> trials that hold it: queued, running, finished, or failed for a real reason
    (a real failure is not retried; an interrupted trial is)."""
    from optuna.trial import TrialState

    held: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        cell = t.user_attrs.get(ATTR_CELL) or t.system_attrs.get("fixed_params")
        if cell is None:
            continue
        live = t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        if live or (t.state == TrialState.FAIL and ATTR_FAILURE in t.user_attrs):
            held.setdefault(cell_key(cell), []).append(t)
    return held


def sync_grid_queue(study, cells: list[dict]) -> int:
    """Queue every grid cell no trial holds. Returns how many were queued."""
    held = cell_holders(study)
    queued = 0
    for cell in cells:
        if cell_key(cell) not in held:
            study.enqueue_trial(cell, user_attrs={ATTR_CELL: cell}, skip_if_exists=False)
            queued += 1
    return queued


def next_trial(study, plan: SweepPlan):
    """The next trial for this worker, or None when the sweep has nothing left to run."""
    from optuna.trial import TrialState

    while True:
        if plan.sweep.sampler == "grid":
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) and not wait_for_stale_cells(study, plan):
                return None
        elif _counted_trials(study) >= plan.sweep.n_trials:
            return None
        trial = study.ask()
        trial.set_user_attr(ATTR_WORKER, this_worker())
        if plan.sweep.sampler != "grid":
            # Workers that asked together may overshoot n_trials: the later numbers stand down.
            if _counted_trials(study, before=trial.number) >= plan.sweep.n_trials:
                trial.set_user_attr(ATTR_SURPLUS, True)
                study.tell(trial, state=TrialState.FAIL)
                return None
            return trial
        fixed = study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params")
        if fixed is None:  # another worker took the last queued cell between our check and ask
            trial.set_user_attr(ATTR_SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            continue  # a stale cell may have been queued again meanwhile; the loop checks
        owner = _earlier_holder(study, trial.number, fixed)
        if owner is None:
            trial.set_user_attr(ATTR_CELL, fixed)
            return trial
        trial.set_user_attr(ATTR_DUPLICATE, owner)
        study.tell(trial, state=TrialState.FAIL)


def _counted_trials(study, before: int | None = None) -> int:
    """Trials that count towards n_trials: all but those failed for no fault of their own
    (interrupted, duplicate, surplus), which are replaced."""
    from optuna.trial import TrialState

    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if (before is None or t.number < before) and (t.state != TrialState.FAIL or ATTR_FAILURE in t.user_attrs)
    )


def wait_for_stale_cells(study, plan: SweepPlan) -> bool:
    """Nothing is queued. Before leaving, an idle worker watches the trials still running for
    one grace period: a worker that died (on any machine) stops its heartbeat, its trial is
    failed here and its cell queued again, and this worker runs it. Returns True when a cell
    was queued; False when the running trials stayed alive (their workers finish them) or none
    is left."""
    import time

    from optuna.trial import TrialState

    interval = plan.sweep.heartbeat_seconds
    deadline = time.monotonic() + (GRACE_BEATS + 1) * interval  # the storage's grace period + one beat
    while True:
        if recover_interrupted(study) and sync_grid_queue(study, plan.cells):
            return True
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or time.monotonic() > deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())) or 0.1)


def _earlier_holder(study, number: int, cell: dict) -> int | None:
    for t in cell_holders(study).get(cell_key(cell), []):
        if t.number < number:
            return t.number
    return None


class Heartbeat:
    """Records the trial's heartbeat in the storage while the trial runs (a daemon thread)."""

    def __init__(self, study, trial, interval: float):
        self.storage, self.trial_id, self.interval = study._storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a missed beat is not fatal; a dead storage fails the tell
                log.warning("heartbeat failed: %s", exc)

    def __enter__(self):
        if hasattr(self.storage, "record_heartbeat"):
            self.storage.record_heartbeat(self.trial_id)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
