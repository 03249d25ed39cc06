"""The grid queue. Grid cells are queued trials, not Optuna's GridSampler: GridSampler re-runs
cells when workers race. Popping a queued trial is a compare-and-set in the storage, and a popped
trial whose cell another trial already holds is discarded, so no cell runs twice.

  sync_grid_queue   queue the grid cells that have no trial yet
  next_trial        pop a queued cell (atomic in the storage) or ask the sampler
  lane_companions   more queued cells that differ from a taken one only in train.lr (sweep.lanes)
"""

from __future__ import annotations

from klein_sweep.boundary.refine import RefineSpec
from klein_sweep.record import Attr, retried_trials
from klein_sweep.sweep.plan import SweepPlan, cell_key
from klein_sweep.sweep.study import GRACE_BEATS, ask_lock, recover_interrupted, this_worker


def holder_key(user_attrs: dict, fixed: dict | None) -> str | None:
    """What a trial holds: its grid cell, or its refinement (the same lr continued is not the
    grid cell again)."""
    if user_attrs.get(Attr.REFINE):
        return "refine " + RefineSpec.from_json(user_attrs[Attr.REFINE]).key
    cell = user_attrs.get(Attr.CELL) or fixed
    return cell_key(cell) if cell is not None else None


def cell_holders(study) -> dict[str, list]:
    """cell key -> trials that hold it: queued, running, finished, or failed for a real reason
    (a real failure is not retried; an interrupted trial is)."""
    from optuna.trial import TrialState

    held: dict[str, list] = {}
    trials = study.get_trials(deepcopy=False)
    retried = retried_trials(trials)
    for t in trials:
        key = holder_key(t.user_attrs, t.system_attrs.get("fixed_params"))
        if key is None or t.number in retried:
            continue
        live = t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        if live or (t.state == TrialState.FAIL and Attr.FAILURE in t.user_attrs):
            held.setdefault(key, []).append(t)
    return held


def sync_grid_queue(study, cells: list[dict], retry_failed: bool = False) -> int:
    """Queue every grid cell no trial holds; with retry_failed, also every cell whose trial
    failed for a reason of its own (the retry records which trial it replaces). Returns how
    many were queued."""
    from optuna.trial import TrialState

    held = cell_holders(study)
    queued = 0
    for cell in cells:
        holders = held.get(cell_key(cell), [])
        attrs = {Attr.CELL: cell}
        if holders and retry_failed and all(t.state == TrialState.FAIL for t in holders):
            attrs[Attr.RETRY_OF] = max(t.number for t in holders)
        elif holders:
            continue
        study.enqueue_trial(cell, user_attrs=attrs, skip_if_exists=False)
        queued += 1
    return queued


def next_trial(study, plan: SweepPlan, wait: bool = True):
    """The next trial for this worker, or None when the sweep has nothing left to run.
    `wait=False`: None as soon as no grid cell is queued (no watching the running ones)."""
    from optuna.trial import TrialState

    while True:
        if plan.sweep.sampler == "grid":
            if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) and (
                not wait or not wait_for_stale_cells(study, plan)
            ):
                return None
        elif _counted_trials(study) >= plan.sweep.n_trials:
            return None
        with ask_lock(plan.storage_url):  # one queued trial, one worker
            trial = study.ask()
        # Alive from the moment it exists: a worker killed before its trial's first heartbeat
        # would leave a RUNNING trial that no grace period ever recovers.
        if hasattr(study._storage, "record_heartbeat"):
            study._storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr(Attr.WORKER, this_worker())
        if plan.sweep.sampler != "grid":
            # Workers that asked together may overshoot n_trials: the later numbers stand down.
            if _counted_trials(study, before=trial.number) >= plan.sweep.n_trials:
                trial.set_user_attr(Attr.SURPLUS, True)
                study.tell(trial, state=TrialState.FAIL)
                return None
            return trial
        frozen = study._storage.get_trial(trial._trial_id)
        fixed = frozen.system_attrs.get("fixed_params")
        if fixed is None:  # another worker took the last queued cell between our check and ask
            trial.set_user_attr(Attr.SURPLUS, True)
            study.tell(trial, state=TrialState.FAIL)
            continue  # a stale cell may have been queued again meanwhile; the loop checks
        owner = _earlier_holder(study, trial.number, holder_key(frozen.user_attrs, fixed))
        if owner is None:
            trial.set_user_attr(Attr.CELL, fixed)
            return trial
        trial.set_user_attr(Attr.DUPLICATE, owner)
        study.tell(trial, state=TrialState.FAIL)


