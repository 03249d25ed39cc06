"""eval.also_distilled: every checkpoint's LoRA is checked, loaded into the distilled model and
evaluated with the distilled recipe, logged as eval_distilled/*; the report compares."""

from __future__ import annotations

import json

import pytest

from sweep_helpers import COMMON, compose_plan

from conftest import run_cli


def test_every_checkpoint_is_also_evaluated_on_the_distilled_model(tmp_path):
    from mlflow.tracking import MlflowClient

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The tiny model has no distilled sibling: it stands in for itself (distilled recipe, same weights), so the
    # whole path runs (load, compatibility check, LoRA load/unload, 4-step no-CFG sampling).
    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", *COMMON, "sweep.params.train.lr.values=[1e-3]",
                         "sweep.params.train.steps.values=[2,4]", "eval.also_distilled=true", "eval.distilled_model=tiny",
                         f"data.cache_dir={tmp_path / 'cache'}", f"sweep.output_dir={tmp_path / 'sweep'}", f"tracking.uri={uri}"])
    summary = run_sweep(plan, progress=False)
    assert summary.ran == [0], summary
    trial = open_study(plan, create=False).trials[0]
    rows = trial.user_attrs["checkpoints"]
    # The distilled recipe (4 steps, no CFG) draws other images than the base recipe: its
    # identity is measured on its own samples, not copied from the base evaluation.
    assert all(r["distilled"]["id_sim"] != r["id_sim"] for r in rows)
    assert trial.user_attrs["base_distilled"]["model"] == "tiny"
    history = MlflowClient(uri).get_metric_history(trial.user_attrs["mlflow_run_id"], "eval_distilled/id_sim")
    assert [m.step for m in history] == [2, 4]
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Base -> distilled transfer" in report and "Mean identity change from base to distilled" in report
    # judged on the distilled model against its own no-LoRA reference, checkpoint by checkpoint
    (transfer,) = json.loads((tmp_path / "sweep" / "report.json").read_text())["transfer"]
    assert sorted(transfer["states"]) == ["2", "4"] and "first collapse on distilled" in report


def test_a_model_without_a_distilled_counterpart_is_refused_up_front(tmp_path):
    proc = run_cli("+sweep=lr_vs_steps", "model=tiny", "data=tiny_character", "eval.also_distilled=true", cwd=tmp_path)
    assert proc.returncode == 2 and "eval.distilled_model" in proc.stderr and "no distilled counterpart" in proc.stderr
    assert not (tmp_path / "sweeps").exists()


def test_on_the_mini_world_the_distilled_mini_is_the_counterpart_and_its_absence_is_named(tmp_path, monkeypatch):
    from klein_sweep import preflight
    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.errors import ModelError
    from klein_sweep.evaluation.distilled import distilled_model_config

    settings = build_settings(compose_config(["eval.also_distilled=true"]), output_dir=str(tmp_path))
    distilled = distilled_model_config(settings)
    assert (distilled.name, distilled.is_distilled, distilled.sample_steps, distilled.guidance_scale) == ("mini_distilled", True, 4, 1.0)
    preflight.check_model(distilled, 32, key="eval.distilled_model")  # shipped: passes
    monkeypatch.setattr(preflight, "MINI_DISTILLED_DIR", tmp_path / "gone")
    with pytest.raises(ModelError, match="python -m klein_sweep.mini.build --only distilled"):
        preflight.check_model(distilled, 32, key="eval.distilled_model")
