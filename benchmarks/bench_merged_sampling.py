"""Checkpoint sampling with the LoRA folded into the base weights (lora.adapters.merged_lora, what
evaluation does on float32 models) against peft's separate adapter path, in one run on this
machine: the default evaluation's 48 samples (16 trigger + 32 prior, 12 steps, CFG 4) of the mini
model with a rank-16 LoRA, single-threaded as the sweep's CPU workers run. Prints seconds for
both, the ratio, and the largest pixel difference between the two sets of samples.

    python benchmarks/bench_merged_sampling.py
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    import torch
    from bench_default_sweep import machine  # beside this script: one way to name the machine

    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.evaluation.evaluator import CheckpointEvaluator, eval_prompts
    from klein_sweep.lora.adapters import inject_lora, merged_lora
    from klein_sweep.training.trial import prepare_model, resolve_plan

    torch.set_num_threads(1)
    settings = build_settings(compose_config(["tracking=none", "eval=default"]))
    plan = resolve_plan(settings)
    trigger, prior = eval_prompts(settings)
    prepared = prepare_model(plan, extra_prompts=trigger + prior)
    evaluator = CheckpointEvaluator(settings, prepared.pipe, prepared.data, plan.examples)
    transformer, t = prepared.pipe.transformer, settings.train
    params = inject_lora(transformer, rank=t.rank, alpha=t.alpha, preset=t.targets, seed=0)
    with torch.no_grad():  # a trained-looking LoRA: B is zero at initialisation
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def sample():
        start = time.perf_counter()
        images = torch.cat([evaluator._sample(evaluator.trigger), evaluator._sample(evaluator.prior)])
        return images, time.perf_counter() - start

    sample()  # warm-up
    separate, separate_s = sample()
    with merged_lora(transformer):
        merged, merged_s = sample()
    print(f"machine: {machine()}, 1 thread; mini model, {len(merged)} samples per checkpoint")
    print("| LoRA during sampling | s per checkpoint's samples |")
    print("|---|---|")
    print(f"| separate (peft) | {separate_s:.2f} |")
    print(f"| merged into the weights | {merged_s:.2f} |")
    print(f"speed-up: {separate_s / merged_s:.2f}x; largest pixel difference: {float((merged - separate).abs().max()):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
