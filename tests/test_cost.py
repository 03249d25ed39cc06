"""The cost preview: counted on the model's architecture on the meta device, printed and written
before any GPU is spent; the shipped real-model recipe keeps evaluation at or below a quarter."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from conftest import run_cli
from sweep_helpers import compose_plan


def test_dry_run_prints_the_preview_writes_cost_json_and_creates_nothing_else(tmp_path):
    proc = run_cli("+sweep=lr_vs_steps", "sweep.dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cost preview of sweep lr_vs_steps" in proc.stdout and "predicted H100 hours (training at 36% MFU, sampling at 46%)" in proc.stdout
    cost = json.loads((tmp_path / "sweeps" / "lr_vs_steps" / "cost.json").read_text())
    # The shipped mini sweep: 5 learning rates trained once to 2500 steps, evaluated at 5 steps each.
    assert (cost["trainings"], cost["optimizer_steps"], cost["checkpoints_evaluated"]) == (5, 12500, 25)
    assert {"train_pflop", "eval_pflop", "eval_share", "gpu_hours"} <= set(cost)
    assert re.search(rf"eval share +{round(100 * cost['eval_share'])}%", proc.stdout)  # the file says what was printed
    # sweep.refine's bound, apart: 5 lrs continued 2500 -> 5000, and 3 bisections trained to 2500 and continued
    assert cost["refine_max_steps"] == 5 * 2500 + 3 * (2500 + 2500) and cost["refine_max_pflop"] > 0
    assert re.search(r"refinement, at most \(sweep.refine\) +\+27,500 steps", proc.stdout)
    assert sorted(p.name for p in (tmp_path / "sweeps" / "lr_vs_steps").iterdir()) == ["cost.json"]  # no study
    assert not (tmp_path / "mlflow.db").exists()


SMALL = ["+sweep=lr_vs_steps", "sweep.refine=false", "model=tiny", "data=tiny_character", "eval.seeds=[0,1]",
         "eval.trigger_prompts=['photo of [trigger]']", "eval.prior_prompts=['photo of a creature']",
         "sweep.params.train.lr.values=[1e-4,4e-4]", "sweep.dry_run=true"]


def small_cost(tmp_path, *extra):
    from klein_sweep.cost.preview import estimate_sweep_cost

    return estimate_sweep_cost(compose_plan([*SMALL, f"sweep.output_dir={tmp_path}", *extra]))


def test_the_preview_counts_a_small_sweeps_samples_and_scales_evaluation_with_its_checkpoints(tmp_path):
    """Counted by hand: 2 lrs (one training each), checkpoints at steps 2 and 4 (the tiny model
    runs the full recipe: no screening; every 250 steps of validation: none before step 4). A
    checkpoint draws (1 trigger + 1 prior prompt) x 2 seeds x 1 strength = 4 samples: 2 trainings
    x 2 checkpoints x 4 = 16. The base model's reference, once per sweep: (1 trigger + 2 x 1 prior)
    x 2 seeds = 6, and its 2 prior samples once more for the validation loss: 8. 24 in all."""
    two = small_cost(tmp_path, "sweep.params.train.steps.values=[2,4]")
    assert (two.trainings, two.optimizer_steps, two.checkpoints_evaluated, two.samples) == (2, 8, 4, 24)
    # a second LoRA strength draws every checkpoint's samples again, not the base model's
    scales = small_cost(tmp_path, "sweep.params.train.steps.values=[2,4]", "eval.lora_scales=[0.5,1.0]")
    assert scales.samples == 2 * 16 + 8 and scales.train_pflop == two.train_pflop
    # checkpoints 2 -> 4 -> 8 per training: the evaluation FLOPs beyond the once-per-sweep
    # reference double with each doubling, so each step up adds twice the one before
    four = small_cost(tmp_path, "sweep.params.train.steps.values=[2,4,6,8]")
    eight = small_cost(tmp_path, "sweep.params.train.steps.values=[2,4,6,8,10,12,14,16]")
    assert (four.checkpoints_evaluated, eight.checkpoints_evaluated) == (8, 16)
    assert (four.samples, eight.samples) == (2 * 4 * 4 + 8, 2 * 8 * 4 + 8)
    assert eight.eval_pflop - four.eval_pflop == pytest.approx(2 * (four.eval_pflop - two.eval_pflop), rel=1e-9)
    assert four.eval_pflop - two.eval_pflop > 0
    # twice the optimizer steps: twice the training FLOPs
    assert (four.optimizer_steps, eight.optimizer_steps) == (16, 32)
    assert eight.train_pflop == pytest.approx(2 * four.train_pflop, rel=1e-9)
    assert four.train_pflop == pytest.approx(2 * two.train_pflop, rel=1e-9)


def test_a_sweep_without_evaluation_costs_only_its_training(tmp_path):
    on = small_cost(tmp_path, "sweep.params.train.steps.values=[2,4]")
    off = small_cost(tmp_path, "sweep.params.train.steps.values=[2,4]", "eval=none")
    assert (off.checkpoints_evaluated, off.samples, off.eval_pflop, off.eval_share) == (0, 0, 0.0, 0.0)
    assert off.train_pflop == on.train_pflop > 0 and 0 < on.eval_share < 1
    assert off.to_json()["eval_share"] == 0.0


@pytest.fixture(scope="module")
def images_1024(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs1024")
    for i in range(4):
        Image.new("RGB", (1024, 1024), (40 * i, 90, 160)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("photo of [trigger]")
    return folder


@pytest.mark.parametrize("size", ["9b", "4b"])
def test_the_real_model_recipe_keeps_evaluation_at_most_half(tmp_path, images_1024, size):
    from klein_sweep.config import build_settings
    from klein_sweep.cost.flops import model_flops
    from klein_sweep.cost.preview import estimate_sweep_cost

    base = ["+sweep=lr_vs_steps", f"model=flux2_klein_base_{size}", "data=folder", f"data.path={images_1024}",
            "data.resolution=1024", "sweep.dry_run=true", f"sweep.output_dir={tmp_path}"]
    economy = estimate_sweep_cost(compose_plan(base))
    full = estimate_sweep_cost(compose_plan([*base, "eval.recipe=full"]))
    # economy: 512 px at the model's own steps, one screening seed (docs/evaluation_cost.md)
    assert economy.eval_share <= 0.5 < 0.75 < full.eval_share
    assert economy.train_pflop == full.train_pflop  # the recipe changes evaluation only
    step = model_flops(build_settings(compose_plan(base).base_cfg), 1024).train_step
    assert economy.train_pflop == pytest.approx(12500 * step / 1e15)
    # 9B: ~162 TFLOP a training step at 1024 px with 512 text tokens (4B: ~76)
    assert step / 1e12 == pytest.approx({"9b": 162.4, "4b": 76.3}[size], rel=0.02)


def test_an_unknown_gpu_for_the_preview_is_refused(tmp_path):
    proc = run_cli("+sweep=lr_vs_steps", "sweep.dry_run=true", "sweep.cost_gpu=TPU", cwd=tmp_path)
    assert proc.returncode == 2 and "config key 'sweep.cost_gpu' = 'TPU' is invalid: one of H100" in proc.stderr
    assert not (tmp_path / "sweeps").exists()


def test_the_real_model_recipe_screens_one_prompt_with_enough_seeds_for_kid(tmp_path, images_1024):
    """One trigger prompt: screening with the first seed alone would be one sample, which KID
    cannot compare; the recipe takes the first two seeds instead of refusing a key the user never set."""
    from klein_sweep.config import build_settings

    base = ["+sweep=lr_vs_steps", "model=flux2_klein_base_4b", "data=folder", f"data.path={images_1024}",
            "data.resolution=1024", f"sweep.output_dir={tmp_path}", "eval.seeds=[3,5,7]", "eval.feature_network=random_conv",
            "eval.identity_network=same"]
    one = build_settings(compose_plan([*base, "eval.trigger_prompts=['photo of [trigger]']",
                                       "eval.prior_prompts=['a cat']"]).base_cfg).eval
    assert one.screening_seeds == [3, 5]
    many = build_settings(compose_plan(base).base_cfg).eval  # the shipped prompts: the first seed is enough
    assert many.screening_seeds == [3]
