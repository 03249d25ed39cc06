"""The checkpoint callback of one trial, a sweep's or a single one: evaluation (through the
policy) -> typed row -> collapse verdict -> tracker; keeps the best checkpoint's LoRA; at the end
judges every checkpoint into the trial's record. Knows nothing of Optuna: a sweep passes
`report` (Optuna's intermediate values) and stores the record itself."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from klein_sweep.config import Settings
from klein_sweep.evaluation import collapse
from klein_sweep.evaluation.validation import prior_moved
from klein_sweep.record import STATES, CheckpointRow, TrialRecord, ValidationPoint


class TrialRecorder:
    def __init__(self, settings: Settings, policy, tracker, n_images: int, objective: str = "eval/id_sim",
                 direction: str = "maximize", report: Callable[[float, int], None] | None = None,
                 continues: TrialRecord | None = None):
        """`continues`: the record of the training this trial continues (a refinement past the
        grid): the collapse rules compare against its best so far, the validation trigger
        against its last sampled evaluation."""
        self.settings, self.tracker, self.report = settings, tracker, report
        self.history = list(continues.rows) if continues else []  # re-judged with this trial's rows
        self.history_validation = list(continues.validation) if continues else []
        self.evaluation = policy.start_trial() if policy is not None else None
        self.base = policy.base if policy is not None else None
        self.base_distilled = policy.base_distilled if policy is not None else None
        self.n_images = n_images
        self.rows: list[CheckpointRow] = []
        self.validation: list[ValidationPoint] = []
        self.best_value: float | None = None
        self.objective = objective.split("/", 1)[1]
        self.direction = direction
        self.maximize = direction == "maximize"
        self.best_dir = Path(settings.output_dir) / "lora_best"

    @property
    def eval_seconds(self) -> float:
        return self.evaluation.seconds if self.evaluation is not None else 0.0

    def on_checkpoint(self, event, model) -> tuple[dict, bool]:
        """The training loop's checkpoint hook: returns (metrics to log at this step, stop?)."""
        from klein_sweep.lora.io import save_lora

        metrics = {}
        if self.evaluation is not None and not self.rows and not self.validation and not self.history:
            # Step 0 is the base model: MLflow's image viewer opens at step 0, and a slider from
            # there runs through the checkpoints.
            self.log_grids(self.evaluation.base_grids(), step=0)
        sampled = event.sampled
        if self.evaluation is not None:
            losses = self.evaluation.validate(model)
            since = self.history_validation + self.validation
            triggered = not sampled and prior_moved(since, losses["prior_loss"], self.settings.eval.validation_trigger)
            sampled = sampled or triggered
            self.validation.append(ValidationPoint(event.step, losses["fit_loss"], losses["prior_loss"], sampled, triggered))
            metrics.update({f"val/{k}": v for k, v in losses.items()})
        if not sampled:
            return metrics, False
        t = self.settings.train
        row = CheckpointRow(step=event.step, repeats=round(event.step * t.batch_size * t.grad_accum / self.n_images, 6),
                            loss=event.loss, lr=event.lr, lora_norm=event.lora_norm)
        if self.evaluation is not None:
            result = self.evaluation.evaluate(event.step, model)
            row.metrics, row.scales, row.distilled = result.metrics, result.scales, result.distilled
            metrics.update(result.logged_metrics())
            self.log_grids(result.grids, step=event.step)
        self.rows.append(row)
        current = self.judged()[-1]
        metrics["eval/collapsed"] = float(current.state == "collapsed")
        value = row.value(self.objective)
        if current.state != "collapsed" and value is not None and math.isfinite(value):
            if self.report is not None:
                self.report(value, event.step)
            if self.best_value is None or (value > self.best_value if self.maximize else value < self.best_value):
                self.best_value = value
                save_lora(model, self.best_dir)  # logged with its export in finish()
        # A collapsed checkpoint ends the trial: later steps are known collapsed.
        return metrics, current.state == "collapsed"

    def judged(self) -> list[CheckpointRow]:
        """This trial's rows with the collapse rules' verdict, judged after the history's."""
        own = {r.step for r in self.rows}
        return [r for r in collapse.classify(self.history + self.rows, self.base, self.settings.eval) if r.step in own]

    def log_grids(self, grids: dict, step: int) -> None:
        """Sample grids (rows: prompts, columns: seeds) to the trial's folder and the tracker."""
        folder = Path(self.settings.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for name, grid in grids.items():
            grid.save(folder / f"{name}_step_{step:06d}.png")
            self.tracker.log_image(grid, key=f"samples/{name}", step=step)

    def finish(self, outcome, total_steps: int, model=None, seconds: float = 0.0) -> tuple[TrialRecord, float | None]:
        """Judge every checkpoint, tag the run, log the best LoRA. Returns (the record, the
        objective's value or None when no checkpoint is usable)."""
        from klein_sweep.evaluation.policies import classify_strengths
        from klein_sweep.lora.io import save_lora

        train_seconds = seconds - self.eval_seconds
        if outcome.status == "diverged":
            self.rows.append(CheckpointRow(step=outcome.steps_done, loss=float("nan")))
        rows = classify_strengths(self.judged(), self.base, self.settings.eval)
        best = collapse.best_checkpoint(rows, self.objective, self.direction)
        value = best.value(self.objective) if best else None
        if self.evaluation is not None and model is not None:
            rows, full_best = self.evaluation.evaluate_in_full(
                rows, model, self.objective, self.direction, save_best=lambda m: save_lora(m, self.best_dir))
            for r in rows:
                if r.full is not None:
                    self.tracker.log_metrics({f"eval_full/{k}": v for k, v in r.full.items()}, step=r.step)
            if full_best is not None:  # the objective from the full evaluation where it ran
                best, value = full_best, full_best.full[self.objective]
        collapse_step = collapse.first_collapse_step(rows)
        state = rows[-1].state if rows else "failed"
        record = TrialRecord(state=state, steps=total_steps, rows=rows, collapse_step=collapse_step,
                             best_step=best.step if best else None, base=self.base, base_distilled=self.base_distilled,
                             train_seconds=round(train_seconds, 3), eval_seconds=round(self.eval_seconds, 3),
                             validation=list(self.validation))
        self.tag_run(record, outcome)
        best_lora = self.best_dir / "pytorch_lora_weights.safetensors"
        if best_lora.exists():
            from klein_sweep.lora.export import export_comfyui

            self.tracker.log_artifact(best_lora, "lora/best")
            self.tracker.log_artifact(export_comfyui(best_lora), "lora/best")
        return record, value

    def tag_run(self, record: TrialRecord, outcome) -> None:
        tags = {
            "klein.state": record.state,
            "klein.collapse_step": record.collapse_step if record.collapse_step is not None else "none",
            "klein.best_step": record.best_step if record.best_step is not None else "none",
        }
        if outcome.reason:
            tags["klein.reason"] = outcome.reason
        if record.collapse_step is not None:
            tags["klein.collapse_reason"] = next(r.reason for r in record.rows if r.state == "collapsed")
        self.tracker.set_tags(tags)
        # The same as metrics, so the runs table can sort by them and the chart view plot them:
        # trial/state is the index in STATES (0 underfit, 1 good, 2 overfit, 3 collapsed).
        metrics = {"trial/collapsed": float(record.collapse_step is not None)}
        if record.state in STATES:
            metrics["trial/state"] = STATES.index(record.state)
        if record.best_step is not None:
            metrics["trial/best_step"] = record.best_step
        if record.collapse_step is not None:
            metrics["trial/collapse_step"] = record.collapse_step
        self.tracker.log_metrics(metrics, step=record.steps or 0)
