"""The typed trial record: what a sweep trial produces, as the worker writes it, the collapse rules
judge it and the report reads it. The Optuna study is the product's output, so its attributes
are a checked contract: one JSON codec here, with a version, and nowhere else.

Stored as Optuna user attributes (one per field, so optuna-dashboard shows them readably):

    trial   record_version, state, steps, collapse_step, best_step, base, base_full, base_distilled,
            train_seconds, eval_seconds, checkpoints (a list of CheckpointRow),
            validation (a list of ValidationPoint: the dense validation losses)
            + the queue's own: cell, worker, failure_reason, interrupted, duplicate_of,
              surplus, retry_of, mlflow_run_id, refine
    study   meta (StudyMeta), mlflow_parent_run_id, mlflow_tracking_uri

JSON has no NaN or infinity: they are stored as the strings "nan", "inf", "-inf" and decoded back
here (a diverged trial's loss is a NaN the report must see as such).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from klein_sweep.errors import KleinSweepError

# 2: the base statistics carry the training images' own (the collapse rules are relative to both),
#    a screened trial keeps the full recipe's base statistics beside the screening's
RECORD_VERSION = 2

# The eval metrics of one evaluation (keys without the `eval/` prefix): what a CheckpointRow's
# `metrics` and its strength / full / distilled evaluations may hold.
METRIC_KEYS = ("id_sim", "kid", "kid_std", "fid", "is", "prior_kid", "leak", "sample_sim",
               "nan_frac", "flat_frac", "noise_frac", "clip_t")
STATES = ("underfit", "good", "overfit", "collapsed")


class Attr:
    """Names of the trial user attributes (the record's fields and the queue's own)."""

    VERSION = "record_version"
    STATE = "state"
    STEPS = "steps"
    COLLAPSE_STEP = "collapse_step"
    BEST_STEP = "best_step"
    BASE = "base"
    BASE_FULL = "base_full"
    BASE_DISTILLED = "base_distilled"
    TRAIN_SECONDS = "train_seconds"
    EVAL_SECONDS = "eval_seconds"
    CHECKPOINTS = "checkpoints"
    VALIDATION = "validation"
    # the queue's: written while a trial is asked, run, failed
    CELL = "cell"  # the cell's params, dotted keys
    WORKER = "worker"  # host:pid of the process running it
    FAILURE = "failure_reason"
    INTERRUPTED = "interrupted"
    DUPLICATE = "duplicate_of"
    SURPLUS = "surplus"
    RETRY_OF = "retry_of"  # sweep.retry_failed: the failed trial this one runs again
    RUN_ID = "mlflow_run_id"
    REFINE = "refine"  # a refinement training (boundary.refine.RefineSpec); absent on grid cells


def retried_trials(trials) -> set[int]:
    """Numbers of failed trials that a later trial ran again (sweep.retry_failed): the retry
    holds their cell now, and the report shows the retry instead."""
    return {t.user_attrs[Attr.RETRY_OF] for t in trials if Attr.RETRY_OF in t.user_attrs}


class StudyAttr:
    META = "meta"
    PARENT_RUN = "mlflow_parent_run_id"
    TRACKING_URI = "mlflow_tracking_uri"  # the store of the parent run, redacted (klein_sweep.tracking.store_identity)


class RecordError(KleinSweepError):
    """A stored record this version of klein_sweep cannot read."""


def encode_float(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan", "inf", "-inf"
    return v


def decode_float(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v


def _encode_metrics(m: dict[str, float]) -> dict[str, Any]:
    return {k: encode_float(v) for k, v in m.items()}


def _decode_metrics(m: dict[str, Any], where: str) -> dict[str, float]:
    unknown = set(m) - set(METRIC_KEYS) - {"state", "reason"}
    if unknown:
        raise RecordError(f"{where}: unknown metric keys {sorted(unknown)}; known: {', '.join(METRIC_KEYS)}")
    return {k: decode_float(v) for k, v in m.items()}


@dataclass
class Judged:
    """One evaluation with the collapse rules' verdict (the extra LoRA strengths)."""

    metrics: dict[str, float]
    state: str | None = None
    reason: str = ""


