"""Evaluation's share of a trial, full vs screening, on the mini world (CPU, no downloads).

Runs the same lr x steps grid twice in one process: every checkpoint evaluated in full (the
default), then screened (eval.screening_seeds: fewer samples, optionally fewer sampling steps)
with the full evaluation only at the checkpoints that decide the result. Prints training and
evaluation seconds per trial, evaluation's share, and whether both find the same best and
collapse steps.

    python benchmarks/bench_eval_share.py
    python benchmarks/bench_eval_share.py --lrs 1e-4 4e-4 --screening-seeds 0 --screening-steps 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def run(overrides: list[str], folder: Path) -> list:
    from sweep_helpers import compose_plan

    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import run_sweep

    plan = compose_plan(["+sweep=lr_vs_steps", "sweep.refine=false", "tracking=none", f"sweep.output_dir={folder}", *overrides])
    run_sweep(plan, progress=False)
    return sorted(open_study(plan, create=False).get_trials(), key=lambda t: t.number)


def summarise(label: str, trials) -> tuple[float, float]:
    train = sum(t.user_attrs["train_seconds"] for t in trials)
    evaluation = sum(t.user_attrs["eval_seconds"] for t in trials)
    print(f"{label}: train {train:.0f} s, evaluation {evaluation:.0f} s -> evaluation {evaluation / (train + evaluation):.0%} of trial time")
    for t in trials:
        print(f"  lr {t.params.get('train.lr')}: best step {t.user_attrs['best_step']}, collapse step "
              f"{t.user_attrs['collapse_step']}, state {t.user_attrs['state']}, value {t.value if t.value is not None else 'pruned'}")
    return train, evaluation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", nargs="+", default=["1e-4", "4e-4"])
    p.add_argument("--steps", nargs="+", default=["500", "1000", "1500", "2000", "2500"])
    p.add_argument("--screening-seeds", nargs="+", default=["0"])
    p.add_argument("--screening-steps", default=None, help="denoising steps of screening samples (default: the full recipe's)")
    args = p.parse_args(argv)
    grid = [f"sweep.params.train.lr.values=[{','.join(args.lrs)}]", f"sweep.params.train.steps.values=[{','.join(args.steps)}]"]
    screening = [f"eval.screening_seeds=[{','.join(args.screening_seeds)}]"]
    if args.screening_steps:
        screening.append(f"eval.screening_sample_steps={args.screening_steps}")
    with tempfile.TemporaryDirectory() as tmp:
        full = run(grid + [f"data.cache_dir={tmp}/cache"], Path(tmp) / "full")
        screened = run(grid + screening + [f"data.cache_dir={tmp}/cache"], Path(tmp) / "screened")
    _, eval_full = summarise("full evaluation at every checkpoint", full)
    _, eval_screened = summarise(f"screening ({' '.join(screening)})", screened)
    same = all((a.user_attrs["best_step"], a.user_attrs["collapse_step"]) == (b.user_attrs["best_step"], b.user_attrs["collapse_step"])
               for a, b in zip(full, screened))
    print(f"evaluation time screened / full: {eval_screened / eval_full:.2f}; same best and collapse steps: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
