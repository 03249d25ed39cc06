"""The cost preview of a sweep: trainings, optimizer steps, checkpoints evaluated, train and
eval PFLOP, the evaluation's share and the predicted hours on a named GPU at a stated model
FLOP utilisation. `sweep.dry_run=true` prints it and writes sweeps/<name>/cost.json; every real
sweep logs it to its parent run.

What is counted (transformer FLOPs, see flops.py):
  training     steps x grad_accum micro-steps, each forward + backward at train.batch_size
               (+ one forward more with gradient checkpointing: the recomputation)
  evaluation   at each checkpoint: (trigger + prior prompts) x seeds x LoRA strengths samples,
               each sample_steps forwards, x2 with classifier-free guidance (guidance_scale > 1);
               with screening, the screening seeds / steps at every checkpoint and the full
               evaluation at 2 deciding checkpoints per trial; with eval.also_distilled, the
               same prompts on the distilled recipe (4 steps, no CFG) at every checkpoint
  validation   at each checkpoint and every eval.validation_every steps: (validation images +
               prior samples) x validation sigmas forwards, no sampling loop
  reference    the base model's samples once per sweep: trigger + prior + prior at other seeds,
               and the prior samples of the validation loss once more
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from klein_sweep.config import Settings
from klein_sweep.config.recipes import validation_images
from klein_sweep.cost.flops import model_flops
from klein_sweep.cost.gpus import peak_tflops
from klein_sweep.sweep.plan import SweepPlan, apply_params, search_corners, trial_plan

# Full evaluations per trial under screening: the two best screened checkpoints (two more
# around a collapse when there is one; the preview cannot know, so it counts the common case).
FULL_EVALS_WITH_SCREENING = 2


@dataclass
class SweepCost:
    model: str
    trainings: int
    optimizer_steps: int
    checkpoints_evaluated: int
    samples: int
    train_pflop: float
    eval_pflop: float
    gpu: str
    mfu: float  # training's model FLOP utilisation
    sample_mfu: float  # sampling's
    refine_max_pflop: float = 0.0  # sweep.refine: the most refinement can add (every lr continued, every bisection run)
    refine_max_steps: int = 0

    @property
    def eval_share(self) -> float:
        total = self.train_pflop + self.eval_pflop
        return self.eval_pflop / total if total else 0.0

    @property
    def gpu_hours(self) -> float:
        seconds = (self.train_pflop / self.mfu + self.eval_pflop / self.sample_mfu) * 1e15 / (peak_tflops(self.gpu) * 1e12)
        return seconds / 3600

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "eval_share": round(self.eval_share, 4), "gpu_hours": round(self.gpu_hours, 4),
                "peak_tflops": peak_tflops(self.gpu)}


def sampling(settings: Settings):
    """(the evaluation's sample recipe, FLOPs of one denoising step of one image: one forward,
    two with classifier-free guidance)."""
    from klein_sweep.evaluation.evaluator import sample_recipe

    recipe = sample_recipe(settings)
    forwards = 2 if recipe.guidance_scale > 1 else 1
    return recipe, forwards * model_flops(settings, recipe.resolution).forward


def evaluation_flops(settings: Settings, checkpoints: int) -> tuple[float, int]:
    """(FLOPs, samples) of evaluating one trial's `checkpoints` checkpoints."""
    from klein_sweep.models.registry import DISTILLED_STEPS

    e = settings.eval
    recipe, step_flops = sampling(settings)
    prompts = len(e.trigger_prompts) + len(e.prior_prompts)
    strengths = len(e.lora_scales)

    def evaluations(seeds: int, steps: int, times: int) -> tuple[float, int]:
        n = prompts * seeds * strengths * times
        return n * steps * step_flops, n

    if e.screening_seeds:
        screen = evaluations(len(e.screening_seeds), e.screening_sample_steps or recipe.steps, checkpoints)
        full = evaluations(len(e.seeds), recipe.steps, min(FULL_EVALS_WITH_SCREENING, checkpoints))
        flops, samples = screen[0] + full[0], screen[1] + full[1]
    else:
        flops, samples = evaluations(len(e.seeds), recipe.steps, checkpoints)
    if e.also_distilled:
        n = prompts * len(e.seeds) * checkpoints  # the distilled recipe: no CFG, one forward a step
        flops, samples = flops + n * DISTILLED_STEPS * model_flops(settings, recipe.resolution).forward, samples + n
    return flops, samples


def validation_flops(settings: Settings, points: int, n_images: int) -> float:
    """FLOPs of the validation losses at `points` steps of one trial: forwards only, the fit
    set at the training resolution, the prior samples at the evaluation's."""
    e = settings.eval
    recipe, _ = sampling(settings)
    k = validation_images(e)
    fit = min(k, n_images) * model_flops(settings, settings.data.resolution).forward
    prior = min(k, len(e.prior_prompts) * len(e.seeds)) * model_flops(settings, recipe.resolution).forward
    return points * len(e.validation_sigmas) * (fit + prior)


def reference_flops(settings: Settings) -> tuple[float, int]:
    """The base model's own samples, drawn once: trigger, prior, prior at other seeds, and the
    prior once more as latents for the validation loss."""
    e = settings.eval
    recipe, step_flops = sampling(settings)
    n = (len(e.trigger_prompts) + 2 * len(e.prior_prompts)) * len(e.seeds)
    n += min(validation_images(e), len(e.prior_prompts) * len(e.seeds))
    return n * recipe.steps * step_flops, n


