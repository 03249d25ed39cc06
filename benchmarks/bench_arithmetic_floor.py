"""The embedded default sweep's arithmetic floor on this machine, measured in one run: how much of
a training step, a checkpoint's evaluation (full and screening) and a validation point on the mini model is matrix
products and attention (the FLOPs the sweep cannot skip), how much is everything else
(element-wise kernels, copies, per-op overhead), and the wall time a sweep would take if
everything else cost nothing.

    python benchmarks/bench_arithmetic_floor.py                     # applied to the committed default sweep
    python benchmarks/bench_arithmetic_floor.py --report RUN/sweeps/lr_vs_steps/report.json --wall SECONDS   # your own run
    python benchmarks/bench_arithmetic_floor.py --steps 20          # shorter

Single-threaded, as the sweep's CPU workers run. Arithmetic time is the profiler's self CPU time
of the matrix-product, attention and convolution kernels (ARITHMETIC below); the step, evaluation
and validation times are taken without the profiler. The sweep's work comes from its report.json: the
optimizer steps its trainings ran (a lane counts as one training), its screened checkpoints and
full evaluations (report.json "evaluations"), and its validation points. Run it on the machine you want to judge: the floor moves with its matrix
speed, which this prints as GFLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LRS = [5e-5, 1e-4, 1.5e-4]  # a lane group of the default sweep's 2 workers (3 + 2 lrs)
# Kernels that do the model's arithmetic (their self time; their callers' time is not counted twice).
ARITHMETIC = {
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
}


@dataclasses.dataclass
class Split:
    wall_s: float  # one unit (step, evaluation, validation point), timed without the profiler
    arithmetic_s: float  # of it, in ARITHMETIC kernels (profiled)
    gflop: float  # counted FLOPs of one unit

    @property
    def share(self) -> float:
        return self.arithmetic_s / self.wall_s


def arithmetic_seconds(fn, units: int) -> float:
    """Self CPU seconds of ARITHMETIC kernels per unit, profiling `fn` (which runs `units` units)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ARITHMETIC) / 1e6 / units


