"""The collapse boundary as a fitted curve with its uncertainty.

Model: log10(collapse step) ~ Normal(intercept + slope * log10(lr), sigma).

A checkpointed training never shows the exact collapse step, only an interval: the run was
fine at the last evaluated step before and collapsed at the first one after, so every point
is interval-censored, (low, high]. A run still fine at the end of its budget is right-censored
at the budget: it says "later than this", not "here". Both enter the maximum likelihood fit
as probabilities of their interval, so a learning rate that never collapsed still pulls the
line up instead of being dropped or counted as collapsing at the budget.

The confidence band comes from a case bootstrap: the points are resampled with replacement,
refitted, and the band at each lr is the central interval of the refitted predictions.
Pure numpy/scipy: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# sigma's floor (log10 units: 0.01 = 2.3% in steps). Points that all fit one line would
# otherwise drive sigma to 0 and the likelihood to a cliff.
SIGMA_FLOOR = 0.01
BOOTSTRAP_SAMPLES = 200
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.90


@dataclass(frozen=True)
class Observation:
    """One training's evidence about its collapse step: fine at `low` (0: no checkpoint
    before), first seen collapsed at `high`; `high` None = still fine at `low`, the end of its
    training (right-censored)."""

    lr: float
    low: float
    high: float | None
    source: str = "grid"  # grid | extend (continued past the grid) | bisect (an lr placed by refinement)
    label: str = ""

    @property
    def censored(self) -> bool:
        return self.high is None


@dataclass(frozen=True)
class BoundaryFit:
    """log10(collapse step) = intercept + slope * log10(lr), with a bootstrap band."""

    slope: float
    intercept: float
    sigma: float
    n_points: int
    n_collapsed: int
    n_censored: int
    slope_interval: tuple[float, float]
    confidence: float = CONFIDENCE
    bootstrap: list[tuple[float, float]] = field(default_factory=list, repr=False, compare=False)  # (intercept, slope) per refit

    def step_at(self, lr: float) -> float:
        return 10 ** (self.intercept + self.slope * math.log10(lr))

    def interval_at(self, lr: float) -> tuple[float, float]:
        """The band at `lr`: the central `confidence` share of the refitted boundaries' steps."""
        import numpy as np

        if not self.bootstrap:
            s = self.step_at(lr)
            return s, s
        x = math.log10(lr)
        logs = np.array([a + b * x for a, b in self.bootstrap])
        tail = (1 - self.confidence) / 2 * 100
        lo, hi = np.percentile(logs, [tail, 100 - tail])
        return float(10 ** lo), float(10 ** hi)

    def to_json(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "sigma": self.sigma, "n_points": self.n_points,
                "n_collapsed": self.n_collapsed, "n_censored": self.n_censored, "slope_interval": list(self.slope_interval),
                "confidence": self.confidence, "bootstrap_samples": len(self.bootstrap)}


def identifiable(observations: list[Observation]) -> bool:
    """A line needs collapses at two different learning rates; censored points only bound it."""
    return len({o.lr for o in observations if not o.censored}) >= 2


def fit_boundary(observations: list[Observation], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> BoundaryFit | None:
    """The maximum likelihood line and its bootstrap band; None unless collapses were seen at two
    or more learning rates."""
    import numpy as np

    obs = [o for o in observations if o.lr > 0 and (o.high is None or o.high > 0) and (o.high is not None or o.low > 0)]
    if not identifiable(obs):
        return None
    intercept, slope, sigma = _mle(obs)
    start = (intercept, slope, sigma)
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(samples):
        pick = [obs[i] for i in rng.integers(0, len(obs), len(obs))]
        if identifiable(pick):
            a, b, _ = _mle(pick, start)
            refits.append((a, b))
    tail = (1 - CONFIDENCE) / 2 * 100
    slopes = [b for _, b in refits] or [slope]
    lo, hi = np.percentile(slopes, [tail, 100 - tail])
    return BoundaryFit(slope=slope, intercept=intercept, sigma=sigma, n_points=len(obs),
                       n_collapsed=sum(not o.censored for o in obs), n_censored=sum(o.censored for o in obs),
                       slope_interval=(float(lo), float(hi)), bootstrap=refits)


def _mle(obs: list[Observation], start: tuple[float, float, float] | None = None) -> tuple[float, float, float]:
    """(intercept, slope, sigma) maximising the interval-censored likelihood, searched from
    `start` (a bootstrap refit starts from the full fit) or from least squares."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import ndtr

    x = np.array([math.log10(o.lr) for o in obs])
    low = np.array([math.log10(o.low) if o.low > 0 else -np.inf for o in obs])
    high = np.array([math.log10(o.high) if o.high is not None else np.inf for o in obs])

    def nll(theta):
        a, b, t = theta
        sigma = SIGMA_FLOOR + math.exp(t)
        mu = a + b * x
        upper = ndtr((high - mu) / sigma)
        lower = ndtr((low - mu) / sigma)
        return -np.sum(np.log(np.clip(upper - lower, 1e-300, None)))

    if start is None:
        a0, b0 = _start(obs)
        x0 = [a0, b0, math.log(0.1)]
    else:
        x0 = [start[0], start[1], math.log(max(start[2] - SIGMA_FLOOR, 1e-3))]
    # sigma's excess over the floor is searched between e^-9 and e^1 (log10 units).
    x0[2] = min(max(x0[2], -9.0), 1.0)
    best = minimize(nll, x0=x0, method="L-BFGS-B", bounds=[(None, None), (None, None), (-9.0, 1.0)])
    a, b, t = best.x
    return float(a), float(b), SIGMA_FLOOR + math.exp(float(t))


def _start(obs: list[Observation]) -> tuple[float, float]:
    """Least squares through the collapsed points' interval centres (in log steps)."""
    import numpy as np

    pts = [(math.log10(o.lr), math.log10(math.sqrt(o.low * o.high)) if o.low > 0 else math.log10(o.high))
           for o in obs if not o.censored]
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    if len(set(xs)) < 2:
        return float(ys.mean()), 0.0
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)
