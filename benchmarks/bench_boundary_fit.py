"""The boundary fit with the likelihood's analytic gradient against the same fit with a
numerical one (what scipy does without `jac`), in one run on this machine: the committed
lr_vs_steps_images report's 12 trainings (lr x number of images, interval- and right-censored),
fitted with its 200 bootstrap refits each way. Prints the seconds of each, the ratio, and the
largest difference in the coefficients (the same maximum) and in the interval ends.

    python benchmarks/bench_boundary_fit.py
    python benchmarks/bench_boundary_fit.py --report sweeps/lr_vs_steps/report.json --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def observations(report: dict):
    """The report's trainings as the fit sees them: (fine at, first collapsed] per training."""
    from klein_sweep.boundary.fit import AXES, Observation

    out = []
    for t in report["boundary"]["trainings"]:
        setting = t["setting"]
        axes = {name: float(setting[key]) for key, name in AXES.items() if key in setting}
        high = t["collapse_step"]
        out.append(Observation(float(setting["train.lr"]), float(t["fine_at"] or 0), float(high) if high else None, covariates=axes))
    return out


def timed_fit(obs, numerical: bool, repeats: int):
    import scipy.optimize

    from klein_sweep.boundary import fit as fit_module

    real = scipy.optimize.minimize

    def without_gradient(fun, x0, jac=None, **kw):  # the value alone: scipy differentiates numerically
        return real(lambda theta: fun(theta)[0], x0, **kw)

    scipy.optimize.minimize = without_gradient if numerical else real
    try:
        best, result = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            result = fit_module.fit_boundary(obs)
            best = min(best, time.perf_counter() - start)
        return best, result
    finally:
        scipy.optimize.minimize = real


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", default=str(REPO / "sweeps" / "lr_vs_steps_images" / "report.json"))
    parser.add_argument("--repeats", type=int, default=3, help="fits each way; the fastest counts")
    args = parser.parse_args(argv)
    from bench_default_sweep import machine  # beside this script: one way to name the machine

    obs = observations(json.loads(Path(args.report).read_text()))
    analytic_s, analytic = timed_fit(obs, numerical=False, repeats=args.repeats)
    numerical_s, numerical = timed_fit(obs, numerical=True, repeats=args.repeats)
    def coefficients(f):
        return [f.intercept, f.slope, *f.exponents.values()]

    def interval_ends(f):
        return [*f.slope_interval, *(v for iv in f.exponent_intervals.values() for v in iv)]

    print(f"machine: {machine()}")
    print(f"fit of {len(obs)} trainings, axes lr + {', '.join(analytic.axes) or 'none'}, {len(analytic.bootstrap)} bootstrap refits")
    print(f"analytic gradient   {analytic_s:7.2f} s")
    print(f"numerical gradient  {numerical_s:7.2f} s")
    print(f"speed-up            {numerical_s / analytic_s:7.2f}x")
    # The maximum is the same; the 200 refits' interval ends move with where each optimizer stops
    # on the flat likelihood of a few resampled points.
    print(f"largest difference in the coefficients: {max(abs(x - y) for x, y in zip(coefficients(analytic), coefficients(numerical))):.1e}")
    print(f"largest difference in the interval ends: {max(abs(x - y) for x, y in zip(interval_ends(analytic), interval_ends(numerical))):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
