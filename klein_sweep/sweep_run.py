"""A sweep worker: take trials from the study until none is left, run each as a tracked LoRA
trial with checkpoint evaluation and collapse detection, then write the report.

Several workers (processes or machines) may run this on one study at once. A failing trial is
recorded with its reason and the worker goes on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from klein_sweep import collapse
from klein_sweep.config import Settings
from klein_sweep.errors import KleinSweepError
from klein_sweep.sweep import (
    ATTR_CELL,
    ATTR_FAILURE,
    ATTR_INTERRUPTED,
    Heartbeat,
    SweepPlan,
    apply_params,
    cell_key,
    next_trial,
    open_study,
    recover_interrupted,
    redact,
    sync_grid_queue,
)

log = logging.getLogger(__name__)

ATTR_ROWS = "checkpoints"
ATTR_STATE = "state"
ATTR_COLLAPSE_STEP = "collapse_step"
ATTR_BEST_STEP = "best_step"
ATTR_BASE = "base"
ATTR_BASE_DISTILLED = "base_distilled"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_STEPS = "steps"
ATTR_TRAIN_SECONDS = "train_seconds"
ATTR_EVAL_SECONDS = "eval_seconds"
STUDY_PARENT_RUN = "mlflow_parent_run_id"
ATTR_META = "meta"


@dataclass
class SweepSummary:
    ran: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    report_dir: Path | None = None
    parent_run_id: str | None = None


class SharedModel:
    """The pipeline, encodings and base-model samples of a worker, reused across its trials
    (the LoRA is unloaded after each trial). Rebuilt only when a trial changes model or data."""

    def __init__(self):
        self.key = None
        self.prepared = None
        self.evaluator = None
        self.distilled = None
        self.full = None  # with screening: the full evaluator, for the checkpoints that decide

    def get(self, plan_t, settings: Settings):
        from klein_sweep.evaluation import CheckpointEvaluator, eval_prompts
        from klein_sweep.trial import prepare_model

        key = (repr(settings.model), repr(settings.data), repr(settings.eval))
        if key != self.key:
            trigger, prior = eval_prompts(settings) if settings.eval.enabled else ([], [])
            self.prepared = prepare_model(plan_t, extra_prompts=trigger + prior)
            self.evaluator = self.distilled = self.full = None
            if settings.eval.enabled:
                self.evaluator = CheckpointEvaluator(settings, self.prepared.pipe, self.prepared.data, plan_t.examples)
                self.evaluator.compute_base()  # before any LoRA touches the transformer
                if settings.eval.screening_seeds:
                    import dataclasses

                    e = settings.eval
                    screening = dataclasses.replace(
                        settings, eval=dataclasses.replace(e, seeds=list(e.screening_seeds),
                                                           sample_steps=e.screening_sample_steps or e.sample_steps)
                    )
                    self.full = self.evaluator
                    self.evaluator = CheckpointEvaluator(screening, self.prepared.pipe, self.prepared.data, plan_t.examples)
                    self.evaluator.compute_base()
                if settings.eval.also_distilled:
                    from klein_sweep.distilled import DistilledEvaluator

                    self.distilled = DistilledEvaluator(settings, self.prepared.pipe, self.prepared.data, plan_t.examples,
                                                        self.prepared.runtime)
            self.key = key
        return self.prepared, self.evaluator


def run_sweep(plan: SweepPlan, progress: bool = True) -> SweepSummary:
    """sweep.role run: prepare + work + report; prepare: only the first; work: the last two on
    a prepared study."""
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


def prepare_study(plan: SweepPlan):
    """Create or reopen the study, queue the grid cells no trial holds (again those of dead
    workers), record the plan, create the MLflow experiment and parent run. Idempotent."""
    study = open_study(plan)
    fingerprint = plan_hash(plan)
    prepared = study.user_attrs.get(ATTR_META)
    if prepared:  # before anything is queued: a study with other cells must stay untouched
        check_same_plan(plan, prepared, fingerprint)
    recovered = recover_interrupted(study)
    if recovered:
        log.info("trials %s were interrupted; their cells run again", recovered)
    if plan.sweep.sampler == "grid":
        queued = sync_grid_queue(study, plan.cells)
        log.info("grid: %d cells, %d queued now", len(plan.cells), queued)
    study.set_user_attr(ATTR_META, {
        "objective": plan.sweep.objective, "direction": plan.sweep.direction, "step_axis": plan.sweep.step_axis,
        "step_values": plan.step_values, "repeats_values": plan.sweep.repeats_values,
        "steps_are_checkpoints": plan.steps_are_checkpoints, "notes": plan.notes, "n_cells": len(plan.cells),
        "trainings_saved": plan.n_trainings_saved, "plan_hash": fingerprint,
    })
    return study, open_parent_run(study, plan)


def join_study(plan: SweepPlan):
    """sweep.role=work: a study prepared before the workers started (so no two workers race to
    create it, its queue or its MLflow parent run)."""
    study = open_study(plan, create=False)
    meta = study.user_attrs.get(ATTR_META)
    if meta is None:
        raise KleinSweepError(
            f"sweep.role=work: study '{plan.study_name}' in {redact(plan.storage_url)} was created but never prepared; "
            "run once with sweep.role=prepare"
        )
    check_same_plan(plan, meta, plan_hash(plan))
    recovered = recover_interrupted(study)
    if plan.sweep.sampler == "grid" and recovered:
        sync_grid_queue(study, plan.cells)
    parent = None
    if plan.tracking.backend != "none":
        from klein_sweep.tracking import MlflowTracker

        run_id = study.user_attrs.get(STUDY_PARENT_RUN)
        if not run_id:
            raise KleinSweepError(
                f"sweep.role=work: study '{plan.study_name}' was prepared with tracking=none; prepare it again with tracking"
            )
        parent = MlflowTracker.attach(plan.tracking.uri, run_id)
    return study, parent


def check_same_plan(plan: SweepPlan, meta: dict, fingerprint: str) -> None:
    if meta.get("plan_hash") != fingerprint:
        raise KleinSweepError(
            f"sweep {plan.study_name}: the study in {redact(plan.storage_url)} was prepared with other settings "
            "(search space, steps or base config differ); start every worker with the prepare command's overrides, "
            "or use another sweep.name or sweep.storage"
        )


# Paths that may differ between the machines of one study (mount points), not its settings.
MACHINE_LOCAL_KEYS = (("data", "path"), ("data", "cache_dir"), ("model", "path"))


def plan_hash(plan: SweepPlan) -> str:
    """What every worker of a study must agree on: cells, steps and the base config (output
    folders excluded: they may differ between machines)."""
    import hashlib
    import json

    base = copy.deepcopy(plan.base_cfg)
    for section, key in MACHINE_LOCAL_KEYS:
        base.get(section, {}).pop(key, None)
    blob = json.dumps(
        {"cells": [cell_key(c) for c in plan.cells], "steps": plan.step_values, "params": _sweep_params(plan), "base": base},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_parent_run(study, plan: SweepPlan):
    """The study's MLflow parent run: created by the first worker, reopened by the others."""
    from klein_sweep.tracking import MlflowTracker

    tracking = plan.tracking
    if tracking.backend == "none":
        return None
    run_id = study.user_attrs.get(STUDY_PARENT_RUN)
    if run_id:
        return MlflowTracker.attach(tracking.uri, run_id)
    parent = MlflowTracker.start(tracking.uri, plan.sweep.name, run_name=f"study {plan.sweep.name}", tags={"klein.study": plan.sweep.name})
    parent.log_params({f"sweep.{k}": v for k, v in _sweep_params(plan).items()})
    study.set_user_attr(STUDY_PARENT_RUN, parent.run_id)
    return parent


