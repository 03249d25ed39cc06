"""The evaluation plan in words: what a sweep will sample and measure at its checkpoints, printed
by the dry run (sweep.dry_run=true) before any GPU hour is spent."""

from __future__ import annotations

from klein_sweep.config import Settings


def describe_evaluation(settings: Settings, checkpoints: list[int]) -> str:
    """Prompts, seeds, resolution, steps, which checkpoints get the full recipe, the validation
    losses and the metric networks, as indented lines."""
    from klein_sweep.config.recipes import recipe_name
    from klein_sweep.evaluation.evaluator import eval_prompts, sample_recipe
    from klein_sweep.evaluation.network_choice import resolve_networks

    e, m = settings.eval, settings.model
    if not e.enabled:
        return "evaluation plan: none (eval.enabled=false): only the training loss is tracked"
    trigger, prior = eval_prompts(settings)
    recipe = sample_recipe(settings)
    cfg = f", CFG {recipe.guidance_scale:g}" if recipe.guidance_scale > 1 else ", no CFG"
    lines = [f"evaluation plan (eval.recipe {recipe_name(e, m)}; {m.name}'s own recipe: {m.sample_steps} steps"
             f"{f', CFG {m.guidance_scale:g}' if m.guidance_scale > 1 else ''})"]
    lines.append(f"  trigger prompts ({len(trigger)}) x seeds {list(e.seeds)}:")
    lines += [f"    {p}" for p in trigger]
    lines.append(f"  prior prompts ({len(prior)}, no trigger: leak and prior preservation) x the same seeds:")
    lines += [f"    {p}" for p in prior]
    steps = ", ".join(str(s) for s in checkpoints)
    full = f"{len(e.seeds)} seeds at {recipe.resolution} px, {recipe.steps} steps{cfg}"
    if e.screening_seeds:
        lines.append(f"  every checkpoint ({steps}): screened with seeds {list(e.screening_seeds)} at {recipe.resolution} px, "
                     f"{e.screening_sample_steps or recipe.steps} steps{cfg}, judged against the base model's samples drawn the same way")
        lines.append(f"  the full recipe ({full}) where it decides: a screened checkpoint that looks collapsed (at once: "
                     "a collapse is declared on full values only), the two best and the one before the first collapse")
    else:
        lines.append(f"  every checkpoint ({steps}): the full recipe, {full}")
    if e.lora_scales != [1.0]:
        lines.append(f"  each checkpoint also at LoRA strengths {[s for s in e.lora_scales if s != 1.0]}")
    if e.also_distilled:
        lines.append("  each checkpoint's LoRA also on the distilled model (4 steps, no CFG)")
    every = f"every {e.validation_every} steps and " if e.validation_every else ""
    lines.append(f"  validation losses: {every}at each checkpoint, on {e.validation_images} training images and "
                 f"{e.validation_images} base prior samples x noise levels {e.validation_sigmas}")
    feature, identity = resolve_networks(e, m.kind)
    lines.append(f"  metric networks: {feature} (KID, FID{', IS' if feature in ('inception', 'mini', 'random_conv') else ''}), "
                 f"{identity or feature} (identity, leak)")
    return "\n".join(lines)
