"""Steps as checkpoints vs retraining every cell, on the reproduce_2500_2e-4 grid, and the share
of trial time spent in evaluation.

    python benchmarks/bench_sweep_checkpoints.py [--scale 10] [--model tiny]

Runs the grid lr {1e-4, 1.5e-4, 2e-4} x steps {1000, 1500, 2000, 2500} / scale twice on the CPU:
  checkpoints: constant schedule -> one training per lr, evaluated at every step value
  retrain:     cosine schedule   -> every (lr, steps) cell trained from scratch (the schedule
               depends on the total, so the sweep must); the per-step work is the same
and prints optimizer steps, training seconds and evaluation seconds of each, read back from the
study storage the sweeps wrote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = (1000, 1500, 2000, 2500)


def run(mode: str, scale: int, model: str, workdir: Path) -> dict:
    steps = [s // scale for s in STEPS]
    args = [
        sys.executable, "-m", "klein_sweep", "+sweep=reproduce_2500_2e-4", f"model={model}", "tracking=none",
        f"sweep.params.train.steps.values=[{','.join(map(str, steps))}]", f"sweep.output_dir={workdir / mode}",
        f"data.cache_dir={workdir / 'cache'}", "hydra.run.dir=" + str(workdir / "hydra" / mode),
    ]
    if mode == "retrain":
        args.append("train.lr_schedule=cosine")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} sweep failed:\n{proc.stderr[-3000:]}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="reproduce_2500_2e-4", storage=f"sqlite:///{workdir / mode / 'study.db'}")
    trials = [t for t in study.get_trials() if "train_seconds" in t.user_attrs]
    return {
        "trainings": len(trials),
        "optimizer_steps": sum(max(r["step"] for r in t.user_attrs["checkpoints"]) for t in trials),
        "train_s": sum(t.user_attrs["train_seconds"] for t in trials),
        "eval_s": sum(t.user_attrs["eval_seconds"] for t in trials),
        "evaluations": sum(len(t.user_attrs["checkpoints"]) for t in trials),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10, help="divide the grid's step values by this (CPU time)")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {mode: run(mode, args.scale, args.model, work) for mode in ("checkpoints", "retrain")}
    print(f"reproduce_2500_2e-4 grid on model={args.model}, steps / {args.scale}: "
          f"{[s // args.scale for s in STEPS]}")
    print(f"{'mode':<12} {'trainings':>9} {'opt steps':>9} {'train s':>8} {'evals':>6} {'eval s':>7} {'eval share':>10}")
    for mode, r in results.items():
        share = r["eval_s"] / (r["train_s"] + r["eval_s"])
        print(f"{mode:<12} {r['trainings']:>9} {r['optimizer_steps']:>9} {r['train_s']:>8.1f} {r['evaluations']:>6} "
              f"{r['eval_s']:>7.1f} {share:>10.0%}")
    a, b = results["checkpoints"], results["retrain"]
    print(f"optimizer-step ratio retrain / checkpoints: {b['optimizer_steps'] / a['optimizer_steps']:.2f}x")
    print(f"training-time ratio retrain / checkpoints:  {b['train_s'] / a['train_s']:.2f}x")
    print(f"whole-trial ratio (train + eval):           {(b['train_s'] + b['eval_s']) / (a['train_s'] + a['eval_s']):.2f}x")


if __name__ == "__main__":
    main()
