"""Deterministic validation losses: the same inputs in every trial, zero forgetting before
training, fit improving and the prior drifting as a LoRA trains; logged by step, stored in the
record, reported; counted by the cost preview."""

from __future__ import annotations

import json

import pytest
import torch
from sweep_helpers import COMMON, compose_plan, tiny_world

from klein_sweep.evaluation.validation import ValidationLosses, prior_moved
from klein_sweep.lora.adapters import inject_lora
from klein_sweep.record import ValidationPoint
from klein_sweep.training.loop import train_lora


def test_validation_inputs_are_fixed_and_forgetting_is_zero_before_training(tmp_path):
    settings, pipe, data = tiny_world(tmp_path, "data.use_cache=false")  # both draw their samples
    first = ValidationLosses(settings, pipe, data)
    again = ValidationLosses(settings, pipe, data)  # another trial's (or worker's) validation set
    for a, b in ((first.fit, again.fit), (first.prior, again.prior)):
        assert torch.equal(a.noise, b.noise) and torch.equal(a.latents, b.latents) and torch.equal(a.sigmas, b.sigmas)
    # the mini-world recipe: 8 images x the 3 shipped noise levels; 4 prior samples (2 prompts x 2 seeds)
    assert len(first.fit) == min(8, data.latents.shape[0]) * 3 and len(first.prior) == 4 * 3
    base = first.measure(pipe.transformer)
    inject_lora(pipe.transformer, rank=4, alpha=4.0, preset="all_linear", seed=0)  # B = 0: the model is unchanged
    assert first.measure(pipe.transformer) == base == first.measure(pipe.transformer)
    assert base["prior_loss"] == 0.0


def test_training_lowers_the_fit_loss_and_moves_the_prior(tmp_path):
    settings, pipe, data = tiny_world(tmp_path, "train.lr=1e-2", "train.batch_size=4")
    validation = ValidationLosses(settings, pipe, data)
    before = validation.measure(pipe.transformer)
    params = inject_lora(pipe.transformer, rank=8, alpha=8.0, preset="all_linear", seed=0)
    train_lora(pipe.transformer, params, data, settings.train, steps=60, device="cpu", progress=False)
    after = validation.measure(pipe.transformer)
    assert after["fit_loss"] < 0.9 * before["fit_loss"], (before, after)
    assert after["prior_loss"] != 0.0  # the LoRA changed what the model does on the prior prompts


def test_a_sweep_logs_stores_and_reports_the_validation_losses_densely(tmp_path):
    from mlflow.tracking import MlflowClient

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-3]", "sweep.params.train.steps.values=[2,4]",
                         "eval.validation_every=1", "eval.validation_trigger=null", f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={tmp_path / 'sweep'}",
                         f"tracking.uri={uri}"])
    run_sweep(plan, progress=False)
    trial = open_study(plan, create=False).trials[0]
    points = trial.user_attrs["validation"]
    # every step (validation_every=1); the sampled checkpoints (the step values 2, 4) among them
    assert [(p["step"], p["sampled"]) for p in points] == [(1, False), (2, True), (3, False), (4, True)]
    assert [r["step"] for r in trial.user_attrs["checkpoints"]] == [2, 4]  # sampling only at the grid's steps
    client = MlflowClient(uri)
    run_id = trial.user_attrs["mlflow_run_id"]
    for key in ("val/fit_loss", "val/prior_loss"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert [m.value for m in history] == [p[key.split("/")[1]] for p in points]
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Validation losses: do the cheap signals track the sampled metrics?" in report and "4 points in this sweep" in report
    assert (tmp_path / "sweep" / "validation.png").stat().st_size > 10_000
    stored = json.loads((tmp_path / "sweep" / "report.json").read_text())["validation"]
    assert stored[0]["points"] == points


def test_the_cost_preview_counts_the_validation_losses(tmp_path):
    from klein_sweep.cost.preview import estimate_sweep_cost

    base = ["+sweep=lr_vs_steps", "sweep.refine=false", f"sweep.output_dir={tmp_path}", "sweep.dry_run=true"]
    sparse = estimate_sweep_cost(compose_plan([*base, "eval.validation_every=0"]))
    dense = estimate_sweep_cost(compose_plan([*base, "eval.validation_every=50"]))
    assert dense.train_pflop == sparse.train_pflop and dense.eval_pflop > sparse.eval_pflop


def test_a_moving_prior_triggers_a_sampled_evaluation_between_the_planned_ones():
    """The screening rule on the lr 4e-4 trial of the mini sweep (val/prior_loss every 100
    steps, sampled at 500): the rise is measured from the last *sampled* point, so a slow drift
    triggers once it adds up, and a sampled point resets the reference."""
    points = [ValidationPoint(400, 0.2, 0.078), ValidationPoint(500, 0.2, 0.080, sampled=True),
              ValidationPoint(600, 0.2, 0.089), ValidationPoint(700, 0.2, 0.104)]
    assert not prior_moved(points, 0.1296 - 1e-4, 0.05)  # +0.0495 since step 500: not yet
    assert prior_moved(points, 0.1452, 0.05)  # step 900: +0.065
    assert not prior_moved(points, 0.1452, None)  # eval.validation_trigger=null: planned checkpoints only
    assert not prior_moved(points, float("nan"), 0.05)  # diverged: the next planned checkpoint judges it
    assert prior_moved([], 0.06, 0.05) and not prior_moved([], 0.04, 0.05)  # before any sample: from the base model (0)


def test_a_continuation_measures_the_trigger_from_the_training_it_continues(tmp_path):
    """A refinement continuation's first validation point is compared with the last sampled
    evaluation of the training it continues, not with the base model: a prior already far from
    the base (0.30) that barely moves (+0.02) must not trigger a sampled evaluation at once."""
    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.evaluation.recorder import TrialRecorder
    from klein_sweep.record import TrialRecord
    from klein_sweep.tracking import NullTracker
    from klein_sweep.training.loop import CheckpointEvent

    class Evaluation:  # the cheap signal only: no sampled evaluation may be asked for
        def __init__(self, prior_loss):
            self.prior_loss = prior_loss

        def base_grids(self):
            return {}

        def validate(self, model):
            return {"fit_loss": 0.2, "prior_loss": self.prior_loss}

        def evaluate(self, step, model):
            raise AssertionError(f"a sampled evaluation was triggered at step {step}")

    class Policy:
        base = base_full = base_distilled = None

        def __init__(self, prior_loss):
            self.prior_loss = prior_loss

        def start_trial(self):
            return Evaluation(self.prior_loss)

    settings = build_settings(compose_config(["tracking=none", "eval=default", f"output_dir={tmp_path}"]))
    assert settings.eval.validation_trigger == 0.05
    grid = TrialRecord(state="good", steps=2500, rows=[], validation=[
        ValidationPoint(2250, 0.2, 0.27), ValidationPoint(2500, 0.2, 0.30, sampled=True)])
    event = CheckpointEvent(step=2750, loss=0.2, lr=1e-4, sampled=False)

    continuation = TrialRecorder(settings, Policy(0.32), NullTracker(), n_images=8, continues=grid)
    metrics, stop = continuation.on_checkpoint(event, model=None)
    assert metrics["val/prior_loss"] == 0.32 and not stop
    assert continuation.validation == [ValidationPoint(2750, 0.2, 0.32, sampled=False, triggered=False)]
    # The same point in a training of its own (no history) is +0.32 from the base: that triggers.
    alone = TrialRecorder(settings, Policy(0.32), NullTracker(), n_images=8)
    with pytest.raises(AssertionError, match="triggered at step 2750"):
        alone.on_checkpoint(event, model=None)
