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

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from klein_sweep.config import Settings
from klein_sweep.errors import KleinSweepError
from klein_sweep.evaluation.recorder import TrialRecorder
from klein_sweep.interrupts import raise_if_requested
from klein_sweep.record import Attr, StudyAttr, StudyMeta, encode_trial
from klein_sweep.redaction import redact
from klein_sweep.sweep.faults import MachineFault, is_out_of_memory, machine_fault, release_memory
from klein_sweep.sweep.parent_run import close_parent_run, open_parent_run
from klein_sweep.sweep.plan import SweepPlan, apply_params, plan_differences, plan_fingerprint, plan_hash, trial_plan
from klein_sweep.sweep.queue import next_trial, sync_grid_queue
from klein_sweep.sweep.refinement import continued_record, next_refinement_trial, refine_spec, refine_trial_plan
from klein_sweep.sweep.study import Heartbeat, open_study, recover_interrupted

log = logging.getLogger(__name__)


@dataclass
class SweepSummary:
    ran: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    report_dir: Path | None = None
    parent_run_id: str | None = None
    experiment_id: str | None = None
    workers: int = 1


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


def run_sweep(plan: SweepPlan, progress: bool = True, report: bool = True) -> SweepSummary:
    """`report=False`: a worker process of a parallel sweep, whose parent process writes the
    report and closes the MLflow parent run once every worker is done."""
    role = plan.sweep.role
    study, parent = join_study(plan) if role == "work" else prepare_study(plan)
    summary = SweepSummary(parent_run_id=getattr(parent, "run_id", None), experiment_id=getattr(parent, "experiment_id", None))
    if role == "prepare":
        return summary
    shared = SharedModel()
    try:
        while (trial := take_work(study, plan)) is not None:
            ok = run_sweep_trial(study, trial, plan, shared, parent, progress)
            (summary.ran if ok else summary.failed).append(trial.number)
            raise_if_requested()  # a Ctrl-C swallowed inside a library callback still stops here
    except KeyboardInterrupt:
        close_parent_run(study, parent, "KILLED")
        raise
    except MachineFault as exc:
        from klein_sweep.tracking import TrackingError

        if not isinstance(exc.__cause__, TrackingError) and report:  # a lost tracking store cannot be told either
            close_parent_run(study, parent, "KILLED")
        raise
    if report:
        summary.report_dir = finish_sweep(study, plan, parent)
    elif parent is not None:
        parent.flush()
    return summary


def finish_sweep(study, plan: SweepPlan, parent) -> Path:
    """Write the report; on the MLflow parent run: the report files, the sweep's answer as
    metrics and tags, and (when no trial is left) its FINISHED status. Returns the report folder."""
    from klein_sweep.report import write_report

    report_dir = write_report(plan.output_dir, study=study)
    if parent is not None:
        for path in sorted(report_dir.iterdir()):
            if path.is_file() and path.suffix in (".md", ".png", ".json") and not path.name.startswith("."):
                parent.log_artifact(path, "report")
        # The answer as metrics and tags: sortable and plottable in the runs table.
        answer = json.loads((report_dir / "report.json").read_text())["answer"]
        parent.log_metrics(answer["metrics"], step=0)
        parent.set_tags(answer["tags"])
        close_parent_run(study, parent, "FINISHED")
    return report_dir


def take_work(study, plan: SweepPlan):
    """The next grid cell, or with sweep.refine the next grid cell or refinement training."""
    if plan.sweep.refine:
        return next_refinement_trial(study, plan, take_next_trial)
    return take_next_trial(study, plan)


def take_next_trial(study, plan: SweepPlan):
    """next_trial, with a storage lost between trials reported as the machine fault it is."""
    try:
        return next_trial(study, plan)
    except KleinSweepError:
        raise
    except Exception as exc:
        fault = machine_fault(exc)
        if fault is None:
            raise
        raise MachineFault(f"{fault}; no trial was running: fix this and run the same command again") from exc


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
        queued = sync_grid_queue(study, plan.cells, retry_failed=plan.sweep.retry_failed)
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


