"""Alerts resolve themselves once their stream is back in control (``monitors.auto_resolve_after``, in feed time),
and that resolution is stored with its audit entry and its notification; a later alarm is a new incident."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from alerts.lifecycle import AlertBook
from vigil import audit
from vigil.domain import AlertState, Signal, StreamKey
from vigil.persist import persist
from vigil.pipeline import Pipeline
from vigil.settings import load_settings
from vigil.simulator import simulate
from vigil.store import AlertRow, AuditRow, OutboxRow, session_factory

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _signal(day: int) -> Signal:
    return Signal(stream=StreamKey("m", "1", "fnr", "site-a", "all"), detector="bernoulli_cusum",
                  detected_at=T0 + timedelta(days=day), change_estimate=T0 + timedelta(days=day - 5), statistic=5.0,
                  threshold=4.0, baseline=0.1, current=0.3, current_ci=(0.2, 0.4), n_baseline=500, n_current=40)


def test_an_alert_resolves_after_the_quiet_period_and_a_later_alarm_opens_a_new_one():
    book = AlertBook()
    first = book.fire(_signal(0))
    book.fire(_signal(10))  # a re-fire keeps it open and restarts the quiet period
    assert book.auto_resolve(T0 + timedelta(days=39), timedelta(days=30)) == []
    assert book.auto_resolve(T0 + timedelta(days=40), timedelta(days=30)) == [first]
    assert first.state is AlertState.RESOLVED and first.resolved_at == T0 + timedelta(days=40)
    second = book.fire(_signal(50))
    assert second is not first and second.state is AlertState.FIRING and len(book.alerts) == 2


@pytest.fixture(scope="module")
def feeds(tmp_path_factory):
    stable, upgrade = tmp_path_factory.mktemp("stable"), tmp_path_factory.mktemp("upgrade")
    simulate("stable", stable, seed=5, days=150, volume=0.6)
    simulate("scanner-upgrade", upgrade, seed=5, days=150, change_day=50, volume=0.6)
    return stable, upgrade


def _settings(url: str | None = None, after: timedelta | None = timedelta(days=7), false_alarms: float = 1):
    settings = load_settings(store_url=url) if url else load_settings()
    settings.monitors.auto_resolve_after = after
    settings.monitors.budget.false_alarms = false_alarms
    return settings


def test_false_alarms_resolve_once_their_stream_performs_as_designed_and_the_store_records_who_and_why(feeds, tmp_path):
    """A generous false-alarm budget on a stable feed gives alarms on streams that are in control: they resolve."""
    settings = _settings(f"sqlite:///{tmp_path / 'vigil.db'}", false_alarms=300)
    result = Pipeline(settings).run_paths([feeds[0]])
    resolved = [a for a in result.alerts.alerts if a.state is AlertState.RESOLVED]
    assert resolved, "false alarms on in-control streams should be resolved after the quiet period"
    for a in resolved:
        assert a.resolved_at - a.last_fired_at >= timedelta(days=7)
    persist(result, settings, ["feed"], datetime.now(UTC))
    factory = session_factory(settings.store_url)
    with factory() as s:
        auto = [r for r in s.scalars(select(AlertRow)) if r.state == "resolved"]
        assert len(auto) == len(resolved)
        assert all(r.resolved_by == "vigil-pipeline" and r.resolved_at is not None for r in auto)
        actions = s.scalars(select(AuditRow.action).where(AuditRow.entity == "alert")).all()
        assert actions.count("alert.auto_resolved") == len(resolved)
        assert audit.verify(s).ok
        assert s.scalars(select(OutboxRow)).all() == []  # no receivers configured in the example: nothing queued
    factory.kw["bind"].dispose()
    never = Pipeline(_settings(after=None, false_alarms=300)).run_paths([feeds[0]])
    assert never.alerts.alerts and all(a.state is AlertState.FIRING for a in never.alerts.alerts)


def test_a_change_that_persists_keeps_its_alert_open(feeds):
    result = Pipeline(_settings()).run_paths([feeds[1]])
    site_b = [a for a in result.alerts.alerts if a.signal.stream.metric == "fnr" and a.signal.stream.site == "site-b"]
    assert site_b and all(a.state is AlertState.FIRING for a in site_b)
