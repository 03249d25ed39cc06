"""Screening evaluation: every checkpoint with few samples, the full evaluation only for the
checkpoints that decide the result (best, and around the first collapse), from LoRA snapshots."""

from __future__ import annotations

import pytest
import torch
from sweep_helpers import COMMON, compose_plan
from test_lora import sample, trained_like

from klein_sweep.lora.adapters import lora_snapshot, restore_lora
from klein_sweep.models.tiny import build_tiny_pipeline


def test_a_snapshot_restores_the_lora_exactly():
    pipe = build_tiny_pipeline(seed=0)
    params = trained_like(pipe, rank=4, alpha=4.0)
    before = sample(pipe)
    snap = lora_snapshot(pipe.transformer)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    assert not torch.allclose(sample(pipe), before, atol=1e-4)
    restore_lora(pipe.transformer, snap)
    assert torch.equal(sample(pipe), before)


COLLAPSE_AT = 8
# Identity of the screened checkpoints before the collapse, as a fraction of the way from the
# base model to the training images: 4 and 2 the two best, 6 the worst (a drop of 0.08, well
# inside eval.id_drop_frac). The tiny model's own values are ties up to rounding.
SCREENED_PROGRESS = {2: 0.08, 4: 0.10, 6: 0.02}


def collapsing_at(monkeypatch, collapse_at: int) -> None:
    """From step `collapse_at` on, the no-trigger samples of the LoRA are measured as the
    training character itself (leak: cosine 1 to the training images, the collapse the README's
    sweeps find), on the screened and on the full evaluation alike, and the real collapse rules
    judge it. Before it, the screened identity is SCREENED_PROGRESS; full evaluations keep their
    measured values."""
    from klein_sweep.evaluation.policies import TrialEvaluation

    evaluate, full_now, full_at = TrialEvaluation.evaluate, TrialEvaluation.evaluate_full_now, TrialEvaluation.evaluate_full_at

    def leaked(values: dict, step: int) -> dict:
        return {**values, "leak": 1.0} if step >= collapse_at else values

    def screened(self, step, model):
        self.lora_step = step
        result = evaluate(self, step, model)
        if step in SCREENED_PROGRESS:
            base = self.policy.base
            result.metrics["id_sim"] = base.id_sim + SCREENED_PROGRESS[step] * (base.reference_id_sim - base.id_sim)
        result.metrics = leaked(result.metrics, step)
        return result

    def in_full_at(self, step, model):
        self.lora_step = step  # the snapshot's LoRA is the one evaluate_full_now measures
        return full_at(self, step, model)

    def in_full_now(self, step, model):
        return leaked(full_now(self, step, model), self.lora_step)

    monkeypatch.setattr(TrialEvaluation, "evaluate", screened)
    monkeypatch.setattr(TrialEvaluation, "evaluate_full_at", in_full_at)
    monkeypatch.setattr(TrialEvaluation, "evaluate_full_now", in_full_now)


