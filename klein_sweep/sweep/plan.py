"""The sweep's plan: the search space expanded into grid cells, whether steps are checkpoints of
one training, and every cell's settings checked before anything is written."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klein_sweep.config import TOTAL_INDEPENDENT_SCHEDULES, Settings, SweepConfig, build_settings
from klein_sweep.errors import ConfigError


@dataclass
class SweepPlan:
    sweep: SweepConfig
    base_cfg: dict  # the resolved config without the sweep, as the trials start from
    cells: list[dict]  # grid: every cell's params (without steps when steps are checkpoints)
    step_values: list[int]  # checkpoint steps every trial is evaluated at (steps axis)
    steps_are_checkpoints: bool
    output_dir: Path
    storage_url: str
    tracking: Any  # TrackingConfig: sweep-wide, the same for every cell
    n_trainings_saved: int = 0  # trainings avoided by evaluating steps as checkpoints
    notes: list[str] = field(default_factory=list)
    peers: int = 1  # worker processes this command started on the study (continuation lanes share among them)
    logs_cost_prediction: bool = False  # this worker logs the cost prediction on a parent run opened without it

    @property
    def study_name(self) -> str:
        return self.sweep.name


def plan_sweep(settings: Settings, resolved_cfg: dict) -> SweepPlan:
    """Expand and check the sweep. Raises ConfigError/DataError before anything is written."""
    sweep = settings.sweep
    base_cfg = {k: v for k, v in resolved_cfg.items() if k != "sweep"}
    params = dict(sweep.params)
    step_values: list[int] = []
    steps_are_checkpoints = False
    notes = []
    steps_spec = params.get("train.steps")
    if steps_spec is not None and steps_spec.type == "categorical":
        schedules = _swept_values(params, "train.lr_schedule", settings.train.lr_schedule)
        if all(s in TOTAL_INDEPENDENT_SCHEDULES for s in schedules):
            step_values = sorted(int(v) for v in steps_spec.values)
            steps_are_checkpoints = True
            del params["train.steps"]
            notes.append(
                f"steps are checkpoints: lr_schedule {'/'.join(schedules)} does not depend on the total step count, "
                f"so one training to {step_values[-1]} steps is evaluated at steps {step_values}"
            )
        else:
            notes.append(
                f"steps are trained separately: lr_schedule {'/'.join(schedules)} depends on the total step count, "
                "so the model at step s of a longer run is not the s-step model"
            )
    cells = _grid_cells(params) if sweep.sampler == "grid" else []
    if sweep.sampler == "grid" and not cells:
        raise ConfigError("sweep.params", sweep.params, "a grid with at least one cell")
    check_every_setting(base_cfg, cells or search_corners(sweep), step_values, planning_only=sweep.dry_run)
    output_dir = Path(sweep.output_dir or Path("sweeps") / sweep.name)
    storage_url = sweep.storage or f"sqlite:///{output_dir / 'study.db'}"
    n_saved = len(cells) * (len(step_values) - 1) if steps_are_checkpoints else 0
    plan = SweepPlan(
        sweep, base_cfg, cells, step_values, steps_are_checkpoints, output_dir, storage_url, settings.tracking, n_saved, notes
    )
    check_refinable(plan)
    return plan


def check_every_setting(base_cfg: dict, cells: list[dict], step_values: list[int], planning_only: bool = False) -> None:
    """Every cell must make valid settings that fit the model, the environment and the data:
    fail now, not after hours of other cells (and not after the study exists)."""
    from klein_sweep.data.folder import load_examples
    from klein_sweep.preflight import check_settings

    seen_data = set()
    for cell in cells or [{}]:
        cell_settings = apply_params(base_cfg, cell, output_dir="")
        check_settings(cell_settings, planning_only)
        if repr(cell_settings.data) not in seen_data:  # each resolution against the images' sizes
            seen_data.add(repr(cell_settings.data))
            load_examples(cell_settings.data)
    for steps in step_values:  # checkpoint steps are not in the cells: check them on their own
        apply_params(base_cfg, {"train.steps": steps}, output_dir="")


def search_corners(sweep: SweepConfig) -> list[dict]:
    """For a search (tpe, random): each parameter at its bounds and each categorical value, one at
    a time, as the cells to check up front."""
    out = [{}]
    for key, spec in sweep.params.items():
        values = spec.values if spec.type == "categorical" else [spec.low, spec.high]
        out += [{key: int(v) if spec.type == "int" else v} for v in values]
    return out


def _swept_values(params: dict, key: str, default: Any) -> list:
    spec = params.get(key)
    return list(spec.values) if spec is not None and spec.type == "categorical" else [default]


def _grid_cells(params: dict) -> list[dict]:
    keys = sorted(params)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(params[k].values for k in keys))]


def apply_params(base_cfg: dict, params: dict, output_dir: str) -> Settings:
    """Settings of one cell: the dotted keys of `params` set in a copy of the config, validated."""
    cfg = copy.deepcopy(base_cfg)
    for dotted, value in params.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        if dotted == "train.repeats":
            node["steps"] = None
    return build_settings(cfg, output_dir=output_dir)


def cell_key(params: dict) -> str:
    """A canonical string for a cell, to compare cells across trials and processes."""
    return json.dumps({k: params[k] for k in sorted(params)}, sort_keys=True, default=str)


# Paths that may differ between the machines of one study (mount points), and the single-trial
# run folder (a timestamp), not the study's settings.
MACHINE_LOCAL_KEYS = ("data.path", "data.cache_dir", "model.path", "output_dir")


def plan_fingerprint(plan: SweepPlan) -> dict[str, Any]:
    """What every worker of a study must agree on, as dotted key -> value: the base config
    (machine-local paths excluded; credentials redacted, so a password is never stored), the
    search space, the cells and the step values. tracking.uri is part of it: the study's MLflow
    parent run lives in one store, so every worker tracks to that store."""
    from klein_sweep.config import flatten
    from klein_sweep.redaction import redact_values

    base = {k: v for k, v in flatten(plan.base_cfg).items() if k not in MACHINE_LOCAL_KEYS}
    s = plan.sweep
    out = {f"{k}": v for k, v in redact_values(base).items()}
    out["sweep.params"] = {k: (v.values if v.type == "categorical" else [v.low, v.high, v.step, v.log]) for k, v in s.params.items()}
    out.update({"sweep.objective": s.objective, "sweep.direction": s.direction, "sweep.sampler": s.sampler,
                "sweep.n_trials": s.n_trials, "sweep.step_axis": s.step_axis, "sweep.repeats_values": s.repeats_values,
                "sweep.cells": [cell_key(c) for c in plan.cells], "sweep.step_values": plan.step_values})
    if s.refine:  # only when on: studies prepared before refinement existed keep their fingerprint
        out.update({f"sweep.{k}": getattr(s, k) for k in ("refine", "refine_budget", "refine_lr_tolerance", "refine_max_bisections")})
        out["sweep.refine_every"] = refine_every(plan)  # resolved: the report states it
    return json.loads(json.dumps(out, default=str))  # as the storage will hand it back


def plan_hash(fingerprint: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def plan_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per key whose value differs: `key: study X, this command Y`."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "(unset)"), current.get(key, "(unset)")
        if a != b:
            lines.append(f"{key}: study {a!r}, this command {b!r}")
    return lines


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


def check_refinable(plan: SweepPlan) -> None:
    """sweep.refine needs a grid over train.lr whose steps are checkpoints of one training."""
    s = plan.sweep
    if not s.refine:
        return
    if s.sampler != "grid" or "train.lr" not in s.params:
        raise ConfigError("sweep.refine", True, "false, or a grid sweep over train.lr (sweep.sampler=grid with sweep.params.train.lr)")
    if not plan.steps_are_checkpoints:
        raise ConfigError("sweep.refine", True, "false, or steps swept as checkpoints (sweep.params.train.steps as a "
                          "categorical list with a constant lr schedule): a continued training must be the longer training")


def refine_every(plan: SweepPlan) -> int:
    """sweep.refine_every, or the grid's own spacing."""
    if plan.sweep.refine_every:
        return plan.sweep.refine_every
    steps = sorted(plan.step_values)
    return min([b - a for a, b in zip(steps, steps[1:])] + [steps[0]])
