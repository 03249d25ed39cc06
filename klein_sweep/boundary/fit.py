"""The collapse boundary as a fitted curve with its uncertainty.

Model: log10(collapse step) ~ Normal(intercept + slope * log10(lr) + sum_k c_k * log10(x_k), sigma)

where the x_k are the other axes a sweep varied (AXES: the number of training images, the LoRA
rank); an axis enters the fit only where the sweep measured it at two or more values. Its
exponent c_k says how the boundary scales with it: for the number of images, c = 0 means the
boundary is a number of steps whatever the dataset, c = 1 a number of repeats per image
(steps = images x repeats / (batch x grad_accum)).

A checkpointed training never shows the exact collapse step, only an interval: the run was
fine at the last evaluated step before and collapsed at the first one after, so every point
is interval-censored, (low, high]. A run still fine at the end of its budget is right-censored
at the budget: it says "later than this", not "here". Both enter the maximum likelihood fit
as probabilities of their interval, so a learning rate that never collapsed still pulls the
line up instead of being dropped or counted as collapsing at the budget. The probabilities are
taken in log space (log_ndtr): 1 - ndtr(z) underflows to 0 for a censored point far above the
line and would flatten the gradient there.

Each coefficient's interval and the band come from a case bootstrap: the points are resampled
with replacement, refitted, and the interval is the central share of the refitted values.
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
# An empty interval (low = high: a point no line can explain) counts as this log-probability
# (e^-690 ~ 1e-300) instead of sending the likelihood to -inf.
LOG_PROBABILITY_FLOOR = -690.0
# The axes besides lr the fit can take an exponent for: the sweep key, and the name in the fit.
AXES = {"data.max_images": "images", "train.rank": "rank"}


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
    covariates: dict = field(default_factory=dict)  # the training's value of each of AXES' names, e.g. {"images": 10, "rank": 16}

    @property
    def censored(self) -> bool:
        return self.high is None


@dataclass(frozen=True)
class BoundaryFit:
    """log10(collapse step) = intercept + slope * log10(lr) + sum_k exponents[k] * log10(x_k),
    with a bootstrap interval for each coefficient and a band for the boundary."""

    slope: float
    intercept: float
    sigma: float
    n_points: int
    n_collapsed: int
    n_censored: int
    slope_interval: tuple[float, float]
    confidence: float = CONFIDENCE
    exponents: dict = field(default_factory=dict)  # axis name -> fitted exponent (only the axes measured at 2+ values)
    exponent_intervals: dict = field(default_factory=dict)  # axis name -> (low, high)
    ranges: dict = field(default_factory=dict)  # "lr" and every axis seen -> (lowest, highest) measured value
    bootstrap: list[tuple] = field(default_factory=list, repr=False, compare=False)  # (intercept, slope, *exponents) per refit

    @property
    def axes(self) -> list[str]:
        return list(self.exponents)

    def _log_step(self, theta, lr: float, at: dict | None) -> float:
        missing = [k for k in self.axes if not at or k not in at]
        if missing:
            raise ValueError(f"the boundary depends on {', '.join(missing)}: give its value")
        return theta[0] + theta[1] * math.log10(lr) + sum(c * math.log10(at[k]) for k, c in zip(self.axes, theta[2:]))

    def step_at(self, lr: float, at: dict | None = None) -> float:
        """The fitted collapse step at `lr` and the other axes' values `at` ({"images": 10})."""
        return 10 ** self._log_step((self.intercept, self.slope, *self.exponents.values()), lr, at)

    def interval_at(self, lr: float, at: dict | None = None) -> tuple[float, float]:
        """The band at `lr` (and `at`): the central `confidence` share of the refitted boundaries' steps."""
        import numpy as np

        if not self.bootstrap:
            s = self.step_at(lr, at)
            return s, s
        logs = np.array([self._log_step(theta, lr, at) for theta in self.bootstrap])
        tail = (1 - self.confidence) / 2 * 100
        lo, hi = np.percentile(logs, [tail, 100 - tail])
        return float(10 ** lo), float(10 ** hi)

    def to_json(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept, "sigma": self.sigma, "n_points": self.n_points,
                "n_collapsed": self.n_collapsed, "n_censored": self.n_censored, "slope_interval": list(self.slope_interval),
                "confidence": self.confidence, "exponents": dict(self.exponents),
                "exponent_intervals": {k: list(v) for k, v in self.exponent_intervals.items()},
                "ranges": {k: list(v) for k, v in self.ranges.items()},
                "bootstrap_samples": len(self.bootstrap), "bootstrap": [list(t) for t in self.bootstrap]}

    @classmethod
    def from_json(cls, d: dict) -> "BoundaryFit":
        """The fit as report.json stores it (a report without `bootstrap` has no band)."""
        return cls(slope=d["slope"], intercept=d["intercept"], sigma=d["sigma"], n_points=d["n_points"],
                   n_collapsed=d["n_collapsed"], n_censored=d["n_censored"], slope_interval=tuple(d["slope_interval"]),
                   confidence=d.get("confidence", CONFIDENCE), exponents=dict(d.get("exponents") or {}),
                   exponent_intervals={k: tuple(v) for k, v in (d.get("exponent_intervals") or {}).items()},
                   ranges={k: tuple(v) for k, v in (d.get("ranges") or {}).items()},
                   bootstrap=[tuple(t) for t in d.get("bootstrap") or []])


