"""Streams: baseline, completion by watermark, family-budget calibration, gating, signals with change estimates."""

import random
from datetime import UTC, datetime, timedelta

import pytest

from monitors.streams import StreamMonitor, interval, wilson
from vigil.domain import ALL, StreamKey
from vigil.settings import BudgetConfig, MonitorConfig, SubgroupConfig, load_settings

START = datetime(2026, 1, 1, tzinfo=UTC)


def _monitor(metrics=("fnr",), min_n=30, baseline_days=30):
    model = load_settings().model("aki-risk")  # 48 h window + 3 d grace
    cfg = MonitorConfig(baseline_days=baseline_days, metrics=list(metrics),
                        budget=BudgetConfig(false_alarms=1, per_days=365))
    return StreamMonitor(model, "1.4.0", cfg, SubgroupConfig(min_n=min_n), START), model


def _feed(mon, model, days, per_day, rate, rng, site="site-a", cells=(ALL,), change=None, new_rate=None):
    signals = []
    for day in range(days):
        for i in range(per_day):
            t = START + timedelta(days=day, minutes=i)
            p = new_rate if change is not None and day >= change else rate
            seen = t + model.label_window  # labels arrive when the window closes
            signals += mon.observe("fnr", site, list(cells), float(rng.random() < p), t, seen)
    return signals


def test_wilson_interval_matches_the_published_example():
    # Newcombe 1998, Table I: 81/263 → 0.2553–0.3662 (Wilson score interval)
    lo, hi = wilson(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)


def test_interval_is_wilson_for_rates_and_normal_for_score_means():
    assert interval("fnr", 81, 81, 263) == wilson(81, 263)
    lo, hi = interval("score_mean", 1 + 2 + 3 + 4, 1 + 4 + 9 + 16, 4)  # mean 2.5, sd 1.118
    assert (lo, hi) == (pytest.approx(2.5 - 1.0957, abs=1e-4), pytest.approx(2.5 + 1.0957, abs=1e-4))


def test_labeled_metric_waits_for_its_baseline_labels_then_calibrates_from_the_budget():
    mon, model = _monitor()
    rng = random.Random(1)
    _feed(mon, model, 31, 20, 0.1, rng)
    key = StreamKey("aki-risk", "1.4.0", "fnr", "site-a", ALL)
    stream = mon.streams[key]
    assert stream.status == "baseline"  # window + grace of the last baseline prediction still open
    mon.advance(START + timedelta(days=30) + model.label_window + model.label_grace)
    assert stream.status == "active"
    # 2 streams (site-a and all) × 1 metric share one false alarm per 365 days; 20 events/day each
    expected = 20 * 365 * 2 / 1
    assert expected <= stream.arl0 < expected * 1.26
    assert stream.detector.threshold > 0
    assert stream.baseline == pytest.approx((stream.b_sum + 0.5) / (stream.b_n + 1), rel=0.05)


def test_small_cells_are_reported_as_insufficient_data():
    mon, model = _monitor(min_n=1000)
    _feed(mon, model, 40, 10, 0.1, random.Random(2))
    statuses = {s.status for s in mon.streams.values()}
    assert statuses == {"insufficient_data"}


def test_a_stable_stream_stays_quiet_and_a_doubled_error_rate_is_signalled_after_the_change():
    mon, model = _monitor()
    quiet = _feed(mon, model, 200, 40, 0.1, random.Random(3))
    assert quiet == []
    mon2, _ = _monitor()
    signals = _feed(mon2, model, 200, 40, 0.1, random.Random(3), change=120, new_rate=0.3)
    assert signals, "a tripled error rate went unnoticed"
    first = signals[0]
    change_time = START + timedelta(days=120)
    assert first.detected_at >= change_time
    assert abs((first.change_estimate - change_time).days) <= 5
    assert first.current_ci[0] > first.baseline
    assert first.n_current > 0 and first.n_baseline == mon2.streams[first.stream].b_n


def test_observations_before_completion_are_replayed_not_lost():
    mon, model = _monitor()
    rng = random.Random(4)
    _feed(mon, model, 33, 20, 0.1, rng)  # days 30-32 arrive while the baseline is still incomplete
    key = StreamKey("aki-risk", "1.4.0", "fnr", "site-a", ALL)
    mon.advance(START + timedelta(days=40))
    assert mon.streams[key].detector.n == 3 * 20
