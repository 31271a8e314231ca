"""Performance, calibration and distribution metrics of one stream, each with its confidence interval where one is
defined — the numbers an alert and a dashboard show next to a detector's signal.

- Rates at the operating threshold (sensitivity, specificity, PPV, NPV, error rate): Wilson score intervals
  (Wilson 1927), from ``monitors.streams.wilson``.
- AUROC: the Mann–Whitney estimate with DeLong, DeLong & Clarke-Pearson (1988, *Biometrics* 44:837) variance,
  computed from midranks (Sun & Xu 2014, *IEEE Signal Process. Lett.* 21:1389), or Hanley & McNeil (1982,
  *Radiology* 143:29).
- Brier score (Brier 1950); observed/expected events with an exact Poisson (Garwood 1936) or Byar's approximate
  interval (Breslow & Day 1987, vol. II §2.2); calibration intercept ("in the large") and slope by logistic
  recalibration on the logit of the predicted risk (Cox 1958, *Biometrika* 45:562; Van Calster et al. 2016,
  *J. Clin. Epidemiol.* 74:167); the VLAD (expected − observed) curve clinicians read (Lovegrove et al. 1997).
- Without labels: population stability index against a reference window, and the two-sample Kolmogorov–Smirnov test
  (``scipy.stats.ks_2samp``).

river's ``metrics`` give point values only (its ROCAUC is an approximation on fixed thresholds) and no intervals, so
the windowed computations here use numpy/scipy on the window's values; ``WindowMetrics`` keeps the window.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import expit, logit

from monitors.streams import wilson

PSI_EPSILON = 1e-4  # proportion given to an empty bin so that ln(c/r) stays finite (Yurdakul 2018, §3)
_Z95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Estimate:
    """A metric's value with its (two-sided, 95 % unless stated) confidence interval and the count behind it."""

    value: float
    low: float
    high: float
    n: int


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")
    return float(stats.norm.ppf(0.5 + level / 2.0))


def _arrays(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=float)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D and of equal length, got shapes {s.shape} and {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1 outcomes")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite numbers")
    return s, y


# --- rates at the operating threshold ---------------------------------------------------------------------


def rate(successes: int, n: int, level: float = 0.95) -> Estimate:
    """A proportion with its Wilson interval (NaN value when n = 0)."""
    low, high = wilson(successes, n, _z(level))
    return Estimate(successes / n if n else math.nan, low, high, n)


def confusion_rates(tp: int, fp: int, tn: int, fn: int, level: float = 0.95) -> dict[str, Estimate]:
    """Sensitivity, specificity, PPV, NPV and error rate, each with its Wilson interval and denominator."""
    for label, value in (("tp", tp), ("fp", fp), ("tn", tn), ("fn", fn)):
        if value < 0:
            raise ValueError(f"confusion-matrix count {label} must be ≥ 0, got {value}")
    return {
        "sensitivity": rate(tp, tp + fn, level),
        "specificity": rate(tn, tn + fp, level),
        "ppv": rate(tp, tp + fp, level),
        "npv": rate(tn, tn + fn, level),
        "error_rate": rate(fp + fn, tp + fp + tn + fn, level),
    }


# --- discrimination --------------------------------------------------------------------------------------


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC by Hanley & McNeil (1982) eq. 2, with Q1 = A/(2−A), Q2 = 2A²/(1+A).

    >>> round(hanley_mcneil_se(0.8932, 51, 58), 3)     # their worked example (CT images, Table 1): A = 0.893
    0.032
    """
    if n_pos < 1 or n_neg < 1 or not 0.0 <= auc <= 1.0:
        raise ValueError(f"need n_pos ≥ 1, n_neg ≥ 1 and 0 ≤ auc ≤ 1, got {n_pos}, {n_neg}, {auc}")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1.0 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, level: float = 0.95,
          method: str = "delong") -> Estimate:
    """AUROC = P(score of a positive > score of a negative) + ½·P(tie), with a Wald interval clipped to [0, 1].

    ``method="delong"``: variance from the structural components V10, V01 (DeLong et al. 1988) computed by midranks;
    ``"hanley_mcneil"``: the exponential-model approximation. Needs at least one positive and one negative;
    DeLong needs two of each.

    >>> auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]).value   # 3 of 4 positive–negative pairs ordered correctly
    0.75
    """
    s, y = _arrays(scores, labels)
    pos, neg = s[y == 1.0], s[y == 0.0]
    n1, n0 = pos.size, neg.size
    if n1 == 0 or n0 == 0:
        raise ValueError(f"AUROC needs positives and negatives; the window has {n1} positives and {n0} negatives")
    ranks = stats.rankdata(np.concatenate((pos, neg)))  # midranks
    auc = float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))
    if method == "delong":
        if n1 < 2 or n0 < 2:
            raise ValueError(f"DeLong's variance needs ≥ 2 positives and ≥ 2 negatives, got {n1} and {n0}")
        v10 = (ranks[:n1] - stats.rankdata(pos)) / n0  # per positive: share of negatives it outranks
        v01 = 1.0 - (ranks[n1:] - stats.rankdata(neg)) / n1  # per negative: share of positives that outrank it
        se = math.sqrt(float(np.var(v10, ddof=1)) / n1 + float(np.var(v01, ddof=1)) / n0)
    elif method == "hanley_mcneil":
        se = hanley_mcneil_se(auc, n1, n0)
    else:
        raise ValueError(f"method must be 'delong' or 'hanley_mcneil', got {method!r}")
    half = _z(level) * se
    return Estimate(auc, max(0.0, auc - half), min(1.0, auc + half), int(n1 + n0))


# --- calibration ------------------------------------------------------------------------------------------


def brier(risks: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Mean squared difference between predicted risk and outcome (Brier 1950); 0 is perfect."""
    p, y = _arrays(risks, labels)
    if p.size == 0:
        raise ValueError("the Brier score needs at least one case")
    return float(np.mean((p - y) ** 2))


