"""Exact run lengths of the detectors, and thresholds for a target in-control ARL.

A threshold that is guessed gives an unknown false-alarm rate; every threshold vigil uses is solved from an exact
average run length (ARL), then cross-checked by simulation in the tests (reference/statistics.md).

Methods
- Normal CUSUM and EWMA: the integral equation for the ARL function solved by the Nyström method with Gauss–Legendre
  quadrature (Crowder 1987, *Technometrics* 29:401; Knoth 2005, *Stat. Comput.* 15:341). The kernels are smooth, so
  the error falls geometrically in the node count: with the node counts below the values agree with the published
  tables to all printed digits and move < 1e-8 (relative) when the node count is doubled. (The published two-sided
  CUSUM ARL0 168 for k = 0.5, h = 4 is 167.7 exactly; a Brook–Evans chain with 2,000 states agrees to 5 digits.)
- EWMA with variance-adjusted ("exact") limits: the same quadrature run forward as a *time-varying* recursion on the
  density of the no-alarm paths for the first T steps, until (1−λ)^{2T} < 1e-8 and the limits equal the fixed ones to
  1e-8; the remaining run length is the fixed-limit ARL function. Accuracy is the quadrature's (< 1e-6 relative);
  the cost is T ≈ 9/λ small solves (4 ms at λ = 0.1, 0.3 s at λ = 0.02).
- Bernoulli and risk-adjusted CUSUMs: the Markov chain of Brook & Evans (1972, *Biometrika* 59:539) on a grid of width
  Δ with paired rounding (Knoth, Wittenberg & Gan 2019, *Stat. Med.* 38:2206): an increment of z grid steps goes to
  ⌊z⌋ or ⌊z⌋+1 with probabilities that keep its mean. The transition matrix is banded (reflections at 0 fall inside
  the lower band), so it is solved with a banded LU (LAPACK gbsv) at a cost of states × lower × total bandwidth.
  * Bernoulli: the chart in its scaled form B = max(0, B + y − γ) (Reynolds & Stoumbos 1999 §3) is a walk with two
    steps, so the grid is aligned with the frequent negative step ln((1−p1)/(1−p0)) = −cΔ, exact in c cells, with
    c the smallest that gives Δ ≤ 0.01 — raised by up to 25 % when that puts the rare positive step close to a whole
    number of cells (γ close to a rational r/m on the grid), so that its paired rounding moves the ARL by < 0.1 %.
    The states number ≈ h/Δ ≈ 1,000–2,000 for ARL0 ≤ 1e7, whatever p0. When the negative step is one cell (p0 ≲ 0.01)
    the chain is skip-free downwards and its ARL satisfies a linear recurrence solved from the top down in O(states)
    time and memory (shooting on the one unknown ARL of the top state, vectorised over runs of equations that
    depend only on known values; stable while p ≤ p1, checked by its residual); otherwise, and for larger p, the
    banded LU, whose lower bandwidth c (≤ 51 for p0 ≤ 0.5, odds ratio 2) stays small. The chain with n states
    stands for the threshold (n + ½)Δ (paired rounding makes the alarm level uniform within a cell) and ln ARL is
    interpolated linearly between cells, so ARL(h) and the threshold are continuous in h. Measured against chains
    with 256 cells per positive step (2–9× finer), likewise interpolated: < 0.5 % for p0 in [0.005, 0.5] (odds
    ratio 2), ARL0 in [1e3, 1e7], in control and at p1; against Monte Carlo of the unrounded chart, within 1.3 SE
    of ≈ 1 % (tests). A threshold takes 4–6 solves (a Newton step on ln ARL with slope 1 per log-likelihood unit,
    then secant steps; up to 10 for ARL0 < 1e4 where ln ARL bends), ≤ 8 ms and < 5 MB over that range. The banded
    fallback refuses bands over 64 MB (out-of-control ARLs of designs with p0 ≲ 0.001).
  * Risk-adjusted: the grid width makes the rounding add ≤ 0.1 % to the variance of one step; measured error
    against a 30× finer grid ≈ 0.4 % (Parsonnet-like mix, R_A = 2 and 0.5), a few ms per solve. In control the
    true odds are R_0 × the predicted odds (the chart's null hypothesis); the mix may be given as a histogram.
  For the risk-adjusted chain the grid does not depend on h, so ARL(h) is a step function of h; thresholds are the
  smallest grid h that reaches the target ARL0, returned at the middle of the grid cell.

Every exact ARL is cached by its parameters rounded to 10 significant digits.

Brook–Evans chains (end of the module) are the second exact route for the Normal CUSUM (``cusum_arl_markov``, error
∝ 1/states², agreeing with the Nyström values to < 2e-5 at 500 states) and give whole run-length distributions:
``conditional_delay`` is the expected detection delay of a change that comes after τ in-control observations, the
"exact optimum" the detection-delay benchmark compares against.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from scipy.linalg import solve_banded
from scipy.optimize import brentq
from scipy.special import ndtr

from monitors.detectors import Detector

_CUSUM_NODES = 32
_EWMA_NODES_PER_WIDTH = 3.0  # quadrature nodes per kernel sd (λ) across the interval [−c, c]
_EWMA_MIN_NODES, _EWMA_MAX_NODES = 24, 400
_EXACT_LIMITS_TOL = 1e-8
_BERNOULLI_MAX_CELL = 0.01  # grid width, log-likelihood units
_BERNOULLI_WIDEN = 1.25  # how far the cells per down step may rise to align the up step
_BERNOULLI_ROUNDING_ERROR = 1e-3
_BERNOULLI_MAX_BAND_BYTES = 64_000_000
_RA_ROUNDING_VARIANCE = 1e-3
_MAX_STATES = 400_000
_MAX_ARL = 1e11
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SIDES = ("two", "upper", "lower")


def _r(x: float) -> float:
    """Round to 10 significant digits: the cache key of an exact ARL."""
    return float(f"{x:.10g}")


def _gauss_legendre(n: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    x, w = _legendre(n)
    half = 0.5 * (b - a)
    return a + half * (x + 1.0), half * w


@lru_cache(maxsize=64)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / _SQRT_2PI


def _check_arl0(arl0: float) -> None:
    if not 1.0 < arl0 <= _MAX_ARL / 10:
        raise ValueError(f"target ARL0 must be a number of events in (1, {_MAX_ARL / 10:g}], got {arl0}")


def _reliable(arl: float, what: str) -> float:
    """The linear solves lose precision as the ARL approaches 1/machine-epsilon; refuse rather than mislead."""
    if not 0.0 < arl <= _MAX_ARL:
        raise ValueError(f"{what}: the ARL exceeds {_MAX_ARL:g}, beyond where it can be computed reliably; "
                         "lower the threshold or the target ARL0")
    return arl


def _solve_increasing(log_arl: Callable[[float], float], arl0: float, lo: float, hi: float, what: str) -> float:
    """Root of a continuous increasing log-ARL: bracket by secant steps (log ARL is close to linear in the threshold,
    so the bracket overshoots the target only a little and stays where the ARL is computable), then Brent's method."""
    target = math.log(arl0)
    at_lo = log_arl(lo)
    if at_lo >= target:
        raise ValueError(f"ARL0 {arl0:g} is below what any {what} threshold gives ({math.exp(at_lo):.3g})")
    while (at_hi := log_arl(hi)) < target:
        slope = (at_hi - at_lo) / (hi - lo)
        lo, at_lo, hi = hi, at_hi, hi + min(0.5 * hi, max(0.05 * hi, 1.1 * (target - at_hi) / slope))
    return brentq(lambda x: log_arl(x) - target, lo, hi, xtol=1e-7, rtol=1e-10)


