"""A real Prometheus Alertmanager (Debian ``prometheus-alertmanager``, API v2) on loopback receives a vigil alert
through the outbox, keeps it alive through re-sends, shows the acknowledgement, and then its resolution via ``endsAt``.

Skips only when the binary is missing (``scripts/ensure-debs.sh`` installs it; ``make test`` runs that).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from alerts.content import ALERTNAME
from alerts.routing import RoutingConfig
from vigil import audit, notify, store
from vigil.store import AlertRow, AuditRow, OutboxRow

BINARY = "prometheus-alertmanager"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which(BINARY)
    if binary is None:
        pytest.skip(f"{BINARY} is not installed: run scripts/ensure-debs.sh (apt-get install prometheus-alertmanager)")
    root = tmp_path_factory.mktemp("alertmanager")
    (root / "alertmanager.yml").write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n')
    port = free_port()
    log = (root / "alertmanager.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={root / 'alertmanager.yml'}", f"--web.listen-address=127.0.0.1:{port}",
         "--cluster.listen-address=", f"--storage.path={root / 'data'}"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (root / "alertmanager.log").read_text()
                pytest.fail(f"Alertmanager did not become ready on {url}; its log:\n{log_text}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    store.upgrade(url)
    factory = store.session_factory(url)
    yield factory
    factory.kw["bind"].dispose()


def vigil_alerts(url: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v2/alerts", params={"filter": f'alertname="{ALERTNAME}"'}, timeout=5)
    response.raise_for_status()
    return response.json()


def test_alertmanager_receives_resends_and_resolves_an_alert(
        alertmanager: str, sessions: sessionmaker[Session]) -> None:
    cfg = RoutingConfig.model_validate({
        "receivers": [{"name": "am", "kind": "alertmanager", "url": alertmanager, "timeout_seconds": 5}],
        "routes": [{"matchers": ['severity=~"warning|critical"'], "receiver": "am"}],
        "resend_interval": "PT1M",
        "links": {"grafana_url": "https://grafana.example", "vigil_url": "https://vigil.example/api"},
    })
    detected = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    with sessions.begin() as s:
        alert_id = store.next_id(s, AlertRow, "A")
        s.add(AlertRow(
            id=alert_id, model="aki-risk", model_version="1.4.0", metric="fpr", site="st-marys", subgroup="age_band=80",
            detector="bernoulli_cusum", state="firing", severity="warning", detected_at=detected,
            change_estimate=detected - timedelta(days=9), statistic=4.9, threshold=4.4, baseline=0.21, current=0.33,
            ci_low=0.27, ci_high=0.40, n_baseline=2210, n_current=318, fire_count=1, last_fired_at=detected))
        assert notify.enqueue(s, s.get(AlertRow, alert_id), "firing", cfg, now=detected) == ["am"]
    sent_at = datetime.now(UTC)
    assert notify.deliver_due(sessions, cfg).delivered == 1

    [received] = vigil_alerts(alertmanager)
    assert received["labels"] == {
        "alertname": ALERTNAME, "model": "aki-risk", "model_version": "1.4.0", "metric": "fpr", "site": "st-marys",
        "subgroup": "age_band=80", "detector": "bernoulli_cusum", "severity": "warning"}
    notes = received["annotations"]
    assert notes["summary"].startswith("fpr 0.33 (95% CI 0.27-0.4, n=318) vs baseline 0.21 (n=2,210) at site st-marys")
    assert (notes["state"], notes["ci"], notes["n_current"], notes["alert_id"]) == ("firing", "0.27-0.4", "318",
                                                                                    alert_id)
    assert notes["change_estimate"] == (detected - timedelta(days=9)).isoformat().replace("+00:00", "Z")
    assert notes["dashboard_url"].startswith("https://grafana.example/d/vigil-control-charts?var-model=aki-risk")
    assert received["generatorURL"] == f"https://vigil.example/api/alerts/{alert_id}"
    assert received["status"]["state"] == "active"
    assert datetime.fromisoformat(received["startsAt"]) == detected
    ends = datetime.fromisoformat(received["endsAt"])
    assert sent_at + timedelta(minutes=2) < ends < datetime.now(UTC) + timedelta(minutes=3, seconds=1)

    # still open a minute after it last fired: one re-send per interval keeps Alertmanager from expiring it
    assert notify.resend_due(sessions, cfg, detected + timedelta(seconds=59)) == 0
    assert notify.resend_due(sessions, cfg, detected + timedelta(minutes=2, seconds=5)) == 1
    assert notify.resend_due(sessions, cfg, detected + timedelta(minutes=2, seconds=50)) == 0  # same interval
    # acknowledged in vigil: Alertmanager has no such state, so it is an annotation on the same alert
    with sessions.begin() as s:
        row = s.get(AlertRow, alert_id)
        row.state, row.acked_by, row.acked_at = "acknowledged", "dr.safety", datetime.now(UTC)
        notify.enqueue(s, row, "acknowledged", cfg)
    assert notify.deliver_due(sessions, cfg).delivered == 2  # the re-send, then the acknowledgement
    [updated] = vigil_alerts(alertmanager)
    assert updated["fingerprint"] == received["fingerprint"]
    assert updated["annotations"]["state"] == "acknowledged"
    assert "Acknowledged: by dr.safety" in updated["annotations"]["description"]

    with sessions.begin() as s:
        row = s.get(AlertRow, alert_id)
        row.state, row.resolved_by, row.resolved_at = "resolved", "dr.safety", datetime.now(UTC)
        notify.enqueue(s, row, "resolved", cfg)
    assert notify.deliver_due(sessions, cfg).delivered == 1
    assert vigil_alerts(alertmanager) == []  # endsAt passed: resolved, no longer among the active alerts
    assert notify.resend_due(sessions, cfg, datetime.now(UTC) + timedelta(hours=1)) == 0  # resolved: no re-sends

    with sessions() as s:
        events = s.scalars(select(OutboxRow.event).order_by(OutboxRow.id)).all()
        assert events == ["firing", "resend", "acknowledged", "resolved"]
        delivered = s.scalars(select(AuditRow).where(AuditRow.action == "notification.delivered")).all()
        assert [e.payload["event"] for e in delivered] == events
        assert audit.verify(s).ok


def test_alertmanager_refusal_is_recorded_with_its_reason(alertmanager: str, sessions: sessionmaker[Session]) -> None:
    """Alertmanager answers 400 for an alert that ends before it starts; vigil records why and retries later."""
    cfg = RoutingConfig.model_validate({
        "receivers": [{"name": "am", "kind": "alertmanager", "url": alertmanager}], "default_receiver": "am"})
    now = datetime.now(UTC)
    with sessions.begin() as s:
        s.add(AlertRow(
            id="A-000001", model="aki-risk", model_version="1.4.0", metric="fpr", site="all", subgroup="all",
            detector="ewma", state="resolved", severity="warning", detected_at=now, change_estimate=now,
            statistic=1, threshold=1, baseline=0.2, current=0.3, ci_low=0.25, ci_high=0.35, n_baseline=100,
            n_current=100, last_fired_at=now, resolved_at=now - timedelta(days=1)))
        notify.enqueue(s, s.get(AlertRow, "A-000001"), "resolved", cfg, now=now)
    report = notify.deliver_due(sessions, cfg, now)
    assert report.failed == 1
    assert f"alertmanager receiver 'am' at {alertmanager}/api/v2/alerts: HTTP 400" in report.errors[0]
    assert "start time must be before end time" in report.errors[0]
    with sessions() as s:
        row = s.scalars(select(OutboxRow)).one()
        assert row.attempts == 1 and row.delivered_at is None and "HTTP 400" in row.last_error
