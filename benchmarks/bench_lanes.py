"""Lanes against one LoRA per training, on the embedded mini model, in one run on this machine:
the default sweep's learning rates trained for N steps each on the single-LoRA path (the
reference), then as lanes of one batched forward, single-threaded as the sweep's CPU workers run.
Prints seconds per optimizer step per LoRA for both, the ratio, and how far each lane's LoRA is
from its reference (relative norm of the difference).

    python benchmarks/bench_lanes.py                 # 5 lrs x 300 steps, lanes of 1, 2, 3 and 5
    python benchmarks/bench_lanes.py --steps 100 --lanes 3
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

LRS = [5e-5, 1e-4, 1.5e-4, 2e-4, 4e-4]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lanes", type=int, nargs="*", default=[2, 3, 5], help="lane counts to time (besides 1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from bench_default_sweep import machine  # beside this script: one way to name the machine

    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.training.lanes import LaneAdapters
    from klein_sweep.training.loop import LaneSpec, train_lanes
    from klein_sweep.training.loop import train_lora
    from klein_sweep.training.trial import inject_trial_lora, prepare_model, resolve_plan

    torch.set_num_threads(args.threads)
    settings = build_settings(compose_config(["tracking=none", f"train.steps={args.steps}"]))
    plan = resolve_plan(settings)
    prepared = prepare_model(plan)
    transformer = prepared.pipe.transformer

    def fresh_lora():
        if getattr(transformer, "_hf_peft_config_loaded", False):
            transformer.unload_lora()
        return inject_trial_lora(transformer, settings)

    reference, single_s = {}, 0.0
    for lr in LRS:
        params = fresh_lora()
        start = time.perf_counter()
        train_lora(transformer, params, prepared.data, dataclasses.replace(settings.train, lr=lr),
                   steps=args.steps, device="cpu", progress=False)
        single_s += time.perf_counter() - start
        reference[lr] = [p.detach().clone() for p in params]
    per_single = single_s / (len(LRS) * args.steps)

    print(f"machine: {machine()}, {args.threads} thread(s); mini model, {len(LRS)} lrs x {args.steps} steps")
    print("| path | s per step per LoRA | speed-up | worst lane difference (relative) |")
    print("|---|---|---|---|")
    print(f"| one LoRA per training (reference) | {per_single * 1000:.1f} ms | 1.00x | - |")
    for n in args.lanes:
        total, worst = 0.0, 0.0
        for first in range(0, len(LRS), n):
            lrs = LRS[first:first + n]
            fresh_lora()
            adapters = LaneAdapters(transformer, len(lrs))
            start = time.perf_counter()
            train_lanes(transformer, adapters, [LaneSpec(lr=lr) for lr in lrs], prepared.data, settings.train,
                        steps=args.steps, device="cpu", progress=False)
            total += time.perf_counter() - start
            for i, lr in enumerate(lrs):
                worst = max(worst, max(float((a.detach() - b).norm() / b.norm()) for a, b in zip(adapters.params[i], reference[lr])))
        per = total / (len(LRS) * args.steps)
        print(f"| lanes of {n} | {per * 1000:.1f} ms | {per_single / per:.2f}x | {worst:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