# --- Tabular CUSUM on N(δ, 1) -----------------------------------------------------------------


@lru_cache(maxsize=8192)
def _cusum_upper_arl(k: float, h: float, shift: float) -> float:
    """Zero-state ARL of S = max(0, S + X − k), X ~ N(shift, 1), alarm S > h.

    L(z) = 1 + L(0)·Φ(k − z − δ) + ∫₀ʰ L(y) φ(y − z + k − δ) dy, solved at z = 0 and the Gauss–Legendre nodes.
    """
    n = max(_CUSUM_NODES, math.ceil(2.0 * h) + 16)  # the kernel has sd 1: keep ≥ 2 nodes per unit of h
    y, w = _gauss_legendre(n, 0.0, h)
    z = np.concatenate(([0.0], y))
    a = np.eye(n + 1)
    a[:, 0] -= ndtr(k - z - shift)
    a[:, 1:] -= w * _phi(y[None, :] - z[:, None] + k - shift)
    return _reliable(float(np.linalg.solve(a, np.ones(n + 1))[0]), f"CUSUM k={k}, h={h}")


def cusum_arl(k: float, h: float, shift: float = 0.0, sided: str = "two") -> float:
    """Zero-state ARL of a tabular CUSUM (Page 1954) on N(shift, 1) observations, in observations.

    Each side is exact (Nyström, see the module docstring); two-sided combines them as
    1/ARL = 1/ARL⁺ + 1/ARL⁻ (Lucas & Crosier 1982), which is accurate to < 0.1 % for k ≥ 0.25 and is how the
    published two-sided tables are computed.

    >>> round(cusum_arl(0.5, 4.0), 1), round(cusum_arl(0.5, 4.0, shift=1.0), 2)
    (167.7, 8.38)
    """
    if sided not in _SIDES:
        raise ValueError(f"sided must be one of {_SIDES}, got {sided!r}")
    if k < 0 or h <= 0:
        raise ValueError(f"CUSUM needs k ≥ 0 and h > 0 (in sd units), got k={k}, h={h}")
    k, h, shift = _r(k), _r(h), _r(shift)
    up = _cusum_upper_arl(k, h, shift) if sided != "lower" else math.inf
    down = _cusum_upper_arl(k, h, -shift) if sided != "upper" else math.inf
    return 1.0 / (1.0 / up + 1.0 / down)


def cusum_threshold(k: float, arl0: float, sided: str = "two") -> float:
    """The h (sd units) at which a tabular CUSUM with reference value k has in-control ARL ``arl0``.

    >>> round(cusum_threshold(0.5, 465.0), 2)
    5.0
    """
    _check_arl0(arl0)
    return _solve_increasing(lambda h: math.log(cusum_arl(k, h, 0.0, sided)), arl0, 1e-3, 4.0, "CUSUM")


# --- EWMA on N(δ, 1) ---------------------------------------------------------------------------


def _ewma_sigma(lam: float) -> float:
    return math.sqrt(lam / (2.0 - lam))


def _ewma_kernel(z: np.ndarray, y: np.ndarray, lam: float, shift: float) -> np.ndarray:
    """Transition density of Z' = (1−λ)Z + λX from each z (rows) to each y (columns)."""
    return _phi((y[None, :] - (1.0 - lam) * z[:, None]) / lam - shift) / lam


