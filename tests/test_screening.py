"""Screening evaluation: every checkpoint with few samples, the full evaluation only for the
checkpoints that decide the result (best, and around the first collapse), from LoRA snapshots."""

from __future__ import annotations

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


def test_screened_sweep_evaluates_the_deciding_checkpoints_in_full(tmp_path):
    from mlflow.tracking import MlflowClient

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "eval.seeds=[0,1,2,3]", "eval.screening_seeds=[0,1]",
                         "eval.prior_prompts=['photo of a creature','a creature on a sky background']",
                         "sweep.params.train.lr.values=[1e-3]", "sweep.params.train.steps.values=[2,4,6]",
                         f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={tmp_path / 'sweep'}", f"tracking.uri={uri}"])
    run_sweep(plan, progress=False)
    trial = open_study(plan, create=False).trials[0]
    rows = trial.user_attrs["checkpoints"]
    best = trial.user_attrs["best_step"]
    full = {r["step"] for r in rows if "full" in r}
    # Exactly the deciding checkpoints: the two best screened, and the first collapsed one with
    # the one before it. Not every checkpoint (no saving), and not only the last.
    usable = [r for r in rows if r["state"] != "collapsed"]
    expected = {r["step"] for r in sorted(usable, key=lambda r: r["id_sim"], reverse=True)[:2]}
    steps = [r["step"] for r in rows]
    first = next((r["step"] for r in rows if r["state"] == "collapsed"), None)
    if first is not None:
        expected |= {first, *steps[max(0, steps.index(first) - 1):steps.index(first)]}
    assert best in full and full == expected and len(rows) == 3
    best_row = next(r for r in rows if r["step"] == best)
    assert trial.value == best_row["full"]["id_sim"]  # the objective comes from the full evaluation
    history = MlflowClient(uri).get_metric_history(trial.user_attrs["mlflow_run_id"], "eval_full/id_sim")
    assert [m.step for m in history] == sorted(full)
    assert "## Full evaluation of the deciding checkpoints" in (tmp_path / "sweep" / "report.md").read_text()