def fitted_axes(observations: list[Observation]) -> list[str]:
    """The axes (AXES' names) measured at two or more values, in AXES' order."""
    return [name for name in AXES.values() if len({o.covariates.get(name) for o in observations}) >= 2
            and all(o.covariates.get(name) for o in observations)]


def identifiable(observations: list[Observation], axes: list[str] = ()) -> bool:
    """A line needs collapses at two different learning rates, and each fitted axis two
    different values among them; censored points only bound it."""
    collapsed = [o for o in observations if not o.censored]
    return len({o.lr for o in collapsed}) >= 2 and all(len({o.covariates[k] for o in collapsed}) >= 2 for k in axes)


def measured_ranges(observations: list[Observation]) -> dict:
    out = {"lr": (min(o.lr for o in observations), max(o.lr for o in observations))}
    for name in AXES.values():
        values = [o.covariates[name] for o in observations if o.covariates.get(name)]
        if values:
            out[name] = (min(values), max(values))
    return out


def fit_boundary(observations: list[Observation], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> BoundaryFit | None:
    """The maximum likelihood boundary and its bootstrap intervals; None unless collapses were
    seen at two or more learning rates (an axis measured at two values but collapsing at only one
    is left out of the fit: nothing could place its exponent)."""
    from threadpoolctl import threadpool_limits

    obs = [o for o in observations if o.lr > 0 and (o.high is None or o.high > 0) and (o.high is not None or o.low > 0)]
    axes = [k for k in fitted_axes(obs) if identifiable(obs, [k])]
    if not identifiable(obs, axes):
        return None
    # One BLAS thread: the optimizer's BLAS calls work on vectors of 3-5 numbers, where threads
    # only synchronise, and on a busy machine they wait for each other (200 refits: 25 s with
    # OpenBLAS' 2 threads on 2 busy cores, 1.2 s with one).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit(obs, axes, samples, seed)


def _fit(obs: list[Observation], axes: list[str], samples: int, seed: int) -> BoundaryFit:
    import numpy as np

    theta = _mle(obs, axes)
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(samples):
        pick = [obs[i] for i in rng.integers(0, len(obs), len(obs))]
        if identifiable(pick, axes):
            refits.append(tuple(_mle(pick, axes, theta)[:-1]))
    tail = (1 - CONFIDENCE) / 2 * 100

    def interval(i: int) -> tuple[float, float]:
        values = [r[i] for r in refits] or [theta[i]]
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)

    return BoundaryFit(slope=theta[1], intercept=theta[0], sigma=theta[-1], n_points=len(obs),
                       n_collapsed=sum(not o.censored for o in obs), n_censored=sum(o.censored for o in obs),
                       slope_interval=interval(1), exponents={k: theta[2 + i] for i, k in enumerate(axes)},
                       exponent_intervals={k: interval(2 + i) for i, k in enumerate(axes)},
                       ranges=measured_ranges(obs), bootstrap=refits)