def _ewma_nodes(lam: float, c: float) -> int:
    return int(min(_EWMA_MAX_NODES, max(_EWMA_MIN_NODES, math.ceil(_EWMA_NODES_PER_WIDTH * 2.0 * c / lam))))


@lru_cache(maxsize=2048)
def _ewma_fixed_solution(lam: float, c: float, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes, weights and ARL values of L(z) = 1 + ∫₋꜀ᶜ L(y) K(z, y) dy (Crowder 1987)."""
    y, w = _gauss_legendre(_ewma_nodes(lam, c), -c, c)
    a = np.eye(y.size) - _ewma_kernel(y, y, lam, shift) * w
    return y, w, np.linalg.solve(a, np.ones(y.size))


def _ewma_fixed_arl_at(z: np.ndarray, lam: float, c: float, shift: float) -> np.ndarray:
    """The fixed-limit ARL function at arbitrary points, by Nyström interpolation."""
    y, w, values = _ewma_fixed_solution(lam, c, shift)
    arl = 1.0 + _ewma_kernel(z, y, lam, shift) @ (w * values)
    _reliable(float(arl.max(initial=1.0)), f"EWMA λ={lam}, c={c}")
    return arl


@lru_cache(maxsize=2048)
def _ewma_exact_arl(lam: float, c: float, shift: float) -> float:
    """ARL with limits c·sqrt(1 − (1−λ)^{2t}): forward density recursion, then the fixed-limit ARL function."""
    decay2 = (1.0 - lam) ** 2
    steps = max(1, math.ceil(math.log(_EXACT_LIMITS_TOL) / math.log(decay2)))
    n = _ewma_nodes(lam, c)
    arl = 1.0  # P(N > 0)
    x, w = _gauss_legendre(n, -c * math.sqrt(1.0 - decay2), c * math.sqrt(1.0 - decay2))
    density = _phi(x / lam - shift) / lam  # Z_1 = λX_1 starts from the point mass at 0
    factor = decay2
    for _ in range(steps - 1):
        arl += float(w @ density)  # P(N > t)
        factor *= decay2
        ct = c * math.sqrt(1.0 - factor)
        x_next, w_next = _gauss_legendre(n, -ct, ct)
        density = (w * density) @ _ewma_kernel(x, x_next, lam, shift)
        x, w = x_next, w_next
    return arl + float((w * density) @ _ewma_fixed_arl_at(x, lam, c, shift))


def ewma_arl(lam: float, L: float, shift: float = 0.0, limits: str = "fixed") -> float:
    """Zero-state ARL of a two-sided EWMA (Roberts 1959) with limits ±L·σ_Z on N(shift, 1) observations.

    ``limits="fixed"`` uses the asymptotic σ_Z = sqrt(λ/(2−λ)); ``"exact"`` the variance-adjusted
    σ_Z·sqrt(1 − (1−λ)^{2t}), computed by a time-varying quadrature recursion (module docstring), not simulation.

    >>> round(ewma_arl(0.1, 2.814)), round(ewma_arl(0.1, 2.814, shift=1.0), 1)
    (500, 10.3)
    """
    if not 0.0 < lam <= 1.0 or L <= 0:
        raise ValueError(f"EWMA needs 0 < λ ≤ 1 and L > 0, got λ={lam}, L={L}")
    lam, shift = _r(lam), _r(shift)
    c = _r(L * _ewma_sigma(lam))
    if limits == "fixed":
        return float(_ewma_fixed_arl_at(np.zeros(1), lam, c, shift)[0])
    if limits == "exact":
        return _ewma_exact_arl(lam, c, shift)
    raise ValueError(f"limits must be 'fixed' or 'exact', got {limits!r}")


def ewma_threshold(lam: float, arl0: float, limits: str = "fixed") -> float:
    """The limit width L (sd of the EWMA statistic) that gives in-control ARL ``arl0``.

    >>> round(ewma_threshold(0.1, 500.0), 3)
    2.814
    """
    _check_arl0(arl0)
    return _solve_increasing(lambda L: math.log(ewma_arl(lam, L, 0.0, limits)), arl0, 1e-2, 3.0, "EWMA")


# --- Upper CUSUM on a discrete increment distribution: Markov chain ------------------------------


def _chain_arl(steps: np.ndarray, probs: np.ndarray, delta: float, m: int) -> float:
    """Zero-state ARL of S = max(0, S + W), alarm S > h, on the grid {0, Δ, …, mΔ} (m = ⌊h/Δ⌋).

    W takes value ``steps[i]`` with probability ``probs[i]``; each is split between its two neighbouring grid
    offsets with the mean kept (paired rounding). I − Q is banded: offset d lies on band d, and the transitions
    that reflect at 0 lie inside the lower band.
    """
    z = steps / delta
    low = np.floor(z)
    frac = z - low
    offsets = np.concatenate((low, low + 1.0)).astype(np.int64)
    weights = np.concatenate((probs * (1.0 - frac), probs * frac))
    lower, upper = max(0, -int(offsets.min())), max(0, int(offsets.max()))
    if upper == 0 or weights[offsets > 0].sum() == 0.0:
        raise ValueError("this CUSUM can never rise: no increment is positive, so it never alarms")
    pmf = np.bincount(offsets + lower, weights=weights, minlength=lower + upper + 1)  # pmf[d + lower] = P(d)
    band = np.empty((lower + upper + 1, m + 1))
    band[:, :] = -pmf[::-1][:, None]  # row upper − d holds offset d
    band[upper, :] += 1.0
    # column 0: from state i, every offset ≤ −i lands on 0 (reflection)
    band[:, 0] = 0.0
    cdf = np.cumsum(pmf)  # cdf[d + lower] = P(offset ≤ d)
    rows = np.arange(0, min(lower, m) + 1)
    band[upper + rows, 0] = (rows == 0) - cdf[lower - rows]
    return float(solve_banded((lower, upper), band, np.ones(m + 1), overwrite_ab=True, check_finite=False)[0])


def _grid_states(h: float, delta: float) -> int:
    m = int(math.floor(h / delta + 1e-9))
    if m > _MAX_STATES:
        raise ValueError(f"h={h:g} needs {m} grid states (> {_MAX_STATES}); the design is too extreme to compute")
    return m


def _smallest_states(arl_of: Callable[[int], float], arl0: float, guess: int) -> int:
    """Smallest m with arl_of(m) ≥ arl0, for arl_of increasing in m.

    log ARL is close to linear in h, so the bracket is found by extrapolating through the origin and narrowed by
    interpolation, probing the neighbour of each interpolated point; bisection takes over when that stalls.
    Typically 4–6 chain solves instead of the ~2·log2(m) of a plain doubling-and-bisection search.
    """
    target = math.log(arl0)

    @lru_cache(maxsize=None)
    def gap(m: int) -> float:
        return math.log(arl_of(m)) - target

    if gap(0) >= 0.0:
        return 0
    lo, hi = 0, max(1, guess)
    while gap(hi) < 0.0:
        lo, hi = hi, max(hi + 1, math.ceil(1.1 * hi * target / (gap(hi) + target)))
        if hi > _MAX_STATES:
            raise ValueError(f"ARL0 {arl0:g} needs more than {_MAX_STATES} grid states; lower the target")
    while hi - lo > 1:
        width = hi - lo
        m = min(hi - 1, max(lo + 1, lo + round(width * -gap(lo) / (gap(hi) - gap(lo)))))
        neighbour = m + 1 if gap(m) < 0.0 else m - 1  # the root is most likely right next to m
        for probe in sorted((m, neighbour)):
            if lo < probe < hi:
                lo, hi = (probe, hi) if gap(probe) < 0.0 else (lo, probe)
        if hi - lo > width // 2:  # interpolation stalled: bisect as well
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if gap(mid) < 0.0 else (lo, mid)
    return hi


# --- Bernoulli CUSUM ---------------------------------------------------------------------------


class _BernoulliGrid(NamedTuple):
    """The chain of one Bernoulli design: grid width Δ (log-likelihood units); y = 0 moves ``down`` cells exactly,
    y = 1 moves ``up`` or ``up`` + 1 cells with probabilities 1 − ``frac`` and ``frac`` (paired rounding)."""

    delta: float
    down: int
    up: int
    frac: float


@lru_cache(maxsize=4096)
def _bernoulli_grid(p0: float, p1: float) -> _BernoulliGrid:
    """Δ = |ln((1−p1)/(1−p0))| / c: the frequent down step is exact, Δ ≤ 0.01 (the smallest such c), and c is
    raised by up to 25 % when that makes the up step land close enough to the grid that its rounding variance
    moves the ARL by < 0.1 % (estimate below); otherwise the c with the least rounding variance is kept.

    Rounding the up step U to the grid adds variance φ = frac(1−frac)Δ² to it; the adjustment coefficient θ = 1 of
    the log-likelihood walk then moves by ≈ p1·φ / (2·KL(p1‖p0)), so ln ARL ≈ θh moves by h·p1·φ / (2·KL), taken
    at h = 20 (ARL0 ≈ 1e8)."""
    if not 0.0 < p0 < p1 < 1.0:
        raise ValueError(f"Bernoulli CUSUM detects an increase: need 0 < p0 < p1 < 1, got p0={p0}, p1={p1}")
    up, down = math.log(p1 / p0), -math.log((1.0 - p1) / (1.0 - p0))
    kl1 = p1 * up - (1.0 - p1) * down
    c_min = max(1, math.ceil(down / _BERNOULLI_MAX_CELL))
    best: tuple[float, _BernoulliGrid] | None = None
    for c in range(c_min, int(_BERNOULLI_WIDEN * c_min) + 1):
        delta = down / c
        z = up / delta
        cells = math.floor(z)
        frac = z - cells
        if frac > 1.0 - 1e-12:  # the up step is a whole number of cells (to rounding)
            cells, frac = cells + 1, 0.0
        error = 20.0 * p1 * frac * (1.0 - frac) * delta**2 / (2.0 * kl1)
        if best is None or error < best[0]:
            best = (error, _BernoulliGrid(delta, c, cells, frac))
        if error <= _BERNOULLI_ROUNDING_ERROR:
            break
    assert best is not None
    return best[1]


def _bernoulli_shoot(g: _BernoulliGrid, p: float, n: int) -> float | None:
    """Zero-state ARL on states 0..n when the down step is one cell, in O(n) time and memory, or None if the
    recursion was not accurate.

    With L(j) = 0 above n, the equation of state i ≥ 1, L(i) = 1 + q·L(i−1) + p·[(1−f)·L(i+u) + f·L(i+u+1)], gives
    L(i−1) from values above it, so every L is affine in the unknown x = L(n); the equation of state 0 (reflection,
    L(0) = 1 + q·L(0) + p·[…]) then fixes x (shooting on the linear recurrence of a walk that is skip-free
    downwards). Runs of up to u equations need only values already known, so each run is one vectorised first-order
    recurrence. The recursion is stable when the walk drifts down or mildly up (p ≤ p1); a residual check guards it.
    """
    q, u, f = 1.0 - p, g.up, g.frac
    if u < 1 or q <= 0.0:
        return None
    values = np.zeros((n + u + 2, 2))  # columns: L = α + β·x; rows above n stay 0
    values[n, 1] = 1.0
    run = max(1, min(u, int(30.0 / -math.log(q))))  # q^−run ≤ e^30
    qpow = q ** np.arange(run + 1)
    top = n
    with np.errstate(all="ignore"):
        while top > 0:
            bottom = max(1, top - run + 1)  # equations i = top … bottom give L(top−1) … L(bottom−1)
            i = np.arange(top, bottom - 1, -1)
            force = p * ((1.0 - f) * values[i + u] + f * values[i + u + 1])
            force[:, 0] += 1.0
            t = np.arange(1, top - bottom + 2)
            # L(top−t) = q^−t·[L(top) − Σ_{s=1..t} q^{s−1}·force(top−s+1)]
            values[top - t] = (values[top] - np.cumsum(qpow[: t.size, None] * force, axis=0)) / qpow[t, None]
            top = bottom - 1
        edge = p * (values[0] - (1.0 - f) * values[u] - f * values[u + 1])
        x = (1.0 - edge[0]) / edge[1]
        arl = values[: n + 1, 0] + x * values[: n + 1, 1]
        padded = np.concatenate((arl, np.zeros(u + 1)))
        below = np.concatenate((arl[:1], arl[:-1]))
        residual = arl - 1.0 - q * below - p * ((1.0 - f) * padded[u: u + n + 1] + f * padded[u + 1: u + n + 2])
        ok = bool(np.all(np.isfinite(arl))) and arl[0] >= 1.0 and float(np.abs(residual).max()) <= 1e-9 * arl[0]
    return float(arl[0]) if ok else None


def _bernoulli_banded(g: _BernoulliGrid, p: float, n: int) -> float:
    """Zero-state ARL on states 0..n by a banded LU of I − Q (lower bandwidth = the down step in cells)."""
    c, u, f = g.down, g.up, g.frac
    lower, upper = c, u + 1
    if (2 * lower + upper + 1) * (n + 1) * 8 > _BERNOULLI_MAX_BAND_BYTES:
        raise ValueError(f"this Bernoulli design needs a {n + 1}-state chain with bandwidth {lower + upper + 1} at "
                         f"p={p:g}, too large to solve; the in-control rate is too small for this grid")
    band = np.zeros((lower + upper + 1, n + 1))  # band[upper + i − j, j] = (I − Q)[i, j]
    band[upper, :] = 1.0
    for offset, weight in ((-c, 1.0 - p), (u, p * (1.0 - f)), (u + 1, p * f)):
        band[upper - offset, :] -= weight
    rows = np.arange(min(c, n) + 1)  # states below c reflect to 0 on a down step
    band[upper + rows, 0] = (rows == 0) - (1.0 - p)
    return float(solve_banded((lower, upper), band, np.ones(n + 1), overwrite_ab=True, check_finite=False)[0])


@lru_cache(maxsize=65536)
def _bernoulli_chain(p0: float, p1: float, p: float, n: int) -> float:
    """Zero-state ARL of the chain with states 0..n (alarm above n); a float, so the cache holds no arrays.
    Not checked for reliability: ``bernoulli_arl`` does that, the threshold search only needs to know it is large."""
    g = _bernoulli_grid(p0, p1)
    if n > _MAX_STATES:
        raise ValueError(f"this Bernoulli design needs {n} grid states (> {_MAX_STATES}); too extreme to compute")
    arl = _bernoulli_shoot(g, p, n) if g.down == 1 and p <= p1 else None
    return arl if arl is not None else _bernoulli_banded(g, p, n)


def bernoulli_arl(p0: float, p1: float, h: float, p: float | None = None) -> float:
    """Zero-state ARL of the Bernoulli CUSUM (Reynolds & Stoumbos 1999) with threshold h (log-likelihood units)
    when the true event rate is ``p`` (default p0, the in-control ARL). Markov chain, module docstring: the chain
    with n states stands for h = (n + ½)Δ, and ln ARL is interpolated linearly between grid cells.

    >>> round(bernoulli_arl(0.01, 0.02, 3.0))
    6803
    """
    p = p0 if p is None else p
    if not 0.0 < p < 1.0:
        raise ValueError(f"the true event rate p must lie in (0, 1), got {p}")
    p0, p1, p = _r(p0), _r(p1), _r(p)
    if h < 0:
        raise ValueError(f"the threshold h must be ≥ 0, got {h}")
    x = max(0.0, h / _bernoulli_grid(p0, p1).delta - 0.5)
    n = int(math.floor(x))
    t = x - n
    what = f"Bernoulli CUSUM p0={p0}, p1={p1}, h={h}"
    below = math.log(_reliable(_bernoulli_chain(p0, p1, p, n), what))
    if t < 1e-12:
        return math.exp(below)
    return math.exp(below + t * (math.log(_reliable(_bernoulli_chain(p0, p1, p, n + 1), what)) - below))


@lru_cache(maxsize=4096)
def _bernoulli_threshold(p0: float, p1: float, arl0: float) -> float:
    delta = _bernoulli_grid(p0, p1).delta
    target = math.log(arl0)

    def gap(n: int) -> float:  # +inf where the ARL is beyond what can be computed: above the target anyway
        arl = _bernoulli_chain(p0, p1, p0, n)
        return math.log(arl) - target if 0.0 < arl <= _MAX_ARL else math.inf

    if gap(0) >= 0.0:
        return 0.5 * delta
    # Smallest n with gap(n) ≥ 0. ln ARL rises by ≈ Δ per cell for large h (the adjustment coefficient of the
    # log-likelihood walk is 1; Reynolds & Stoumbos 1999), so one step from the guess h = ln(ARL0·p0) with that
    # slope and then secant steps land within a cell of the root; the cell next to the landing point closes the
    # bracket.
    # Typically 4–5 chain solves. lo/hi keep the bracket; bisection takes over if a step fails to shrink it.
    lo, hi = 0, _MAX_STATES + 1
    points: list[tuple[int, float]] = []

    def probe(n: int) -> float:
        nonlocal lo, hi
        value = gap(n)
        points.append((n, value))
        lo, hi = (max(lo, n), hi) if value < 0.0 else (lo, min(hi, n))
        return value

    n = max(1, round(math.log(arl0 * p0) / delta))  # ARL ≈ e^h / p0: close, and above the root by a little
    while hi - lo > 1:
        if n > _MAX_STATES:
            raise ValueError(f"ARL0 {arl0:g} needs more than {_MAX_STATES} grid states; lower the target")
        width = hi - lo
        value = probe(n)
        if hi - lo <= 1:
            break
        neighbour = n + 1 if value < 0.0 else n - 1
        if abs(value) < 2.0 * delta and lo < neighbour < hi:  # the root is most likely right next to n
            probe(neighbour)
            if hi - lo <= 1:
                break
        if math.isinf(value):
            n = (lo + hi) // 2
            continue
        (n_a, g_a), (n_b, g_b) = points[-2:] if len(points) > 1 else ((n, value), (n, value))
        slope = (g_b - g_a) / (n_b - n_a) if n_b != n_a else 0.0
        if abs(n_b - n_a) < 4 or slope <= 0.0:  # neighbouring cells: their slope is noisy; use the asymptote
            slope = delta
        n = math.ceil(n_b - g_b / slope - 1e-9)  # the first cell at or past the interpolated root
        if hi <= _MAX_STATES:
            n = min(max(n, lo + 1), hi - 1)
            if 2 * (hi - lo) > width and len(points) > 3:  # not converging: bisect
                n = (lo + hi) // 2
        else:
            n = max(n, lo + 1)
    below, above = gap(lo), gap(hi)  # below < 0 ≤ above
    return (lo + 0.5 + below / (below - above)) * delta


def bernoulli_threshold(p0: float, p1: float, arl0: float) -> float:
    """The threshold h (log-likelihood units) whose in-control ARL (as ``bernoulli_arl`` computes it) is ``arl0``.

    A Newton search on the chain's states, then the log-linear interpolation of ``bernoulli_arl`` solved for h; h is
    nudged up so that ``bernoulli_arl(p0, p1, h) >= arl0`` holds in floating point.

    >>> h = bernoulli_threshold(0.005, 0.01, 1e7); bernoulli_arl(0.005, 0.01, h) >= 1e7
    True
    """
    _check_arl0(arl0)
    p0, p1 = _r(p0), _r(p1)
    h = _bernoulli_threshold(p0, p1, _r(arl0))
    for attempt in range(8):
        if bernoulli_arl(p0, p1, h) >= arl0:
            break
        h = math.nextafter(h, math.inf) if attempt < 4 else h * (1.0 + 1e-12)
    return h


# --- Risk-adjusted CUSUM -----------------------------------------------------------------------


def _risk_mix(risks: Sequence[float], counts: Sequence[float] | None = None) -> tuple[bytes, bytes]:
    """The risk mix as a hashable histogram: distinct risks rounded to 1e-6, with their counts.

    ``counts`` (optional, one per risk) gives the mix as a histogram — how many patients had each risk — so a
    stream can keep a bounded summary of its baseline instead of every risk (``monitors.streams.RiskMix``)."""
    r = np.asarray(risks, dtype=float)
    if r.ndim != 1 or r.size == 0:
        raise ValueError("the risk mix must be a non-empty list of predicted risks")
    bad = np.flatnonzero(~((r > 0.0) & (r < 1.0)))
    if bad.size:
        raise ValueError(f"predicted risks must lie in (0, 1); entry {bad[0] + 1} is {r[bad[0]]}")
    if counts is None:
        values, n = np.unique(np.round(r, 6), return_counts=True)
        return values.tobytes(), n.astype(float).tobytes()
    c = np.asarray(counts, dtype=float)
    if c.shape != r.shape:
        raise ValueError(f"the risk mix has {r.size} risks but {c.size} counts; give one count per risk")
    bad = np.flatnonzero(~(np.isfinite(c) & (c >= 0.0)))
    if bad.size or c.sum() <= 0.0:
        where = f"entry {bad[0] + 1} is {c[bad[0]]}" if bad.size else "they sum to 0"
        raise ValueError(f"risk-mix counts must be finite, ≥ 0 and not all 0; {where}")
    values, inverse = np.unique(np.round(r, 6), return_inverse=True)
    return values.tobytes(), np.bincount(inverse, weights=c, minlength=values.size).tobytes()


def _ra_steps(values: np.ndarray, ra: float, r0: float) -> tuple[np.ndarray, np.ndarray]:
    """Steiner et al. (2000) weights for y = 1 and y = 0 at each risk."""
    base = -np.log((1.0 + (ra - 1.0) * values) / (1.0 + (r0 - 1.0) * values))
    return base + math.log(ra / r0), base


def _odds_scaled(values: np.ndarray, odds_ratio: float) -> np.ndarray:
    """Risks whose odds are ``odds_ratio`` × the odds of ``values``."""
    return odds_ratio * values / (1.0 - values + odds_ratio * values)


@lru_cache(maxsize=256)
def _ra_grid(values_b: bytes, counts_b: bytes, ra: float, r0: float) -> float:
    """Grid width whose rounding adds ≤ 0.1 % to the in-control variance of one weight (Δ²/4 per step); in
    control the true odds are R_0 × the predicted odds."""
    values, counts = np.frombuffer(values_b), np.frombuffer(counts_b)
    w1, w0 = _ra_steps(values, ra, r0)
    prob = counts / counts.sum()
    steps = np.concatenate((w1, w0))
    p_in = _odds_scaled(values, r0)
    probs = np.concatenate((prob * p_in, prob * (1.0 - p_in)))
    variance = float(probs @ steps**2 - (probs @ steps) ** 2)
    return math.sqrt(4.0 * _RA_ROUNDING_VARIANCE * variance)


@lru_cache(maxsize=8192)
def _ra_chain(values_b: bytes, counts_b: bytes, ra: float, r0: float, odds_ratio: float, m: int) -> float:
    values, counts = np.frombuffer(values_b), np.frombuffer(counts_b)
    w1, w0 = _ra_steps(values, ra, r0)
    true_p = _odds_scaled(values, odds_ratio)
    prob = counts / counts.sum()
    steps = np.concatenate((w1, w0))
    probs = np.concatenate((prob * true_p, prob * (1.0 - true_p)))
    return _chain_arl(steps, probs, _ra_grid(values_b, counts_b, ra, r0), m)


def _ra_check(ra: float, r0: float) -> None:
    if ra <= 0 or r0 <= 0 or ra == r0:
        raise ValueError(f"risk-adjusted CUSUM needs odds ratios R_A ≠ R_0, both > 0; got R_A={ra}, R_0={r0}")


def racusum_arl(risks: Sequence[float], ra: float, h: float, odds_ratio: float | None = None, r0: float = 1.0,
                counts: Sequence[float] | None = None) -> float:
    """Zero-state ARL of the risk-adjusted CUSUM (Steiner et al. 2000) when patients are drawn from ``risks`` (the
    model's predicted risks, e.g. a baseline period; with ``counts``, a histogram of them) and the true odds are
    ``odds_ratio`` × the predicted odds (default R_0, the chart's in-control hypothesis).
    Markov chain over the mix (each patient's two weights are atoms of the increment distribution)."""
    _ra_check(ra, r0)
    odds_ratio = r0 if odds_ratio is None else odds_ratio
    if odds_ratio <= 0:
        raise ValueError(f"the true odds ratio must be > 0, got {odds_ratio}")
    values_b, counts_b = _risk_mix(risks, counts)
    ra, r0 = _r(ra), _r(r0)
    m = _grid_states(h, _ra_grid(values_b, counts_b, ra, r0))
    return _ra_chain(values_b, counts_b, ra, r0, _r(odds_ratio), m)


def racusum_threshold(risks: Sequence[float], ra: float, arl0: float, r0: float = 1.0,
                      counts: Sequence[float] | None = None) -> float:
    """The smallest h (middle of its grid cell) whose in-control ARL over the risk mix is ≥ ``arl0``.

    In control the true odds are R_0 × the predicted odds (Steiner et al. 2000 test R_A against R_0; with R_0 = 1,
    the default, the model is calibrated). ``counts``: the mix as a histogram, one count per risk."""
    _check_arl0(arl0)
    _ra_check(ra, r0)
    values_b, counts_b = _risk_mix(risks, counts)
    ra, r0 = _r(ra), _r(r0)
    delta = _ra_grid(values_b, counts_b, ra, r0)
    m = _smallest_states(lambda m: _ra_chain(values_b, counts_b, ra, r0, r0, m), arl0, int(math.log(arl0) / delta))
    return (m + 0.5) * delta


# --- Simulation cross-check --------------------------------------------------------------------


def monte_carlo_arl(
    make_detector: Callable[[], Detector],
    draw: Callable[[np.random.Generator, int], np.ndarray],
    n_runs: int,
    seed: int,
    max_steps: int,
) -> tuple[float, float]:
    """Mean run length and its standard error over ``n_runs`` independent runs of fresh detectors.

    ``draw(rng, size)`` returns ``size`` observations: a 1-D array for one-argument detectors, or a (size, 2)
    array of (y, p) rows for ``RiskAdjustedCusum.update(y, p)``. A run that reaches ``max_steps`` without an alarm
    counts as ``max_steps`` (biasing the mean low), and a warning says how many did.
    """
    if n_runs < 2 or max_steps < 1:
        raise ValueError(f"need n_runs ≥ 2 and max_steps ≥ 1, got {n_runs}, {max_steps}")
    rng = np.random.default_rng(seed)
    lengths = np.empty(n_runs)
    censored = 0
    for run in range(n_runs):
        detector = make_detector()
        update, steps = detector.update, 0
        while steps < max_steps:
            block = draw(rng, min(1024, max_steps - steps)).tolist()
            alarmed = False
            if isinstance(block[0], list):
                for y, p in block:
                    if update(y, p):  # type: ignore[call-arg]
                        alarmed = True
                        break
            else:
                for x in block:
                    if update(x):
                        alarmed = True
                        break
            if alarmed:
                steps = detector.n
                break
            steps += len(block)
        else:
            censored += 1
        lengths[run] = steps
    if censored:
        warnings.warn(f"{censored} of {n_runs} runs reached max_steps={max_steps} without an alarm; "
                      "the mean is biased low — raise max_steps", stacklevel=2)
    return float(lengths.mean()), float(lengths.std(ddof=1) / math.sqrt(n_runs))


# --- Brook–Evans chains: a second exact route, and the conditional detection delay ------------------------


def cusum_chain(k: float, h: float, shift: float = 0.0, states: int = 1000) -> np.ndarray:
    """Transient matrix Q of the upper tabular CUSUM S = max(0, S + X − k), X ~ N(shift, 1), alarm S > h, by the
    Markov-chain method of Brook & Evans (1972, *Biometrika* 59:539): ``states`` cells of width w = 2h/(2·states − 1),
    state 0 = [0, w/2) (S at zero), state i ≥ 1 = [(i − ½)w, (i + ½)w) represented by its midpoint iw.

    The discretisation error falls as 1/states², so 1,000 states give ≈ 5 significant digits — a check on the Nyström
    solution ``cusum_arl`` uses, and the matrix the conditional delays below need.
    """
    if k < 0 or h <= 0 or states < 2:
        raise ValueError(f"CUSUM chain needs k ≥ 0, h > 0 and ≥ 2 states, got k={k}, h={h}, states={states}")
    w = 2.0 * h / (2.0 * states - 1.0)
    i = np.arange(states)
    # P(S' below the upper edge (j + ½)w of cell j | S = iw): S' = iw + X − k; then differences give the cells
    below = ndtr((np.arange(states)[None, :] + 0.5 - i[:, None]) * w + k - shift)
    return np.diff(below, axis=1, prepend=0.0)


def cusum_arl_markov(k: float, h: float, shift: float = 0.0, sided: str = "two", states: int = 1000) -> float:
    """Zero-state ARL of a tabular CUSUM by the Brook–Evans chain (``cusum_chain``); two-sided by
    1/ARL = 1/ARL⁺ + 1/ARL⁻ (Lucas & Crosier 1982), as ``cusum_arl``.

    >>> round(cusum_arl_markov(0.5, 4.0), 1), round(cusum_arl_markov(0.5, 4.0, shift=1.0), 2)
    (167.7, 8.38)
    """
    if sided not in _SIDES:
        raise ValueError(f"sided must be one of {_SIDES}, got {sided!r}")

    def one(s: float) -> float:
        q = cusum_chain(k, h, s, states)
        return _reliable(float(np.linalg.solve(np.eye(states) - q, np.ones(states))[0]), f"CUSUM k={k}, h={h}")

    if sided == "two" and shift == 0.0:
        return one(0.0) / 2.0  # both sides alike in control
    up = one(shift) if sided != "lower" else math.inf
    down = one(-shift) if sided != "upper" else math.inf
    return 1.0 / (1.0 / up + 1.0 / down)


def bernoulli_chain(p0: float, p1: float, h: float, p: float) -> np.ndarray:
    """Dense transient matrix of the Bernoulli CUSUM on the grid of ``bernoulli_arl`` (paired rounding), states
    0..n with n = round(h/Δ − ½), when the true event rate is p. Its zero-state ARL agrees with ``bernoulli_arl``
    to the half cell of threshold rounding (< 1 % for Δ ≤ 0.01); use it where the whole run-length distribution
    is needed (``conditional_delay``), and ``bernoulli_arl`` for ARLs and thresholds."""
    g = _bernoulli_grid(_r(p0), _r(p1))
    n = max(0, round(h / g.delta - 0.5))
    size = n + 1
    if size > 20_000:
        raise ValueError(f"a dense chain of {size} states is too large; use bernoulli_arl for this design")
    q = np.zeros((size, size))
    rows = np.arange(size)
    np.add.at(q, (rows, np.maximum(rows - g.down, 0)), 1.0 - p)
    for offset, weight in ((g.up, p * (1.0 - g.frac)), (g.up + 1, p * g.frac)):
        ok = rows + offset < size
        np.add.at(q, (rows[ok], rows[ok] + offset), weight)
    return q


def conditional_delay(q_in: np.ndarray, q_out: np.ndarray, tau: int) -> float:
    """Conditional expected detection delay of a CUSUM chain whose change happens after ``tau`` in-control
    observations: the state distribution after tau steps of ``q_in`` given no alarm, times the out-of-control ARL
    vector (I − q_out)⁻¹·1. The delay counts observations from the first changed one to the alarm, inclusive, so at
    tau = 0 it is the zero-state ARL; as tau grows it tends to the steady-state delay, which is shorter because the
    statistic is not always at zero when the change comes (Lorden's worst case is the zero state)."""
    if q_in.shape != q_out.shape or q_in.shape[0] != q_in.shape[1] or tau < 0:
        raise ValueError("conditional_delay needs two square transient matrices of one chain and tau ≥ 0")
    pi = np.zeros(q_in.shape[0])
    pi[0] = 1.0
    for _ in range(tau):
        pi = pi @ q_in
        pi /= pi.sum()
    arl = np.linalg.solve(np.eye(q_out.shape[0]) - q_out, np.ones(q_out.shape[0]))
    return float(pi @ arl)
