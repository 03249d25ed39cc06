"""What gets evaluated at a checkpoint, and how: the evaluation policies around the one
CheckpointEvaluator.

  strengths    every checkpoint also at other LoRA strengths (eval.lora_scales)
  screening    every checkpoint with few samples (eval.screening_seeds), judged against the base
               model's samples on the same screening recipe; a checkpoint that looks collapsed
               gets the full evaluation at once (a collapse is declared on full values only), and
               the checkpoints that decide the result (the two best, the one before the first
               collapse) get it at the end, from LoRA snapshots
  distilled    every checkpoint's LoRA also on the distilled model (eval.also_distilled)
  validation   the deterministic validation losses (val/fit_loss, val/prior_loss) at every
               checkpoint and every eval.validation_every steps between them

Knows nothing of Optuna or MLflow: it returns typed rows and numbers; the caller logs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from klein_sweep.config import Settings
from klein_sweep.evaluation import collapse
from klein_sweep.record import BaseStats, CheckpointRow, Judged

if TYPE_CHECKING:
    from klein_sweep.evaluation.evaluator import DrawnSamples

# Metrics logged per extra LoRA strength (the full row is kept in the study).
SCALE_METRICS = ("id_sim", "kid", "prior_kid", "leak")


@dataclass
class CheckpointResult:
    """One checkpoint's evaluation: the metrics at strength 1.0 and what the policies added."""

    metrics: dict[str, float]
    grids: dict[str, "PIL.Image.Image"]  # noqa: F821 - the samples at strength 1.0 by prompt set
    scales: dict[str, Judged] = field(default_factory=dict)
    distilled: dict[str, float] | None = None
    seconds: float = 0.0

    def logged_metrics(self) -> dict[str, float]:
        """What goes to the tracker at this step (eval/*, eval_strength_S/*, eval_distilled/*)."""
        out = {f"eval/{k}": v for k, v in self.metrics.items()}
        for s, j in self.scales.items():
            out.update({f"eval_strength_{s}/{k}": v for k, v in j.metrics.items() if k in SCALE_METRICS})
        if self.distilled is not None:
            out.update({f"eval_distilled/{k}": v for k, v in self.distilled.items()})
        return out


class EvaluationPolicy:
    """The evaluators one model + data + eval setting needs, built once per worker and shared by
    its trials (the base-model references are sampled once, before any LoRA exists)."""

    def __init__(self, settings: Settings, prepared, examples):
        from klein_sweep.evaluation.evaluator import CheckpointEvaluator

        e = settings.eval
        self.settings = settings
        self.scales = [s for s in e.lora_scales if s != 1.0]
        placement = getattr(prepared, "placement", None)
        self.evaluator = CheckpointEvaluator(settings, prepared.pipe, prepared.data, examples, placement)
        self.evaluator.compute_base()  # before any LoRA touches the transformer
        from klein_sweep.evaluation.validation import ValidationLosses

        self.validation = ValidationLosses(settings, prepared.pipe, prepared.data)  # before any LoRA too
        self.full = None
        if e.screening_seeds:
            screening = dataclasses.replace(settings, eval=dataclasses.replace(
                e, seeds=list(e.screening_seeds), sample_steps=e.screening_sample_steps or e.sample_steps))
            self.full = self.evaluator
            self.evaluator = CheckpointEvaluator(screening, prepared.pipe, prepared.data, examples, placement)
            # The economy recipe screens with the full recipe's first seed at its steps: the full
            # base samples hold the screening's, which are taken rather than drawn again.
            self.evaluator.compute_base(drawn_by=self.full)
        self.distilled = None
        if e.also_distilled:
            from klein_sweep.evaluation.distilled import DistilledEvaluator

            self.distilled = DistilledEvaluator(settings, prepared.pipe, prepared.data, examples, prepared.runtime, placement)

    @property
    def base(self) -> BaseStats:
        """The base statistics of the checkpoints' own evaluation (the screening recipe's, with screening)."""
        return self.evaluator.base.stats()

    @property
    def base_full(self) -> BaseStats | None:
        """With screening: the full recipe's base statistics, which judge collapse; else None."""
        return self.full.base.stats() if self.full is not None else None

    @property
    def base_distilled(self) -> BaseStats | None:
        if self.distilled is None:
            return None
        return dataclasses.replace(self.distilled.base.stats(), model=self.distilled.model.name)

    def start_trial(self) -> "TrialEvaluation":
        return TrialEvaluation(self)


