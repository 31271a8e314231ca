"""The family false-alarm budget holds on a long in-control feed (issue 5; DESIGN.md §Statistics).

A ``stable`` simulated feed has no change, so every alarm is a false alarm. The accounting (monitored exposure per
metric, budgeted count, alarms = Σ ``Stream.alarms`` cross-checked against Σ ``Alert.fire_count``) is the one
``bench/false_alarms.py`` reports (re-stated here: ``bench`` is not importable under pytest); see its docstring and
BENCHMARKS.md §Family false-alarm budget for the method and the full-length results. Everything is real: the
simulator writes FHIR NDJSON and the whole pipeline (decode, ontology, label join, streams, calibrated detectors, alert book) runs on it.
Nothing is mocked.

Reduced form: the feed is ``550 × VIGIL_SLOW_SCALE`` days (at least 110); CI runs scale 0.2 → 110 days, of which
about 80 are monitored after the 30-day baseline (fewer for the CTA labeled metrics, whose 90-day label window must
close first).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from scipy.stats import poisson

from vigil.pipeline import Pipeline
from vigil.settings import BudgetConfig, Settings, load_settings
from vigil.simulator import simulate

SLOW_SCALE = float(os.environ.get("VIGIL_SLOW_SCALE", "1.0"))
DAYS = max(110, round(550 * SLOW_SCALE))  # 110 days in CI (scale 0.2), 550 at full scale
SEED = 7  # the simulator's default seed, fixed before any result was seen
VOLUME = 0.6  # ≈ 126 predictions a day over 2 devices × 3 sites: keeps the CI form under ~15 s of CPU
GENEROUS = 400.0  # false alarms per year, 400 × the configured budget: ≈ 80 budgeted per device at 110 days
LEVEL = 0.999


def with_budget(settings: Settings, false_alarms: float, per_days: float) -> Settings:
    monitors = settings.monitors.model_copy(update={"budget": BudgetConfig(false_alarms=false_alarms,
                                                                           per_days=per_days)})
    return settings.model_copy(update={"monitors": monitors})


@pytest.fixture(scope="module")
def stable_feed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stable")
    simulate("stable", out, seed=SEED, days=DAYS, volume=VOLUME)
    return out


def _run(feed: Path, false_alarms: float | None = None) -> tuple[dict[str, dict[str, float]], float]:
    """Per device: calibrated streams, budgeted false alarms for the monitored exposure, and detector alarms.

    Budgeted = Σ over the device's M metrics of (B/M)·T_m/D, T_m = days from the end of the baseline to the last
    event day the metric's calibrated streams observed (observations of the first post-baseline days that waited for
    a labeled metric's baseline are replayed, so they count). Alarms = Σ ``Stream.alarms``, which must equal
    Σ ``Alert.fire_count`` (re-fires of an open alert are further alarms of the same chart).
    """
    settings = load_settings()
    if false_alarms is not None:
        settings = with_budget(settings, false_alarms, settings.monitors.budget.per_days)
    budget = settings.monitors.budget
    result = Pipeline(settings).run_paths([feed])
    devices = {}
    for monitor in result.monitors():
        budgeted, alarms, streams = 0.0, 0, 0
        for metric in monitor.metrics:
            mine = [s for s in monitor.streams.values() if s.key.metric == metric]
            active = [s for s in mine if s.detector is not None]
            days = [d for s in active for d in s.points]
            if days:
                span = (max(days) + timedelta(days=1) - monitor.baseline_end) / timedelta(days=1)
                budgeted += budget.false_alarms / len(monitor.metrics) * max(span, 0.0) / budget.per_days
            alarms += sum(s.alarms for s in mine)
            streams += len(active)
        fires = sum(a.fire_count for a in result.alerts.of(monitor.model.id))
        assert alarms == fires, f"{monitor.model.id}: {alarms} detector alarms but {fires} alert fires"
        devices[monitor.model.id] = {"budgeted": budgeted, "alarms": alarms, "streams": streams}
    return devices, budget.false_alarms


@pytest.fixture(scope="module")
def configured(stable_feed: Path) -> dict[str, dict[str, float]]:
    """Per device on the stable feed with the example config's budget (1 false alarm per 365 days)."""
    devices, budget = _run(stable_feed)
    assert budget == 1.0
    return devices


@pytest.mark.slow
def test_stable_feed_stays_within_the_configured_family_budget(configured: dict[str, dict[str, float]]) -> None:
    """Asserted, per device (both simulated devices, with the example config's budget of 1 false alarm per 365 days):
    the detector alarms on the stable feed ≤ the 99.9 % quantile of Poisson(budgeted), where budgeted = B/M · T_m/D
    summed over the device's M metrics and T_m is each metric's monitored span after its baseline. The quantile is
    computed from the measured exposure, not hard-coded. Also asserted: the exposure is real (a budgeted count of at
    least 0.15 false alarms per device, over 100 calibrated streams per device), so the check is not made on an empty
    run. Alone this check would pass for a detector that never alarms; the generous-budget test below rules that out.
    What it cannot see: at CI exposure (budget ≈ 0.2, quantile 2–3) only an over-spend of about 10× or more fails
    it. The known over-spend of the score-mean charts (about 5× their share, about 1.7× the family in expectation;
    BENCHMARKS.md §Family false-alarm budget) is therefore reported by the benchmark, not gated here.
    """
    devices = configured
    assert set(devices) == {"aki-risk", "cta-stenosis"}
    for model, d in devices.items():
        assert d["streams"] > 100, f"{model}: only {d['streams']} calibrated streams"
        assert d["budgeted"] >= 0.15, f"{model}: exposure too short to test a budget ({d['budgeted']:.3f})"
        allowed = poisson.ppf(LEVEL, d["budgeted"])
        assert d["alarms"] <= allowed, (
            f"{model}: {d['alarms']} false alarms on a {DAYS}-day stable feed, budget allows {d['budgeted']:.2f} "
            f"(99.9 % Poisson quantile {allowed:.0f})")


@pytest.mark.slow
def test_a_generous_budget_makes_false_alarms_happen_and_still_bounds_them(
        stable_feed: Path, configured: dict[str, dict[str, float]]) -> None:
    """With the budget raised to 100 false alarms per 365 days the thresholds drop (ARL0 ∝ 1/B), so on the same
    stable feed alarms must occur: asserted ≥ 1 per device, ≥ 5 in all, and per device more than with the configured
    budget. That makes the configured-budget test able to fail in both directions: a detector that never alarms fails
    here, one that alarms beyond its ARL0 fails there. Also asserted: per device, alarms ≤ the 99.9 % quantile of
    Poisson(budgeted) at this budget, i.e. the budget still bounds the family when it is large enough to be spent.
    """
    generous, budget = _run(stable_feed, GENEROUS)
    assert budget == GENEROUS
    total = sum(d["alarms"] for d in generous.values())
    assert total >= 5, f"only {total} false alarms at a budget of {GENEROUS:g}/yr: do the detectors ever alarm?"
    for model, d in generous.items():
        assert d["alarms"] >= 1, f"{model}: no alarm at {GENEROUS:g} false alarms/yr over {d['budgeted']:.1f} budgeted"
        allowed = poisson.ppf(LEVEL, d["budgeted"])
        assert d["alarms"] <= allowed, (
            f"{model}: {d['alarms']} false alarms at a budget of {GENEROUS:g}/yr, budget allows {d['budgeted']:.1f} "
            f"(99.9 % Poisson quantile {allowed:.0f})")
        assert d["alarms"] > configured[model]["alarms"], f"{model}: {GENEROUS:g} × the budget raised no more alarms"