def _counted_trials(study, before: int | None = None) -> int:
    """Trials that count towards n_trials: all but those failed for no fault of their own
    (interrupted, duplicate, surplus), which are replaced."""
    from optuna.trial import TrialState

    return sum(
        1 for t in study.get_trials(deepcopy=False)
        if (before is None or t.number < before) and (t.state != TrialState.FAIL or Attr.FAILURE in t.user_attrs)
    )


STALE_POLL_S = 1.0  # how often an idle worker looks at the running trials (a SQLite or PostgreSQL read)


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
    next_recovery = time.monotonic()
    while True:
        if time.monotonic() >= next_recovery:  # a dead worker shows only after a heartbeat is missed
            next_recovery += interval
            if recover_interrupted(study) and sync_grid_queue(study, plan.cells):
                return True
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) or time.monotonic() > deadline:
            return False
        # Looked at every second: the last running trial's end (or a refinement it queues) is
        # seen at once, where sleeping a whole heartbeat kept a finished sweep waiting up to 30 s.
        time.sleep(min(STALE_POLL_S, interval, max(0.0, deadline - time.monotonic())) or 0.1)


def _earlier_holder(study, number: int, key: str) -> int | None:
    for t in cell_holders(study).get(key, []):
        if t.number < number:
            return t.number
    return None


def lane_companions(study, first, plan: SweepPlan, lanes: int) -> tuple[list, object | None]:
    """Up to `lanes` - 1 more grid cells for `first`'s lane group: taken from the front of the
    queue while the front cell differs from `first`'s only in train.lr. Returns (companions, a
    trial taken that does not fit when another worker took the front cell first: run it next)."""
    from optuna.trial import TrialState

    cell = first.user_attrs.get(Attr.CELL)
    spec = RefineSpec.from_json(first.user_attrs.get(Attr.REFINE))
    if lanes <= 1 or plan.sweep.sampler != "grid" or cell is None or not lane_ready(spec, plan):
        return [], None

    def fits(other_cell, other_spec) -> bool:
        """Grid cells with grid cells; continuations with continuations between the same steps
        (lanes resume together from one saved step, training/lanes.py); each differing in lr only."""
        if (spec is None) != (other_spec is None) or not differs_in_lr_only(other_cell, cell):
            return False
        return spec is None or (lane_ready(other_spec, plan) and (other_spec.from_step, other_spec.to_step) == (spec.from_step, spec.to_step))

    if spec is not None:
        # Continuations are the sweep's tail: each worker of the command takes an even share of
        # those ready together (one taking all three of the default sweep's kept the other idle).
        ready = 1 + sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                        if fits(t.system_attrs.get("fixed_params"), RefineSpec.from_json(t.user_attrs.get(Attr.REFINE))))
        lanes = min(lanes, -(-ready // max(1, plan.peers)))
    companions = []
    while len(companions) < lanes - 1:
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            break
        front = min(waiting, key=lambda t: t.number)  # the storage hands out the lowest number first
        if not fits(front.system_attrs.get("fixed_params"), RefineSpec.from_json(front.user_attrs.get(Attr.REFINE))):
            break
        trial = next_trial(study, plan, wait=False)
        if trial is None:
            break
        if not fits(trial.user_attrs.get(Attr.CELL), RefineSpec.from_json(trial.user_attrs.get(Attr.REFINE))):
            return companions, trial
        companions.append(trial)
    return companions, None


def lane_ready(spec: RefineSpec | None, plan: SweepPlan) -> bool:
    """A grid cell, or a continuation whose saved state is there to resume (a bisection trains
    alone: it shares no start with anything queued)."""
    from klein_sweep.training.resume import STATE_FILE

    if spec is None:
        return True
    return spec.kind == "extend" and spec.from_trial is not None and (
        plan.output_dir / "trials" / f"{spec.from_trial:04d}" / STATE_FILE).exists()


def differs_in_lr_only(cell: dict | None, other: dict) -> bool:
    if cell is None or "train.lr" not in cell:
        return False
    return {k: v for k, v in cell.items() if k != "train.lr"} == {k: v for k, v in other.items() if k != "train.lr"}
