"""A sweep worker: take trials from the study until none is left, run each as a tracked LoRA
trial with checkpoint evaluation and collapse detection, then write the report.

Several workers (processes or machines) may run this on one study at once. A failing trial is
recorded with its reason and the worker goes on.

  run_sweep       sweep.role run: prepare + work + report; prepare: the first only; work: the
                  last two, on a study prepared before
  prepare_study   create or reopen the study, queue the grid, record the plan (prepare_queue), open the parent run
  join_study      a worker joining a prepared study

One trial's run is sweep/trial_run.py's; grid cells that differ only in lr run as one lane
group (sweep/lane_group.py) when sweep.lanes allows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from klein_sweep.config import Settings
from klein_sweep.errors import KleinSweepError
from klein_sweep.interrupts import raise_if_requested
from klein_sweep.record import StudyAttr, StudyMeta
from klein_sweep.redaction import redact
from klein_sweep.sweep.faults import MachineFault, machine_fault
from klein_sweep.sweep.lane_group import run_lane_group
from klein_sweep.sweep.parent_run import check_tracking_store, close_parent_run, log_cost_prediction, open_parent_run
from klein_sweep.sweep.plan import SweepPlan, plan_differences, plan_fingerprint, plan_hash
from klein_sweep.sweep.queue import lane_companions, next_trial, sync_grid_queue
from klein_sweep.sweep.refinement import next_refinement_trial
from klein_sweep.sweep.study import open_study, recover_interrupted
from klein_sweep.sweep.trial_run import run_sweep_trial

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

    def release(self) -> None:
        """Drop the pipeline and everything built on it. A frame of the sweep can outlive the
        sweep (a library imported for the first time inside it may keep the importing frames),
        and with it this object: emptied, it holds no GPU memory."""
        self.key = self.prepared = self.policy = None


def run_sweep(plan: SweepPlan, progress: bool = True, report: bool = True) -> SweepSummary:
    """`report=False`: a worker process of a parallel sweep, whose parent process writes the
    report and closes the MLflow parent run once every worker is done."""
    role = plan.sweep.role
    study, parent = join_study(plan) if role == "work" else prepare_study(plan)
    summary = SweepSummary(parent_run_id=getattr(parent, "run_id", None), experiment_id=getattr(parent, "experiment_id", None))
    if plan.logs_cost_prediction and parent is not None:
        log_cost_prediction(parent, plan)
    if role == "prepare":
        return summary
    shared = SharedModel()
    taken = None  # a trial taken while gathering a lane group that did not fit it
    try:
        while (trial := taken or take_work(study, plan)) is not None:
            companions, taken = lane_companions(study, trial, plan, plan.sweep.lanes or 1)
            if companions:
                group = [trial, *companions]
                results = run_lane_group(study, group, plan, shared, parent, progress)
            else:
                group, results = [trial], [run_sweep_trial(study, trial, plan, shared, parent, progress)]
            for t, ok in zip(group, results):
                (summary.ran if ok else summary.failed).append(t.number)
            raise_if_requested()  # a Ctrl-C swallowed inside a library callback still stops here
    except KeyboardInterrupt:
        close_parent_run(study, parent, "KILLED")
        raise
    except MachineFault as exc:
        from klein_sweep.tracking import TrackingError

        if not isinstance(exc.__cause__, TrackingError) and report:  # a lost tracking store cannot be told either
            close_parent_run(study, parent, "KILLED")
        raise
    finally:
        shared.release()
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
    study = prepare_queue(plan)
    return study, open_parent_run(study, plan)


def prepare_queue(plan: SweepPlan):
    """prepare_study without the MLflow parent run: the study checked, queued and its plan recorded."""
    study = open_study(plan)
    check_tracking_store(study, plan)  # before anything is queued into the study or tracked
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
    return study


def join_study(plan: SweepPlan):
    """sweep.role=work: a study prepared before the workers started (so no two workers race to
    create it, its queue or its MLflow parent run)."""
    study = open_study(plan, create=False)
    check_tracking_store(study, plan)
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


