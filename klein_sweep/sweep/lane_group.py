"""Trials that differ only in learning rate (grid cells, or continuations from one saved
step), trained together as lanes of one batched forward (training/lanes.py; sweep.lanes).
Each stays its own Optuna trial with its own heartbeat, MLflow run, evaluation, record and
LoRA files, as if it had run alone.

  run_lane_group   start every trial, train them as lanes, finish and tell each
"""

from __future__ import annotations

import contextlib
import logging

from klein_sweep.sweep.plan import SweepPlan
from klein_sweep.sweep.study import Heartbeat
from klein_sweep.sweep.trial_run import fail_trial, finish_trial, start_trial, tell_trial, unload

log = logging.getLogger(__name__)


def run_lane_group(study, trials: list, plan: SweepPlan, shared, parent, progress: bool) -> list[bool]:
    """Returns, per trial, False when it failed (recorded with its reason, not raised). An error
    in one trial's evaluation fails that trial alone; an error in the shared training fails all."""
    from klein_sweep.training.trial import run_lane_training

    runs = []
    told: set[int] = set()
    ok = [False] * len(trials)
    transformer = None
    try:
        with contextlib.ExitStack() as beats:
            for trial in trials:
                beats.enter_context(Heartbeat(study, trial, plan.sweep.heartbeat_seconds))
            runs = [start_trial(study, trial, plan, shared, parent) for trial in trials]
            transformer = runs[0].prepared.pipe.transformer
            log.info("trials %s: learning rates %s trained as %d lanes of one batch",
                     [t.number for t in trials], [r.settings.train.lr for r in runs], len(runs))
            training = run_lane_training([r.plan for r in runs], runs[0].prepared, [r.tracker for r in runs],
                                         [r.recorder.on_checkpoint for r in runs], progress=progress,
                                         lora_artifact_path="lora/last")
            # Each trial's time: an equal share of the batched training plus its own evaluations.
            evaluation = sum(r.recorder.eval_seconds for r in runs)
            train_share = max(0.0, training.seconds - evaluation) / len(runs)
            finished = []
            for i, (run, lane) in enumerate(zip(runs, training.lanes)):
                if lane.error is not None:
                    told.add(i)
                    ok[i] = fail_trial(study, run.trial, run.tracker, lane.error)
                    continue
                training.adapters.load(i)  # the model holds this trial's LoRA for its best-checkpoint work
                finished.append((i, run, *finish_trial(run, lane.outcome, transformer, train_share + run.recorder.eval_seconds)))
        for i, run, record, value in finished:
            tell_trial(study, run, record, value)
            told.add(i)
            ok[i] = True
        return ok
    except BaseException as exc:
        fault = None
        for i, trial in enumerate(trials):
            if i in told:
                continue
            tracker = runs[i].tracker if i < len(runs) else None
            try:
                fail_trial(study, trial, tracker, exc)
            except BaseException as raised:  # a Ctrl-C or machine fault: mark every trial, then raise
                fault = fault or raised
        if fault is not None:
            raise fault
        return ok
    finally:
        unload(transformer)
