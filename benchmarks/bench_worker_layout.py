"""How the embedded default sweep should spread its training over a machine's cores, measured in
one run on the mini model: the grid's learning rates as lanes in one single-threaded worker
process alone (what bench_lanes.py and bench_arithmetic_floor.py time), two such workers at once
(the default on 2 cores: one per core), and one worker training all five lrs as lanes on every
core's thread. Prints each layout's time per optimizer step, the lane-steps per second the whole
machine trains, and how fast a worker runs beside another against alone: the reason a sweep's
measured worker-seconds exceed the single-process benchmarks' speeds.

    python benchmarks/bench_worker_layout.py                     # 60 steps, 2 rounds
    python benchmarks/bench_worker_layout.py --steps 20 --rounds 1

Each measurement runs in fresh processes that load the model first and start timing together;
the rounds alternate the layouts, so a machine whose speed drifts moves them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LRS = [5e-5, 1e-4, 1.5e-4, 2e-4, 4e-4]  # the default sweep's grid


def child(lanes: int, threads: int, steps: int) -> None:
    """One worker: load the mini model, say ready, wait for go, train `lanes` lanes for `steps`
    optimizer steps and print the seconds it took."""
    import torch

    from klein_sweep.config import build_settings, compose_config
    from klein_sweep.training.lanes import LaneAdapters
    from klein_sweep.training.loop import LaneSpec, train_lanes
    from klein_sweep.training.trial import inject_trial_lora, prepare_model, resolve_plan

    torch.set_num_threads(threads)
    settings = build_settings(compose_config(["tracking=none"]))
    prepared = prepare_model(resolve_plan(settings))
    transformer = prepared.pipe.transformer
    inject_trial_lora(transformer, settings)
    adapters = LaneAdapters(transformer, lanes)
    specs = [LaneSpec(lr) for lr in LRS[:lanes]]

    def train(n: int) -> None:
        train_lanes(transformer, adapters, specs, prepared.data, settings.train, steps=n, device="cpu", progress=False)

    train(3)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()  # go
    start = time.perf_counter()
    train(steps)
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def run_together(configs: list[tuple[int, int]], steps: int) -> list[float]:
    """Start one child per (lanes, threads), let all of them load, then time them at once.
    Returns each child's seconds."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as logs:
        errors = [open(Path(logs) / f"worker{i}.err", "w+") for i in range(len(configs))]
        procs = [subprocess.Popen([sys.executable, __file__, "--child", str(lanes), str(threads), str(steps)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
                 for (lanes, threads), err in zip(configs, errors)]

        def failed(i: int) -> RuntimeError:
            errors[i].seek(0)
            return RuntimeError(f"a worker ({configs[i][0]} lanes, {configs[i][1]} threads) exited with code "
                                f"{procs[i].wait()}:\n{errors[i].read()[-3000:]}")

        try:
            for i, p in enumerate(procs):
                while (line := p.stdout.readline()) and line.strip() != "ready":
                    pass
                if not line:
                    raise failed(i)
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            seconds = []
            for i, p in enumerate(procs):
                out, _ = p.communicate(timeout=3600)
                if p.returncode != 0:
                    raise failed(i)
                seconds.append(json.loads(out.strip().splitlines()[-1])["seconds"])
            return seconds
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for err in errors:
                err.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps each worker times")
    parser.add_argument("--rounds", type=int, default=2, help="times each layout is measured (alternating)")
    parser.add_argument("--child", type=int, nargs=3, metavar=("LANES", "THREADS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    sys.path.insert(0, str(HERE))
    from bench_default_sweep import machine  # beside this script: one way to name the machine

    cores = os.cpu_count() or 1
    layouts = {
        "one worker, 1 thread, lanes of 3, the other core idle": [(3, 1)],
        f"{cores} workers at once, 1 thread each, lanes of 3 each (the default)": [(3, 1)] * cores,
        f"one worker, {cores} threads, all 5 lrs as lanes": [(5, cores)],
    }
    slowest: dict[str, list[float]] = {name: [] for name in layouts}  # per round: the slowest worker's seconds
    each: dict[str, list[float]] = {name: [] for name in layouts}  # every worker's seconds
    for _ in range(args.rounds):
        for name, configs in layouts.items():
            seconds = run_together(configs, args.steps)
            slowest[name].append(max(seconds))
            each[name].extend(seconds)

    print(f"machine: {machine()}; mini model, {args.steps} optimizer steps per worker, {args.rounds} round(s), the faster round")
    print("| layout | ms per optimizer step (each worker) | lane-steps per second, whole machine | vs the default |")
    print("|---|---|---|---|")
    rates = {}
    for name, configs in layouts.items():
        wall = min(slowest[name])  # the faster round
        rates[name] = sum(lanes for lanes, _ in configs) * args.steps / wall
    default = list(layouts)[1]
    for name, configs in layouts.items():
        per_step = ", ".join(f"{s / args.steps * 1000:.1f}" for s in each[name])
        print(f"| {name} | {per_step} | {rates[name]:.1f} | {rates[name] / rates[default]:.2f}x |")
    alone = min(each[list(layouts)[0]]) / args.steps
    beside = min(each[default]) / args.steps
    print(f"a worker beside {cores - 1} other(s) trains at {alone / beside:.2f}x its speed alone "
          f"({beside * 1000:.1f} against {alone * 1000:.1f} ms a step, the fastest of each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
