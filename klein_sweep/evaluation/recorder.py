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
        self.base_full = policy.base_full if policy is not None else None
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
        if self.evaluation is not None and self.evaluation.screening and \
                collapse.suspect_collapse(self.history + self.rows, self.base, self.settings.eval, self.base_full):
            # A collapse is declared on the full recipe's values only: judge this one in full now.
            row.full = self.evaluation.evaluate_full_now(event.step, model)
            metrics.update({f"eval_full/{k}": v for k, v in row.full.items()})
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
        judged = collapse.classify(self.history + self.rows, self.base, self.settings.eval, self.base_full)
        return [r for r in judged if r.step in own]

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
        if self.evaluation is not None and self.evaluation.screening and model is not None:
            self.confirm_in_full(model)
        rows = classify_strengths(self.judged(), self.base, self.settings.eval)
        best = collapse.best_checkpoint(rows, self.objective, self.direction)
        value = best.value(self.objective) if best else None
        collapse_step = collapse.first_collapse_step(rows)
        state = rows[-1].state if rows else "failed"
        record = TrialRecord(state=state, steps=total_steps, rows=rows, collapse_step=collapse_step,
                             best_step=best.step if best else None, base=self.base, base_full=self.base_full,
                             base_distilled=self.base_distilled,
                             train_seconds=round(train_seconds, 3), eval_seconds=round(self.eval_seconds, 3),
                             validation=list(self.validation))
        self.tag_run(record, outcome)
        best_lora = self.best_dir / "pytorch_lora_weights.safetensors"
        if best_lora.exists():
            from klein_sweep.lora.export import export_comfyui

            self.tracker.log_artifact(best_lora, "lora/best")
            self.tracker.log_artifact(export_comfyui(best_lora), "lora/best")
        return record, value

    def confirm_in_full(self, model) -> None:
        """With screening, the full evaluation of the checkpoints that decide the result, from
        their LoRA snapshots: the two best screened ones (the best checkpoint and the objective
        are chosen on full values) and the one before the first collapse (is the boundary really
        after it?). When that one turns out collapsed too, the one before it is next, and so on.
        The best checkpoint's LoRA is saved again from its snapshot; the model leaves with the
        LoRA it came with."""
        from klein_sweep.lora.io import save_lora

        ev = self.evaluation
        by_step = {r.step: r for r in self.rows}
        with ev.restoring(model):
            while True:
                judged = self.judged()
                need = set(_best_screened(judged, self.objective, self.maximize, n=2))
                first = collapse.first_collapse_step(judged)
                before = [r.step for r in judged if first is not None and r.step < first]
                if before:
                    need.add(before[-1])
                need = {s for s in need if by_step[s].full is None and s in ev.snapshots}
                if not need:
                    break
                for step in sorted(need):
                    by_step[step].full = ev.evaluate_full_at(step, model)
                    self.tracker.log_metrics({f"eval_full/{k}": v for k, v in by_step[step].full.items()}, step=step)
            best = collapse.best_checkpoint(self.judged(), self.objective, self.direction)
            if best is not None and best.full is not None:
                ev.save_at(best.step, model, lambda m: save_lora(m, self.best_dir))

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


def _best_screened(rows: list[CheckpointRow], objective: str, maximize: bool, n: int) -> list[int]:
    """Steps of the n best non-collapsed checkpoints by their own (screened) value: screening
    noise can swap neighbours, so the full evaluation looks at two."""
    usable = [r for r in rows if r.state != "collapsed" and r.metrics.get(objective) is not None
              and math.isfinite(r.metrics[objective])]
    return [r.step for r in sorted(usable, key=lambda r: r.metrics[objective], reverse=maximize)[:n]]
