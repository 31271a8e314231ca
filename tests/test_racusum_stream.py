"""Calibration streams (``calibration_oe``): Steiner's risk-adjusted CUSUM on every stream, designed from the baseline.

What is checked, with real values: the in-control odds ratio R_0 (recalibration in the large, then its conservative
design value) on worked examples; the chart's exact in-control ARL over the baseline risk mix at R_0, and a Monte
Carlo check of it; a calibrated stream stays quiet for far less than its ARL0; doubled odds alarm with a change
estimate near the injected time and an O/E with an exact Poisson interval; gating; corrections; back in control;
pickling (the pipeline's checkpoint); bounded memory of the baseline mix; and that the rate charts' fast path
(``BernoulliCusum.update_event``) gives the general recursion's results bit for bit.
"""

from __future__ import annotations

import math
import pickle
import random
import tracemalloc
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.stats import chi2

from monitors.calibrate import monte_carlo_arl, racusum_arl, racusum_threshold
from monitors.detectors import BernoulliCusum, RiskAdjustedCusum
from monitors.streams import (
    MIN_EXPECTED_EVENTS,
    RiskMix,
    StreamMonitor,
    _design_odds_ratio,
    _risk_bin,
    expected_events,
    oe_interval,
    recalibration_odds_ratio,
)
from vigil.domain import ALL, StreamKey
from vigil.settings import BudgetConfig, MonitorConfig, SubgroupConfig, load_settings

START = datetime(2026, 1, 1, tzinfo=UTC)
MODEL = load_settings().model("aki-risk")  # 48 h label window + 3 d grace
LAG = MODEL.label_window + MODEL.label_grace
SITE_KEY = StreamKey("aki-risk", "1", "calibration_oe", "site-a", ALL)


def _monitor(min_n: int = 30, per_days: float = 3650.0, metrics=("calibration_oe",)) -> StreamMonitor:
    cfg = MonitorConfig(baseline_days=30, metrics=list(metrics), budget=BudgetConfig(false_alarms=1, per_days=per_days))
    return StreamMonitor(MODEL, "1", cfg, SubgroupConfig(min_n=min_n), START)


def _risk(rng: random.Random, mean_logit: float = -2.2) -> float:
    return 1.0 / (1.0 + math.exp(-rng.gauss(mean_logit, 1.0)))


def _feed(mon: StreamMonitor, days: range, rng: random.Random, per_day: int = 40, odds=lambda day: 1.0,
          mean_logit: float = -2.2) -> list:
    """Cases whose true odds are ``odds(day)`` × the model's predicted odds, observed when their window closes."""
    signals = []
    for day in days:
        for i in range(per_day):
            t = START + timedelta(days=day, minutes=i)
            p = _risk(rng, mean_logit)
            r = odds(day)
            y = float(rng.random() < r * p / (1 - p + r * p))
            signals += mon.observe("calibration_oe", "site-a", [ALL], y, t, t + LAG, risk=p)
    return signals


# --- R_0: recalibration in the large, and the value the chart is designed for -------------------------------------


def test_r0_worked_example_one_risk() -> None:
    """1,000 cases all predicted at 10 %, 150 events. Expected events match observed when the odds are multiplied by
    r = (0.15/0.85)/(0.10/0.90) = 1.5882 (the MLE of logistic recalibration in the large). The design uses the
    one-sided 95 % exact Poisson upper bound of the 150 events, χ²₀.₉₅(302)/2 = 171.76, i.e. a rate of 17.18 % and
    r = (0.17176/0.82824)/(1/9) = 1.8665, rounded up to three digits: 1.87."""
    assert recalibration_odds_ratio([0.1], [1000], 150) == pytest.approx((0.15 / 0.85) / (0.1 / 0.9), rel=1e-10)
    upper = chi2.ppf(0.95, 2 * 151) / 2
    assert upper == pytest.approx(171.7646, abs=1e-4)
    assert recalibration_odds_ratio([0.1], [1000], upper) == pytest.approx(1.8665, abs=1e-4)
    assert _design_odds_ratio([0.1], [1000], 150) == 1.87


