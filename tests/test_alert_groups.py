"""Alert hierarchy: a change at one site alarms its subgroup streams too — they are grouped under the site's alert
(one signal, one notification), and an alert of the parent stream arriving later adopts them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from alerts.lifecycle import AlertBook
from alerts.routing import RoutingConfig
from vigil import audit
from vigil.domain import Signal, StreamKey
from vigil.persist import store_results
from vigil.pipeline import RunResult
from vigil.store import AlertRow, OutboxRow, session_factory, upgrade

T0 = datetime(2026, 5, 1, tzinfo=UTC)
ROUTING = RoutingConfig.model_validate({
    "receivers": [{"name": "eqms", "kind": "webhook", "url": "http://127.0.0.1:9/hook", "secret_env": "X_SECRET"}],
    "default_receiver": "eqms"})


def _signal(site: str, subgroup: str, day: int = 0, metric: str = "fnr") -> Signal:
    return Signal(stream=StreamKey("cta-stenosis", "2.1", metric, site, subgroup), detector="bernoulli_cusum",
                  detected_at=T0 + timedelta(days=day), change_estimate=T0 - timedelta(days=5), statistic=5.0,
                  threshold=4.0, baseline=0.1, current=0.3, current_ci=(0.2, 0.4), n_baseline=500, n_current=40)


def _store(url: str, *signals: Signal) -> dict[str, AlertRow]:
    book = AlertBook()
    for s in signals:
        book.fire(s)
    factory = session_factory(url)
    with factory() as s, s.begin():
        store_results(s, RunResult(alerts=book), ROUTING)
    with factory() as s:
        rows = {(a.site, a.subgroup, a.metric): a for a in s.scalars(select(AlertRow))}
        rows["_queued"] = sorted(o.alert_id for o in s.scalars(select(OutboxRow)))
        rows["_audit_ok"] = audit.verify(s).ok
    factory.kw["bind"].dispose()
    return rows


def test_subgroup_alarms_at_an_alerted_site_are_grouped_and_not_notified_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    upgrade(url)
    rows = _store(url, _signal("site-b", "all"), _signal("site-b", "age_band=80+", 1), _signal("site-b", "sex=f", 1),
                  _signal("site-a", "age_band=80+", 1), _signal("site-b", "all", 2, metric="error_rate"))
    site = rows[("site-b", "all", "fnr")]
    assert site.parent_id is None
    assert rows[("site-b", "age_band=80+", "fnr")].parent_id == site.id
    assert rows[("site-b", "sex=f", "fnr")].parent_id == site.id
    assert rows[("site-a", "age_band=80+", "fnr")].parent_id is None  # another site: its own signal
    assert rows[("site-b", "all", "error_rate")].parent_id is None  # another metric: its own signal
    assert rows["_queued"] == sorted([site.id, rows[("site-a", "age_band=80+", "fnr")].id,
                                      rows[("site-b", "all", "error_rate")].id])
    assert rows["_audit_ok"]


def test_an_overall_alert_arriving_later_adopts_the_open_alerts_below_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    upgrade(url)
    _store(url, _signal("site-a", "all"), _signal("site-b", "age_band=80+"))
    rows = _store(url, _signal("all", "all", 3))
    overall = rows[("all", "all", "fnr")]
    assert overall.parent_id is None
    assert rows[("site-a", "all", "fnr")].parent_id == overall.id
    assert rows[("site-b", "age_band=80+", "fnr")].parent_id == overall.id


def test_a_grouped_alert_firing_again_is_still_told_only_through_its_parent(tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    upgrade(url)
    book = AlertBook()
    book.fire(_signal("site-b", "all"))
    book.fire(_signal("site-b", "age_band=80+", 1))
    factory = session_factory(url)
    result = RunResult(alerts=book)
    with factory() as s, s.begin():
        store_results(s, result, ROUTING)
    book.fire(_signal("site-b", "age_band=80+", 4))  # the subgroup stream alarms again
    with factory() as s, s.begin():
        store_results(s, result, ROUTING)
    with factory() as s:
        child = s.scalars(select(AlertRow).where(AlertRow.subgroup == "age_band=80+")).one()
        queued = [o.alert_id for o in s.scalars(select(OutboxRow))]
    factory.kw["bind"].dispose()
    assert child.fire_count == 2 and child.parent_id is not None
    assert child.id not in queued and len(queued) == 1
