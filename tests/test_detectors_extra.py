"""The second exact route (Brook–Evans chains) against the published tables, the conditional detection delay, the
risk-adjusted CUSUM against the Bernoulli CUSUM it reduces to, and BOCPD localising a CUSUM alarm.
Published values: reference/statistics.md §Tabular CUSUM (Lucas & Crosier 1982; Siegmund's approximation) and
§Risk-adjusted CUSUM (Steiner et al. 2000)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from monitors.bocpd import Bocpd, localise
from monitors.calibrate import (
    bernoulli_arl,
    bernoulli_chain,
    bernoulli_threshold,
    conditional_delay,
    cusum_arl,
    cusum_arl_markov,
    cusum_chain,
    cusum_threshold,
    monte_carlo_arl,
    racusum_arl,
)
from monitors.detectors import BernoulliCusum, Detector, RiskAdjustedCusum, TabularCusum
from monitors.river_adapters import RiverAdwin, RiverKswin, RiverPageHinkley

SLOW_SCALE = float(os.environ.get("VIGIL_SLOW_SCALE", "1.0"))


def _runs(base: int) -> int:
    return max(200, int(base * SLOW_SCALE))


# --- two-sided tabular CUSUM by the Brook–Evans chain ---------------------------------------------------


@pytest.mark.parametrize(("h", "arl0", "arl1"), [(4.0, 168.0, 8.38), (5.0, 465.0, 10.4)])
def test_markov_chain_reproduces_lucas_crosier_1982(h, arl0, arl1) -> None:
    """statistics.md: two-sided k = 0.5 — h = 4: ARL0 168, ARL(δ=1) 8.38; h = 5: 465, 10.4 (Lucas & Crosier 1982,
    Table 1), two-sided from the one-sided ARLs by 1/ARL = 1/ARL⁺ + 1/ARL⁻."""
    assert cusum_arl_markov(0.5, h, states=400) == pytest.approx(arl0, rel=0.005)
    up, down = cusum_arl_markov(0.5, h, 1.0, "upper", 400), cusum_arl_markov(0.5, h, 1.0, "lower", 400)
    assert 1.0 / (1.0 / up + 1.0 / down) == pytest.approx(arl1, rel=0.005)


def test_markov_chain_and_integral_equation_agree_and_converge() -> None:
    """Two independent exact methods: the chain's error falls as 1/states² towards the Nyström value."""
    nystrom = cusum_arl(0.5, 4.0, sided="upper")
    errors = [abs(cusum_arl_markov(0.5, 4.0, sided="upper", states=n) - nystrom) for n in (125, 250, 500)]
    assert errors[2] / nystrom < 2e-5
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.2) and errors[1] / errors[2] == pytest.approx(4.0, rel=0.2)
    assert cusum_arl_markov(0.25, 8.0, 0.5, states=600) == pytest.approx(cusum_arl(0.25, 8.0, 0.5), rel=1e-4)


@pytest.mark.parametrize("h", [4.0, 5.0])
def test_siegmund_approximation_is_good_to_about_one_percent(h) -> None:
    """statistics.md: one-sided ARL0 ≈ (exp(2kb) − 2kb − 1)/(2k²), b = h + 1.166, 'good to ~1 %'."""
    k, b = 0.5, h + 1.166
    siegmund = (math.exp(2 * k * b) - 2 * k * b - 1) / (2 * k * k)
    assert siegmund == pytest.approx(cusum_arl_markov(k, h, sided="upper"), rel=0.015)


def test_chain_rows_are_sub_stochastic() -> None:
    q = cusum_chain(0.5, 4.0, 1.0, 300)
    assert (q >= 0).all() and (q.sum(axis=1) <= 1.0 + 1e-12).all()
    assert q.sum(axis=1)[-1] < q.sum(axis=1)[0]  # the top state alarms most often
    with pytest.raises(ValueError, match="states"):
        cusum_chain(0.5, 4.0, 0.0, 1)


@pytest.mark.slow
def test_two_sided_detector_in_control_arl_matches_the_published_168() -> None:
    """The detector itself (TabularCusum k = 0.5, h = 4) on N(0, 1): simulated ARL0 within 3 SE of 167.7 (168)."""
    mean, se = monte_carlo_arl(lambda: TabularCusum(0.5, 4.0), lambda rng, n: rng.normal(0.0, 1.0, n),
                               n_runs=_runs(4000), seed=21, max_steps=100_000)
    assert abs(mean - cusum_arl_markov(0.5, 4.0, states=400)) < 3 * se


# --- conditional detection delay --------------------------------------------------------------------------


def test_conditional_delay_starts_at_the_zero_state_arl_and_falls_to_steady_state() -> None:
    h = cusum_threshold(0.5, 500.0, sided="upper")
    q0, q1 = cusum_chain(0.5, h, 0.0, 600), cusum_chain(0.5, h, 1.0, 600)
    at = [conditional_delay(q0, q1, tau) for tau in (0, 1, 5, 50, 200)]
    assert at[0] == pytest.approx(cusum_arl(0.5, h, 1.0, "upper"), rel=1e-4)
    assert at[0] > at[1] > at[2] > at[3] and at[3] == pytest.approx(at[4], rel=1e-6)  # Lorden: zero state is worst