def run_sweep_trial(study, trial, plan: SweepPlan, shared: SharedModel, parent, progress: bool) -> bool:
    """One Optuna trial, start to tell. Returns False when it failed (recorded, not raised)."""
    from optuna.trial import TrialState

    from klein_sweep.tracking import TrackingError
    from klein_sweep.training.trial import run_training

    tracker = None
    transformer = None
    try:
        with Heartbeat(study, trial, plan.sweep.heartbeat_seconds):
            refine = refine_spec(trial)
            # A refinement's lr lies between the grid's values: its cell is set, not suggested.
            params = dict(refine.cell) if refine else suggest(trial, plan)
            settings = apply_params(plan.base_cfg, params, output_dir=str(plan.output_dir / "trials" / f"{trial.number:04d}"))
            plan_t = refine_trial_plan(settings, plan, refine) if refine else trial_plan(settings, plan)
            # Saved for a later continuation past the grid (an extension is not continued again).
            plan_t.save_state = plan.sweep.refine and (refine is None or refine.kind == "bisect")
            prepared, policy = shared.get(plan_t, settings)
            transformer = prepared.pipe.transformer
            tracker = open_child_run(settings, plan, trial, params, parent, refine)
            if tracker.run_id:
                trial.set_user_attr(Attr.RUN_ID, tracker.run_id)
            recorder = TrialRecorder(settings, policy, tracker, n_images=len(plan_t.examples), objective=plan.sweep.objective,
                                     direction=plan.sweep.direction, report=trial.report,
                                     continues=continued_record(study, refine))
            start = time.perf_counter()
            outcome = run_training(
                plan_t, prepared, tracker, evaluate=recorder.on_checkpoint, progress=progress, lora_artifact_path="lora/last"
            )
            record, value = recorder.finish(outcome, plan_t.steps, model=transformer, seconds=time.perf_counter() - start)
            for key, v in encode_trial(record).items():
                trial.set_user_attr(key, v)
        # MLflow first: a trial counts as done in the study only once its run is complete.
        tracker.finish("FINISHED")
        if value is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
        log.info("trial %d %s: %s", trial.number, params, record.state)
        return True
    except KeyboardInterrupt:
        _fail(study, trial, tracker, None, interrupted=True)
        raise
    except Exception as exc:
        fault = machine_fault(exc)
        if fault is not None:
            # Not the cell's fault: the trial is marked interrupted (its cell runs again on the
            # next start) and this worker stops rather than fail every remaining cell the same way.
            _fail(study, trial, None if isinstance(exc, TrackingError) else tracker, None, interrupted=True)
            raise MachineFault(
                f"{fault}; trial {trial.number} is marked interrupted: fix this and run the same command again, its cell runs again"
            ) from exc

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


def _fail(study, trial, tracker, reason: str | None, interrupted: bool = False):
    from optuna.trial import TrialState

    try:
        if reason:
            trial.set_user_attr(Attr.FAILURE, reason)
        if interrupted:
            trial.set_user_attr(Attr.INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
    except Exception as exc:
        if not interrupted:
            raise
        # The storage is the fault: the trial stays RUNNING with a silent heartbeat, which the
        # next start finds (dead process or stale heartbeat) and runs again.
        log.warning("could not mark trial %d interrupted in the study: %s", trial.number, redact(str(exc).splitlines()[0][:200]))
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


def open_child_run(settings: Settings, plan: SweepPlan, trial, params: dict, parent, refine=None):
    from klein_sweep.tracking import MlflowTracker, NullTracker

    if parent is None:
        return NullTracker()
    label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in params.items())
    tags = {"optuna.trial": trial.number, "optuna.study": plan.sweep.name, **{f"cell.{k}": v for k, v in params.items()}}
    if refine is not None:  # marked in the runs table: the grid's rows stay the grid's
        label = f"refine {refine.kind} {label} to step {refine.to_step}"
        tags.update({"klein.refine": refine.kind, "klein.refine_detail": refine.describe()})
    return MlflowTracker.start(
        settings.tracking.uri,
        plan.sweep.name,
        run_name=f"trial {trial.number}: {label}",
        parent_run_id=parent.run_id,
        tags=tags,
    )