def test_r0_worked_example_two_risks() -> None:
    """500 cases at 5 % and 500 at 20 %: 25 + 100 = 125 expected events. 125 observed → r = 1 (calibrated);
    200 observed → the r that makes 500·r·0.05/(0.95 + 0.05r) + 500·r·0.2/(0.8 + 0.2r) = 200, r = 1.8192.
    No events at all still gives a finite design (the Poisson bound of 0 events is 3.0): r = 0.019883 → 0.0199."""
    values, counts = [0.05, 0.2], [500, 500]
    assert expected_events(values, counts, 1.0) == pytest.approx(125.0)
    assert recalibration_odds_ratio(values, counts, 125) == pytest.approx(1.0, abs=1e-9)
    r = recalibration_odds_ratio(values, counts, 200)
    assert r == pytest.approx(1.81919, abs=1e-5)
    assert expected_events(values, counts, r) == pytest.approx(200.0, abs=1e-6)
    assert _design_odds_ratio(values, counts, 0) == 0.0199  # r = 0.019883, rounded up to three digits
    with pytest.raises(ValueError, match="strictly between 0 and the 1000 cases"):
        recalibration_odds_ratio(values, counts, 0)
    assert _design_odds_ratio([0.9], [10], 10) is None  # every case an event: no finite odds multiplier


def test_oe_interval_is_the_exact_poisson_interval() -> None:
    # Ulm 1990: O = 10, E = 5 → [χ²₀.₀₂₅(20)/2, χ²₀.₉₇₅(22)/2] / 5 = [0.959, 3.678]
    lo, hi = oe_interval(10, 5.0)
    assert (lo, hi) == (pytest.approx(chi2.ppf(0.025, 20) / 10), pytest.approx(chi2.ppf(0.975, 22) / 10))
    assert (round(lo, 3), round(hi, 3)) == (0.959, 3.678)
    assert oe_interval(0, 2.0) == (0.0, pytest.approx(chi2.ppf(0.975, 2) / 4))


def test_histogram_mix_gives_the_threshold_of_the_raw_risks() -> None:
    """The bounded baseline summary (64 log-odds bins, each at its cases' mean risk) changes the threshold by far
    less than the chain's own discretisation error (≈ 0.4 %, monitors/calibrate.py)."""
    rng = np.random.default_rng(1)
    risks = 1.0 / (1.0 + np.exp(-rng.normal(-2.2, 1.2, 2000)))
    mix = RiskMix()
    for p in risks.tolist():
        mix.add(_risk_bin(p), p)
    values, counts = mix.histogram()
    assert sum(counts) == 2000 and sum(v * n for v, n in zip(values, counts)) == pytest.approx(risks.sum())
    h_mix = racusum_threshold(values, 2.2, 1e5, r0=1.1, counts=counts)
    h_raw = racusum_threshold(risks, 2.2, 1e5, r0=1.1)
    assert h_mix == pytest.approx(h_raw, rel=2e-3)
    assert racusum_arl(risks, 2.2, h_mix, r0=1.1) == pytest.approx(1e5, rel=0.01)


def test_in_control_arl_at_r0_matches_simulation() -> None:
    """With R_0 ≠ 1 the chart is in control when the true odds are R_0 × the predicted odds: the exact ARL there
    (what racusum_threshold solves) agrees with Monte Carlo of the chart on that mix."""
    values, counts, r0 = [0.05, 0.15, 0.4], [5, 3, 2], 1.3
    h = racusum_threshold(values, 2 * r0, 300.0, r0=r0, counts=counts)
    exact = racusum_arl(values, 2 * r0, h, r0=r0, counts=counts)
    assert 300.0 <= exact < 330.0
    p = np.repeat(values, counts)
    true_p = r0 * p / (1 - p + r0 * p)

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        i = rng.integers(0, p.size, n)
        return np.column_stack([(rng.random(n) < true_p[i]).astype(float), p[i]])

    mean, se = monte_carlo_arl(lambda: RiskAdjustedCusum(2 * r0, h, r0), draw, n_runs=400, seed=5, max_steps=100_000)
    assert abs(mean - exact) < 3 * se
    assert racusum_arl(values, 2 * r0, h, odds_ratio=1.0, r0=r0, counts=counts) > exact  # calibrated: even quieter


# --- the stream ----------------------------------------------------------------------------------------------------


def test_a_calibrated_stream_is_designed_from_its_baseline_and_stays_quiet() -> None:
    mon = _monitor()
    rng = random.Random(11)
    assert _feed(mon, range(30), rng) == []
    stream = mon.streams[SITE_KEY]
    assert stream.status == "baseline" and stream.b_n == 1200
    assert sum(stream.mix.counts) == 1200 and sum(stream.mix.sums) == pytest.approx(stream.b_expected)
    values, counts = stream.mix.histogram()
    quiet = _feed(mon, range(30, 200), rng)  # 6,800 in-control cases after the baseline
    assert quiet == []
    assert stream.status == "active" and stream.detector_name == "racusum" and stream.mix is None
    d = stream.detector
    assert isinstance(d, RiskAdjustedCusum)
    # the family budget: one false alarm per 3,650 days over 2 streams (site-a, all) × 1 metric, 40 cases a day
    assert 40 * 3650 * 2 <= stream.arl0 < 40 * 3650 * 2 * 1.26
    assert stream.arl0 > 40 * 6800  # the quiet run is far shorter than the designed ARL0
    # the threshold gives (at least) that ARL0, exactly, over the baseline mix in control (true odds = R_0 × predicted)
    assert stream.arl0 <= racusum_arl(values, d.ra, d.threshold, r0=d.r0, counts=counts) < stream.arl0 * 1.02
    # R_0 is the conservative design value: at or above the MLE of the baseline's calibration in the large
    assert stream.baseline == pytest.approx(stream.b_sum / stream.b_expected)
    mle = recalibration_odds_ratio(values, counts, stream.b_sum)
    assert mle <= d.r0 <= _design_odds_ratio(values, counts, stream.b_sum) and d.ra == pytest.approx(2 * d.r0)
    assert d.n == 6800 and sum(p.n for p in stream.points.values()) == 6800
    assert all(p.threshold == d.threshold for p in stream.points.values())