def test_screened_sweep_evaluates_the_deciding_checkpoints_in_full(tmp_path, monkeypatch):
    """Checkpoints 2 ... 10; the character leaks into the no-trigger samples at step 8.
    Screening sees it at 8 and runs the full evaluation there at once, which confirms the
    collapse and ends the training (step 10 never runs). At the end, the full evaluation of the
    deciding checkpoints from their snapshots: the two best screened ones (4 and 2) and the one
    before the first collapse (6). Exactly 2, 4, 6 and 8 are evaluated in full; the objective
    comes from those."""
    from mlflow.tracking import MlflowClient

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    collapsing_at(monkeypatch, COLLAPSE_AT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "eval.seeds=[0,1,2,3]", "eval.screening_seeds=[0,1]",
                         "eval.prior_prompts=['photo of a creature','a creature on a sky background']",
                         "sweep.params.train.lr.values=[1e-3]", "sweep.params.train.steps.values=[2,4,6,8,10]",
                         f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={tmp_path / 'sweep'}", f"tracking.uri={uri}"])
    run_sweep(plan, progress=False)
    trial = open_study(plan, create=False).trials[0]
    rows = trial.user_attrs["checkpoints"]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [2, 4, 6, 8]  # the collapse ended the training
    assert [by_step[s]["state"] == "collapsed" for s in (2, 4, 6, 8)] == [False, False, False, True]
    assert by_step[8]["reason"].startswith("concept leak") and trial.user_attrs["collapse_step"] == COLLAPSE_AT
    full = {r["step"] for r in rows if "full" in r}
    assert full == {2, 4, 6, 8}
    assert by_step[8]["full"]["leak"] == 1.0  # the collapse was declared on the full evaluation's values
    best = trial.user_attrs["best_step"]
    assert best in (2, 4, 6)
    assert trial.value == by_step[best]["full"]["id_sim"]  # the objective comes from the full evaluation
    history = MlflowClient(uri).get_metric_history(trial.user_attrs["mlflow_run_id"], "eval_full/id_sim")
    assert sorted(m.step for m in history) == [2, 4, 6, 8]
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Full evaluation of the deciding checkpoints" in report
    # the table puts the screening's identity beside the full evaluation's, each its own
    table = report.split("## Full evaluation of the deciding checkpoints")[1]
    line = next(line for line in table.splitlines() if line.startswith(f"| lr=0.001 | {COLLAPSE_AT} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "collapsed"
    assert (float(cells[3]), float(cells[4])) == pytest.approx((by_step[8]["id_sim"], by_step[8]["full"]["id_sim"]), abs=1e-3)
    assert cells[3] != cells[4]


def seeds_drawn(monkeypatch) -> list[int]:
    """The seeds of every sample the evaluators draw from now on, appended as they are drawn."""
    import klein_sweep.evaluation.evaluator as evaluator_module

    drawn = []
    generate = evaluator_module.generate

    def counting(pipe, embeds, negative, seeds, recipe, **kwargs):
        drawn.extend(seeds)
        return generate(pipe, embeds, negative, seeds, recipe, **kwargs)

    monkeypatch.setattr(evaluator_module, "generate", counting)
    return drawn


def test_the_full_evaluation_of_a_screened_checkpoint_samples_only_the_seeds_the_screening_did_not(tmp_path, monkeypatch):
    """The screening drew seeds 0 and 1 at the full recipe's steps: the full evaluation of the
    same checkpoint samples seeds 2 and 3 only, and measures what a full evaluation from scratch
    does."""
    from types import SimpleNamespace

    from klein_sweep.data.folder import load_examples
    from klein_sweep.evaluation.policies import EvaluationPolicy
    from sweep_helpers import tiny_world

    settings, pipe, data = tiny_world(tmp_path, "eval.seeds=[0,1,2,3]", "eval.screening_seeds=[0,1]")
    policy = EvaluationPolicy(settings, SimpleNamespace(pipe=pipe, data=data), load_examples(settings.data))
    trained_like(pipe, rank=4, alpha=4.0)  # a LoRA that moves the samples
    drawn = seeds_drawn(monkeypatch)
    trial = policy.start_trial()
    trial.evaluate(2, pipe.transformer)
    prompts = len(settings.eval.trigger_prompts) + len(settings.eval.prior_prompts)
    assert sorted(drawn) == sorted([0, 1] * prompts)  # the screening: seeds 0 and 1 of every prompt
    drawn.clear()
    reused = trial.evaluate_full_now(2, pipe.transformer)
    assert sorted(drawn) == sorted([2, 3] * prompts)  # seeds 0 and 1 came from the screening
    drawn.clear()
    fresh, _ = policy.full.evaluate()
    assert sorted(drawn) == sorted([0, 1, 2, 3] * prompts)
    assert reused.keys() == fresh.keys()
    for key in fresh:  # batches of other sizes: floating-point noise at most
        assert reused[key] == pytest.approx(fresh[key], rel=1e-4, abs=1e-5), key


def test_the_screening_base_is_taken_from_the_full_base_samples_not_drawn_again(tmp_path, monkeypatch):
    """Screening with seeds 0 and 1 at the full recipe's steps: building the policy draws the
    full recipe's base samples only, and the screening's base statistics equal those of a
    screening base drawn from scratch."""
    import dataclasses
    from types import SimpleNamespace

    from klein_sweep.data.folder import load_examples
    from klein_sweep.evaluation.evaluator import CheckpointEvaluator
    from klein_sweep.evaluation.policies import EvaluationPolicy
    from sweep_helpers import tiny_world

    settings, pipe, data = tiny_world(tmp_path, "eval.seeds=[0,1,2,3]", "eval.screening_seeds=[0,1]")
    drawn = seeds_drawn(monkeypatch)
    examples = load_examples(settings.data)
    policy = EvaluationPolicy(settings, SimpleNamespace(pipe=pipe, data=data), examples)
    trigger, prior = len(settings.eval.trigger_prompts), len(settings.eval.prior_prompts)
    full_base = [0, 1, 2, 3] * (trigger + prior) + [1000, 1001, 1002, 1003] * prior
    assert sorted(drawn) == sorted(full_base)  # nothing more for the screening's base
    drawn.clear()
    screening = dataclasses.replace(settings, eval=dataclasses.replace(settings.eval, seeds=[0, 1]))
    fresh = CheckpointEvaluator(screening, pipe, data, examples)
    fresh.compute_base()
    assert sorted(drawn) == sorted([0, 1] * (trigger + prior) + [1000, 1001] * prior)  # drawn from scratch this time
    taken, scratch = dataclasses.asdict(policy.base), dataclasses.asdict(fresh.base.stats())
    assert taken.keys() == scratch.keys()
    for key in scratch:  # batches of other sizes: floating-point noise at most
        assert taken[key] == pytest.approx(scratch[key], rel=1e-4, abs=1e-5), key
