"""The Optuna study's storage and life: open it (sqlite under sweeps/<name>/ or any URL), find
trials whose worker died, and keep a running trial's heartbeat. Driven from our own Hydra app
(not the hydra-optuna-sweeper plugin, which hides the trial and so cannot prune, and does not
install with Optuna 5)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

from klein_sweep.errors import KleinSweepError
from klein_sweep.record import Attr
from klein_sweep.redaction import redact
from klein_sweep.sweep.plan import SweepPlan

log = logging.getLogger(__name__)

# A running trial whose heartbeat is silent for this many intervals is taken as dead.
GRACE_BEATS = 4


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


def check_storage(plan: SweepPlan) -> None:
    """Before anything is written: the study's storage can be opened (a database server takes a
    connection within seconds; a sqlite file exists or its folder can be created). Creates
    nothing; the tracking store's check is klein_sweep.tracking.check_reachable."""
    from klein_sweep.stores import store_problem

    problem = store_problem(plan.storage_url)
    if problem:
        key = "sweep.storage" if plan.sweep.storage else "sweep.output_dir"  # the default study lives in the output folder
        hint = ("for PostgreSQL: pip install 'klein_sweep[postgres]'" if "driver" in problem else
                "valid: sqlite:///path/study.db, or postgresql://user:password@host:port/database of a running server")
        raise KleinSweepError(f"{key}: cannot open Optuna storage {redact(plan.storage_url)}: {problem}; {hint}")


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
        worker = t.user_attrs.get(Attr.WORKER, "")
        w_host, _, pid = worker.rpartition(":")
        if w_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            study._storage.set_trial_user_attr(t._trial_id, Attr.INTERRUPTED, True)
            try:
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if Attr.FAILURE not in t.user_attrs and Attr.DUPLICATE not in t.user_attrs and Attr.SURPLUS not in t.user_attrs:
            failed.append(t.number)  # failed by the heartbeat check above or in an earlier run
    return sorted(set(failed))


@contextlib.contextmanager
def ask_lock(storage_url: str):
    """Hold while asking for a trial. On SQLite, Optuna's ask is not atomic across processes:
    the driver reads the waiting trial outside the write transaction, so two workers can pop the
    same one (measured: 3 of 200 queued trials handed to both of two processes). There, asks
    are serialized by a lock file beside the database (SQLite is one machine's anyway). Other
    databases lock the row in Optuna's own transaction: no lock needed."""
    if not storage_url.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(storage_url[len("sqlite:///"):] + ".ask.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
