"""The sweep's settings: its search space, sampler, storage and role (`+sweep=NAME`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from klein_sweep.config.checks import build_dataclass, check_choice, check_float, check_int
from klein_sweep.errors import ConfigError

SAMPLERS = ("grid", "tpe", "random")
SWEEP_ROLES = ("run", "prepare", "work")
PARAM_TYPES = ("categorical", "float", "int")
STEP_AXES = ("steps", "repeats")
OBJECTIVES = ("eval/id_sim", "eval/kid", "eval/prior_kid", "eval/fid", "eval/is", "eval/leak")
# Settings a sweep may vary: the training hyperparameters and the sampling of training data.
SWEEPABLE_PREFIXES = ("train.", "data.caption_dropout", "data.resolution", "data.max_images")


@dataclass
class ParamSpec:
    """One axis of a sweep's search space."""

    type: str = "categorical"
    """categorical (a list of `values`; the grid sampler needs these) | float | int (low..high)."""
    values: Optional[list] = None
    """The choices of a categorical parameter."""
    low: Optional[float] = None
    """Lower bound of a float/int parameter."""
    high: Optional[float] = None
    """Upper bound of a float/int parameter."""
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: Optional[float] = None
    """Quantisation step of an int/float parameter."""


@dataclass
class SweepConfig:
    name: str = ""
    """Sweep name: the MLflow experiment, the Optuna study, the folder sweeps/<name>/."""
    objective: str = "eval/id_sim"
    """Metric optimised over non-collapsed checkpoints: one of OBJECTIVES."""
    direction: str = "maximize"
    """maximize | minimize."""
    sampler: str = "grid"
    """grid (every cell once) | tpe (Optuna TPE, constant liar for parallel workers) | random."""
    n_trials: Optional[int] = None
    """Trials to run (tpe/random; required there). Grid: every cell, this is ignored."""
    seed: int = 0
    """Sampler seed."""
    storage: Optional[str] = None
    """Optuna storage URL (sqlite:///..., postgresql://...); null = sqlite file sweeps/<name>/study.db."""
    output_dir: Optional[str] = None
    """Where the study, reports and trial files go; null = sweeps/<name>."""
    params: dict = field(default_factory=dict)
    """Search space: config key -> ParamSpec, nested as in the config (train: {lr: {type:
    categorical, values: [...]}}); flattened to dotted keys (train.lr) on load."""
    step_axis: str = "steps"
    """The report's column axis: `steps`, or `repeats` (repeats per image, for comparisons at
    equal repeats across grad_accum or batch sizes)."""
    repeats_values: Optional[list] = None
    """With step_axis=repeats: the repeats-per-image values to checkpoint at."""
    heartbeat_seconds: int = 30
    """A running trial records a heartbeat this often; one silent for 4x this is taken as dead
    and re-run."""
    role: str = "run"
    """run: prepare, work, write the report (one process, or several on one machine) |
    prepare: create the study, queue the grid, create the MLflow experiment and parent run, exit |
    work: take trials from a prepared study (the many-workers recipe: prepare once, then N work)."""
    dry_run: bool = False
    """Plan the sweep, print its cost preview (trainings, steps, checkpoints, train / eval PFLOP,
    eval share, predicted GPU hours), write sweeps/<name>/cost.json and exit: no study, no MLflow
    run, no GPU, nothing downloaded."""
    cost_gpu: str = "H100"
    """The GPU the cost preview predicts hours on: H100, H200, A100, L40S, RTX 4090, RTX 5090."""
    cost_mfu: float = 0.36
    """The model FLOP utilisation of training the cost preview assumes. Measured on an H200 (9B,
    1024 px, random weights): 36% with and without gradient checkpointing, counting its
    recomputation (benchmarks/RESULTS.md)."""
    cost_sample_mfu: float = 0.46
    """The same for sampling (evaluation). Measured on an H200 (9B, 50 steps, CFG 4): 45% at 512 px,
    47% at 1024 px."""
    retry_failed: bool = False
    """Queue again the grid cells whose trial failed for a reason of its own (a diverging
    setting, a bug since fixed). Off: a failed cell stays failed. Cells interrupted by the
    machine (Ctrl-C, a full disk, a lost store) always run again without it."""
    refine: bool = False
    """After the grid, place extra trainings where it leaves the collapse boundary unresolved
    (klein_sweep/boundary/refine.py; needs a grid over train.lr with steps as checkpoints):
    every learning rate that did not collapse continues from its saved state to the budget,
    evaluated every `refine_every` steps until it collapses; and between the highest lr safe at
    the grid's last step and the lowest that collapsed by then, learning rates are bisected in
    log space until the two are within `refine_lr_tolerance`."""
    refine_budget: float = 2.0
    """Continuations run up to this multiple of the grid's largest step (2.0: 2500 -> 5000)."""
    refine_every: Optional[int] = None
    """Evaluation spacing of refinement trainings (steps): the resolution of their collapse step.
    null = the grid's own spacing (the smallest gap between its step values: 500 in lr_vs_steps)."""
    refine_lr_tolerance: float = 1.5
    """Bisection stops once the highest safe and the lowest collapsed lr are within this factor."""
    refine_max_bisections: int = 3
    """At most this many bisected learning rates per setting of the other swept values."""
    workers: Optional[int] = None
    """Worker processes this command starts on this machine (sweep.role=run). null = auto: on a
    CPU one single-threaded worker per core (at most one per cell: a 2-core machine runs two
    trials at once; the default mini sweep measured 1.35-1.58x faster than one two-threaded
    worker, benchmarks/bench_default_sweep.py); on a GPU one."""
    lanes: Optional[int] = None
    """Grid cells that differ only in train.lr trained together, in one batched forward, each
    with its own LoRA and optimizer (klein_sweep/training/lanes.py; results equal one LoRA per
    training within float32 rounding). 1 = one LoRA per training. null = auto: on a CPU
    (sweep.role=run), the grid's lrs shared evenly among the worker processes it starts (5 lrs, 2
    workers: 3 and 2 lanes); on a GPU and for sweep.role=work workers 1."""
    worker: Optional[int] = None
    """A label only: lets a launcher array start N identical workers (hydra -m sweep.worker=0,1,2)."""

    def __post_init__(self):
        if not self.name:
            raise ConfigError("sweep.name", self.name, "a non-empty name")
        check_choice("sweep.objective", self.objective, OBJECTIVES)
        check_choice("sweep.direction", self.direction, ("maximize", "minimize"))
        check_choice("sweep.sampler", self.sampler, SAMPLERS)
        check_choice("sweep.step_axis", self.step_axis, STEP_AXES)
        if not self.params:
            raise ConfigError("sweep.params", self.params, "at least one parameter to sweep")
        specs = {}
        for key, raw in _flatten_specs(self.params).items():
            if not isinstance(raw, dict):
                raise ConfigError(f"sweep.params.{key}", raw, "a mapping with type and values or low/high")
            if not key.startswith(SWEEPABLE_PREFIXES):
                raise ConfigError(f"sweep.params.{key}", raw, f"a key under {', '.join(SWEEPABLE_PREFIXES)}")
            specs[key] = spec = build_dataclass(ParamSpec, raw, prefix=f"sweep.params.{key}")
            _check_param(key, spec, self.sampler)
        self.params = specs
        if self.sampler != "grid" and not self.n_trials:
            raise ConfigError("sweep.n_trials", self.n_trials, f"an integer >= 1 for sampler={self.sampler}")
        if self.n_trials is not None:
            check_int("sweep.n_trials", self.n_trials, 1, 100_000)
        if self.step_axis == "repeats":
            if not self.repeats_values or any(not isinstance(r, (int, float)) or r <= 0 for r in self.repeats_values):
                raise ConfigError("sweep.repeats_values", self.repeats_values, "a list of positive numbers with step_axis=repeats")
            if "train.steps" in self.params:
                raise ConfigError("sweep.params.train.steps", "...", "not swept with step_axis=repeats (repeats set the steps)")
        check_int("sweep.heartbeat_seconds", self.heartbeat_seconds, 1, 3600)
        if self.workers is not None:
            check_int("sweep.workers", self.workers, 1, 256)
        if self.lanes is not None:
            check_int("sweep.lanes", self.lanes, 1, 64)
        check_float("sweep.refine_budget", self.refine_budget, 1.0, 100.0)
        if self.refine_every is not None:
            check_int("sweep.refine_every", self.refine_every, 1, 1_000_000)
        check_float("sweep.refine_lr_tolerance", self.refine_lr_tolerance, 1.0, 100.0, low_open=True)
        check_int("sweep.refine_max_bisections", self.refine_max_bisections, 0, 20)
        check_float("sweep.cost_mfu", self.cost_mfu, 0.0, 1.0, low_open=True)
        check_float("sweep.cost_sample_mfu", self.cost_sample_mfu, 0.0, 1.0, low_open=True)
        from klein_sweep.cost.gpus import peak_tflops

        peak_tflops(self.cost_gpu)
        check_choice("sweep.role", self.role, SWEEP_ROLES)