def estimate_sweep_cost(plan: SweepPlan) -> SweepCost:
    """Count every trial the plan will run (a search: n_trials at the mean of its corners); hours
    on sweep.cost_gpu at sweep.cost_mfu (training) and sweep.cost_sample_mfu (sampling)."""
    gpu = plan.sweep.cost_gpu
    peak_tflops(gpu)  # an unknown GPU is refused before anything is counted
    cells = plan.cells or search_corners(plan.sweep)
    weight = 1.0 if plan.cells else (plan.sweep.n_trials or 1) / len(cells)
    trainings = steps_total = checkpoints_total = samples_total = 0.0
    train_flops = eval_flops = 0.0
    settings = None
    for cell in cells:
        settings = apply_params(plan.base_cfg, cell, output_dir=str(plan.output_dir))
        t_plan = trial_plan(settings, plan)
        t = t_plan.settings.train
        flops = model_flops(t_plan.settings, t_plan.settings.data.resolution)
        micro = flops.train_step + (flops.forward * t.batch_size if t.gradient_checkpointing else 0.0)
        checkpoints = len(t_plan.checkpoints) if settings.eval.enabled else 0
        e_flops, e_samples = evaluation_flops(t_plan.settings, checkpoints) if checkpoints else (0.0, 0)
        if checkpoints:
            points = checkpoints + len(t_plan.validation_steps)
            e_flops += validation_flops(t_plan.settings, points, len(t_plan.examples))
        trainings += weight
        steps_total += weight * t_plan.steps
        checkpoints_total += weight * checkpoints
        samples_total += weight * e_samples
        train_flops += weight * t_plan.steps * t.grad_accum * micro
        eval_flops += weight * e_flops
    if settings is not None and settings.eval.enabled:
        ref_flops, ref_samples = reference_flops(settings)
        eval_flops += ref_flops
        samples_total += ref_samples
    refine_steps, refine_flops = refinement_bound(plan, t_plan, micro) if plan.sweep.refine and settings else (0, 0.0)
    return SweepCost(model=settings.model.name if settings else "", trainings=round(trainings), optimizer_steps=round(steps_total),
                     checkpoints_evaluated=round(checkpoints_total), samples=round(samples_total),
                     train_pflop=train_flops / 1e15, eval_pflop=eval_flops / 1e15, gpu=gpu, mfu=plan.sweep.cost_mfu,
                     sample_mfu=plan.sweep.cost_sample_mfu,
                     refine_max_pflop=refine_flops / 1e15, refine_max_steps=refine_steps)


def refinement_bound(plan: SweepPlan, t_plan, micro_flops: float) -> tuple[int, float]:
    """(steps, FLOPs) refinement adds at most: every grid training continued to the budget and
    every allowed bisection trained to the grid's last step and continued too, evaluated every
    refine_every steps. Collapses stop them earlier: what runs is usually much less."""
    from klein_sweep.sweep.refinement import refine_policy

    policy = refine_policy(plan)
    settings, t = t_plan.settings, t_plan.settings.train
    lrs = len(plan.sweep.params["train.lr"].values)
    groups = max(1, len(plan.cells) // lrs)
    bisections = groups * policy.max_bisections
    continued = len(plan.cells) + bisections
    steps = continued * (policy.budget - policy.grid_steps) + bisections * policy.grid_steps
    checkpoints = steps // policy.every
    e_flops = evaluation_flops(settings, checkpoints)[0] if settings.eval.enabled and checkpoints else 0.0
    return steps, steps * t.grad_accum * micro_flops + e_flops


def render_cost(cost: SweepCost, name: str) -> str:
    rows = [
        ("model", cost.model),
        ("trainings", f"{cost.trainings}"),
        ("optimizer steps", f"{cost.optimizer_steps:,}"),
        ("checkpoints evaluated", f"{cost.checkpoints_evaluated}"),
        ("samples drawn", f"{cost.samples:,}"),
        ("train PFLOP", f"{cost.train_pflop:,.1f}"),
        ("eval PFLOP", f"{cost.eval_pflop:,.1f}"),
        ("eval share", f"{cost.eval_share:.0%}"),
        (f"predicted {cost.gpu} hours (training at {cost.mfu:.0%} MFU, sampling at {cost.sample_mfu:.0%})", f"{cost.gpu_hours:,.2f}"),
    ]
    if cost.refine_max_steps:
        total = cost.train_pflop + cost.eval_pflop
        rows.append(("refinement, at most (sweep.refine)", f"+{cost.refine_max_steps:,} steps, +{cost.refine_max_pflop:,.1f} PFLOP "
                     f"(+{cost.refine_max_pflop / total:.0%}); collapses end it sooner" if total else ""))
    width = max(len(k) for k, _ in rows)
    lines = [f"cost preview of sweep {name} (transformer FLOPs counted on the meta device; nothing was run)"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def write_cost(cost: SweepCost, folder: Path) -> Path:
    from klein_sweep.fileio import replaced_atomically

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cost.json"
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(cost.to_json(), indent=2))
    return path
