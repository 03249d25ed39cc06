"""A sweep worker: take trials from the study until none is left, run each as a tracked LoRA
trial with checkpoint evaluation and collapse detection, then write the report.

Several workers (processes or machines) may run this on one study at once. A failing trial is
recorded with its reason and the worker goes on.

  run_sweep       sweep.role run: prepare + work + report; prepare: the first only; work: the
                  last two, on a study prepared before
  prepare_study   create or reopen the study, queue the grid, record the plan, open the parent run
  join_study      a worker joining a prepared study
  run_sweep_trial one Optuna trial, from ask to tell
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from klein_sweep.config import Settings
from klein_sweep.errors import KleinSweepError
from klein_sweep.record import Attr, StudyAttr, StudyMeta
from klein_sweep.redaction import redact
from klein_sweep.sweep.callbacks import TrialRecorder
from klein_sweep.sweep.plan import SweepPlan, apply_params, plan_differences, plan_fingerprint, plan_hash
from klein_sweep.sweep.queue import next_trial, sync_grid_queue
from klein_sweep.sweep.study import Heartbeat, open_study, recover_interrupted

log = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    ran: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    report_dir: Path | None = None
    parent_run_id: str | None = None


class SharedModel:
    """The pipeline, encodings and evaluation policy of a worker, reused across its trials (the
    LoRA is unloaded after each trial). Rebuilt only when a trial changes model, data or eval."""

    def __init__(self):
        self.key = None
        self.prepared = None
        self.policy = None

    def get(self, plan_t, settings: Settings):
        from klein_sweep.evaluation.evaluator import eval_prompts
        from klein_sweep.evaluation.policies import EvaluationPolicy
        from klein_sweep.training.trial import prepare_model

        key = (repr(settings.model), repr(settings.data), repr(settings.eval))
        if key != self.key:
            trigger, prior = eval_prompts(settings) if settings.eval.enabled else ([], [])
            self.prepared = prepare_model(plan_t, extra_prompts=trigger + prior)
            self.policy = EvaluationPolicy(settings, self.prepared, plan_t.examples) if settings.eval.enabled else None
            self.key = key
        return self.prepared, self.policy


def run_sweep(plan: SweepPlan, progress: bool = True) -> SweepSummary:
    role = plan.sweep.role
    study, parent = join_study(plan) if role == "work" else prepare_study(plan)
    summary = SweepSummary(parent_run_id=getattr(parent, "run_id", None))
    if role == "prepare":
        return summary
    shared = SharedModel()
    while (trial := next_trial(study, plan)) is not None:
        ok = run_sweep_trial(study, trial, plan, shared, parent, progress)
        (summary.ran if ok else summary.failed).append(trial.number)
    from klein_sweep.report import write_report

    summary.report_dir = write_report(plan.output_dir, study=study)
    if parent is not None:
        for path in sorted(summary.report_dir.iterdir()):
            if path.is_file() and path.suffix in (".md", ".png", ".json") and not path.name.startswith("."):
                parent.log_artifact(path, "report")
        from optuna.trial import TrialState

        # The worker that finds nothing queued or running closes the study's run.
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
            parent.finish("FINISHED")
        else:
            parent.flush()
    return summary


def study_meta(plan: SweepPlan) -> StudyMeta:
    fingerprint = plan_fingerprint(plan)
    s = plan.sweep
    return StudyMeta(
        objective=s.objective, direction=s.direction, step_axis=s.step_axis, step_values=plan.step_values,
        repeats_values=s.repeats_values, steps_are_checkpoints=plan.steps_are_checkpoints, notes=plan.notes,
        n_cells=len(plan.cells), trainings_saved=plan.n_trainings_saved, plan_hash=plan_hash(fingerprint), plan=fingerprint,
    )


def prepare_study(plan: SweepPlan):
    """Create or reopen the study, queue the grid cells no trial holds (again those of dead
    workers), record the plan, create the MLflow experiment and parent run. Idempotent."""
    study = open_study(plan)
    meta = study_meta(plan)
    prepared = StudyMeta.from_json(study.user_attrs.get(StudyAttr.META), where=f"study {plan.study_name}")
    if prepared:  # before anything is queued: a study with other cells must stay untouched
        check_same_plan(plan, prepared, meta)
    recovered = recover_interrupted(study)
    if recovered:
        log.info("trials %s were interrupted; their cells run again", recovered)
    if plan.sweep.sampler == "grid":
        queued = sync_grid_queue(study, plan.cells)
        log.info("grid: %d cells, %d queued now", len(plan.cells), queued)
    study.set_user_attr(StudyAttr.META, meta.to_json())
    return study, open_parent_run(study, plan)


def join_study(plan: SweepPlan):
    """sweep.role=work: a study prepared before the workers started (so no two workers race to
    create it, its queue or its MLflow parent run)."""
    study = open_study(plan, create=False)
    prepared = StudyMeta.from_json(study.user_attrs.get(StudyAttr.META), where=f"study {plan.study_name}")
    if prepared is None:
        raise KleinSweepError(
            f"sweep.role=work: study '{plan.study_name}' in {redact(plan.storage_url)} was created but never prepared; "
            "run once with sweep.role=prepare"
        )
    check_same_plan(plan, prepared, study_meta(plan))
    recovered = recover_interrupted(study)
    if plan.sweep.sampler == "grid" and recovered:
        sync_grid_queue(study, plan.cells)
    parent = None
    if plan.tracking.backend != "none":
        from klein_sweep.tracking import MlflowTracker

        run_id = study.user_attrs.get(StudyAttr.PARENT_RUN)
        if not run_id:
            raise KleinSweepError(
                f"sweep.role=work: study '{plan.study_name}' was prepared with tracking=none; prepare it again with tracking"
            )
        parent = MlflowTracker.attach(plan.tracking.uri, run_id)
    return study, parent


def check_same_plan(plan: SweepPlan, prepared: StudyMeta, current: StudyMeta) -> None:
    """Refuse a worker or a re-run whose settings differ from the study's, naming every key."""
    if prepared.plan_hash == current.plan_hash:
        return
    diffs = plan_differences(prepared.plan, current.plan)
    listed = "; ".join(diffs[:8]) + (f"; ... and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise KleinSweepError(
        f"sweep {plan.study_name}: the study in {redact(plan.storage_url)} was prepared with other settings "
        f"({listed or 'the stored plan predates this check'}); start every worker with the prepare command's overrides, "
        "or use another sweep.name or sweep.storage"
    )


