"""One Optuna trial of a sweep, from ask to tell, in stages a lane group (sweep/lane_group.py)
shares with a lone trial:

  start_trial         the trial's cell, settings, plan, MLflow child run and recorder
  finish_trial        judge its checkpoints, store the record in the study
  tell_trial          close the MLflow run, then tell the study
  fail_trial          a failure recorded with its reason; a machine fault raised, cell to run again
  run_sweep_trial     all of it for one trial trained alone
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from klein_sweep.config import Settings
from klein_sweep.errors import KleinSweepError
from klein_sweep.evaluation.recorder import TrialRecorder
from klein_sweep.record import Attr, encode_trial
from klein_sweep.redaction import redact
from klein_sweep.sweep.faults import MachineFault, is_out_of_memory, machine_fault, release_memory
from klein_sweep.sweep.plan import SweepPlan, apply_params, trial_plan
from klein_sweep.sweep.refinement import continued_record, refine_spec, refine_trial_plan
from klein_sweep.sweep.study import Heartbeat

log = logging.getLogger(__name__)


@dataclass
class TrialRun:
    """A trial between start and tell: what its training and its record need."""

    trial: object  # optuna.Trial
    params: dict
    settings: Settings
    plan: object  # training.trial.TrialPlan
    prepared: object  # training.trial.PreparedModel, shared by the worker's trials
    tracker: object
    recorder: TrialRecorder


def start_trial(study, trial, plan: SweepPlan, shared, parent) -> TrialRun:
    """Resolve the trial's cell into settings and a plan, load (or reuse) the model, open the
    MLflow child run and the recorder. `shared`: the worker's SharedModel."""
    refine = refine_spec(trial)
    # A refinement's lr lies between the grid's values: its cell is set, not suggested.
    params = dict(refine.cell) if refine else suggest(trial, plan)
    settings = apply_params(plan.base_cfg, params, output_dir=str(plan.output_dir / "trials" / f"{trial.number:04d}"))
    plan_t = refine_trial_plan(settings, plan, refine) if refine else trial_plan(settings, plan)
    # Saved for a later continuation past the grid (an extension is not continued again).
    plan_t.save_state = plan.sweep.refine and (refine is None or refine.kind == "bisect")
    plan_t.swept = tuple(params)
    prepared, policy = shared.get(plan_t, settings)
    tracker = open_child_run(settings, plan, trial, params, parent, refine, colour=setting_colour(study, plan, params))
    if tracker.run_id:
        trial.set_user_attr(Attr.RUN_ID, tracker.run_id)
        log_trial_config(tracker, settings)
    continues = continued_record(study, refine)
    recorder = TrialRecorder(settings, policy, tracker, n_images=len(plan_t.examples), objective=plan.sweep.objective,
                             direction=plan.sweep.direction, report=trial.report, continues=continues)
    if continues is not None:
        log_join(tracker, continues, refine.from_step)
    return TrialRun(trial, params, settings, plan_t, prepared, tracker, recorder)


def finish_trial(run: TrialRun, outcome, model, seconds: float):
    """Judge the checkpoints and store the record on the trial. Returns (record, objective value)."""
    record, value = run.recorder.finish(outcome, run.plan.steps, model=model, seconds=seconds)
    for key, v in encode_trial(record).items():
        run.trial.set_user_attr(key, v)
    return record, value


def tell_trial(study, run: TrialRun, record, value) -> None:
    from optuna.trial import TrialState

    # MLflow first: a trial counts as done in the study only once its run is complete.
    run.tracker.finish("FINISHED")
    if value is None:
        study.tell(run.trial, state=TrialState.PRUNED)
    else:
        study.tell(run.trial, value)
    log.info("trial %d %s: %s", run.trial.number, run.params, record.state)


def run_sweep_trial(study, trial, plan: SweepPlan, shared, parent, progress: bool) -> bool:
    """One Optuna trial, start to tell. Returns False when it failed (recorded, not raised)."""
    from klein_sweep.training.trial import run_training

    run = None
    transformer = None
    try:
        with Heartbeat(study, trial, plan.sweep.heartbeat_seconds):
            run = start_trial(study, trial, plan, shared, parent)
            transformer = run.prepared.pipe.transformer
            start = time.perf_counter()
            outcome = run_training(run.plan, run.prepared, run.tracker, evaluate=run.recorder.on_checkpoint,
                                   progress=progress, lora_artifact_path="lora/last")
            record, value = finish_trial(run, outcome, transformer, time.perf_counter() - start)
        tell_trial(study, run, record, value)
        return True
    except BaseException as exc:
        return fail_trial(study, trial, run.tracker if run else None, exc)
    finally:
        unload(transformer)


def unload(transformer) -> None:
    """Take the LoRA out of the shared model (the next trial injects its own) and free memory."""
    if transformer is not None and getattr(transformer, "_hf_peft_config_loaded", False):
        transformer.unload_lora()
    release_memory()


