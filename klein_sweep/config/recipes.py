"""The evaluation recipe's defaults, resolved once when the settings are built: the keys a user
left null are filled from the recipe (eval.recipe), so MLflow params, the study's plan and the
cost preview all see the values that will run.

The economy recipe is expressed relative to the model's own recipe (model.sample_steps), so it
means the same on every model - the mini world measures what the real sweeps rely on
(docs/evaluation_cost.md, "Does the economy recipe find the same boundary?"):

  resolution        512 px at most: a forward at 512 px is 0.30x one at 1024 px (22.8 vs 75.8
                    TFLOP on the 9B); the metric networks look at 224-299 px anyway
  sample_steps      the model's own steps (9B / 4B: 50; the mini: 12). Measured on the mini world:
                    at 0.4 of them (5 of 12, screening at 2) the default sweep missed every collapse
                    but lr 4e-4's; at all 12 it found the full recipe's boundary exactly
  screening         every checkpoint with the first seed at the same steps, judged against the
                    base model's samples drawn the same way;
                    the full evaluation (every seed, sample_steps) where it decides: a screened
                    checkpoint that looks collapsed (at once), the two best and the one before the
                    first collapse (at the end, from LoRA snapshots)
  validation        the validation losses at the checkpoints and every 500 steps, on 2 training
                    images and 2 base prior samples x 3 noise levels (~2% of the evaluation); the
                    full recipe every 250 steps on 8 + 8 (0.37 s a point on one mini core)
"""

from __future__ import annotations

import dataclasses

ECONOMY_RECIPE = {"resolution": 512, "sample_steps_share": 1.0, "screening_seeds": 1, "screening_steps_share": 1.0,
                  "validation_every": 500, "validation_images": 2}
FULL_RECIPE = {"validation_every": 250, "validation_images": 8}
# eval.recipe=auto: the economy recipe wherever sampling is what a sweep pays for: the real models
# and the mini world, whose default sweep so runs what a real sweep runs (it found the full
# recipe's boundary on the three sweeps measured). The random tiny model (tests and smoke runs)
# samples in milliseconds and keeps the full one.
AUTO_RECIPE = {"pretrained": "economy", "mini": "economy", "tiny": "full"}


def recipe_name(eval_cfg, model) -> str:
    """`full` or `economy`: eval.recipe with auto decided for the model."""
    return AUTO_RECIPE[model.kind] if eval_cfg.recipe == "auto" else eval_cfg.recipe


def share_of_steps(share: float, model) -> int:
    """A share of the model's own denoising steps, at least 1."""
    return max(1, round(share * model.sample_steps))


def resolve_eval_recipe(eval_cfg, model, data):
    """EvalConfig with its null recipe keys filled for this model (explicit values win)."""
    recipe = recipe_name(eval_cfg, model)
    validation = {k: getattr(eval_cfg, k) if getattr(eval_cfg, k) is not None else (FULL_RECIPE if recipe == "full" else ECONOMY_RECIPE)[k]
                  for k in ("validation_every", "validation_images")}
    if recipe == "full":
        return dataclasses.replace(eval_cfg, **validation)
    r = ECONOMY_RECIPE
    filled = {
        "resolution": eval_cfg.resolution or min(r["resolution"], data.resolution),
        "sample_steps": eval_cfg.sample_steps or share_of_steps(r["sample_steps_share"], model),
        "screening_seeds": eval_cfg.screening_seeds if eval_cfg.screening_seeds is not None else screening_seeds(eval_cfg),
        "screening_sample_steps": eval_cfg.screening_sample_steps or share_of_steps(r["screening_steps_share"], model),
        **validation,
    }
    if filled["screening_seeds"] == []:  # screening_seeds: [] switches screening off
        filled["screening_seeds"], filled["screening_sample_steps"] = None, None
    return dataclasses.replace(eval_cfg, **filled)


def screening_seeds(eval_cfg) -> list:
    """The recipe's screening seeds: the first one, or as many of the first seeds as give each
    prompt set the 2 samples KID compares (one trigger prompt: two seeds)."""
    prompts = min(len(eval_cfg.trigger_prompts or [None]), len(eval_cfg.prior_prompts or [None])) or 1
    n = max(ECONOMY_RECIPE["screening_seeds"], -(-2 // prompts))
    return list(eval_cfg.seeds[:n])


def validation_images(eval_cfg) -> int:
    """eval.validation_images, with the full recipe's where settings were built without a recipe."""
    return eval_cfg.validation_images or FULL_RECIPE["validation_images"]
