"""Bayesian online change-point detection (Adams & MacKay 2007, arXiv:0710.3742) to *localise* a change.

A CUSUM says *that* a stream changed and, by the last time its statistic left zero, roughly *when*. BOCPD gives the
posterior distribution of the current run length r_t (observations since the last change), so after an alarm the
most probable start of the current segment, with its posterior probability, is the change-time estimate an alert
can carry (reference/statistics.md §Bayesian online change-point detection).

Per observation x_t, with constant hazard H = 1/λ and π_r the predictive probability of x_t under run r:
growth P(r_t = r+1) ∝ P(r_{t−1} = r)·π_r·(1−H); change P(r_t = 0) ∝ Σ_r P(r_{t−1} = r)·π_r·H; normalise; then each
run's sufficient statistics absorb x_t (run 0 holds the prior). Convention: r_t counts the observations of the current
segment, so the segment starts at observation t − r_t + 1 (1-based). Runs whose posterior mass falls below ``tol`` are
pruned and at most ``max_runs`` are kept, so memory and time per update are O(max_runs), whatever the stream length.

Conjugate models (``model=``):
- ``"bernoulli"``: Beta(a, b) prior on an event rate; predictive P(x=1) = a/(a+b).
- ``"normal"``: Normal-Gamma prior (mean μ₀, κ₀ pseudo-observations, precision Gamma(α₀, β₀)); predictive
  Student-t with 2α degrees of freedom, location μ and scale² β(κ+1)/(ακ) (Murphy 2007, "Conjugate Bayesian analysis
  of the Gaussian distribution", §7).
- ``"normal_known_var"``: Normal prior N(μ₀, τ₀²) on the mean with known noise variance σ²; predictive N(μ, v + σ²).

>>> import numpy as np
>>> rng = np.random.default_rng(1)
>>> xs = np.concatenate([rng.normal(0, 1, 100), rng.normal(3, 1, 50)])
>>> cp = Bocpd(model="normal_known_var", hazard=1 / 100, mu0=0.0, tau0=2.0, sigma=1.0)
>>> alarms = [cp.update(x) for x in xs]
>>> where = cp.change_point()
>>> where.index, where.probability > 0.5     # the second segment starts at observation 101
(101, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.special import gammaln

from monitors.detectors import restored, saved_state

_MODELS = ("bernoulli", "normal", "normal_known_var")


def _logsumexp(a: np.ndarray) -> float:
    """log Σ exp(a), shifted by the maximum (scipy.special.logsumexp does the same with ~100 µs of array-API
    dispatch per call in scipy 1.17, which would dominate an update)."""
    top = float(a.max())
    return top + math.log(float(np.exp(a - top).sum()))


@dataclass(frozen=True, slots=True)
class ChangePoint:
    """The most probable start of the current segment: 1-based index (in observations since the last reset), the
    posterior probability of exactly that run length, and of a start within ±``window`` of it."""

    index: int
    probability: float
    probability_near: float
    window: int


class Bocpd:
    """Bayesian online change-point detection with a conjugate model and constant hazard; river-style ``update``.

    ``update(x)`` returns True when a *new* change point becomes the maximum a posteriori read-out — the MAP run
    starts after the previously reported start, and the posterior probability of a start within ±``window``
    observations of it is ≥ ``threshold`` — and sets ``change_index`` to that start. Unlike the CUSUMs it does not
    restart after a detection: the run-length posterior already accounts for the change. ``statistic`` is the
    posterior probability that at least one change occurred since the last reset (1 − P(run covers every
    observation)). Memory: at most ``max_runs`` runs (two floats of sufficient statistics each) are kept.
    """

    name: ClassVar[str] = "bocpd"
    _params: ClassVar[tuple[str, ...]] = ("model", "hazard", "threshold", "window", "max_runs", "tol", "a0", "b0",
                                          "mu0", "kappa0", "alpha0", "beta0", "tau0", "sigma")

    def __init__(self, model: str = "normal", hazard: float = 1 / 250, threshold: float = 0.5, window: int = 3,
                 max_runs: int = 300, tol: float = 1e-8, *, a0: float = 1.0, b0: float = 1.0, mu0: float = 0.0,
                 kappa0: float = 1.0, alpha0: float = 1.0, beta0: float = 1.0, tau0: float = 1.0,
                 sigma: float = 1.0) -> None:
        if model not in _MODELS:
            raise ValueError(f"model must be one of {_MODELS}, got {model!r}")
        if not 0.0 < hazard < 1.0:
            raise ValueError(f"hazard is a per-observation change probability 1/λ in (0, 1), got {hazard}")
        if not 0.0 < threshold <= 1.0 or window < 0 or max_runs < 2 or not 0.0 <= tol < 1.0:
            raise ValueError(f"need 0 < threshold ≤ 1, window ≥ 0, max_runs ≥ 2 and 0 ≤ tol < 1; got "
                             f"threshold={threshold}, window={window}, max_runs={max_runs}, tol={tol}")
        for label, value in (("a0", a0), ("b0", b0), ("kappa0", kappa0), ("alpha0", alpha0), ("beta0", beta0),
                             ("tau0", tau0), ("sigma", sigma)):
            if not value > 0.0:
                raise ValueError(f"prior parameter {label} must be > 0, got {value}")
        self.model, self.hazard, self.threshold, self.window = model, float(hazard), float(threshold), int(window)
        self.max_runs, self.tol = int(max_runs), float(tol)
        self.a0, self.b0, self.mu0, self.kappa0 = float(a0), float(b0), float(mu0), float(kappa0)
        self.alpha0, self.beta0, self.tau0, self.sigma = float(alpha0), float(beta0), float(tau0), float(sigma)
        self._log_h, self._log_1mh = math.log(hazard), math.log1p(-hazard)
        self.reset()

    # --- interface ----------------------------------------------------------------------------------

    def reset(self) -> None:
        self.n = 0
        self.statistic = 0.0
        self.drift_detected = False
        self.change_index: int | None = None
        self._reported = 1  # the segment start last reported (1 = the beginning: no change)
        self.runs = np.zeros(1, dtype=np.int64)  # run lengths r, most recent (r = 0) first
        self.log_post = np.zeros(1)  # log P(r_t = r | x_1:t)
        self.suff = self._prior(1)  # sufficient statistics per run, shape (k, 2)

    def update(self, x: float) -> bool:
        x = self._check(x)
        self.n += 1
        log_pred = self._log_predictive(x)
        joint = self.log_post + log_pred
        log_change = _logsumexp(joint) + self._log_h
        log_growth = joint + self._log_1mh
        log_post = np.concatenate(([log_change], log_growth))
        log_post -= _logsumexp(log_post)
        runs = np.concatenate(([0], self.runs + 1))
        suff = np.concatenate((self._prior(1), self._absorb(self.suff, x)))
        keep = log_post >= math.log(self.tol) if self.tol > 0.0 else np.ones(log_post.size, dtype=bool)
        keep[0] = True  # the fresh run must stay: it carries the hazard
        if keep.sum() > self.max_runs:
            order = np.argsort(-log_post[1:], kind="stable")[: self.max_runs - 1] + 1
            keep = np.zeros(log_post.size, dtype=bool)
            keep[0] = True
            keep[order] = True
        if not keep.all():
            log_post = log_post[keep]
            log_post -= _logsumexp(log_post)
            runs, suff = runs[keep], suff[keep]
        self.runs, self.log_post, self.suff = runs, log_post, suff
        full = np.flatnonzero(runs == self.n)
        self.statistic = 1.0 - (float(np.exp(log_post[full[0]])) if full.size else 0.0)
        self.drift_detected = False
        where = self.change_point()
        if where is not None and where.index > self._reported and where.probability_near >= self.threshold:
            self._reported = self.change_index = where.index
            self.drift_detected = True
        return self.drift_detected

    def run_length_posterior(self) -> dict[int, float]:
        """P(r_t = r | x_1:t) for the retained run lengths (pruned ones carry < ``tol`` each)."""
        return {int(r): float(p) for r, p in zip(self.runs, np.exp(self.log_post), strict=True)}

    def change_point(self, window: int | None = None, given_change: bool = False) -> ChangePoint | None:
        """The most probable start of the current segment, or None when the most probable run covers every
        observation since the last reset (no change) or nothing has been observed. ``window`` defaults to the
        detector's. ``given_change=True`` conditions on a change having happened (another detector alarmed): the
        MAP among the runs that start after the first observation, probabilities renormalised over them."""
        window = self.window if window is None else window
        if self.n == 0:
            return None
        post = np.exp(self.log_post)
        starts = self.n - self.runs + 1
        if given_change:
            post = np.where(starts > 1, post, 0.0)
            if post.sum() <= 0.0:
                return None
            post = post / post.sum()
        best = int(np.argmax(post))
        if starts[best] <= 1:
            return None
        start = int(starts[best])
        near = post[np.abs(starts - start) <= window].sum()
        return ChangePoint(start, float(post[best]), float(min(1.0, near)), window)

    def state(self) -> dict[str, Any]:
        return saved_state(self, {p: getattr(self, p) for p in self._params},
                           {"reported": self._reported, "runs": self.runs.tolist(), "log_post": self.log_post.tolist(),
                            "suff": self.suff.tolist()})

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Bocpd:
        detector, s = restored(cls, d)
        detector._reported = int(s["reported"])
        detector.runs = np.asarray(s["runs"], dtype=np.int64)
        detector.log_post = np.asarray(s["log_post"], dtype=float)
        detector.suff = np.asarray(s["suff"], dtype=float).reshape(-1, 2)
        return detector

    def __repr__(self) -> str:
        return (f"Bocpd(model={self.model!r}, hazard={self.hazard:g}; n={self.n}, runs kept={self.runs.size}, "
                f"P(change)={self.statistic:.3g})")

    # --- conjugate models ------------------------------------------------------------------------------
    # Sufficient statistics per run, two columns for every model: bernoulli (a, b); normal_known_var (posterior mean,
    # posterior variance of the mean); normal (μ, β), with κ = κ₀ + r and α = α₀ + r/2 derived from the run length r.

    def _check(self, x: float) -> float:
        x = float(x)
        if self.model == "bernoulli":
            if x not in (0.0, 1.0):
                raise ValueError(f"the bernoulli model takes 0/1 observations, got {x!r}")
        elif not math.isfinite(x):
            raise ValueError(f"observations must be finite numbers, got {x!r}")
        return x

    def _prior(self, k: int) -> np.ndarray:
        if self.model == "bernoulli":
            row = (self.a0, self.b0)
        elif self.model == "normal_known_var":
            row = (self.mu0, self.tau0**2)
        else:
            row = (self.mu0, self.beta0)
        return np.tile(np.asarray(row, dtype=float), (k, 1))

    def _log_predictive(self, x: float) -> np.ndarray:
        s0, s1 = self.suff[:, 0], self.suff[:, 1]
        if self.model == "bernoulli":
            return np.log(s0 / (s0 + s1)) if x == 1.0 else np.log(s1 / (s0 + s1))
        if self.model == "normal_known_var":
            var = s1 + self.sigma**2
            return -0.5 * (np.log(2.0 * math.pi * var) + (x - s0) ** 2 / var)
        kappa = self.kappa0 + self.runs
        alpha = self.alpha0 + 0.5 * self.runs
        scale2 = s1 * (kappa + 1.0) / (alpha * kappa)  # Student-t with ν = 2α, location μ, scale² (Murphy 2007 eq. 110)
        nu = 2.0 * alpha
        return (gammaln(0.5 * (nu + 1.0)) - gammaln(0.5 * nu) - 0.5 * np.log(nu * math.pi * scale2)
                - 0.5 * (nu + 1.0) * np.log1p((x - s0) ** 2 / (nu * scale2)))

    def _absorb(self, suff: np.ndarray, x: float) -> np.ndarray:
        """Each run's statistics after x (runs are the lengths *before* x)."""
        s0, s1 = suff[:, 0], suff[:, 1]
        if self.model == "bernoulli":
            return np.column_stack((s0 + x, s1 + (1.0 - x)))
        if self.model == "normal_known_var":
            var = 1.0 / (1.0 / s1 + 1.0 / self.sigma**2)
            return np.column_stack((var * (s0 / s1 + x / self.sigma**2), var))
        kappa = self.kappa0 + self.runs
        mu = (kappa * s0 + x) / (kappa + 1.0)
        beta = s1 + kappa * (x - s0) ** 2 / (2.0 * (kappa + 1.0))
        return np.column_stack((mu, beta))


def localise(observations: Sequence[float] | np.ndarray, model: str = "normal", window: int = 3,
             given_change: bool = True, **params: Any) -> ChangePoint | None:
    """Where did the change happen? Run a fresh ``Bocpd`` over the observations that led to an alarm (e.g. a CUSUM's
    since its last reset, standardised) and return the most probable start of the last segment, 1-based in
    ``observations``. By default it conditions on a change having happened — the alarm says so, and right at an
    alarm the few changed observations rarely outweigh the prior's "no change" on their own."""
    detector = Bocpd(model, window=window, **params)
    for x in observations:
        detector.update(x)
    return detector.change_point(given_change=given_change)