def test_doubled_odds_alarm_after_the_change_with_an_oe_and_its_interval() -> None:
    mon = _monitor()
    rng = random.Random(12)
    change = 120
    signals = _feed(mon, range(200), rng, odds=lambda day: 2.0 if day >= change else 1.0)
    mine = [s for s in signals if s.stream == SITE_KEY]
    assert mine, "doubled odds of the outcome went unnoticed"
    first = mine[0]
    changed_at = START + timedelta(days=change)
    assert first.detector == "racusum"
    assert first.detected_at >= changed_at
    assert abs((first.change_estimate - changed_at).days) <= 10
    stream = mon.streams[SITE_KEY]
    assert first.n_baseline == stream.b_n == 1200 and first.n_current > 0
    assert first.baseline == pytest.approx(stream.b_sum / stream.b_expected)
    assert first.current > 1.3 and first.current_ci[0] > 1.0 > first.baseline * 0.8
    assert first.current_ci[0] < first.current < first.current_ci[1]


def test_small_cells_and_too_few_expected_events_are_insufficient_data() -> None:
    few = _monitor(min_n=2000)  # 1,200 baseline cases < min_n
    _feed(few, range(40), random.Random(13))
    assert {s.status for s in few.streams.values()} == {"insufficient_data"}
    rare = _monitor()  # 1,200 cases at ~0.1 % risk: ~1.2 expected events, below MIN_EXPECTED_EVENTS
    _feed(rare, range(40), random.Random(14), mean_logit=-7.0)
    s = rare.streams[SITE_KEY]
    assert s.b_n == 1200 and s.b_expected < MIN_EXPECTED_EVENTS
    assert s.status == "insufficient_data" and s.detector is None and s.mix is None
    assert s.points == {}  # observed after the baseline, but nothing charted


def test_risk_is_required_and_clamped() -> None:
    mon = _monitor(metrics=("calibration_oe", "fnr"))
    with pytest.raises(ValueError, match="needs the prediction's predicted risk"):
        mon.observe("calibration_oe", "site-a", [ALL], 1.0, START, START)
    with pytest.raises(ValueError, match="needs the prediction's predicted risk"):
        mon.observe("calibration_oe", "site-a", [ALL], 1.0, START, START, risk=float("nan"))
    mon.observe("calibration_oe", "site-a", [ALL], 1.0, START, START, risk=1.0)  # clamped to 1 − 1e-6
    assert mon.streams[SITE_KEY].b_expected == 1.0 - 1e-6 and mon.streams[SITE_KEY].mix.counts[63] == 1
    mon.observe("fnr", "site-a", [ALL], 1.0, START, START, risk=0.3)  # other metrics ignore it
    fnr = mon.streams[StreamKey("aki-risk", "1", "fnr", "site-a", ALL)]
    assert (fnr.b_n, fnr.b_sum, fnr.b_expected, fnr.mix) == (1, 1.0, 0.0, None)


def test_back_in_control_after_the_odds_return_and_not_while_they_stay_doubled() -> None:
    results = {}
    for name, after in (("returns", 1.0), ("persists", 2.0)):
        mon = _monitor()
        rng = random.Random(15)
        signals = _feed(mon, range(140), rng, odds=lambda day: 2.0 if day >= 100 else 1.0)
        assert any(s.stream == SITE_KEY for s in signals)
        _feed(mon, range(140, 240), rng, odds=lambda day, a=after: a)
        s = mon.streams[SITE_KEY]
        assert s.since_alarm_n >= 30
        results[name] = mon.back_in_control(SITE_KEY)
    assert results == {"returns": True, "persists": False}


