"""The study's MLflow parent run: created by the first worker with the sweep's params, its shared
runs view and the cost prediction; reopened by the others; closed by the last one out. The study
records the run's store beside its id, so a command that tracks elsewhere is refused before it
does any work (check_tracking_store)."""

from __future__ import annotations

import dataclasses
import logging

from klein_sweep.errors import KleinSweepError
from klein_sweep.record import StudyAttr
from klein_sweep.sweep.plan import SweepPlan

log = logging.getLogger(__name__)


def close_parent_run(study, parent, status: str) -> None:
    """The worker that finds no other trial queued or running closes the study's MLflow run
    (FINISHED after the last trial; KILLED when it stops on Ctrl-C or a machine fault, so the
    run is never left RUNNING). Other workers still at work leave it open for the last one."""
    from optuna.trial import TrialState

    from klein_sweep.tracking import TrackingError

    if parent is None:
        return
    try:
        busy = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,) if status == "KILLED" else (TrialState.WAITING, TrialState.RUNNING))
    except Exception:  # the storage itself is the fault: close the run anyway
        busy = []
    try:
        parent.finish(status) if not busy else parent.flush()
    except TrackingError as exc:  # the tracking store is the fault; the study keeps the truth
        log.warning("could not close the MLflow parent run: %s", exc)


def open_parent_run(study, plan: SweepPlan, cost_prediction: bool = True):
    """The study's MLflow parent run: created by the first worker, reopened by the others.
    `cost_prediction=False`: created without it, for a worker to log (log_cost_prediction)."""
    from klein_sweep.tracking import MlflowTracker

    tracking = plan.tracking
    if tracking.backend == "none":
        return None
    run_id = study.user_attrs.get(StudyAttr.PARENT_RUN)
    if run_id:
        parent = MlflowTracker.attach(tracking.uri, run_id)
        if not study.user_attrs.get(StudyAttr.TRACKING_URI):  # a study prepared before the store was recorded
            record_tracking_store(study, plan)
        return parent
    parent = MlflowTracker.start(tracking.uri, plan.sweep.name, run_name=f"study {plan.sweep.name}", tags={"klein.study": plan.sweep.name})
    s = plan.sweep
    parent.log_params({
        "sweep.objective": s.objective, "sweep.direction": s.direction, "sweep.sampler": s.sampler,
        "sweep.n_cells": len(plan.cells), "sweep.step_values": plan.step_values,
        "sweep.steps_are_checkpoints": plan.steps_are_checkpoints,
        "sweep.params": {k: (v.values if v.type == "categorical" else [v.low, v.high]) for k, v in s.params.items()},
        **shared_params(plan),
    })
    study.set_user_attr(StudyAttr.PARENT_RUN, parent.run_id)
    record_tracking_store(study, plan)
    parent.share_runs_view(*runs_view_columns(plan), chart_sections=runs_view_sections(plan))
    if cost_prediction:
        log_cost_prediction(parent, plan)
    return parent


def record_tracking_store(study, plan: SweepPlan) -> None:
    from klein_sweep.tracking import store_identity

    study.set_user_attr(StudyAttr.TRACKING_URI, store_identity(plan.tracking.uri))


def check_tracking_store(study, plan: SweepPlan) -> None:
    """Refuse a command whose tracking.uri is not the store of the study's MLflow parent run:
    its trials would be tracked apart from the study's runs, and reopening the parent run would
    fail only late. Called as the study is opened, before anything is queued, asked or tracked.
    A study prepared before its store was recorded is not checked."""
    from klein_sweep.redaction import MASK, redact
    from klein_sweep.stores import local_path
    from klein_sweep.tracking import store_identity

    recorded, run_id = study.user_attrs.get(StudyAttr.TRACKING_URI), study.user_attrs.get(StudyAttr.PARENT_RUN)
    if plan.tracking.backend == "none" or not recorded or not run_id:
        return
    mine = store_identity(plan.tracking.uri)
    if mine == recorded:
        return
    path = local_path(plan.tracking.uri)
    relative = f" ({redact(plan.tracking.uri)} is relative to the folder a command starts in)" if path and not path.is_absolute() else ""
    raise KleinSweepError(
        f"tracking.uri: study '{plan.study_name}' tracks to the MLflow store {recorded} (its parent run {run_id}), "
        f"this command to {mine}{relative}; join the study with tracking.uri={recorded}"
        + (f" (your password in place of {MASK})" if MASK in recorded else "")
    )


