"""The evaluation recipe's defaults, resolved once when the settings are built: the keys a user
left null are filled from the recipe (eval.recipe), so MLflow params, the study's plan and the
cost preview all see the values that will run.

Why an economy recipe for real models: at the model's own recipe (50 steps, CFG 4, 1024 px, 48
samples at every checkpoint) evaluation is ~80% of a 9B or 4B lr_vs_steps sweep's FLOPs. Each
lever below, counted by the cost preview on the 9B architecture (docs/evaluation_cost.md):
  resolution 512             a forward at 512 px is 0.30x one at 1024 px (22.8 vs 75.8 TFLOP);
                             the metric networks look at 224-299 px anyway
  sample_steps 20            0.40x of 50 steps, Klein's flow-matching schedule with its shift
  screening_seeds [first]    every checkpoint with one seed (0.25x of four) ...
  screening_sample_steps 10  ... at 10 steps; the full evaluation only where it decides
  validation_every 500       the validation losses (forwards on fixed inputs, no sampling) at
  validation_images 2        the checkpoints and every 500 steps, on 2 training images and 2 base
                             prior samples x 3 noise levels: ~2% of the evaluation; the mini world every
                             250 steps on 8 + 8 (0.37 s a point on one core: every 100 steps would
                             add ~9 s to each 2500-step trial)
"""

from __future__ import annotations

import dataclasses

ECONOMY_RECIPE = {"resolution": 512, "sample_steps": 20, "screening_seeds": 1, "screening_sample_steps": 10,
                  "validation_every": 500, "validation_images": 2}
FULL_RECIPE = {"validation_every": 250, "validation_images": 8}


def resolve_eval_recipe(eval_cfg, model, data):
    """EvalConfig with its null recipe keys filled for this model (explicit values win)."""
    recipe = eval_cfg.recipe
    if recipe == "auto":
        recipe = "economy" if model.kind == "pretrained" else "full"
    validation = {k: getattr(eval_cfg, k) if getattr(eval_cfg, k) is not None else (FULL_RECIPE if recipe == "full" else ECONOMY_RECIPE)[k]
                  for k in ("validation_every", "validation_images")}
    if recipe == "full":
        return dataclasses.replace(eval_cfg, **validation)
    r = ECONOMY_RECIPE
    filled = {
        "resolution": eval_cfg.resolution or min(r["resolution"], data.resolution),
        "sample_steps": eval_cfg.sample_steps or r["sample_steps"],
        "screening_seeds": eval_cfg.screening_seeds if eval_cfg.screening_seeds is not None else screening_seeds(eval_cfg),
        "screening_sample_steps": eval_cfg.screening_sample_steps or r["screening_sample_steps"],
        **validation,
    }
    if filled["screening_seeds"] == []:  # screening_seeds: [] switches screening off
        filled["screening_seeds"], filled["screening_sample_steps"] = None, None
    return dataclasses.replace(eval_cfg, **filled)


def screening_seeds(eval_cfg) -> list:
    """The recipe's screening seeds: the first one, or as many of the first seeds as give each
    prompt set the 2 samples KID compares (one trigger prompt: two seeds)."""
    prompts = min(len(eval_cfg.trigger_prompts), len(eval_cfg.prior_prompts)) or 1
    n = max(ECONOMY_RECIPE["screening_seeds"], -(-2 // prompts))
    return list(eval_cfg.seeds[:n])


def validation_images(eval_cfg) -> int:
    """eval.validation_images, with the full recipe's where settings were built without a recipe."""
    return eval_cfg.validation_images or FULL_RECIPE["validation_images"]
