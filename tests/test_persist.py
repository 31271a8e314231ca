"""A pipeline run lands in the store in one transaction — on SQLite and on a real PostgreSQL — with its audit trail."""

from datetime import UTC, datetime

import pytest
from _shared_fixtures import scanner_upgrade_run
from sqlalchemy import func, select

from vigil import audit
from vigil.persist import persist
from vigil.pipeline import Pipeline
from vigil.settings import load_settings
from vigil.simulator import simulate
from vigil.store import AlertRow, AuditRow, CaseRow, MetricPointRow, RunRow, StreamStateRow, TicketRow, session_factory


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """A scanner upgrade with the change early (day 60 of 150), so the feed has alerts and a ticket. Simulated and
    run once per session, shared with test_dashboards.py (``_shared_fixtures.scanner_upgrade_run``)."""
    settings, run, _ = scanner_upgrade_run(tmp_path_factory)
    return settings, run


def _check(url: str, settings, result) -> None:
    settings = settings.model_copy(update={"store_url": url})
    started = datetime.now(UTC)
    ids = persist(result, settings, ["feed"], started)
    assert result.alerts.alerts, "the scenario should raise alerts"
    with session_factory(url)() as s:
        assert s.scalar(select(func.count()).select_from(CaseRow)) == len(result.cases)
        assert s.scalar(select(func.count()).select_from(AlertRow)) == len(result.alerts.alerts)
        assert s.scalar(select(func.count()).select_from(TicketRow)) == len(result.tickets) >= 1
        assert s.scalar(select(func.count()).select_from(RunRow)) == 1
        assert s.scalar(select(func.count()).select_from(StreamStateRow)) == sum(
            len(m.streams) for m in result.monitors())
        assert s.scalar(select(func.count()).select_from(MetricPointRow)) > 0
        linked = s.scalars(select(AlertRow.ticket_id).where(AlertRow.ticket_id.is_not(None))).all()
        assert set(ids.values()) >= set(s.scalars(select(AlertRow.id)).all())
        assert linked, "alerts are linked to their ticket"
        actions = s.scalars(select(AuditRow.action)).all()
        assert actions.count("alert.fired") == len(result.alerts.alerts)
        assert actions.count("ticket.opened") == len(result.tickets)
        assert actions[-1] == "run.completed"
        assert audit.verify(s).ok
    with session_factory(url)() as s:
        fired = {a.id: (a.fire_count, a.last_fired_at) for a in s.scalars(select(AlertRow))}
        audit_rows = s.scalar(select(func.count()).select_from(AuditRow))
    # the same run stored again does not double-count cases, alerts, firings or tickets
    persist(result, settings, ["feed"], started)
    with session_factory(url)() as s:
        assert {a.id: (a.fire_count, a.last_fired_at) for a in s.scalars(select(AlertRow))} == fired
        assert s.scalar(select(func.count()).select_from(AuditRow)) == audit_rows + 1  # only run.completed
        assert s.scalar(select(func.count()).select_from(CaseRow)) == len(result.cases)
        assert s.scalar(select(func.count()).select_from(AlertRow)) == len(result.alerts.alerts)
        assert s.scalar(select(func.count()).select_from(TicketRow)) == len(result.tickets)
        assert s.scalar(select(func.count()).select_from(RunRow)) == 2
        assert audit.verify(s).ok


def test_persist_on_sqlite(result, tmp_path):
    _check(f"sqlite:///{tmp_path / 'v.db'}", *result)


@pytest.mark.postgres
def test_persist_on_postgres(result, fresh_postgres_url):
    _check(fresh_postgres_url, *result)


@pytest.fixture(scope="module")
def small_result(tmp_path_factory):
    """A three-day stable feed through the real pipeline: enough for a run record, quick to store three times."""
    feed = tmp_path_factory.mktemp("small-feed")
    simulate("stable", feed, seed=3, days=3, volume=0.05)
    settings = load_settings()
    return settings, Pipeline(settings).run_paths([feed])


def test_a_configuration_change_is_audited_with_the_effective_configuration(small_result, tmp_path):
    """The config audit depends on the run's configuration only, not on how much the run found: a small run."""
    settings, res = small_result
    assert res.case_count > 0
    url = f"sqlite:///{tmp_path / 'config.db'}"
    first = settings.model_copy(update={"store_url": url})
    persist(res, first, ["feed"], datetime.now(UTC))
    persist(res, first, ["feed"], datetime.now(UTC))  # same config: nothing new to audit
    changed = first.model_copy(deep=True)
    changed.monitors.odds_ratio = 3.0
    persist(res, changed, ["feed"], datetime.now(UTC))
    with session_factory(url)() as s:
        entries = s.scalars(select(AuditRow).where(AuditRow.action == "config.changed").order_by(AuditRow.seq)).all()
    assert [e.payload["previous"] for e in entries] == [None, first.config_hash()]
    assert [e.entity_id for e in entries] == [first.config_hash(), changed.config_hash()]
    assert entries[1].payload["effective"]["monitors"]["odds_ratio"] == 3.0
    assert "subject_key" not in entries[1].payload["effective"]