def test_calibration_is_never_corrected() -> None:
    """Calibration is observed only at a case's window close, when its label is frozen (vigil.pipeline): a
    correction of it is ignored, like one of a score."""
    mon, twin = _monitor(), _monitor()
    _feed(mon, range(10), random.Random(16))
    _feed(twin, range(10), random.Random(16))
    t = START + timedelta(days=5, hours=12)
    mon.correct("calibration_oe", "site-a", [ALL], 1.0, None, t)
    a, b = mon.streams[SITE_KEY], twin.streams[SITE_KEY]
    assert (a.b_n, a.b_sum, a.b_expected, list(a.mix.counts)) == (b.b_n, b.b_sum, b.b_expected, list(b.mix.counts))


@pytest.mark.parametrize("cut_day", [20, 90])  # in the baseline (the mix is kept), and while active
def test_state_survives_pickle(cut_day: int) -> None:
    mon = _monitor()
    rng = random.Random(17)
    _feed(mon, range(cut_day), rng, odds=lambda day: 2.0 if day >= 100 else 1.0)
    restored = pickle.loads(pickle.dumps(mon, protocol=pickle.HIGHEST_PROTOCOL))
    state = rng.getstate()
    rest = range(cut_day, 160)
    odds = lambda day: 2.0 if day >= 100 else 1.0  # noqa: E731
    a = _feed(mon, rest, rng, odds=odds)
    rng.setstate(state)
    b = _feed(restored, rest, rng, odds=odds)
    assert a and a == b
    s, r = mon.streams[SITE_KEY], restored.streams[SITE_KEY]
    assert s.detector.state() == r.detector.state()
    assert (s.run_expected, s.since_alarm_expected, s.b_expected) == (r.run_expected, r.since_alarm_expected,
                                                                        r.b_expected)


def test_baseline_mix_memory_is_bounded() -> None:
    """100,000 streams must stay well under 1 GiB: the mix is a fixed 64-bin summary, whatever the baseline size."""
    mon = _monitor()
    t = START + timedelta(hours=1)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(2000):
        mon.observe("calibration_oe", f"s{i}", [ALL], 0.0, t, t, risk=0.1)
    per_stream = (tracemalloc.get_traced_memory()[0] - before) / 2000  # one new stream (and its group) each
    for _ in range(20):
        for i in range(2000):
            mon.observe("calibration_oe", f"s{i}", [ALL], 1.0, t, t, risk=0.3)
    grown = (tracemalloc.get_traced_memory()[0] - before) / 2000
    tracemalloc.stop()
    assert per_stream < 3000 and grown < per_stream * 1.1  # more baseline cases: no more memory


# --- the rate charts' fast path ---------------------------------------------------------------------------------


def test_update_event_is_the_general_recursion_bit_for_bit() -> None:
    rng = random.Random(18)
    fast, general = BernoulliCusum(0.05, 0.095, 3.0), BernoulliCusum(0.05, 0.095, 3.0)
    alarms = 0
    for _ in range(20_000):
        y = float(rng.random() < 0.08)
        a, b = fast.update_event(y == 1.0), general.update(y)
        assert a == b
        alarms += a
        assert fast.state() == general.state()
    assert alarms > 5  # alarms and restarts were exercised


def test_rate_streams_chart_exactly_what_a_bare_detector_computes() -> None:
    """The stream's hot path (one update per stream, the daily point's statistic) against a standalone chart fed
    the same outcomes: the same statistic after every observation, the same alarms."""
    cfg = MonitorConfig(baseline_days=30, metrics=["fnr"], budget=BudgetConfig(false_alarms=1, per_days=30))
    mon = StreamMonitor(MODEL, "1", cfg, SubgroupConfig(min_n=30), START)
    rng = random.Random(19)
    for day in range(30):
        for i in range(20):
            t = START + timedelta(days=day, minutes=i)
            mon.observe("fnr", "site-a", [ALL], float(rng.random() < 0.1), t, t)
    mon.advance(START + timedelta(days=30) + LAG)
    key = StreamKey("aki-risk", "1", "fnr", "site-a", ALL)
    s = mon.streams[key]
    bare = BernoulliCusum(s.detector.p0, s.detector.p1, s.detector.threshold)
    alarms = 0
    for day in range(30, 90):
        for i in range(20):
            t = START + timedelta(days=day, minutes=i)
            y = float(rng.random() < (0.1 if day < 60 else 0.25))
            signals = mon.observe("fnr", "site-a", [ALL], y, t, t)
            alarm = bare.update(y)
            assert any(x.stream == key for x in signals) == alarm
            alarms += alarm
            assert s.points[t.replace(hour=0, minute=0)].statistic == bare.statistic
            if alarm:
                bare.reset()
            assert s.detector.statistic == bare.statistic
    assert alarms >= 1 and s.alarms == alarms
