"""Refinement: which extra trainings resolve the collapse boundary after the grid. Pure decisions
over finished trials; the sweep queues what this returns (klein_sweep/sweep/refinement.py).

Two kinds, both evaluated every `refine_every` steps and stopped at their first collapse:
  extend  a training that did not collapse (a grid lr, or a bisected one) continues from its saved
          state (LoRA, optimizer, schedule, data order: nothing is trained twice) from its last
          step to the budget (refine_budget x the grid's largest step). Its collapse step is a
          boundary point the grid could not see; still fine at the budget, it is a censored point.
  bisect  at the grid's largest step G (the step count the user asked about), between the highest
          learning rate still fine at G and the lowest one collapsed by G, a new learning rate at
          their geometric mean trains from scratch to G; repeated until the two are within
          refine_lr_tolerance of each other (or refine_max_bisections were trained). One group
          per combination of the other swept values (a seed, a rank).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

LR = "train.lr"


@dataclass(frozen=True)
class RefineSpec:
    """One refinement training, as queued in the study (the `refine` trial attribute)."""

    kind: str  # extend | bisect
    cell: dict  # the swept values it trains with (train.lr and the others)
    to_step: int  # trains up to this step
    from_step: int = 0  # extend: the step its saved state is at
    from_trial: int | None = None  # extend: the trial whose training it continues

    @property
    def key(self) -> str:
        """Identity in the study: one queued or finished trial per key."""
        return json.dumps({"kind": self.kind, "cell": self.cell, "to": self.to_step, "from_trial": self.from_trial},
                          sort_keys=True, default=str)

    def to_json(self) -> dict:
        return {"kind": self.kind, "cell": self.cell, "to_step": self.to_step, "from_step": self.from_step,
                "from_trial": self.from_trial}

    @classmethod
    def from_json(cls, d: dict | None) -> "RefineSpec | None":
        if not d:
            return None
        return cls(kind=d["kind"], cell=dict(d["cell"]), to_step=int(d["to_step"]), from_step=int(d.get("from_step") or 0),
                   from_trial=d.get("from_trial"))

    def describe(self) -> str:
        lr = self.cell.get(LR)
        if self.kind == "extend":
            return f"continue lr={lr:g} from step {self.from_step} (trial {self.from_trial}) to {self.to_step}"
        return f"bisect: lr={lr:g} to step {self.to_step}"


@dataclass(frozen=True)
class Finished:
    """What the planner needs of one finished trial."""

    number: int
    cell: dict
    refine: RefineSpec | None
    collapse_step: int | None
    last_step: int  # the step its training ended at (its budget, or where it stopped at a collapse)


@dataclass(frozen=True)
class RefinePolicy:
    grid_steps: int  # G: the grid's largest step
    budget: int  # continuations run up to here
    every: int
    lr_tolerance: float
    max_bisections: int


def checkpoint_steps(spec: RefineSpec, every: int) -> list[int]:
    """Where a refinement training is evaluated: every `every` steps after its start, and its last step."""
    marks = set(range(spec.from_step + every, spec.to_step + 1, every))
    marks.add(spec.to_step)
    return sorted(m for m in marks if m > spec.from_step)


def group_key(cell: dict) -> str:
    return json.dumps({k: v for k, v in sorted(cell.items()) if k != LR}, default=str)


def plan_refinement(finished: list[Finished], pending: list[dict], held: set[str], policy: RefinePolicy) -> list[RefineSpec]:
    """The refinement trainings to queue now. `pending`: cells of grid or bisection trials queued
    or running (their results may move a bracket); `held`: keys of refinement trials that exist (queued, running or done), so
    calling this again never queues one twice."""
    new: list[RefineSpec] = []
    for t in finished:
        if t.collapse_step is None and t.last_step < policy.budget and (t.refine is None or t.refine.kind == "bisect"):
            spec = RefineSpec("extend", dict(t.cell), policy.budget, from_step=t.last_step, from_trial=t.number)
            if spec.key not in held:
                new.append(spec)
    pending_lrs: dict[str, list] = {}
    for c in pending:
        pending_lrs.setdefault(group_key(c), []).append(c.get(LR))
    groups: dict[str, list[Finished]] = {}
    for t in finished:
        if LR in t.cell and (t.refine is None or t.refine.kind == "bisect"):
            groups.setdefault(group_key(t.cell), []).append(t)
    for key, trials in groups.items():
        lo, hi = bracket(trials, policy.grid_steps)
        # A grid or bisection training still running inside the bracket will move it: wait for
        # it. One below it could move it only by collapsing where a higher lr did not; waiting
        # for those would hold the bisection back until the slowest of the grid's trainings ends.
        if any(lr is None or lo is None or hi is None or lo < lr < hi for lr in pending_lrs.get(key, [])):
            continue
        spec = next_bisection(trials, policy)
        if spec is not None and spec.key not in held:
            new.append(spec)
    return new


def bracket(trials: list[Finished], grid_steps: int) -> tuple[float | None, float | None]:
    """(highest lr fine at grid_steps below the lowest collapsed one, lowest lr collapsed by grid_steps)."""
    collapsed = [t.cell[LR] for t in trials if t.collapse_step is not None and t.collapse_step <= grid_steps]
    if not collapsed:
        return None, None
    hi = min(collapsed)
    safe = [t.cell[LR] for t in trials if (t.collapse_step is None or t.collapse_step > grid_steps) and t.cell[LR] < hi]
    return (max(safe) if safe else None), hi


def next_bisection(trials: list[Finished], policy: RefinePolicy) -> RefineSpec | None:
    lo, hi = bracket(trials, policy.grid_steps)
    if lo is None or hi is None or hi / lo <= policy.lr_tolerance:
        return None
    if sum(1 for t in trials if t.refine is not None) >= policy.max_bisections:
        return None
    lr = float(f"{math.sqrt(lo * hi):.3g}")
    cell = {**trials[0].cell, LR: lr}
    return RefineSpec("bisect", cell, policy.grid_steps)