def runs_view_columns(plan: SweepPlan) -> tuple[list[str], str]:
    """(columns, sort key) of the sweep's runs view in the MLflow UI: the swept values, each
    trial's state, best and collapse step and collapse reason; sorted by the learning rate where
    it is swept, so the trials read as the report's table rows."""
    swept = [k for k in plan.sweep.params if k != "train.steps"]
    columns = [f"params.`{k}`" for k in swept]
    columns += [f"metrics.`trial/{m}`" for m in ("state", "best_step", "collapse_step")]
    columns += ["tags.`klein.state`", "tags.`klein.collapse_reason`"]
    order = "train.lr" if "train.lr" in swept else (swept[0] if swept else "train.lr")
    return columns, f"params.`{order}`"


def shared_params(plan: SweepPlan) -> dict:
    """The settings every trial of the sweep shares, as params of the parent run (a trial's run
    has only its swept keys and steps, training/trial.py): TRIAL_PARAMS that are not swept and
    equal in every cell or corner of the search space (train.alpha follows a swept train.rank),
    and the evaluation recipe. Every resolved value: each trial's config.yaml artifact."""
    from klein_sweep.config import flatten
    from klein_sweep.config.recipes import recipe_name
    from klein_sweep.sweep.plan import apply_params, search_corners
    from klein_sweep.training.trial import TRIAL_PARAMS

    every = [apply_params(plan.base_cfg, cell, output_dir="") for cell in plan.cells or search_corners(plan.sweep) or [{}]]
    flats = [flatten(dataclasses.asdict(s)) for s in every]
    params = {k: flats[0][k] for k in TRIAL_PARAMS if k not in plan.sweep.params and all(f[k] == flats[0][k] for f in flats)}
    settings = every[0]
    if settings.eval.enabled:
        params["eval.recipe"] = recipe_name(settings.eval, settings.model)
    return params


# Metric prefixes only the parent run logs (single values at step 0): last in the chart view, collapsed.
PARENT_SECTIONS = ("sweep", "boundary", "boundary/safe_steps", "collapse_step", "cost")


def runs_view_sections(plan: SweepPlan) -> list[tuple[str, bool]]:
    """The chart view's sections, (metric prefix, expanded?): first the trials' curves - the
    sampled metrics, the validation losses, the training loss, then what the evaluation settings
    add, the trials' outcomes and their sample grids - then the parent's answer, collapsed. Only
    sections some trial will fill: the UI shows a listed section even when it stays empty."""
    from klein_sweep.sweep.plan import apply_params

    e = apply_params(plan.base_cfg, plan.cells[0] if plan.cells else {}, output_dir="").eval
    sections = ["eval"]  # eval/collapsed at every sampled checkpoint, with or without evaluation
    if e.enabled:
        sections += ["val", "train"]
        sections += ["eval_full"] if e.screening_seeds else []
        sections += ["eval_distilled"] if e.also_distilled else []
        sections += [f"eval_strength_{s:g}" for s in e.lora_scales if s != 1.0]
        sections += ["trial", "samples"]
    else:
        sections += ["train", "trial"]
    return [(name, True) for name in sections] + [(name, False) for name in PARENT_SECTIONS]


def log_cost_prediction(parent, plan: SweepPlan) -> None:
    """The cost preview (what sweep.dry_run=true prints) on the parent run and in cost.json; the
    report adds the measured seconds beside it when the sweep ends."""
    from klein_sweep.cost.preview import estimate_sweep_cost, write_cost

    s = plan.sweep
    cost = estimate_sweep_cost(plan)
    write_cost(cost, plan.output_dir)
    parent.log_metrics({"cost/predicted_train_pflop": cost.train_pflop, "cost/predicted_eval_pflop": cost.eval_pflop,
                        "cost/predicted_eval_share": cost.eval_share, "cost/predicted_gpu_hours": cost.gpu_hours}, step=0)
    parent.log_params({"sweep.cost_gpu": s.cost_gpu, "sweep.cost_mfu": s.cost_mfu, "sweep.cost_sample_mfu": s.cost_sample_mfu})