def counted_gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sweep_work(report_path: Path) -> dict:
    """Optimizer steps, sampled checkpoints and validation points of a finished sweep, from its
    report.json: each lr's training (with its continuations, which resume without retraining)
    ends at its collapse or at the last step it was fine; every sampled checkpoint also has a
    validation point, so the validation points tell both counts."""
    report = json.loads(report_path.read_text())
    steps = sum(t["collapse_step"] or t["fine_at"] or 0 for t in report["boundary"]["trainings"])
    points = [p for trial in report.get("validation") or [] for p in trial["points"]]
    metrics = report.get("answer", {}).get("metrics", {})
    # report.json's counts (older reports: the sampled validation points, one per checkpoint).
    # With screening (the economy recipe) every sampled checkpoint was screened and some of them
    # evaluated in full too; without it, each sampled checkpoint was one full evaluation.
    counts = report.get("evaluations") or {"sampled": sum(1 for p in points if p["sampled"]), "full": 0}
    sampled, full = counts["sampled"], counts["full"]
    return {"steps": int(steps), "screened": sampled if full else 0, "evaluations": full or sampled,
            "validation": sum(1 for p in points if not p["sampled"]),
            "worker_s": metrics.get("cost/measured_train_seconds", 0.0) + metrics.get("cost/measured_eval_seconds", 0.0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps timed per training path")
    parser.add_argument("--report", type=Path, default=REPO / "sweeps" / "lr_vs_steps" / "report.json",
                        help="a finished sweep's report.json (default: the committed default sweep's)")
    parser.add_argument("--wall", type=float, default=382.0,
                        help="the sweep's measured wall seconds (default: the committed default sweep's run, 382 s)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes the sweep ran (2 on 2 cores)")
    args = parser.parse_args(argv)

    import torch
    from bench_default_sweep import machine  # beside this script: one way to name the machine

    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.evaluation.evaluator import CheckpointEvaluator, eval_prompts
    from klein_sweep.evaluation.validation import ValidationLosses
    from klein_sweep.training.lanes import LaneAdapters
    from klein_sweep.training.loop import LaneSpec, train_lanes
    from klein_sweep.training.loop import flow_matching_loss, train_lora, BatchSampler
    from klein_sweep.training.trial import inject_trial_lora, prepare_model, resolve_plan

    torch.set_num_threads(1)
    settings = build_settings(compose_config(["+sweep=lr_vs_steps", "tracking=none"]))
    plan = resolve_plan(settings)
    trigger, prior = eval_prompts(settings)
    prepared = prepare_model(plan, extra_prompts=trigger + prior)
    pipe, data, train_cfg = prepared.pipe, prepared.data, settings.train
    full_recipe = dataclasses.replace(settings, eval=dataclasses.replace(settings.eval, screening_seeds=None))
    evaluator = CheckpointEvaluator(full_recipe, pipe, data, plan.examples)  # every seed
    evaluator.compute_base()
    screening = list(settings.eval.screening_seeds or settings.eval.seeds[:1])
    screener = CheckpointEvaluator(dataclasses.replace(settings, eval=dataclasses.replace(
        settings.eval, seeds=screening, sample_steps=settings.eval.screening_sample_steps or settings.eval.sample_steps)),
        pipe, data, plan.examples)
    screener.compute_base()
    validation = ValidationLosses(settings, pipe, data)
    transformer = pipe.transformer
    params = inject_trial_lora(transformer, settings)
    with torch.no_grad():  # a trained-looking LoRA: B is zero at initialisation
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def single(n):
        return lambda: train_lora(transformer, params, data, train_cfg, steps=n, device="cpu", progress=False)

    adapters = LaneAdapters(transformer, len(LRS))

    def lanes(n):
        return lambda: train_lanes(transformer, adapters, [LaneSpec(lr) for lr in LRS], data, train_cfg,
                                   steps=n, device="cpu", progress=False)

    def one_step_flops():
        loss = flow_matching_loss(transformer, BatchSampler(data, train_cfg, "cpu").next(), "cpu")
        loss.backward()
        transformer.zero_grad(set_to_none=True)

    profiled = max(5, args.steps // 4)
    single(3)()  # warm-up
    step_gflop = counted_gflop(one_step_flops)
    splits = {
        "training step, one LoRA": Split(timed(single(args.steps)) / args.steps,
                                         arithmetic_seconds(single(profiled), profiled), step_gflop),
        f"training step, lanes of {len(LRS)} (per lane)": Split(timed(lanes(args.steps)) / args.steps / len(LRS),
                                                  arithmetic_seconds(lanes(profiled), profiled * len(LRS)), step_gflop),
    }
    n_full = len(evaluator.settings.eval.seeds) * (len(trigger) + len(prior))
    n_screened = len(screening) * (len(trigger) + len(prior))
    screener.evaluate()  # warm-up
    screen_name = f"screening evaluation ({n_screened} samples)"
    splits[screen_name] = Split(timed(screener.evaluate), arithmetic_seconds(screener.evaluate, 1), counted_gflop(screener.evaluate))

    def full():  # as the sweep runs it: after the checkpoint's screening, whose samples it reuses
        evaluator.evaluate(known=screener.drawn)

    full()  # warm-up
    shared = n_screened if screener.recipe == evaluator.recipe else 0  # drawn alike: reused
    full_name = f"full evaluation ({n_full} samples, {shared} of them the screening's)"
    splits[full_name] = Split(timed(full), arithmetic_seconds(full, 1), counted_gflop(full))
    splits["validation point"] = Split(timed(lambda: validation.measure(transformer)),
                                       arithmetic_seconds(lambda: validation.measure(transformer), 1),
                                       counted_gflop(lambda: validation.measure(transformer)))

    print(f"machine: {machine()}, 1 thread; mini model, torch {torch.__version__}")
    print("| unit | wall | arithmetic | share | GFLOP | arithmetic GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, s in splits.items():
        print(f"| {name} | {s.wall_s * 1000:.1f} ms | {s.arithmetic_s * 1000:.1f} ms | {s.share:.0%} | {s.gflop:.2f} | "
              f"{s.gflop / s.arithmetic_s:.0f} |")

    work = sweep_work(args.report)
    lane = splits[f"training step, lanes of {len(LRS)} (per lane)"]
    ev, sc, val = splits[full_name], splits[screen_name], splits["validation point"]
    units = ((work["steps"], lane), (work["evaluations"], ev), (work["screened"], sc), (work["validation"], val))
    floor = sum(n * unit.arithmetic_s for n, unit in units)
    at_speed = sum(n * unit.wall_s for n, unit in units)
    print(f"\nthe sweep in {args.report.relative_to(REPO) if args.report.is_relative_to(REPO) else args.report}: "
          f"{work['steps']} optimizer steps, {work['evaluations']} full evaluations, {work['screened']} screened checkpoints, "
          f"{work['validation']} validation points; {work['worker_s']:.0f} worker-seconds measured there")
    print(f"at this machine's measured speed (every step as a lane): {at_speed:.0f} worker-seconds")
    print(f"its arithmetic alone: {floor:.0f} worker-seconds = {floor / args.workers:.0f} s of wall time on {args.workers} workers "
          f"(the sweep took {args.wall:.0f} s: {args.wall / (floor / args.workers):.2f}x its arithmetic floor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