def _flatten_specs(params: dict, prefix: str = "") -> dict:
    """{'train': {'lr': {type: ...}}} -> {'train.lr': {type: ...}}. Nested in YAML so that a
    command line can override `sweep.params.train.lr.values=[...]`."""
    out = {}
    for key, value in params.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and not ({"type", "values", "low", "high"} & set(value)):
            out.update(_flatten_specs(value, dotted))
        else:
            out[dotted] = value
    return out


def _check_param(key: str, spec: ParamSpec, sampler: str) -> None:
    where = f"sweep.params.{key}"
    check_choice(f"{where}.type", spec.type, PARAM_TYPES)
    if spec.type == "categorical":
        if not spec.values:
            raise ConfigError(f"{where}.values", spec.values, "a non-empty list of choices")
        if len(set(map(repr, spec.values))) != len(spec.values):
            raise ConfigError(f"{where}.values", spec.values, "choices without duplicates")
        return
    if sampler == "grid":
        raise ConfigError(f"{where}.type", spec.type, "categorical with sampler=grid (a grid needs explicit values)")
    if spec.low is None or spec.high is None:
        raise ConfigError(where, {"low": spec.low, "high": spec.high}, "both low and high")
    if spec.low > spec.high:
        raise ConfigError(f"{where}.low", spec.low, f"<= high ({spec.high})")
    if spec.log and spec.low <= 0:
        raise ConfigError(f"{where}.low", spec.low, "> 0 with log: true")