@dataclass
class CheckpointRow:
    """One checkpoint of one trial: training figures, the evaluation's metrics, the verdict."""

    step: int
    repeats: float | None = None  # repeats per image at this step
    loss: float | None = None  # mean training loss since the previous checkpoint
    lr: float | None = None
    lora_norm: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # METRIC_KEYS -> value (empty: not evaluated)
    state: str | None = None  # one of STATES once judged
    reason: str = ""
    scales: dict[str, Judged] = field(default_factory=dict)  # other LoRA strengths ("0.5") -> evaluation
    full: dict[str, float] | None = None  # with screening: the full evaluation, where it ran
    distilled: dict[str, float] | None = None  # the same LoRA on the distilled model

    def value(self, key: str) -> float | None:
        """A figure by name: loss, lora_norm, lr, repeats, or an eval metric - the full
        evaluation's where it ran (with screening), the checkpoint's own evaluation otherwise."""
        if key in ("loss", "lora_norm", "lr", "repeats"):
            return getattr(self, key)
        return self.judged_metrics.get(key)

    @property
    def judged_metrics(self) -> dict[str, float]:
        """The values the collapse rules and the best checkpoint judge: the full evaluation's
        where it ran, the checkpoint's own otherwise."""
        return self.full if self.full is not None else self.metrics

    @property
    def evaluated(self) -> bool:
        return bool(self.metrics)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step}
        for key in ("repeats", "loss", "lr", "lora_norm"):
            if getattr(self, key) is not None:
                out[key] = encode_float(getattr(self, key))
        out.update(_encode_metrics(self.metrics))
        if self.state is not None:
            out["state"], out["reason"] = self.state, self.reason
        if self.scales:
            out["scales"] = {s: {**_encode_metrics(j.metrics), "state": j.state, "reason": j.reason} for s, j in self.scales.items()}
        if self.full is not None:
            out["full"] = _encode_metrics(self.full)
        if self.distilled is not None:
            out["distilled"] = _encode_metrics(self.distilled)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CheckpointRow":
        where = f"checkpoint at step {d.get('step')}"
        nested = {"step", "repeats", "loss", "lr", "lora_norm", "state", "reason", "scales", "full", "distilled"}
        metrics = _decode_metrics({k: v for k, v in d.items() if k not in nested}, where)
        scales = {}
        for s, j in (d.get("scales") or {}).items():
            values = _decode_metrics(dict(j), f"{where}, strength {s}")
            scales[s] = Judged({k: v for k, v in values.items() if k not in ("state", "reason")}, j.get("state"), j.get("reason", ""))
        return cls(
            step=int(d["step"]), repeats=d.get("repeats"), loss=decode_float(d.get("loss")), lr=d.get("lr"),
            lora_norm=decode_float(d.get("lora_norm")), metrics=metrics, state=d.get("state"), reason=d.get("reason", ""),
            scales=scales,
            full=_decode_metrics(d["full"], where) if d.get("full") is not None else None,
            distilled=_decode_metrics(d["distilled"], where) if d.get("distilled") is not None else None,
        )


@dataclass
class ValidationPoint:
    """The validation losses at one step (klein_sweep.evaluation.validation): dense, cheap,
    deterministic. `sampled`: a sampled evaluation ran at this step too; `triggered`: because
    val/prior_loss moved (eval.validation_trigger), not because the step was planned."""

    step: int
    fit_loss: float
    prior_loss: float
    sampled: bool = False
    triggered: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "fit_loss": encode_float(self.fit_loss), "prior_loss": encode_float(self.prior_loss),
                "sampled": self.sampled, "triggered": self.triggered}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ValidationPoint":
        return cls(step=int(d["step"]), fit_loss=decode_float(d["fit_loss"]), prior_loss=decode_float(d["prior_loss"]),
                   sampled=bool(d.get("sampled", False)), triggered=bool(d.get("triggered", False)))


@dataclass
class BaseStats:
    """What the base model (no LoRA) and the training images measure on one evaluation recipe,
    before any LoRA exists: the two ends of every collapse rule's scale (evaluation/collapse.py).
    Identity-like figures are cosines of the identity network, KIDs of the feature network."""

    id_sim: float | None = None  # base's trigger samples vs the training images
    leak: float | None = None  # base's prior (no-trigger) samples vs the training images
    degenerate: float | None = None  # share of the base's samples that are flat, noise or NaN
    prior_kid_noise: float | None = None  # KID of the base's prior samples against other seeds: |mean| + 3 std
    reference_id_sim: float | None = None  # the training images vs each other (every pair, each with itself too)
    reference_sample_sim: float | None = None  # the training images' mean pairwise similarity (their own variety)
    kid: float | None = None  # KID of the base's trigger samples vs the training images
    prior_reference_kid: float | None = None  # KID of the base's prior samples vs the training images
    model: str | None = None  # set for the distilled model's reference

    def to_json(self) -> dict[str, Any]:
        return {k: encode_float(v) for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "BaseStats | None":
        if not d:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: decode_float(v) for k, v in d.items() if k in names})


