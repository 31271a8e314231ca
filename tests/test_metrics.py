"""Stream metrics against worked and published numbers: Wilson (Newcombe 1998), AUROC and its SE (Hanley & McNeil
1982, Table 1), DeLong's variance against its definition, exact Poisson limits, logistic recalibration, PSI, KS."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logit

import monitors.metrics
from monitors.metrics import (
    PSI_EPSILON,
    WindowMetrics,
    auroc,
    brier,
    calibration_intercept_slope,
    confusion_rates,
    ks,
    observed_expected,
    psi,
    psi_from_proportions,
    vlad,
)

# Hanley & McNeil (1982) Table 1: radiologist's 5-point ratings of 109 CT images (1 = definitely normal)
HM_NORMAL = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
HM_ABNORMAL = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])


def test_docstring_examples_run() -> None:
    result = doctest.testmod(monitors.metrics)
    assert result.attempted >= 7 and result.failed == 0


def test_rates_use_wilson_intervals_published_example() -> None:
    """Newcombe (1998, *Stat. Med.* 17:857) Table I, 81/263: Wilson score interval 0.2553 to 0.3662."""
    rates = confusion_rates(tp=81, fp=5, tn=95, fn=182)
    sens = rates["sensitivity"]
    assert sens.value == pytest.approx(81 / 263) and sens.n == 263
    assert (round(sens.low, 4), round(sens.high, 4)) == (0.2553, 0.3662)
    assert rates["specificity"].value == pytest.approx(0.95) and rates["specificity"].n == 100
    assert rates["ppv"].value == pytest.approx(81 / 86) and rates["npv"].value == pytest.approx(95 / 277)
    assert rates["error_rate"].value == pytest.approx(187 / 363)
    empty = confusion_rates(0, 0, 0, 0)["sensitivity"]
    assert math.isnan(empty.value) and (empty.low, empty.high, empty.n) == (0.0, 1.0, 0)
    with pytest.raises(ValueError, match="fn"):
        confusion_rates(1, 1, 1, -1)


def test_auroc_is_the_share_of_concordant_pairs() -> None:
    # positives 0.9, 0.6, 0.35; negatives 0.1, 0.4, 0.6 → pairs: 3 + 2 + 0.5(tie 0.6) + 1 (0.35 > 0.1) = 6.5 of 9
    a = auroc([0.9, 0.6, 0.35, 0.1, 0.4, 0.6], [1, 1, 1, 0, 0, 0])
    assert a.value == pytest.approx(6.5 / 9) and a.n == 6 and a.low < a.value < a.high
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]).value == 1.0
    with pytest.raises(ValueError, match="0 positives"):
        auroc([0.1, 0.2], [0, 0])


def test_auroc_and_hanley_mcneil_se_reproduce_their_table_1() -> None:
    """Hanley & McNeil 1982: A = 0.893, SE(A) = 0.032 for 51 abnormal and 58 normal images."""
    scores = np.concatenate([HM_ABNORMAL, HM_NORMAL])
    labels = np.r_[np.ones(51), np.zeros(58)]
    hm = auroc(scores, labels, method="hanley_mcneil")
    assert round(hm.value, 3) == 0.893
    assert round((hm.high - hm.value) / 1.959964, 3) == 0.032
    delong = auroc(scores, labels)
    assert delong.value == hm.value
    assert abs((delong.high - delong.value) - (hm.high - hm.value)) < 0.01  # two SEs of the same AUC agree roughly


def test_delong_variance_matches_its_definition() -> None:
    """V10(x_i) = mean_j ψ(x_i, y_j), V01(y_j) = mean_i ψ(x_i, y_j), ψ = 1, ½, 0 (DeLong et al. 1988 §2),
    var = s²(V10)/m + s²(V01)/n — computed here by the explicit double loop, against the midrank computation."""
    rng = np.random.default_rng(3)
    pos, neg = np.round(rng.normal(1, 1, 17), 1), np.round(rng.normal(0, 1, 23), 1)  # rounding makes ties
    psi_ = np.array([[1.0 if x > y else 0.5 if x == y else 0.0 for y in neg] for x in pos])
    v10, v01 = psi_.mean(axis=1), psi_.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size)
    a = auroc(np.r_[pos, neg], np.r_[np.ones(17), np.zeros(23)], level=0.9)
    assert a.value == pytest.approx(psi_.mean(), abs=1e-12)
    assert a.high - a.value == pytest.approx(1.644854 * se, rel=1e-6)


def test_brier_and_vlad() -> None:
    assert brier([0.2, 0.7, 0.5], [0, 1, 1]) == pytest.approx((0.04 + 0.09 + 0.25) / 3)
    np.testing.assert_allclose(vlad([0.2, 0.7, 0.5], [0, 1, 1]), [0.2, -0.1, -0.6])


def test_observed_expected_exact_and_byar_limits() -> None:
    """Exact Poisson limits for 10 events: 4.795 to 18.390 (Garwood 1936; any exact-Poisson table); Byar's
    approximation lands within 0.01 of them; E scales the interval."""
    risks, labels = [0.25] * 80, [1] * 10 + [0] * 70  # E = 20, O = 10
    exact = observed_expected(risks, labels)
    assert exact.value == 0.5
    assert (round(exact.low * 20, 3), round(exact.high * 20, 3)) == (4.795, 18.39)
    byar = observed_expected(risks, labels, method="byar")
    assert byar.low * 20 == pytest.approx(4.795, abs=0.01) and byar.high * 20 == pytest.approx(18.39, abs=0.01)
    zero = observed_expected([0.1] * 30, [0] * 30)
    assert zero.low == 0.0 and zero.high * 3 == pytest.approx(3.689, abs=1e-3)  # O = 0: upper limit 3.689


def test_calibration_is_ideal_when_observed_rates_equal_the_risks() -> None:
    risks = [0.2] * 10 + [0.5] * 4 + [0.8] * 10
    labels = [1] * 2 + [0] * 8 + [1, 1, 0, 0] + [1] * 8 + [0] * 2
    c = calibration_intercept_slope(risks, labels)
    assert c["intercept"].value == pytest.approx(0.0, abs=1e-9)
    assert c["slope"].value == pytest.approx(1.0, abs=1e-9)
    assert c["slope"].low < 1.0 < c["slope"].high and c["slope"].n == 24


def test_calibration_matches_a_general_optimiser_and_finds_the_miscalibration() -> None:
    """True log-odds = 0.7 + 0.6·logit(risk): the model's predictions are too low on average and too extreme."""
    rng = np.random.default_rng(11)
    risks = expit(rng.normal(-1.5, 1.2, 4000))
    labels = (rng.random(4000) < expit(0.7 + 0.6 * logit(risks))).astype(float)
    c = calibration_intercept_slope(risks, labels)
    lp = logit(risks)

    def nll(beta: np.ndarray, design: np.ndarray, offset: np.ndarray) -> float:
        eta = offset + design @ beta
        return float(np.sum(np.logaddexp(0.0, eta) - labels * eta))

    slope_fit = minimize(nll, np.zeros(2), args=(np.column_stack((np.ones(4000), lp)), np.zeros(4000)), tol=1e-10)
    intercept_fit = minimize(nll, np.zeros(1), args=(np.ones((4000, 1)), lp), tol=1e-10)
    assert c["slope"].value == pytest.approx(slope_fit.x[1], abs=1e-4)
    assert c["intercept"].value == pytest.approx(intercept_fit.x[0], abs=1e-4)
    assert c["slope"].low < 0.6 < c["slope"].high and c["slope"].high < 1.0
    assert c["intercept"].low > 0.0
    with pytest.raises(ValueError, match="both outcomes"):
        calibration_intercept_slope([0.2, 0.3], [0, 0])