class TrialEvaluation:
    """One trial's checkpoints under the policy: LoRA snapshots for the full evaluation."""

    def __init__(self, policy: EvaluationPolicy):
        self.policy = policy
        self.snapshots: dict[int, dict] = {}  # step -> LoRA values (screening only)
        self.screened: dict[int, DrawnSamples] = {}  # step -> its screening's samples, reused by its full evaluation
        self.seconds = 0.0

    def base_grids(self) -> dict:
        """The base model's sample grids by prompt set (step 0 of every trial)."""
        return self.policy.evaluator.base_grids()

    def validate(self, model: torch.nn.Module) -> dict[str, float]:
        """The validation losses of the model as it is now: {fit_loss, prior_loss}."""
        start = time.perf_counter()
        losses = self.policy.validation.measure(model)
        self.seconds += time.perf_counter() - start
        return losses

    def evaluate(self, step: int, model: torch.nn.Module) -> CheckpointResult:
        from klein_sweep.lora.adapters import lora_snapshot, lora_strength

        p = self.policy
        start = time.perf_counter()
        metrics, grids = p.evaluator.evaluate()
        result = CheckpointResult(metrics=metrics, grids=grids)
        if p.full is not None:
            self.screened[step] = p.evaluator.drawn
        for strength in p.scales:  # the same samples at a weaker (or stronger) LoRA
            with lora_strength(model, strength):
                at_strength, _ = p.evaluator.evaluate()
            result.scales[f"{strength:g}"] = Judged(at_strength)
        if p.full is not None:
            self.snapshots[step] = lora_snapshot(model)
        if p.distilled is not None:
            result.distilled = p.distilled.evaluate(model)
        result.seconds = time.perf_counter() - start
        self.seconds += result.seconds
        return result

    @property
    def screening(self) -> bool:
        return self.policy.full is not None

    def evaluate_full_now(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        """The full evaluation of checkpoint `step`'s LoRA, which the model holds now (a screened
        checkpoint that looks collapsed is judged on these values before training goes on or
        stops). The screening's samples of that checkpoint are reused: with the economy recipe
        its first seed at the same steps, a quarter of the full recipe's samples."""
        start = time.perf_counter()
        values, _ = self.policy.full.evaluate(known=self.screened.get(step))
        self.seconds += time.perf_counter() - start
        return values

    def evaluate_full_at(self, step: int, model: torch.nn.Module) -> dict[str, float] | None:
        """The full evaluation of checkpoint `step`'s LoRA, from its snapshot (None without one).
        Call inside `restoring(model)`."""
        from klein_sweep.lora.adapters import restore_lora

        if step not in self.snapshots:
            return None
        restore_lora(model, self.snapshots[step])
        return self.evaluate_full_now(step, model)

    def save_at(self, step: int, model: torch.nn.Module, save) -> None:
        """`save(model)` with checkpoint `step`'s LoRA loaded. Call inside `restoring(model)`."""
        from klein_sweep.lora.adapters import restore_lora

        if step in self.snapshots:
            restore_lora(model, self.snapshots[step])
            save(model)

    @contextlib.contextmanager
    def restoring(self, model: torch.nn.Module):
        """The model leaves with the LoRA it came with; the snapshots are dropped after."""
        from klein_sweep.lora.adapters import lora_snapshot, restore_lora

        final = lora_snapshot(model)
        try:
            yield
        finally:
            restore_lora(model, final)
            self.snapshots.clear()
            self.screened.clear()


def classify_strengths(rows: list[CheckpointRow], base: BaseStats | None, th) -> list[CheckpointRow]:
    """Each extra strength's checkpoints judged by the same collapse rules as strength 1.0:
    rows[i].scales[S].state. Returns new rows."""
    strengths = sorted({s for r in rows for s in r.scales})
    verdicts: dict[tuple[int, str], CheckpointRow] = {}
    for strength in strengths:
        series = [CheckpointRow(step=r.step, loss=r.loss, metrics=r.scales[strength].metrics) for r in rows if strength in r.scales]
        for judged in collapse.classify(series, base, th):
            verdicts[(judged.step, strength)] = judged
    out = []
    for r in rows:
        scales = {s: Judged(j.metrics, verdicts[(r.step, s)].state, verdicts[(r.step, s)].reason) for s, j in r.scales.items()}
        out.append(dataclasses.replace(r, scales=scales))
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