@dataclass
class TrialRecord:
    """Everything a finished sweep trial leaves in the study."""

    state: str  # the last checkpoint's state, or "failed"
    steps: int  # steps the trial was planned to train
    rows: list[CheckpointRow]
    collapse_step: int | None = None
    best_step: int | None = None
    base: BaseStats | None = None  # on the recipe of the checkpoints' own evaluation (screening, when on)
    base_full: BaseStats | None = None  # with screening: on the full recipe, which judges collapse
    base_distilled: BaseStats | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    validation: list[ValidationPoint] = field(default_factory=list)


def encode_trial(record: TrialRecord) -> dict[str, Any]:
    """The record as trial user attributes (JSON values)."""
    return {
        Attr.VERSION: RECORD_VERSION,
        Attr.STATE: record.state,
        Attr.STEPS: record.steps,
        Attr.COLLAPSE_STEP: record.collapse_step,
        Attr.BEST_STEP: record.best_step,
        Attr.BASE: record.base.to_json() if record.base else None,
        Attr.BASE_FULL: record.base_full.to_json() if record.base_full else None,
        Attr.BASE_DISTILLED: record.base_distilled.to_json() if record.base_distilled else None,
        Attr.TRAIN_SECONDS: record.train_seconds,
        Attr.EVAL_SECONDS: record.eval_seconds,
        Attr.CHECKPOINTS: [r.to_json() for r in record.rows],
        Attr.VALIDATION: [v.to_json() for v in record.validation],
    }


def decode_trial(attrs: dict[str, Any], where: str = "trial") -> TrialRecord | None:
    """The record in a trial's user attributes; None when the trial holds none (queued,
    running, failed). RecordError for a record of another version."""
    if Attr.CHECKPOINTS not in attrs:
        return None
    version = attrs.get(Attr.VERSION)
    if version != RECORD_VERSION:
        raise RecordError(
            f"{where}: record version {version!r}, this klein_sweep reads version {RECORD_VERSION}; "
            "rebuild the report with the klein_sweep version that ran the sweep"
        )
    return TrialRecord(
        state=attrs.get(Attr.STATE, "?"),
        steps=attrs.get(Attr.STEPS),
        rows=[CheckpointRow.from_json(r) for r in attrs[Attr.CHECKPOINTS]],
        collapse_step=attrs.get(Attr.COLLAPSE_STEP),
        best_step=attrs.get(Attr.BEST_STEP),
        base=BaseStats.from_json(attrs.get(Attr.BASE)),
        base_full=BaseStats.from_json(attrs.get(Attr.BASE_FULL)),
        base_distilled=BaseStats.from_json(attrs.get(Attr.BASE_DISTILLED)),
        train_seconds=attrs.get(Attr.TRAIN_SECONDS),
        eval_seconds=attrs.get(Attr.EVAL_SECONDS),
        validation=[ValidationPoint.from_json(v) for v in attrs.get(Attr.VALIDATION) or []],
    )


@dataclass
class StudyMeta:
    """What the prepare step records on the study: the plan every worker must agree on and what
    the report needs to lay out its table."""

    objective: str
    direction: str
    step_axis: str
    step_values: list[int]
    repeats_values: list[float] | None
    steps_are_checkpoints: bool
    notes: list[str]
    n_cells: int
    trainings_saved: int
    plan_hash: str
    plan: dict[str, Any] = field(default_factory=dict)  # sweep.plan.plan_fingerprint: dotted key -> value
    version: int = RECORD_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None, where: str = "study") -> "StudyMeta | None":
        if not d:
            return None
        if d.get("version") != RECORD_VERSION:
            raise RecordError(f"{where}: study meta version {d.get('version')!r}, this klein_sweep reads version {RECORD_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