def test_psi_worked_values() -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(0, 1, 5000)
    assert psi(reference, reference) == 0.0  # identical distributions
    # two bins, 50/50 → 60/40: 0.1·ln 1.2 + 0.1·ln 1.25
    assert psi_from_proportions([50, 50], [60, 40]) == pytest.approx(0.1 * math.log(1.2) + 0.1 * math.log(1.25))
    # an empty current bin counts with proportion ε (then renormalised), not as infinite
    floored = np.array([1.0, PSI_EPSILON]) / (1.0 + PSI_EPSILON)  # current [1, 0] → [1, ε], renormalised
    expected = (floored[0] - 0.5) * math.log(floored[0] / 0.5) + (floored[1] - 0.5) * math.log(floored[1] / 0.5)
    assert psi_from_proportions([1, 1], [1, 0]) == pytest.approx(expected)
    assert psi(reference, rng.normal(0, 1, 2000)) < 0.02
    assert psi(reference, rng.normal(1, 1, 2000)) > 0.25  # a 1 sd shift is a "major" shift
    assert psi([1.0] * 20, [1.0] * 5) == 0.0  # a constant reference: one bin


def test_ks_is_scipys_two_sample_test() -> None:
    assert ks([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    statistic, p = ks([1, 2, 3, 4], [5, 6, 7, 8])
    assert statistic == 1.0 and p == pytest.approx(2 / 70)  # exact: 2 of C(8,4) = 70 orderings are as extreme


def test_window_counts_slide_and_report_supports_every_metric() -> None:
    rng = np.random.default_rng(8)
    reference = rng.beta(2, 5, 500)
    w = WindowMetrics(window=200, threshold=0.4, reference=reference)
    cases = []
    for i in range(700):
        score = None if i % 50 == 0 else float(rng.beta(2, 5))
        label = None if i % 7 == 0 else int(rng.random() < (score if score is not None else 0.3))
        w.update(score, label)
        cases.append((score, label))
    last = cases[-200:]
    tp = sum(1 for s, y in last if s is not None and y == 1 and s >= 0.4)
    fn = sum(1 for s, y in last if s is not None and y == 1 and s < 0.4)
    report = w.report()
    assert report["volume"] == 200
    assert report["missing"].value == pytest.approx(sum(s is None for s, _ in last) / 200)
    assert report["sensitivity"].value == pytest.approx(tp / (tp + fn)) and report["sensitivity"].n == tp + fn
    labeled = [(s, y) for s, y in last if s is not None and y is not None]
    assert report["auroc"].value == pytest.approx(auroc(*zip(*labeled, strict=True)).value)
    assert report["brier"] == pytest.approx(brier(*zip(*labeled, strict=True)))
    assert report["psi"] < 0.25 and report["ks"][1] > 0.001
    assert set(report["calibration"]) == {"intercept", "slope"}


def test_window_reports_insufficient_data_instead_of_failing() -> None:
    w = WindowMetrics(window=10)
    w.update(0.7, 1)
    report = w.report()
    assert report["auroc"].startswith("insufficient data") and "0 negatives" in report["auroc"]
    assert report["calibration"].startswith("insufficient data")
    with pytest.raises(ValueError, match="label"):
        w.update(0.5, 2)