def _sweep_params(plan: SweepPlan) -> dict:
    s = plan.sweep
    return {
        "objective": s.objective, "direction": s.direction, "sampler": s.sampler, "n_cells": len(plan.cells),
        "step_values": plan.step_values, "steps_are_checkpoints": plan.steps_are_checkpoints,
        "params": {k: (v.values if v.type == "categorical" else [v.low, v.high]) for k, v in s.params.items()},
    }


def run_sweep_trial(study, trial, plan: SweepPlan, shared: SharedModel, parent, progress: bool) -> bool:
    """One Optuna trial, start to tell. Returns False when it failed (recorded, not raised)."""
    from optuna.trial import TrialState

    from klein_sweep.tracking import TrackingError

    tracker = None
    transformer = None
    try:
        with Heartbeat(study, trial, plan.sweep.heartbeat_seconds):
            params = suggest(trial, plan)
            settings = apply_params(plan.base_cfg, params, output_dir=str(plan.output_dir / "trials" / f"{trial.number:04d}"))
            plan_t = trial_plan(settings, plan)
            prepared, evaluator = shared.get(plan_t, settings)
            transformer = prepared.pipe.transformer
            tracker = open_child_run(settings, plan, trial, params, parent)
            if tracker.run_id:
                trial.set_user_attr(ATTR_RUN_ID, tracker.run_id)
            record = TrialRecorder(trial, plan, settings, evaluator, tracker, n_images=len(plan_t.examples),
                                   distilled=shared.distilled, full=shared.full)
            from klein_sweep.trial import run_training

            start = time.perf_counter()
            outcome = run_training(
                plan_t, prepared, tracker, evaluate=record.on_checkpoint, progress=progress, lora_artifact_path="lora/last"
            )
            train_seconds = time.perf_counter() - start - record.eval_seconds
            state, value = record.finish(outcome, plan_t.steps, model=transformer)
            trial.set_user_attr(ATTR_TRAIN_SECONDS, round(train_seconds, 3))
            trial.set_user_attr(ATTR_EVAL_SECONDS, round(record.eval_seconds, 3))
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
        log.warning("trial %d failed: %s%s", trial.number, reason, detail)
        _fail(study, trial, tracker, reason)
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
        trial.set_user_attr(ATTR_FAILURE, reason)
    if interrupted:
        trial.set_user_attr(ATTR_INTERRUPTED, True)
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
    trial.set_user_attr(ATTR_CELL, params)
    return params