def fail_trial(study, trial, tracker, exc: BaseException) -> bool:
    """Record `exc` as the trial's failure and return False; re-raise a Ctrl-C, and raise a
    machine fault (not the cell's fault: the trial is marked interrupted, its cell runs again on
    the next start) rather than fail every remaining cell the same way."""
    from klein_sweep.tracking import TrackingError

    if isinstance(exc, KeyboardInterrupt):
        _fail(study, trial, tracker, None, interrupted=True)
        raise exc
    if not isinstance(exc, Exception):
        raise exc
    fault = machine_fault(exc)
    if fault is not None:
        _fail(study, trial, None if isinstance(exc, TrackingError) else tracker, None, interrupted=True)
        raise MachineFault(
            f"{fault}; trial {trial.number} is marked interrupted: fix this and run the same command again, its cell runs again"
        ) from exc
    reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    if is_out_of_memory(exc):
        reason = (f"out of memory ({reason}); set train.gradient_checkpointing=true (a 9B step at 1024 px: 43 -> 20 GiB), "
                  "model.quantize=int8 or fp8, or lower data.resolution, train.batch_size or train.rank")
    # The traceback as text, not exc_info: a log record that keeps the exception keeps every
    # frame of the failed trial alive (optimizer state, activations: the memory to release).
    detail = "" if isinstance(exc, KleinSweepError) else "\n" + "".join(traceback.format_exception(exc))
    log.warning("trial %d failed: %s%s", trial.number, redact(reason), redact(detail))
    _fail(study, trial, tracker, redact(reason))
    return False


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


def open_child_run(settings: Settings, plan: SweepPlan, trial, params: dict, parent, refine=None, colour: str | None = None):
    """The trial's MLflow run under the study's parent. Tagged `klein.setting` (the swept values,
    e.g. lr_0.0001: a grid trial and the continuation of its training share it, for MLflow's
    group-by) and `mlflow.runColor` (`colour`: the line colour MLflow's charts draw the run in)."""
    from klein_sweep.report.answer import setting_slug
    from klein_sweep.tracking import MlflowTracker, NullTracker

    if parent is None:
        return NullTracker()
    label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in params.items())
    tags = {"optuna.trial": trial.number, "optuna.study": plan.sweep.name, **{f"cell.{k}": v for k, v in params.items()},
            "klein.setting": setting_slug(params)}
    if colour:
        tags[RUN_COLOUR_TAG] = colour
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


RUN_COLOUR_TAG = "mlflow.runColor"  # the MLflow UI draws a run in this colour (its colour picker sets it)
# Distinct colours of MLflow's own run palette, most different first.
RUN_COLOURS = ("#137dae", "#c83243", "#308613", "#8a63bf", "#de7921", "#04867d", "#b45091", "#a6630c", "#434a93",
               "#1f272d", "#4299e0", "#e65b77", "#3ba65e", "#93320b", "#5f7281", "#facb66")


def setting_colour(study, plan: SweepPlan, cell: dict) -> str | None:
    """One colour per setting, so that a refinement continuation draws on in its grid trial's
    colour and the charts show one line per lr: the grid's cells in order, then the bisected
    settings in the order they were queued. None without a grid (MLflow's own colours)."""
    from klein_sweep.sweep.plan import cell_key

    if not plan.cells:
        return None
    order = [cell_key(c) for c in plan.cells]
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        spec = refine_spec(t)
        if spec is not None and cell_key(spec.cell) not in order:
            order.append(cell_key(spec.cell))
    key = cell_key(cell)
    return RUN_COLOURS[(order.index(key) if key in order else len(order)) % len(RUN_COLOURS)]


def log_join(tracker, continued, step: int) -> None:
    """A continuation's curves start where the training it continues stopped: the sampled
    metrics and validation losses of `continued` (its TrialRecord) at `step`, the state the
    continuation starts from, logged at that step - so in MLflow's charts the grid trial's line
    and its continuation's (one colour: setting_colour) meet."""
    row = next((r for r in continued.rows if r.step == step and r.metrics), None)
    point = next((v for v in continued.validation if v.step == step), None)
    metrics = {f"eval/{k}": v for k, v in row.metrics.items()} if row is not None else {}
    if point is not None:
        metrics.update({"val/fit_loss": point.fit_loss, "val/prior_loss": point.prior_loss})
    if metrics:
        tracker.log_metrics(metrics, step=step)


def log_trial_config(tracker, settings: Settings) -> None:
    """The trial's resolved settings as its run's config.yaml artifact (as a single trial's run
    has): its params are only the few a user compares (training/trial.py, trial_params)."""
    import dataclasses
    from pathlib import Path

    from omegaconf import OmegaConf

    from klein_sweep.redaction import redact_values

    folder = Path(settings.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(redact_values(dataclasses.asdict(settings)))))
    tracker.log_artifact(path)
