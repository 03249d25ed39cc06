"""eval.lora_scales: each checkpoint also evaluated at other LoRA strengths, judged by the same
collapse rules, shown in the report for the checkpoints that collapsed at 1.0."""

from __future__ import annotations

import pytest
import torch
from sweep_helpers import COMMON, compose_plan
from test_lora import sample, trained_like

from klein_sweep.lora.adapters import lora_strength, merged_lora
from klein_sweep.models.tiny import build_tiny_pipeline


def test_strength_scales_the_adapter_and_is_restored():
    pipe = build_tiny_pipeline(seed=0)
    base = sample(pipe)
    trained_like(pipe, rank=4, alpha=2.0)
    full = sample(pipe)
    with lora_strength(pipe.transformer, 0.0):
        assert torch.allclose(sample(pipe), base, atol=1e-5)  # strength 0 is the base model
    with lora_strength(pipe.transformer, 0.5):
        half = sample(pipe)
    assert not torch.allclose(half, full, atol=1e-4) and not torch.allclose(half, base, atol=1e-4)
    with pytest.raises(RuntimeError), lora_strength(pipe.transformer, 0.25):
        raise RuntimeError("evaluation failed")
    assert torch.allclose(sample(pipe), full, atol=1e-6)  # trained scale back, even after an error


def test_merged_sampling_matches_the_adapter_and_leaves_the_base_untouched():
    pipe = build_tiny_pipeline(seed=0)
    trained_like(pipe, rank=4, alpha=2.0)
    base_weights = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora_" not in n}
    full = sample(pipe)
    with merged_lora(pipe.transformer):
        merged = sample(pipe)
    assert torch.allclose(merged, full, atol=1e-5) and not torch.equal(merged, full)  # folded in, same model
    with lora_strength(pipe.transformer, 0.5):
        half = sample(pipe)
        with merged_lora(pipe.transformer):
            assert torch.allclose(sample(pipe), half, atol=1e-5)  # the strength is what gets folded in
    with pytest.raises(RuntimeError), merged_lora(pipe.transformer):
        raise RuntimeError("evaluation failed")
    for n, p in pipe.transformer.named_parameters():  # bit for bit, even after an error
        if n in base_weights:
            assert torch.equal(p, base_weights[n]), n
    assert torch.equal(sample(pipe), full)  # the adapter runs on its own again


def test_sweep_evaluates_every_checkpoint_at_each_strength(tmp_path):
    from mlflow.tracking import MlflowClient

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-3]",
                         "sweep.params.train.steps.values=[2,4]", "eval.lora_scales=[0.5,1.0]",
                         f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={tmp_path / 'sweep'}", f"tracking.uri={uri}"])
    run_sweep(plan, progress=False)
    trial = open_study(plan, create=False).trials[0]
    rows = trial.user_attrs["checkpoints"]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert set(r["scales"]) == {"0.5"}
        assert r["scales"]["0.5"]["state"] in ("good", "underfit", "overfit", "collapsed")
        assert r["scales"]["0.5"]["id_sim"] != r["id_sim"]  # other samples, not a copy
    client = MlflowClient(uri)
    history = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "eval_strength_0.5/id_sim")
    assert [m.step for m in history] == [2, 4]


def test_report_shows_collapsed_checkpoints_at_other_strengths():
    from klein_sweep.record import CheckpointRow, Judged, TrialRecord
    from klein_sweep.report.markdown import strength_section
    from klein_sweep.report.results import SweepResults, TrialResult

    rows = [
        CheckpointRow(step=500, metrics={"id_sim": 0.8}, state="good", scales={"0.5": Judged({"id_sim": 0.6}, "good")}),
        CheckpointRow(step=1000, metrics={"id_sim": 0.4}, state="collapsed", reason="identity dropped",
                      scales={"0.5": Judged({"id_sim": 0.7}, "good")}),
    ]
    record = TrialRecord(state="collapsed", steps=1000, rows=rows, collapse_step=1000, best_step=500)
    results = SweepResults("s", None, [TrialResult(0, {"train.lr": 4e-4}, record)], [])
    text = "\n".join(strength_section(results))
    assert "| 1000 | 0.4 / collapsed | 0.7 / good |" in text
    assert "1 of 1 collapsed checkpoints are not collapsed at some lower or higher strength" in text