def trial_plan(settings: Settings, plan: SweepPlan):
    """Steps and checkpoints of one trial: to the last step value when steps are checkpoints;
    at the repeats values converted to this trial's steps on the repeats axis."""
    import dataclasses

    from klein_sweep.data import load_examples, steps_for_repeats
    from klein_sweep.trial import resolve_plan

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


class TrialRecorder:
    """The evaluation callback of one trial: metrics -> collapse state -> Optuna report ->
    tracker; keeps the best checkpoint's LoRA."""

    def __init__(self, trial, plan: SweepPlan, settings: Settings, evaluator, tracker, n_images: int, distilled=None,
                 full=None):
        self.trial, self.plan, self.settings, self.evaluator, self.tracker = trial, plan, settings, evaluator, tracker
        self.distilled = distilled
        self.full = full  # set when `evaluator` is the screening one
        self.snapshots: dict[int, dict] = {}  # step -> LoRA values, for the full evaluation at the end
        self.n_images = n_images
        self.rows: list[dict] = []
        self.eval_seconds = 0.0
        self.best_value = None
        self.th = collapse.Thresholds.from_eval(settings.eval)
        self.objective = plan.sweep.objective.split("/", 1)[1]
        self.base = (
            {
                "id_sim": evaluator.base.id_sim,
                "leak": evaluator.base.leak,
                "degenerate": evaluator.base.degenerate,
                "prior_kid_noise": evaluator.base.prior_kid_noise,
            }
            if evaluator
            else {}
        )
        self.trial.set_user_attr(ATTR_BASE, self.base)
        if distilled is not None:
            self.trial.set_user_attr(ATTR_BASE_DISTILLED, {"model": distilled.model.name, "id_sim": distilled.base.id_sim,
                                                           "leak": distilled.base.leak})

    def on_checkpoint(self, event, model) -> tuple[dict, bool]:
        from klein_sweep.lora import save_lora

        t = self.settings.train
        row = {
            "step": event.step,
            "repeats": round(event.step * t.batch_size * t.grad_accum / self.n_images, 6),
            "loss": event.loss,
            "lora_norm": event.lora_norm,
            "lr": event.lr,
        }
        metrics = {}
        if self.evaluator is not None:
            from klein_sweep.lora import lora_strength

            start = time.perf_counter()
            values, grid = self.evaluator.evaluate()
            row.update(values)
            metrics = {f"eval/{k}": v for k, v in values.items()}
            for strength in self.settings.eval.lora_scales:
                if strength != 1.0:  # the same samples at a weaker (or stronger) LoRA
                    with lora_strength(model, strength):
                        at_strength, _ = self.evaluator.evaluate()
                    row.setdefault("scales", {})[f"{strength:g}"] = at_strength
                    metrics.update({f"eval_strength_{strength:g}/{k}": v for k, v in at_strength.items() if k in SCALE_METRICS})
            if self.full is not None:
                from klein_sweep.lora import lora_snapshot

                self.snapshots[event.step] = lora_snapshot(model)
            if self.distilled is not None:
                transfer = self.distilled.evaluate(model)
                row["distilled"] = transfer
                metrics.update({f"eval_distilled/{k}": v for k, v in transfer.items()})
            self.eval_seconds += time.perf_counter() - start
            grid_path = Path(self.settings.output_dir) / "samples" / f"step_{event.step:06d}.png"
            grid_path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(grid_path)
            self.tracker.log_artifact(grid_path, "samples")
        self.rows.append(row)
        current = collapse.classify(self.rows, self.base, self.th)[-1]
        metrics["eval/collapsed"] = float(current["state"] == "collapsed")
        value = row.get(self.objective)
        if current["state"] != "collapsed" and value is not None and math.isfinite(value):
            self.trial.report(value, event.step)
            better = self.best_value is None or (value > self.best_value if self.plan.sweep.direction == "maximize" else value < self.best_value)
            if better:
                self.best_value = value
                save_lora(model, Path(self.settings.output_dir) / "lora_best")  # logged with its export in finish()
        # A collapsed checkpoint ends the trial: later steps are known collapsed.
        return metrics, current["state"] == "collapsed"

    def finish(self, outcome, total_steps: int, model=None) -> tuple[str, float | None]:
        if outcome.status == "diverged":
            self.rows.append({"step": outcome.steps_done, "loss": float("nan")})
        rows = collapse.classify(self.rows, self.base, self.th)
        classify_strengths(rows, self.base, self.th)
        best = collapse.best_checkpoint(rows, self.objective, self.plan.sweep.direction)
        if self.full is not None and model is not None:
            best = self.evaluate_in_full(rows, model) or best
        collapse_step = collapse.first_collapse_step(rows)
        state = rows[-1]["state"] if rows else "failed"
        t = self.trial
        t.set_user_attr(ATTR_ROWS, [_jsonable(r) for r in rows])
        t.set_user_attr(ATTR_STATE, state)
        t.set_user_attr(ATTR_COLLAPSE_STEP, collapse_step)
        t.set_user_attr(ATTR_BEST_STEP, best["step"] if best else None)
        t.set_user_attr(ATTR_STEPS, total_steps)
        tags = {
            "klein.state": state,
            "klein.collapse_step": collapse_step if collapse_step is not None else "none",
            "klein.best_step": best["step"] if best else "none",
        }
        if outcome.reason:
            tags["klein.reason"] = outcome.reason
        if collapse_step is not None:
            tags["klein.collapse_reason"] = next(r["reason"] for r in rows if r["state"] == "collapsed")
        self.tracker.set_tags(tags)
        best_lora = Path(self.settings.output_dir) / "lora_best" / "pytorch_lora_weights.safetensors"
        if best_lora.exists():
            from klein_sweep.lora_export import export_comfyui

            self.tracker.log_artifact(best_lora, "lora/best")
            self.tracker.log_artifact(export_comfyui(best_lora), "lora/best")
        if best and "full" in best:  # the objective from the full evaluation where it ran
            return state, best["full"][self.objective]
        return state, (best[self.objective] if best else None)

    def evaluate_in_full(self, rows: list[dict], model) -> dict | None:
        """Full evaluation of the checkpoints that decide the result - the two best screened
        ones, the first collapsed one and the one before it - from their LoRA snapshots, into
        rows[i]["full"]. Returns the best checkpoint by its full value (its LoRA becomes
        lora_best), or None when no candidate was evaluated."""
        from klein_sweep.lora import lora_snapshot, restore_lora, save_lora

        steps = [r["step"] for r in rows if r["step"] in self.snapshots]
        maximize = self.plan.sweep.direction == "maximize"
        usable = [r for r in rows if r.get("state") != "collapsed" and r["step"] in self.snapshots
                  and isinstance(r.get(self.objective), (int, float)) and math.isfinite(r[self.objective])]
        ranked = sorted(usable, key=lambda r: r[self.objective], reverse=maximize)
        decisive = {r["step"] for r in ranked[:2]}  # screening noise can swap neighbours: two
        first = collapse.first_collapse_step(rows)
        if first is not None and first in steps:
            i = steps.index(first)
            decisive |= {first} | ({steps[i - 1]} if i > 0 else set())
        if not decisive:
            return None
        start = time.perf_counter()
        final = lora_snapshot(model)
        try:
            for step in sorted(decisive):
                restore_lora(model, self.snapshots[step])
                values, _ = self.full.evaluate()
                next(r for r in rows if r["step"] == step)["full"] = values
                self.tracker.log_metrics({f"eval_full/{k}": v for k, v in values.items()}, step=step)
            judged = [r for r in rows if "full" in r and r.get("state") != "collapsed"
                      and math.isfinite(r["full"].get(self.objective, float("nan")))]
            best = (max if maximize else min)(judged, key=lambda r: r["full"][self.objective]) if judged else None
            if best is not None:
                restore_lora(model, self.snapshots[best["step"]])
                save_lora(model, Path(self.settings.output_dir) / "lora_best")
            return best
        finally:
            restore_lora(model, final)
            self.snapshots.clear()
            self.eval_seconds += time.perf_counter() - start


# Metrics logged per extra LoRA strength (the full row is kept in the study).
SCALE_METRICS = ("id_sim", "kid", "prior_kid", "leak")


def classify_strengths(rows: list[dict], base: dict, th) -> None:
    """Each extra strength's checkpoints judged by the same collapse rules as strength 1.0, in
    place: rows[i]["scales"][S]["state"]."""
    strengths = sorted({s for r in rows for s in r.get("scales", {})})
    for strength in strengths:
        series = [{"step": r["step"], "loss": r.get("loss"), **r["scales"][strength]} for r in rows if strength in r.get("scales", {})]
        for judged in collapse.classify(series, base, th):
            row = next(r for r in rows if r["step"] == judged["step"])
            row["scales"][strength]["state"] = judged["state"]
            row["scales"][strength]["reason"] = judged.get("reason", "")


def _jsonable(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out[k] = {name: _jsonable(sub) if isinstance(sub, dict) else sub for name, sub in v.items()}
        elif isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)  # JSON has no NaN; the report parses it back
        else:
            out[k] = v
    return out
