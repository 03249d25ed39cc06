"""The distilled mini: a 4-step, no-CFG student of the shipped mini base, as FLUX.2 [klein] 9B /
4B are of their base models. `python -m klein_sweep.mini.build --only distilled`.

Guidance and step distillation by reflow: the teacher (the base, its own recipe: 12 steps, real
CFG 4) maps seeded noise z to a sample x0 for world captions; the student, initialised from the
teacher, learns the straight path between the two, velocity z - x0 at every point
(1 - t) x0 + t z, without the negative prompt. A straight path is walked exactly by a few Euler
steps, and the guidance is in the pairs, so 4 steps without CFG reproduce the teacher's samples.

Written to klein_sweep/mini/weights/distilled_transformer/ (the student transformer only: the
distilled Klein models share their base's VAE and text encoder, and so does this one).
"""

from __future__ import annotations

import logging
import random

import torch

log = logging.getLogger("klein_sweep.mini.build")

DISTILLED_DIR_NAME = "distilled_transformer"
PAIRS = 2048
STEPS = 2000
BATCH = 32
LR = 2e-4


@torch.no_grad()
def teacher_pairs(pipe, embeds: torch.Tensor, empty: torch.Tensor, recipe: tuple[int, float], seed: int):
    """(noise z, the teacher's sample x0 from it) for each prompt embedding: (n, 16, 8, 8) each."""
    from klein_sweep.evaluation.sampling import SampleRecipe, _initial_latents, generate_latents

    n = len(embeds)
    seeds = [100_000 + seed * n + i for i in range(n)]
    z = _initial_latents(pipe, [torch.Generator().manual_seed(s) for s in seeds], 32)
    x0 = generate_latents(pipe, embeds, empty, seeds, SampleRecipe(recipe[0], recipe[1], 32, 128))
    return z, x0


def distill(pipe, embeds: torch.Tensor, empty: torch.Tensor, teacher_recipe: tuple[int, float], seed: int = 0,
            steps: int = STEPS, batch: int = BATCH, lr: float = LR):
    """The student transformer (a trained copy of pipe.transformer) and what its training saw."""
    import copy

    from klein_sweep.mini.full_training import train_all_weights
    from klein_sweep.training.loop import Batch

    n_pairs = len(embeds)
    z, x0 = teacher_pairs(pipe, embeds, empty, teacher_recipe, seed)
    log.info("teacher sampled %d pairs", n_pairs)
    student = copy.deepcopy(pipe.transformer)

    def pair_batch(g: torch.Generator) -> Batch:
        idx = torch.randint(n_pairs, (batch,), generator=g)
        # uniform t: every point of a straight path is on the few-step sampler's way somewhere
        return Batch(x0[idx], embeds[idx], z[idx], torch.rand(batch, generator=g).clamp(1e-3, 1.0))

    loss = train_all_weights(student, pair_batch, steps=steps, lr=lr, weight_decay=0.0, seed=seed + 31, what="distillation")
    return student, {"pairs": n_pairs, "steps": steps, "batch": batch, "lr": lr, "final_loss": round(loss, 4)}


def build_distilled(weights_dir, world, measure_quality, teacher_recipe: tuple[int, float], seed: int = 0,
                    n_pairs: int = PAIRS) -> dict:
    """Distil, measure the three recipes on held-out captions, save the student. `world(pipe, n,
    seed) -> (prompt embeds, empty embeds)` draws captions; `measure_quality(pipe, features,
    recipe=)` is the build's quality check. Returns the figures build.json records."""
    import shutil

    from diffusers import Flux2KleinPipeline

    from klein_sweep.mini.features import load_mini_features
    from klein_sweep.models.registry import DISTILLED_GUIDANCE, DISTILLED_STEPS

    torch.manual_seed(seed)
    random.seed(seed)
    pipe = Flux2KleinPipeline.from_pretrained(weights_dir / "pipeline").to(torch.float32)
    features = load_mini_features()
    result = {}
    base, _ = measure_quality(pipe, features, recipe=teacher_recipe)
    base_4, _ = measure_quality(pipe, features, recipe=(DISTILLED_STEPS, DISTILLED_GUIDANCE))
    embeds, empty = world(pipe, n_pairs, seed)
    student, result["training"] = distill(pipe, embeds, empty, teacher_recipe, seed=seed)
    teacher = pipe.transformer
    pipe.transformer = student
    distilled, _ = measure_quality(pipe, features, recipe=(DISTILLED_STEPS, DISTILLED_GUIDANCE))
    pipe.transformer = teacher
    result["quality_256_held_out_captions"] = {
        f"base, {teacher_recipe[0]} steps, CFG {teacher_recipe[1]:g}": base,
        f"base, {DISTILLED_STEPS} steps, no CFG": base_4,
        f"distilled, {DISTILLED_STEPS} steps, no CFG": distilled,
    }
    log.info("distilled mini quality: %s", result["quality_256_held_out_captions"])
    out = weights_dir / DISTILLED_DIR_NAME
    if out.exists():
        shutil.rmtree(out)
    student.save_pretrained(out, safe_serialization=True)
    return result
