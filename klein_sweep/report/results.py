"""The sweep's results, rebuilt from the Optuna storage alone (no retraining, no MLflow needed):
the typed trial records decoded, laid out as the lr x steps table, the boundary per setting,
the best cell, and whether training loss tracks quality."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from klein_sweep.boundary.refine import RefineSpec
from klein_sweep.evaluation import collapse
from klein_sweep.record import Attr, BaseStats, CheckpointRow, StudyAttr, StudyMeta, TrialRecord, decode_trial, retried_trials

QUALITY_METRICS = ("id_sim", "kid", "prior_kid", "fid", "is", "leak")


@dataclass
class TrialResult:
    """One finished trial as the report sees it: its setting and its stored record."""

    number: int
    setting: dict  # swept params other than the step axis
    record: TrialRecord
    refine: RefineSpec | None = None  # a refinement training after the grid (sweep.refine); None: a grid cell

    @property
    def rows(self) -> list[CheckpointRow]:
        return self.record.rows

    @property
    def steps(self) -> int | None:
        return self.record.steps

    @property
    def collapse_step(self) -> int | None:
        return self.record.collapse_step

    @property
    def base(self) -> BaseStats | None:
        return self.record.base


@dataclass
class SweepResults:
    name: str
    meta: StudyMeta | None
    trials: list[TrialResult]
    failed: list[tuple[int, dict, str]] = field(default_factory=list)  # number, cell, reason

    @property
    def grid(self) -> list[TrialResult]:
        """The trials of the grid the user asked for (the table's rows), without refinement."""
        return [t for t in self.trials if t.refine is None]

    @property
    def refinement(self) -> list[TrialResult]:
        return [t for t in self.trials if t.refine is not None]

    @property
    def objective(self) -> str:
        """The objective's metric key (id_sim), without the eval/ prefix."""
        return (self.meta.objective if self.meta else "eval/id_sim").split("/", 1)[-1]

    @property
    def direction(self) -> str:
        return self.meta.direction if self.meta else "maximize"

    @property
    def plan(self) -> dict:
        """The resolved settings the study was planned with (dotted keys); {} without a plan."""
        return self.meta.plan if self.meta else {}

    @property
    def grid_lrs(self) -> list[float]:
        """The learning rates of the grid, ascending."""
        return sorted({float(t.setting["train.lr"]) for t in self.grid if "train.lr" in t.setting})


def load_results(study) -> SweepResults:
    """Every finished trial's record and every failed trial's reason, decoded from the study."""
    from optuna.trial import TrialState

    meta = StudyMeta.from_json(study.user_attrs.get(StudyAttr.META), where=f"study {study.study_name}")
    trials, failed = [], []
    stored = study.get_trials(deepcopy=False)
    retried = retried_trials(stored)
    for t in stored:
        cell = dict(t.user_attrs.get(Attr.CELL) or {})
        if t.state == TrialState.FAIL:
            if Attr.FAILURE in t.user_attrs and t.number not in retried:
                failed.append((t.number, cell, t.user_attrs[Attr.FAILURE]))
            continue
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        record = decode_trial(t.user_attrs, where=f"trial {t.number}")
        if record is not None:
            setting = {k: v for k, v in cell.items() if k != "train.steps"}
            trials.append(TrialResult(t.number, setting, record, RefineSpec.from_json(t.user_attrs.get(Attr.REFINE))))
    return SweepResults(study.study_name, meta, trials, failed)


# --- the table ----------------------------------------------------------------------------------


def axis_of(results: SweepResults) -> tuple[str, list]:
    """('steps' or 'repeats', the column values)."""
    meta = results.meta
    if meta and meta.step_axis == "repeats":
        return "repeats", list(meta.repeats_values or [])
    if meta and meta.step_values:
        return "steps", list(meta.step_values)
    # Steps trained separately (a schedule that depends on the total, or a searched step count):
    # each trial is one column, its own step count.
    return "steps", sorted({t.steps for t in results.grid if t.steps})


def cell_row(trial: TrialResult, axis: str, value, steps_are_checkpoints: bool) -> CheckpointRow | None:
    """The checkpoint row standing for (trial's setting, axis value). A trial stopped by collapse
    before that point is collapsed there too."""
    key = "step" if axis == "steps" else "repeats"
    if axis == "steps" and not steps_are_checkpoints and trial.steps is not None and trial.steps != value:
        return None  # steps trained separately: only the trial's own final step is its cell
    for r in trial.rows:
        at = getattr(r, key)
        if at is not None and math.isclose(float(at), float(value), rel_tol=1e-6):
            return r
    if trial.collapse_step is not None:
        last = max(getattr(r, key) or 0 for r in trial.rows)
        if value > last:  # training stopped at the collapse: known collapsed, not evaluated
            return CheckpointRow(step=int(value) if axis == "steps" else -1, state="collapsed", reason="after the collapse")
    return None


def setting_order(trial: TrialResult) -> list:
    """Rows in numeric order of the swept values (lr 5e-5 before 1e-4), then by trial."""
    return [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for _, v in sorted(trial.setting.items())] + [(0, trial.number, "")]


def setting_label(setting: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[-1]}={fmt_value(v)}" for k, v in sorted(setting.items())) or "(default)"


def build_table(results: SweepResults) -> tuple[str, list, list[str], dict]:
    """(axis, columns, row labels, {(label, column): CheckpointRow})."""
    axis, columns = axis_of(results)
    sac = bool(results.meta and results.meta.steps_are_checkpoints)
    labels, cells = [], {}
    for t in sorted(results.grid, key=setting_order):
        label = setting_label(t.setting)
        if label not in labels:
            labels.append(label)
        for c in columns:
            row = cell_row(t, axis, c, sac)
            if row is not None:
                cells[(label, c)] = row
    return axis, columns, labels, cells


def best_cell(results: SweepResults) -> tuple[TrialResult, CheckpointRow] | None:
    """The best checkpoint of the grid (the table's cells; refinement trainings are not cells)."""
    objective, maximize = results.objective, results.direction == "maximize"
    best = None
    for t in results.grid:
        row = collapse.best_checkpoint(t.rows, objective, results.direction)
        if row is None:
            continue
        v = row.value(objective)
        if best is None or (v > best[1].value(objective) if maximize else v < best[1].value(objective)):
            best = (t, row)
    return best


def loss_quality_correlation(results: SweepResults) -> dict[str, dict]:
    """Spearman rank correlation between training loss and each metric across all checkpoints:
    does the loss curve say anything about quality?"""
    out = {}
    for m in QUALITY_METRICS:
        pairs = [(r.loss, r.value(m)) for t in results.trials for r in t.rows
                 if _finite(r.loss) and _finite(r.value(m))]
        if (c := spearman(pairs)) is not None:
            out[m] = c
    return out


def spearman(pairs: list[tuple[float, float]]) -> dict | None:
    """{rho, p, n} of (x, y) pairs; None with fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None
    rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return {"rho": float(rho), "p": float(p), "n": len(pairs)}


def spearman_table(corr: dict[str, dict], first_column: str, empty: str) -> list[str]:
    """Markdown rows of a {name: {rho, p, n}} table."""
    lines = [f"| {first_column} | rho | p | n |", "|---|---|---|---|"]
    lines += [f"| {name} | {c['rho']:+.2f} | {c['p']:.3g} | {c['n']} |" for name, c in corr.items()]
    return lines + ([f"| ({empty}) | | | |"] if not corr else [])



def checkpoints_with(results: SweepResults, part: str) -> list[tuple[TrialResult, CheckpointRow]]:
    """(trial, row) for every row carrying `part` (scales, full, distilled), in table order."""
    return [(t, r) for t in sorted(results.trials, key=setting_order) for r in t.rows if getattr(r, part)]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt_value(v) -> str:
    """A number as the report prints it (3 significant digits)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)