def open_parent_run(study, plan: SweepPlan):
    """The study's MLflow parent run: created by the first worker, reopened by the others."""
    from klein_sweep.tracking import MlflowTracker

    tracking = plan.tracking
    if tracking.backend == "none":
        return None
    run_id = study.user_attrs.get(StudyAttr.PARENT_RUN)
    if run_id:
        return MlflowTracker.attach(tracking.uri, run_id)
    parent = MlflowTracker.start(tracking.uri, plan.sweep.name, run_name=f"study {plan.sweep.name}", tags={"klein.study": plan.sweep.name})
    s = plan.sweep
    parent.log_params({
        "sweep.objective": s.objective, "sweep.direction": s.direction, "sweep.sampler": s.sampler,
        "sweep.n_cells": len(plan.cells), "sweep.step_values": plan.step_values,
        "sweep.steps_are_checkpoints": plan.steps_are_checkpoints,
        "sweep.params": {k: (v.values if v.type == "categorical" else [v.low, v.high]) for k, v in s.params.items()},
    })
    study.set_user_attr(StudyAttr.PARENT_RUN, parent.run_id)
    return parent


def run_sweep_trial(study, trial, plan: SweepPlan, shared: SharedModel, parent, progress: bool) -> bool:
    """One Optuna trial, start to tell. Returns False when it failed (recorded, not raised)."""
    from optuna.trial import TrialState

    from klein_sweep.tracking import TrackingError
    from klein_sweep.training.trial import run_training

    tracker = None
    transformer = None
    try:
        with Heartbeat(study, trial, plan.sweep.heartbeat_seconds):
            params = suggest(trial, plan)
            settings = apply_params(plan.base_cfg, params, output_dir=str(plan.output_dir / "trials" / f"{trial.number:04d}"))
            plan_t = trial_plan(settings, plan)
            prepared, policy = shared.get(plan_t, settings)
            transformer = prepared.pipe.transformer
            tracker = open_child_run(settings, plan, trial, params, parent)
            if tracker.run_id:
                trial.set_user_attr(Attr.RUN_ID, tracker.run_id)
            recorder = TrialRecorder(trial, plan, settings, policy, tracker, n_images=len(plan_t.examples))
            start = time.perf_counter()
            outcome = run_training(
                plan_t, prepared, tracker, evaluate=recorder.on_checkpoint, progress=progress, lora_artifact_path="lora/last"
            )
            state, value = recorder.finish(outcome, plan_t.steps, model=transformer, seconds=time.perf_counter() - start)
        # MLflow first: a trial counts as done in the study only once its run is complete.
        tracker.finish("FINISHED")
        if value is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
        log.info("trial %d %s: %s", trial.number, params, state)
        return True
    except KeyboardInterrupt:
        _fail(study, trial, tracker, None, interrupted=True)
        raise
    except TrackingError as exc:
        # Not the cell's fault: the trial is marked interrupted (its cell runs again on the next
        # start) and this worker stops rather than fail every remaining cell the same way.
        _fail(study, trial, None, None, interrupted=True)
        raise TrackingError(f"{exc}; trial {trial.number} is marked interrupted and its cell runs again when the sweep restarts") from exc
    except Exception as exc:
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        if is_out_of_memory(exc):
            reason = f"out of memory ({reason}); lower train.rank, data.resolution or train.batch_size, or enable memory savers"
        # The traceback as text, not exc_info: a log record that keeps the exception keeps every
        # frame of the failed trial alive (optimizer state, activations: the memory to release).
        detail = "" if isinstance(exc, KleinSweepError) else "\n" + traceback.format_exc()
        log.warning("trial %d failed: %s%s", trial.number, redact(reason), redact(detail))
        _fail(study, trial, tracker, redact(reason))
        return False
    finally:
        if transformer is not None and getattr(transformer, "_hf_peft_config_loaded", False):
            transformer.unload_lora()
        release_memory()


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def release_memory() -> None:
    """After a trial (above all a failed one, whose optimizer state and activations the
    traceback kept alive until now): collect, and hand cached CUDA blocks back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fail(study, trial, tracker, reason: str | None, interrupted: bool = False):
    from optuna.trial import TrialState

    if reason:
        trial.set_user_attr(Attr.FAILURE, reason)
    if interrupted:
        trial.set_user_attr(Attr.INTERRUPTED, True)
    study.tell(trial, state=TrialState.FAIL)
    if tracker is not None:
        from klein_sweep.tracking import TrackingError

        try:
            tracker.set_tags({"klein.state": "failed", "klein.failure_reason": reason or "interrupted"})
            tracker.finish("KILLED" if interrupted else "FAILED")
        except TrackingError as exc:  # the study has the reason; the run stays open in MLflow
            log.warning("could not mark the MLflow run failed: %s", exc)


def suggest(trial, plan: SweepPlan) -> dict:
    """The trial's params through Optuna's suggest API (a queued grid cell returns its values)."""
    params = {}
    for key, spec in plan.sweep.params.items():
        if plan.steps_are_checkpoints and key == "train.steps":
            continue
        if spec.type == "categorical":
            params[key] = trial.suggest_categorical(key, list(spec.values))
        elif spec.type == "int":
            params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    trial.set_user_attr(Attr.CELL, params)
    return params


def trial_plan(settings: Settings, plan: SweepPlan):
    """Steps and checkpoints of one trial: to the last step value when steps are checkpoints;
    at the repeats values converted to this trial's steps on the repeats axis."""
    from klein_sweep.data.folder import load_examples, steps_for_repeats
    from klein_sweep.training.trial import resolve_plan

    t = settings.train
    if plan.steps_are_checkpoints:
        settings.train = dataclasses.replace(t, steps=plan.step_values[-1], repeats=None)
        return resolve_plan(settings, extra_checkpoints=plan.step_values)
    if plan.sweep.step_axis == "repeats":
        n = len(load_examples(settings.data))
        marks = [steps_for_repeats(r, n, t.batch_size, t.grad_accum) for r in plan.sweep.repeats_values]
        settings.train = dataclasses.replace(t, steps=max(marks), repeats=None)
        return resolve_plan(settings, extra_checkpoints=marks)
    return resolve_plan(settings)


def open_child_run(settings: Settings, plan: SweepPlan, trial, params: dict, parent):
    from klein_sweep.tracking import MlflowTracker, NullTracker

    if parent is None:
        return NullTracker()
    label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in params.items())
    return MlflowTracker.start(
        settings.tracking.uri,
        plan.sweep.name,
        run_name=f"trial {trial.number}: {label}",
        parent_run_id=parent.run_id,
        tags={"optuna.trial": trial.number, "optuna.study": plan.sweep.name, **{f"cell.{k}": v for k, v in params.items()}},
    )
