"""Refinement in the study: after the grid, workers queue the trainings boundary/refine.py asks
for and run them like grid cells, until none is left and none is running.

A refinement trial carries its RefineSpec in the `refine` user attribute (the study, MLflow's
`klein.refine` tag and the report all show it); its cell is the spec's swept values, so it never
takes a grid cell's place in the queue."""

from __future__ import annotations

import dataclasses
import logging
import time

from klein_sweep.boundary.refine import Finished, RefinePolicy, RefineSpec, checkpoint_steps, plan_refinement
from klein_sweep.record import Attr, decode_trial, retried_trials
from klein_sweep.sweep.plan import SweepPlan, refine_every
from klein_sweep.sweep.study import ask_lock, recover_interrupted

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # how often an idle worker looks for refinement the others' results make possible


def refine_policy(plan: SweepPlan) -> RefinePolicy:
    s = plan.sweep
    grid = max(plan.step_values)
    return RefinePolicy(grid_steps=grid, budget=int(round(grid * s.refine_budget)), every=refine_every(plan),
                        lr_tolerance=s.refine_lr_tolerance, max_bisections=s.refine_max_bisections)


def refine_spec(trial) -> RefineSpec | None:
    """The refinement a trial (frozen or live) runs; None for a grid cell."""
    return RefineSpec.from_json(trial.user_attrs.get(Attr.REFINE))


def study_state(study) -> tuple[list[Finished], list[dict], set[str]]:
    """(finished trials, cells of grid or bisection trials queued or running, keys of refinement
    trials that exist). A continuation in flight is not pending here: it cannot move the bracket
    at the grid's last step."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_trials(trials)
    finished, pending, held = [], [], set()
    for t in trials:
        spec = refine_spec(t)
        cell = t.user_attrs.get(Attr.CELL) or t.system_attrs.get("fixed_params") or {}
        if t.state in (TrialState.WAITING, TrialState.RUNNING) and (spec is None or spec.kind == "bisect"):
            pending.append(cell)
        real_failure = t.state == TrialState.FAIL and Attr.FAILURE in t.user_attrs and t.number not in retried
        if spec is not None and (t.state != TrialState.FAIL or real_failure):
            held.add(spec.key)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            record = decode_trial(t.user_attrs, where=f"trial {t.number}")
            if record is not None:
                last = max((r.step for r in record.rows), default=record.steps or 0)
                finished.append(Finished(t.number, dict(cell), spec, record.collapse_step, last))
    return finished, pending, held


def queue_refinement(study, plan: SweepPlan) -> int:
    """Queue the refinement trainings the finished trials call for now; returns how many."""
    with ask_lock(plan.storage_url):  # two workers finishing together plan once
        finished, pending, held = study_state(study)
        specs = plan_refinement(finished, pending, held, refine_policy(plan))
        for spec in specs:
            study.enqueue_trial(spec.cell, user_attrs={Attr.CELL: spec.cell, Attr.REFINE: spec.to_json()}, skip_if_exists=False)
            log.info("refinement queued: %s", spec.describe())
    return len(specs)


def next_refinement_trial(study, plan: SweepPlan, take):
    """After the grid: the next refinement trial for this worker (`take`: the queue's pop), or
    None once nothing is queued, nothing runs, and the finished trials call for nothing more."""
    from optuna.trial import TrialState

    from klein_sweep.interrupts import raise_if_requested
    from klein_sweep.sweep.queue import sync_grid_queue

    while True:
        queue_refinement(study, plan)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = take(study, plan)
            if trial is not None:
                return trial
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return None
        if recover_interrupted(study):  # a dead worker's trial: its cell runs again
            sync_grid_queue(study, plan.cells)
        time.sleep(POLL_SECONDS)  # another worker's result may call for more
        raise_if_requested()


def refine_trial_plan(settings, plan: SweepPlan, spec: RefineSpec):
    """The TrialPlan of a refinement training: to spec.to_step, evaluated every refine_every
    steps after its start; an extension resumes the continued trial's saved state (or, when that
    file is gone, trains again from 0 to the same result: training is deterministic)."""
    from klein_sweep.training.resume import STATE_FILE
    from klein_sweep.training.trial import resolve_plan

    settings.train = dataclasses.replace(settings.train, steps=spec.to_step, repeats=None, checkpoint_every=0)
    plan_t = resolve_plan(settings, extra_checkpoints=checkpoint_steps(spec, refine_every(plan)))
    plan_t.checkpoints = [c for c in plan_t.checkpoints if c > spec.from_step]
    plan_t.validation_steps = [c for c in plan_t.validation_steps if c > spec.from_step]
    if spec.kind == "extend":
        state = plan.output_dir / "trials" / f"{spec.from_trial:04d}" / STATE_FILE
        if state.exists():
            plan_t.resume_from = state
        else:
            log.warning("no saved state %s: training lr=%g again from step 0", state, spec.cell.get("train.lr"))
    return plan_t


def continued_record(study, spec: RefineSpec | None):
    """The record of the trial an extension continues (None for grid cells and bisections): the
    collapse rules and the validation trigger carry on from that training's checkpoints."""
    if spec is None or spec.kind != "extend" or spec.from_trial is None:
        return None
    t = next(t for t in study.get_trials(deepcopy=False) if t.number == spec.from_trial)
    return decode_trial(t.user_attrs, where=f"trial {t.number}")