def observed_expected(risks: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray,
                      level: float = 0.95, method: str = "exact") -> Estimate:
    """O/E = observed events / Σ predicted risks, with the interval of the Poisson count O divided by E.

    ``method="exact"``: Garwood's chi-square limits; ``"byar"``: Byar's approximation.

    >>> e = observed_expected([0.5] * 20, [1] * 10 + [0] * 10)
    >>> e.value, round(e.low * 10, 3), round(e.high * 10, 3)     # O = 10: the textbook exact limits 4.795, 18.390
    (1.0, 4.795, 18.39)
    """
    p, y = _arrays(risks, labels)
    expected = float(p.sum())
    if expected <= 0.0:
        raise ValueError("O/E needs at least one case with a positive predicted risk")
    o = float(y.sum())
    alpha = 1.0 - level
    if method == "exact":
        low = 0.0 if o == 0 else float(stats.chi2.ppf(alpha / 2.0, 2.0 * o)) / 2.0
        high = float(stats.chi2.ppf(1.0 - alpha / 2.0, 2.0 * o + 2.0)) / 2.0
    elif method == "byar":
        z = _z(level)
        low = 0.0 if o == 0 else o * (1.0 - 1.0 / (9.0 * o) - z / (3.0 * math.sqrt(o))) ** 3
        high = (o + 1.0) * (1.0 - 1.0 / (9.0 * (o + 1.0)) + z / (3.0 * math.sqrt(o + 1.0))) ** 3
    else:
        raise ValueError(f"method must be 'exact' or 'byar', got {method!r}")
    return Estimate(o / expected, low / expected, high / expected, int(p.size))


