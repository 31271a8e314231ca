"""Detectors: recursions against hand-computed values, published weights, change-point estimates, checkpointing."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest

import monitors.detectors
from monitors.detectors import (
    BernoulliCusum,
    Detector,
    Ewma,
    RiskAdjustedCusum,
    TabularCusum,
    detector_from_state,
)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(monitors.detectors)
    assert result.attempted >= 12
    assert result.failed == 0


def test_every_detector_has_the_uniform_interface() -> None:
    for detector in (TabularCusum(0.5, 4.0), Ewma(0.1, 2.8), BernoulliCusum(0.1, 0.2, 3.0), RiskAdjustedCusum(2.0, 4.5)):
        assert isinstance(detector, Detector)
        assert (detector.n, detector.statistic, detector.drift_detected, detector.change_index) == (0, 0.0, False, None)


# --- Tabular CUSUM -----------------------------------------------------------------------------


def test_cusum_recursion_both_sides() -> None:
    cusum = TabularCusum(k=0.5, h=2.0)
    stats = []
    for x in [1.0, 1.5, -0.2, -2.0, -1.5, -1.5]:
        cusum.update(x)
        stats.append((round(cusum.upper, 10), round(cusum.lower, 10)))
    # upper: 0.5, 1.5, 0.8, 0, 0, 0 ; lower: 0, 0, 0, 1.5, 2.5 (alarm), then a fresh run: 0 / 1.0
    assert stats[:5] == [(0.5, 0.0), (1.5, 0.0), (0.8, 0.0), (0.0, 1.5), (0.0, 2.5)]
    assert stats[5] == (0.0, 1.0) and cusum.n == 1  # restarted after the alarm at n = 5


def test_cusum_lower_alarm_reports_direction_and_change() -> None:
    cusum = TabularCusum(k=0.5, h=2.0)
    alarms = [cusum.update(x) for x in [0.3, 0.2, -1.4, -1.5, -1.2]]
    assert alarms == [False, False, False, False, True]
    assert cusum.direction == -1
    assert cusum.change_index == 3  # the lower side last stood at zero after observation 2
    assert cusum.statistic == pytest.approx(0.9 + 1.0 + 0.7)


def test_one_sided_cusum_ignores_the_other_direction() -> None:
    upper = TabularCusum(k=0.5, h=2.0, sided="upper")
    assert not any(upper.update(-3.0) for _ in range(20))
    assert upper.lower == 0.0
    lower = TabularCusum(k=0.5, h=2.0, sided="lower")
    assert [lower.update(-1.6) for _ in range(2)] == [False, True]


def test_head_start_shortens_detection_of_an_initial_shift() -> None:
    plain, fir = TabularCusum(0.5, 4.0), TabularCusum(0.5, 4.0, head_start=2.0)
    plain_n = next(i for i in range(1, 50) if plain.update(1.5))
    fir_n = next(i for i in range(1, 50) if fir.update(1.5))
    assert (plain_n, fir_n) == (5, 3)  # 1.0 per step from 0 vs from 2
    assert fir.change_index == 1


@pytest.mark.parametrize("kwargs", [dict(k=-0.1, h=4), dict(k=0.5, h=0), dict(k=0.5, h=4, head_start=4),
                                    dict(k=0.5, h=4, sided="both")])
def test_cusum_rejects_bad_designs(kwargs) -> None:
    with pytest.raises(ValueError, match="TabularCusum|sided"):
        TabularCusum(**kwargs)


# --- EWMA --------------------------------------------------------------------------------------


def test_ewma_exact_limits_start_at_the_observation_scale() -> None:
    exact, fixed = Ewma(0.1, 3.0, limits="exact"), Ewma(0.1, 3.0)
    exact.update(2.5)
    fixed.update(2.5)
    # Z_1 = λx has sd λ: the exact-limit statistic is |x| itself; fixed limits use the asymptotic sd sqrt(λ/(2−λ))
    assert exact.statistic == pytest.approx(2.5)
    assert fixed.statistic == pytest.approx(0.25 / math.sqrt(0.1 / 1.9))
    # Z_2 = 0.225 + 0.3 = 0.525: 3.90 sd of Z_2 (exact limits alarm), 2.29 asymptotic sd (fixed limits do not)
    assert exact.update(3.0) and exact.statistic == pytest.approx(0.525 / math.sqrt(0.1 / 1.9 * (1 - 0.9**4)))
    assert not fixed.update(3.0) and fixed.statistic == pytest.approx(0.525 / math.sqrt(0.1 / 1.9))


def test_ewma_change_index_is_the_last_centre_crossing() -> None:
    ewma = Ewma(lam=0.3, L=2.0)
    xs = [0.5, -1.0, -0.2, 0.4, 1.5, 2.0]
    alarms = [ewma.update(x) for x in xs]
    assert alarms.index(True) == 5
    # Z: 0.15, −0.195, −0.1965, −0.01755, 0.4377 (crossing at observation 5), 0.9064
    assert ewma.change_index == 5
    assert ewma.direction == 1


# --- Bernoulli and risk-adjusted CUSUMs --------------------------------------------------------


def test_bernoulli_weights_are_the_log_likelihood_ratio() -> None:
    chart = BernoulliCusum(p0=0.1, p1=0.2, h=10.0)
    chart.update(1)
    assert chart.statistic == pytest.approx(math.log(2.0))
    chart.update(0)
    assert chart.statistic == pytest.approx(math.log(2.0) + math.log(0.8 / 0.9))
    with pytest.raises(ValueError, match="0/1 outcomes"):
        chart.update(0.5)
    with pytest.raises(ValueError, match="increase"):
        BernoulliCusum(p0=0.2, p1=0.1, h=3.0)


@pytest.mark.parametrize(
    ("ra", "parsonnet", "w0", "w1"),
    [(2.0, 0, "-0.024", "0.67"), (2.0, 50, "-0.43", "0.26"), (0.5, 0, "0.012", "-0.681"), (0.5, 50, "0.316", "-0.377")],
)
def test_risk_adjusted_weights_reproduce_steiner_2000(ra, parsonnet, w0, w1) -> None:
    """Steiner, Cook, Farewell & Treasure 2000, p. 446: logit p = −3.68 + 0.077·Parsonnet; every printed digit."""
    p = 1.0 / (1.0 + math.exp(3.68 - 0.077 * parsonnet))
    chart = RiskAdjustedCusum(ra=ra, h=4.5)
    for y, published in ((0, w0), (1, w1)):
        half_unit = 0.5 * 10.0 ** -len(published.split(".")[1])
        assert abs(chart.weight(y, p) - float(published)) <= half_unit


def test_risk_adjusted_cusum_rejects_bad_risk() -> None:
    chart = RiskAdjustedCusum(ra=2.0, h=4.5)
    with pytest.raises(ValueError, match="predicted risk"):
        chart.update(1, 1.2)


# --- change-point estimates and checkpointing ------------------------------------------------------


def _change_estimates(make, draw_before, draw_after, change_at: int, seeds=range(25)) -> list[int]:
    """For each seed: feed in-control data then shifted data until the first alarm after the change."""
    estimates = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        detector = make()
        t = 0
        while True:
            t += 1
            obs = draw_before(rng) if t < change_at else draw_after(rng)
            if (detector.update(*obs) if isinstance(obs, tuple) else detector.update(obs)) and t >= change_at:
                estimates.append(t - detector.n + detector.change_index)  # back to the global index
                break
    return estimates


@pytest.mark.parametrize(
    ("make", "before", "after"),
    [
        (lambda: TabularCusum(0.5, 8.0), lambda r: r.normal(), lambda r: r.normal(1.5)),
        (lambda: TabularCusum(0.5, 8.0), lambda r: r.normal(), lambda r: r.normal(-1.5)),
        (lambda: Ewma(0.1, 3.5), lambda r: r.normal(), lambda r: r.normal(1.5)),
        (lambda: BernoulliCusum(0.05, 0.2, 6.0), lambda r: float(r.random() < 0.05), lambda r: float(r.random() < 0.3)),
        (lambda: RiskAdjustedCusum(3.0, 6.0), lambda r: (float(r.random() < 0.1), 0.1),
         lambda r: (float(r.random() < 0.4), 0.1)),
    ],
    ids=["cusum-up", "cusum-down", "ewma", "bernoulli", "racusum"],
)
def test_change_point_estimate_lands_near_the_true_change(make, before, after) -> None:
    change_at = 301
    estimates = _change_estimates(make, before, after, change_at)
    errors = np.abs(np.array(estimates) - change_at)
    assert np.median(errors) <= 6
    assert np.mean(errors <= 15) >= 0.75


@pytest.mark.parametrize(
    ("make", "draw"),
    [
        (lambda: TabularCusum(0.5, 3.0, head_start=1.0), lambda r, n: r.normal(0.4, 1.0, n)),
        (lambda: Ewma(0.2, 2.5, limits="exact"), lambda r, n: r.normal(0.4, 1.0, n)),
        (lambda: BernoulliCusum(0.05, 0.1, 2.5), lambda r, n: (r.random(n) < 0.08).astype(float)),
        (lambda: RiskAdjustedCusum(2.0, 2.5), lambda r, n: np.column_stack(
            [(r.random(n) < 0.2).astype(float), np.full(n, 0.1)])),
    ],
    ids=["cusum", "ewma", "bernoulli", "racusum"],
)
def test_state_round_trip_mid_stream_gives_identical_alarms(make, draw) -> None:
    rng = np.random.default_rng(11)
    data = draw(rng, 3000).tolist()
    original = make()
    step = (lambda d, o: d.update(*o)) if isinstance(data[0], list) else (lambda d, o: d.update(o))
    for obs in data[:1234]:
        step(original, obs)
    saved = json.loads(json.dumps(original.state()))
    restored = detector_from_state(saved)
    assert type(restored).from_state(saved).state() == original.state()

    def trace(detector):
        return [(step(detector, o), detector.statistic, detector.n, detector.change_index) for o in data[1234:]]

    expected, got = trace(original), trace(restored)
    assert sum(alarm for alarm, *_ in expected) >= 3  # the comparison covers several alarms and resets
    assert got == expected


def test_from_state_refuses_another_detectors_state() -> None:
    state = TabularCusum(0.5, 4.0).state()
    with pytest.raises(ValueError, match="TabularCusum"):
        Ewma.from_state(state)
    with pytest.raises(ValueError, match="unknown detector type"):
        detector_from_state({"type": "PageHinkley"})