def log_interval_probability(lower, upper):
    """log(ndtr(upper) - ndtr(lower)), elementwise, without underflow: far in the upper tail the
    difference is taken as ndtr(-lower) - ndtr(-upper), and both as a log-difference of log_ndtr."""
    import numpy as np
    from scipy.special import log_ndtr

    flip = lower > 0  # both in the upper tail: mirror, where the small probabilities are representable
    a, b = np.where(flip, -upper, lower), np.where(flip, -lower, upper)
    log_b, log_a = log_ndtr(b), log_ndtr(a)
    with np.errstate(divide="ignore"):  # an empty interval: log 0, floored below
        out = log_b + np.log1p(-np.exp(np.minimum(log_a - log_b, 0.0)))
    return np.where(b > a, out, LOG_PROBABILITY_FLOOR)


def _mle(obs: list[Observation], axes: list[str], start: tuple | None = None) -> tuple:
    """(intercept, slope, *exponents, sigma) maximising the interval-censored likelihood,
    searched from `start` (a bootstrap refit starts from the full fit) or from least squares."""
    import numpy as np
    from scipy.optimize import minimize

    x = design(obs, axes)  # (points, 2 + axes): 1, log10 lr, log10 of each axis
    low = np.array([math.log10(o.low) if o.low > 0 else -np.inf for o in obs])
    high = np.array([math.log10(o.high) if o.high is not None else np.inf for o in obs])

    def nll(theta):
        """The negative log-likelihood and its gradient (analytic: a numerical one costs a
        likelihood per coefficient per step, and a report fits 200 bootstrap refits)."""
        excess = math.exp(theta[-1])
        sigma = SIGMA_FLOOR + excess
        mu = x @ theta[:-1]
        z_low, z_high = (low - mu) / sigma, (high - mu) / sigma
        log_p = log_interval_probability(z_low, z_high)
        # d log P / d mu = -(phi(z_high) - phi(z_low)) / (sigma P), each phi / P taken in log space
        # so far tails stay finite; an infinite end contributes 0 (phi and z phi vanish there).
        empty = ~(z_high > z_low)  # floored, constant: no gradient
        w_high, zw_high = _density_over(z_high, log_p, empty)
        w_low, zw_low = _density_over(z_low, log_p, empty)
        d_mu = (w_high - w_low) / sigma  # d nll / d mu, per point
        d_t = np.sum(zw_high - zw_low) / sigma * excess  # d nll / d log(sigma excess)
        return -np.sum(log_p), np.append(x.T @ d_mu, d_t)

    if start is None:
        x0 = [*_start(obs, axes), math.log(0.1)]
    else:
        x0 = [*start[:-1], math.log(max(start[-1] - SIGMA_FLOOR, 1e-3))]
    # sigma's excess over the floor is searched between e^-9 and e^1 (log10 units).
    x0[-1] = min(max(x0[-1], -9.0), 1.0)
    best = minimize(nll, x0=np.array(x0, dtype=float), jac=True, method="L-BFGS-B", bounds=[(None, None)] * (len(x0) - 1) + [(-9.0, 1.0)])
    return (*(float(v) for v in best.x[:-1]), SIGMA_FLOOR + math.exp(float(best.x[-1])))


def _density_over(z, log_p, empty):
    """(phi(z) / P, z phi(z) / P) elementwise; 0 where z is infinite or the interval empty."""
    import numpy as np

    finite = np.isfinite(z) & ~empty
    zf = np.where(finite, z, 0.0)
    w = np.exp(np.where(finite, -0.5 * zf ** 2 - 0.5 * math.log(2 * math.pi) - log_p, -np.inf))
    return w, zf * w


def design(obs: list[Observation], axes: list[str]):
    import numpy as np

    return np.array([[1.0, math.log10(o.lr), *(math.log10(o.covariates[k]) for k in axes)] for o in obs])


def _start(obs: list[Observation], axes: list[str]) -> list[float]:
    """Least squares through the collapsed points' interval centres (in log steps)."""
    import numpy as np

    collapsed = [o for o in obs if not o.censored]
    ys = np.array([math.log10(math.sqrt(o.low * o.high)) if o.low > 0 else math.log10(o.high) for o in collapsed])
    x = design(collapsed, axes)
    coef, *_ = np.linalg.lstsq(x, ys, rcond=None)
    return [float(c) for c in coef]