def _newton_logistic(y: np.ndarray, design: np.ndarray, offset: np.ndarray, iterations: int = 50
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood logistic regression by Newton–Raphson; coefficients and their covariance."""
    beta = np.zeros(design.shape[1])
    for _ in range(iterations):
        mu = expit(offset + design @ beta)
        info = design.T @ (design * (mu * (1.0 - mu))[:, None])
        step = np.linalg.solve(info, design.T @ (y - mu))
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    else:
        raise ValueError("logistic recalibration did not converge (outcomes perfectly separated by the risk?)")
    mu = expit(offset + design @ beta)
    info = design.T @ (design * (mu * (1.0 - mu))[:, None])
    return beta, np.linalg.inv(info)


def calibration_intercept_slope(risks: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray,
                                level: float = 0.95) -> dict[str, Estimate]:
    """Logistic recalibration on lp = logit(risk): the **slope** b of logit P(y) = a + b·lp (1 = ideal, < 1 = too
    extreme predictions) and the **intercept** a of logit P(y) = a + lp (calibration in the large; 0 = ideal,
    > 0 = risks too low). Wald intervals from the observed information.

    >>> c = calibration_intercept_slope([0.2] * 5 + [0.8] * 5, [1, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    >>> round(c["intercept"].value, 9) + 0.0, round(c["slope"].value, 9)     # observed rates equal the risks
    (0.0, 1.0)
    """
    p, y = _arrays(risks, labels)
    if not ((p > 0.0) & (p < 1.0)).all():
        raise ValueError("predicted risks must lie strictly between 0 and 1 for logistic recalibration")
    if y.min() == y.max():
        raise ValueError("calibration intercept and slope need both outcomes in the window")
    lp = logit(p)
    z = _z(level)
    ones = np.ones((p.size, 1))
    (a,), cov_a = _newton_logistic(y, ones, lp)
    coef, cov = _newton_logistic(y, np.column_stack((ones, lp)), np.zeros(p.size))
    se_a, se_b = math.sqrt(cov_a[0, 0]), math.sqrt(cov[1, 1])
    return {
        "intercept": Estimate(float(a), float(a - z * se_a), float(a + z * se_a), int(p.size)),
        "slope": Estimate(float(coef[1]), float(coef[1] - z * se_b), float(coef[1] + z * se_b), int(p.size)),
    }


def vlad(risks: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> np.ndarray:
    """Variable life-adjusted display: cumulative expected − observed events (rises when outcomes beat the model)."""
    p, y = _arrays(risks, labels)
    return np.cumsum(p - y)


# --- distribution drift (no labels needed) -------------------------------------------------------------


def psi_from_proportions(reference: Sequence[float], current: Sequence[float], eps: float = PSI_EPSILON) -> float:
    """PSI = Σ (c − r)·ln(c/r) over bins, proportions floored at ``eps`` (then renormalised) so an empty bin counts
    as rare rather than infinitely surprising.

    >>> round(psi_from_proportions([0.5, 0.5], [0.6, 0.4]), 6)   # 0.1·ln 1.2 + 0.1·ln 1.25
    0.040547
    """
    r, c = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if r.shape != c.shape or r.ndim != 1 or r.size < 2:
        raise ValueError("PSI needs two proportion vectors of equal length ≥ 2")
    if (r < 0).any() or (c < 0).any():
        raise ValueError("bin proportions must be ≥ 0")
    r, c = np.maximum(r / r.sum(), eps), np.maximum(c / c.sum(), eps)
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((c - r) * np.log(c / r)))


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, bins: int = 10,
        eps: float = PSI_EPSILON) -> float:
    """Population stability index of ``current`` against ``reference`` on the reference's quantile bins (deciles by
    default; ties merge bins). Rule of thumb: < 0.1 stable, 0.1–0.25 moderate shift, > 0.25 major shift."""
    ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if ref.size < bins or cur.size == 0:
        raise ValueError(f"PSI needs a reference of ≥ {bins} values and a non-empty current window, got "
                         f"{ref.size} and {cur.size}")
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1))[1:-1])
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1)
    if r.size < 2:
        return 0.0 if np.all(cur == ref[0]) else math.inf
    return psi_from_proportions(r, c, eps)


def ks(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic and p-value (``scipy.stats.ks_2samp``, exact for small samples)."""
    result = stats.ks_2samp(np.asarray(reference, dtype=float), np.asarray(current, dtype=float))
    return float(result.statistic), float(result.pvalue)


# --- a sliding window over one stream --------------------------------------------------------------------


class WindowMetrics:
    """The last ``window`` predictions of one stream (score, and outcome once known) and their metrics.

    Confusion counts are kept incrementally (O(1) per update); AUROC, calibration, PSI and KS are computed on demand
    over the window. ``reference`` is a baseline sample of scores for the unlabeled drift metrics.
    """

    def __init__(self, window: int = 1000, threshold: float = 0.5,
                 reference: Sequence[float] | np.ndarray | None = None) -> None:
        if window < 2:
            raise ValueError(f"window must hold at least 2 cases, got {window}")
        self.window, self.threshold = int(window), float(threshold)
        self.reference = None if reference is None else np.asarray(reference, dtype=float)
        self._cases: deque[tuple[float | None, float | None]] = deque()
        self._counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
        self.missing = 0  # cases in the window without a score

    def _cell(self, score: float | None, label: float | None) -> str | None:
        if score is None or label is None:
            return None
        flagged = score >= self.threshold
        return ("tp" if flagged else "fn") if label == 1 else ("fp" if flagged else "tn")

    def update(self, score: float | None, label: float | None = None) -> None:
        """One case: its score (None when missing) and outcome (None while unknown)."""
        if label not in (None, 0, 1):
            raise ValueError(f"label must be 0, 1 or None, got {label!r}")
        if score is not None and not math.isfinite(score):
            raise ValueError(f"score must be a finite number or None, got {score!r}")
        if len(self._cases) == self.window:
            old_score, old_label = self._cases.popleft()
            if (cell := self._cell(old_score, old_label)) is not None:
                self._counts[cell] -= 1
            self.missing -= old_score is None
        self._cases.append((score, label))
        if (cell := self._cell(score, label)) is not None:
            self._counts[cell] += 1
        self.missing += score is None

    def report(self, level: float = 0.95) -> dict[str, object]:
        """Every metric the window supports; a metric the window cannot support is reported as the reason why."""
        scores = np.array([s for s, _ in self._cases if s is not None])
        labeled = [(s, y) for s, y in self._cases if s is not None and y is not None]
        out: dict[str, object] = {"volume": len(self._cases), "missing": rate(self.missing, len(self._cases), level)}
        if scores.size:
            out["score_mean"] = float(scores.mean())
            out["positive_rate"] = rate(int((scores >= self.threshold).sum()), int(scores.size), level)
            if self.reference is not None:
                try:
                    out["psi"] = psi(self.reference, scores)
                except ValueError as err:
                    out["psi"] = f"insufficient data: {err}"
                out["ks"] = ks(self.reference, scores)
        out.update(confusion_rates(**self._counts, level=level))
        if labeled:
            s, y = (np.array(v, dtype=float) for v in zip(*labeled, strict=True))
            out["brier"] = brier(s, y)
            for key, compute in (("auroc", lambda: auroc(s, y, level)),
                                 ("observed_expected", lambda: observed_expected(s, y, level)),
                                 ("calibration", lambda: calibration_intercept_slope(s, y, level))):
                try:
                    out[key] = compute()
                except ValueError as err:
                    out[key] = f"insufficient data: {err}"
        return out