def test_conditional_delay_matches_simulation_of_the_detector() -> None:
    """Upper CUSUM k = 0.5, h = 3, change after 30 in-control observations, 4,000 streams."""
    q0, q1 = cusum_chain(0.5, 3.0, 0.0, 600), cusum_chain(0.5, 3.0, 1.0, 600)
    exact = conditional_delay(q0, q1, 30)
    rng = np.random.default_rng(5)
    delays = []
    for _ in range(4000):
        chart = TabularCusum(0.5, 3.0, sided="upper")
        xs = np.r_[rng.normal(0, 1, 30), rng.normal(1, 1, 200)]
        at = next((i for i, x in enumerate(xs, 1) if chart.update(x)), None)
        if at is not None and at > 30:
            delays.append(at - 30)
    d = np.asarray(delays, dtype=float)
    assert abs(d.mean() - exact) < 3 * d.std(ddof=1) / math.sqrt(d.size)


def test_dense_bernoulli_chain_agrees_with_the_banded_solver() -> None:
    h = bernoulli_threshold(0.05, 2 * 0.05 / 1.05, 2000.0)
    q = bernoulli_chain(0.05, 2 * 0.05 / 1.05, h, 0.05)
    arl = np.linalg.solve(np.eye(len(q)) - q, np.ones(len(q)))[0]
    assert arl == pytest.approx(bernoulli_arl(0.05, 2 * 0.05 / 1.05, h), rel=0.01)


# --- risk-adjusted CUSUM (Steiner et al. 2000) -------------------------------------------------------------


@pytest.mark.parametrize("p", [0.02, 0.1, 0.3])
def test_risk_adjusted_cusum_on_one_risk_is_the_bernoulli_cusum(p) -> None:
    """With every patient at risk p and R_A = 2 the Steiner weights are ln(p1/p) and ln((1−p1)/(1−p)) with
    p1 = 2p/(1+p): the same chart as the Bernoulli CUSUM. Two independent chains must agree, and so must the paths."""
    p1 = 2 * p / (1 + p)
    for odds_ratio, true_p in ((1.0, p), (2.0, p1)):
        ra = racusum_arl([p], 2.0, 3.0, odds_ratio=odds_ratio)
        assert ra == pytest.approx(bernoulli_arl(p, p1, 3.0, true_p), rel=0.02)
    rng = np.random.default_rng(1)
    ra_chart, b_chart = RiskAdjustedCusum(2.0, 3.0), BernoulliCusum(p, p1, 3.0)
    for y in (rng.random(2000) < p1).astype(float):
        assert ra_chart.update(y, p) == b_chart.update(y)
        assert ra_chart.statistic == pytest.approx(b_chart.statistic, abs=1e-9)


def test_steiner_weights_for_both_alternatives() -> None:
    """statistics.md p. 446 values, logit p = −3.68 + 0.077·Parsonnet: R_A = 2 at Parsonnet 50: −0.43 / +0.26;
    R_A = 0.5 at Parsonnet 0: +0.012 / −0.681."""
    p50 = 1 / (1 + math.exp(3.68 - 0.077 * 50))
    p0 = 1 / (1 + math.exp(3.68))
    up, down = RiskAdjustedCusum(2.0, 4.5), RiskAdjustedCusum(0.5, 4.0)
    assert (round(up.weight(0, p50), 2), round(up.weight(1, p50), 2)) == (-0.43, 0.26)
    assert (round(down.weight(0, p0), 3), round(down.weight(1, p0), 3)) == (0.012, -0.681)


# --- every new detector speaks the same interface ----------------------------------------------------------


def test_new_detectors_have_the_uniform_interface() -> None:
    for detector in (Bocpd("normal"), RiverAdwin(), RiverPageHinkley(), RiverKswin()):
        assert isinstance(detector, Detector)
        assert (detector.n, detector.drift_detected, detector.change_index) == (0, False, None)
        assert detector.update(0.0) is False and detector.n == 1
        detector.reset()
        assert detector.n == 0


def test_bocpd_localises_a_cusum_alarm() -> None:
    """After a two-sided CUSUM (ARL0 2,000) alarms on a 1 sd rise at observation 201, BOCPD over the observations
    up to the alarm, conditioned on a change, puts it where the CUSUM's own estimate does: median error ≤ 3 for
    both over 30 streams (measured: median 2 for both; BOCPD has rare gross errors, the CUSUM a longer tail)."""
    h = cusum_threshold(0.5, 2000.0)
    cusum_errors, bocpd_errors = [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        xs = np.r_[rng.normal(0, 1, 200), rng.normal(1, 1, 300)]
        chart = TabularCusum(0.5, h)
        at = next((i for i, x in enumerate(xs, 1) if chart.update(x)), None)
        if at is None or at <= 200:
            continue  # a false alarm before the change: nothing to localise
        where = localise(xs[:at], "normal_known_var", hazard=1 / 500, mu0=0.0, tau0=2.0, sigma=1.0)
        assert where is not None
        cusum_errors.append(abs(chart.change_index - 201))
        bocpd_errors.append(abs(where.index - 201))
    assert len(cusum_errors) >= 20
    assert np.median(cusum_errors) <= 3 and np.median(bocpd_errors) <= 3


def test_detector_from_state_restores_bocpd() -> None:
    from monitors.detectors import detector_from_state

    cp = Bocpd("bernoulli", hazard=0.01)
    for y in [0, 0, 1, 0, 1, 1, 1]:
        cp.update(y)
    restored = detector_from_state(cp.state())
    assert isinstance(restored, Bocpd) and restored.run_length_posterior() == cp.run_length_posterior()
    with pytest.raises(ValueError, match="Bocpd"):
        detector_from_state({"type": "Nope"})
