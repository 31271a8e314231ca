"""The retraining-ticket feed end to end: ticket changes queue outbox rows in their own transaction, and the outbox
delivers them to a real Kafka-protocol broker (librdkafka's mock cluster, ``tests/kafka_mock.py``: no Kafka broker
can run here, the mock speaks the wire protocol) and to a real signed-webhook receiver (``http.server`` on loopback,
verifying with ``alerts.notifiers.verify_signature``), on a real SQLite store with real classifier output
(``test_ticket_lifecycle.build_store``: the scanner-upgrade ticket T-000001 and the AKI ticket T-000002).

Covers: consumed back from the topic keyed by model id with the category in the JSON value; per-device order; the
HMAC signature; an outage retried with backoff and delivered once, in per-ticket order; idempotent enqueueing;
rollback of the ticket change takes its message with it; alert delivery leaves the feed's rows alone; no patient
identifier in any message.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer
from kafka_mock import MockCluster, mock_cluster  # noqa: F401 (fixture)
from pydantic import ValidationError
from sqlalchemy import select
from test_ticket_lifecycle import build_store, m2_results

from alerts.notifiers import SignatureError, verify_signature
from alerts.routing import RoutingConfig
from retrain_trigger.fhir_task import ticket_to_task
from retrain_trigger.manifest import build_manifest
from vigil import auth, notify, store, ticket_actions, ticket_feed
from vigil.api import create_app
from vigil.settings import load_settings
from vigil.store import AuditRow, OutboxRow, TicketRow
from vigil.ticket_feed import TicketFeed, TicketFeedConfig

SECRET = "ticket-feed-test-secret-91c2"
SECRET_ENV = "VIGIL_TEST_TICKET_FEED_SECRET"
IDENTIFIERS = (b"subj-secret", b"enc-site")  # the subject and encounter keys build_store gives its cases


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One migrated store with the two classified tickets and their cases; each test gets a copy."""
    path = tmp_path_factory.mktemp("built") / "vigil.db"
    build_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as con:  # everything into the main file, so copying it copies the store
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture
def sessions(tmp_path, built):
    shutil.copyfile(built, tmp_path / "vigil.db")
    factory = store.session_factory(f"sqlite:///{tmp_path / 'vigil.db'}")
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def publish() -> Iterator[Callable[[TicketFeedConfig], None]]:
    """Subscribe the feed to ticket changes for one test (``publish(config)``); unsubscribed afterwards."""
    stops: list[Callable[[], None]] = []
    yield lambda config: stops.append(ticket_feed.publish_ticket_events(config))
    for stop in stops:
        stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_tickets(sessions) -> None:
    """What the pipeline does when it stores a ticket (``vigil.persist``): the ticket.opened audit entry (already
    written by build_store) and the announcement to listeners."""
    with sessions.begin() as s:
        for ticket_id in ("T-000001", "T-000002"):
            ticket_actions.opened(s, s.get(TicketRow, ticket_id), "vigil-pipeline")


def consume(bootstrap: str, topic: str, count: int, timeout_s: float = 15.0) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                             enable_auto_commit=False)
    records: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        extra = consumer.poll(timeout_ms=300)  # nothing more than expected
        records.extend(r for batch in extra.values() for r in batch)
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


# --- a real signed-webhook receiver on loopback ---------------------------------------------------------------------


@dataclass
class Hook:
    """Accepts a POST only if ``verify_signature`` passes; answers 503 to the first ``fail_first`` requests."""

    fail_first: int = 0
    accepted: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    requests: int = 0
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    hook.requests += 1
                    if hook.requests <= hook.fail_first:
                        code = 503
                    else:
                        try:
                            verify_signature(SECRET, body, self.headers.get("X-Vigil-Timestamp"),
                                             self.headers.get("X-Vigil-Signature"))
                        except SignatureError as exc:
                            hook.refused.append(str(exc))
                            code = 401
                        else:
                            hook.accepted.append(json.loads(body))
                            hook.headers.append(dict(self.headers.items()))
                            code = 204
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/retraining"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def hook(monkeypatch) -> Iterator[Hook]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    receiver = Hook()
    yield receiver
    receiver.stop()


def feed_config(**values) -> TicketFeedConfig:
    return TicketFeedConfig.model_validate({"timeout_seconds": 3, "api_url": "https://vigil.example/api",
                                            "delivery": {"backoff": "PT10S", "max_backoff": "PT40S"}, **values})


# --- tests ---------------------------------------------------------------------------------------------------------


def test_ticket_events_reach_the_kafka_topic_keyed_by_device_and_are_consumed_back(
        sessions, publish, mock_cluster: MockCluster):
    config = feed_config(bootstrap_servers=mock_cluster.bootstrap, topic="retraining-requests")
    publish(config)
    open_tickets(sessions)
    with sessions.begin() as s:
        ticket_actions.start(s, "T-000001", "eng.alice")  # internal: not published
        ticket_actions.reclassify(s, load_settings(), "T-000001", "eng.alice", "retrain_arch_change")
        ticket_actions.close(s, "T-000002", "ra.carol", "monitoring only")

    feed = TicketFeed(sessions, config)
    try:
        report = feed.deliver_due()
    finally:
        feed.close()
    assert (report.delivered, report.failed) == (4, 0), report.errors

    records = consume(mock_cluster.bootstrap, "retraining-requests", 4)
    values = [json.loads(r.value) for r in records]
    by_key: dict[bytes, list[tuple[str, str, str]]] = {}
    for record, value in zip(records, values, strict=True):
        by_key.setdefault(record.key, []).append((value["ticket_id"], value["event"], value["category"]))
        assert dict(record.headers)["vigil-event-id"].decode() == value["event_id"]
        assert not any(marker in record.value for marker in IDENTIFIERS)
    assert by_key == {  # one device's requests in one partition, in the order they happened
        b"cta-stenosis": [("T-000001", "opened", "C2"), ("T-000001", "reclassified", "C5")],
        b"aki-risk": [("T-000002", "opened", "C2"), ("T-000002", "closed", "C2")],
    }
    assert len({r.partition for r in records if r.key == b"cta-stenosis"}) == 1
    reclassified = next(v for v in values if v["event"] == "reclassified")
    assert reclassified["event_id"] == "T-000001:reclassified:1"
    assert (reclassified["model"], reclassified["model_version"], reclassified["remedy"]) == (
        "cta-stenosis", "2.1.0", "retrain_arch_change")
    assert reclassified["device"]["udi_di"] == "00850012345001"
    assert reclassified["pccp"] == {"id": "PCCP-CTA-001", "version": "1.0"}
    assert any("new Traditional 510(k)" in line for line in reclassified["rationale"])
    with sessions() as s:
        task_identifier = ticket_to_task(s.get(TicketRow, "T-000001"))["identifier"][0]
    assert reclassified["fhir_task"]["identifier"] == task_identifier
    assert reclassified["fhir_task"] == {
        "reference": "Task/T-000001", "identifier": {"system": "urn:vigil:ticket", "value": "T-000001"},
        "url": "https://vigil.example/api/tickets/T-000001/fhir-task"}
    with sessions() as s:
        delivered = s.scalars(select(AuditRow).where(AuditRow.action == "notification.delivered")).all()
    assert sorted((e.entity, e.entity_id, e.payload["event"]) for e in delivered) == [
        ("ticket", "T-000001", "opened"), ("ticket", "T-000001", "reclassified"),
        ("ticket", "T-000002", "closed"), ("ticket", "T-000002", "opened")]


def test_signed_webhook_carries_the_request_and_the_manifest_hash(sessions, publish, hook, monkeypatch):
    config = feed_config(webhook_url=hook.start(), secret_env=SECRET_ENV)
    publish(config)
    with sessions.begin() as s:
        ticket = ticket_actions.get(s, "T-000001")
        manifest = build_manifest(s, ticket)
        ticket_actions.attach_manifest(s, "T-000001", "eng.alice", manifest)
        ticket_actions.start(s, "T-000001", "eng.alice")
        ticket_actions.record_acceptance(s, load_settings(), "T-000001", "eng.alice", passed=True,
                                         results=m2_results(), evidence_ref="VV-2025-032")
    feed = TicketFeed(sessions, config)
    monkeypatch.setenv(SECRET_ENV, "a-key-the-receiver-does-not-know")
    forged = feed.deliver_due()
    assert (forged.delivered, forged.failed) == (0, 1) and "HTTP 401" in forged.errors[0]
    assert hook.refused == ["X-Vigil-Signature does not match the body: wrong secret or altered request"]
    monkeypatch.setenv(SECRET_ENV, SECRET)
    report = feed.deliver_due(datetime.now(UTC) + timedelta(seconds=10))
    assert (report.delivered, report.failed) == (1, 0)
    [body] = hook.accepted
    assert (body["event"], body["category"], body["deployable"], body["acceptance"]["passed"]) == (
        "acceptance_recorded", "C2", True, True)
    assert body["manifests"][0]["sha256"] == manifest["content_hash"]["sha256"]
    assert body["manifests"][0]["case_count"] == manifest["case_count"] == 4
    assert hook.headers[0]["X-Vigil-Delivery"] == "ticket-feed:webhook:T-000001:acceptance_recorded:1"
    assert not any(marker.decode() in json.dumps(body) for marker in IDENTIFIERS)


def test_webhook_outage_is_retried_with_backoff_and_delivered_once_in_ticket_order(sessions, publish, hook):
    outage_then_delivery(sessions, publish, hook)


@pytest.mark.postgres
def test_webhook_outage_on_postgresql(fresh_postgres_url, publish, hook):
    """The same on PostgreSQL, where the claim uses FOR UPDATE SKIP LOCKED and the per-ticket order reads the JSON
    payload with ``->>``."""
    build_store(fresh_postgres_url)
    factory = store.session_factory(fresh_postgres_url)
    try:
        outage_then_delivery(factory, publish, hook)
    finally:
        factory.kw["bind"].dispose()


def outage_then_delivery(sessions, publish, hook: Hook) -> None:
    """The receiver answers 503 twice: both opened requests fail, T-000002's closed waits behind its opened one;
    after the backoff all three arrive, each once, in order."""
    hook.fail_first = 2
    config = feed_config(webhook_url=hook.start(), secret_env=SECRET_ENV)
    publish(config)
    open_tickets(sessions)
    with sessions.begin() as s:
        ticket_actions.close(s, "T-000002", "ra.carol", "monitoring only")
    feed = TicketFeed(sessions, config)
    T0 = datetime.now(UTC)  # noqa: N806 (the clock the test drives from here on)

    first = feed.deliver_due(T0)  # T-000001 opened fails (503); T-000002 opened fails (503); closed waits
    assert (first.delivered, first.failed) == (0, 2) and "HTTP 503" in first.errors[0]
    assert feed.deliver_due(T0 + timedelta(seconds=5)).delivered == 0  # backoff: not due yet
    second = feed.deliver_due(T0 + timedelta(seconds=10))
    assert (second.delivered, second.failed) == (3, 0)
    assert feed.deliver_due(T0 + timedelta(minutes=5)).delivered == 0  # nothing left, nothing twice

    assert [(b["ticket_id"], b["event"]) for b in hook.accepted] == [
        ("T-000001", "opened"), ("T-000002", "opened"), ("T-000002", "closed")]
    with sessions() as s:
        rows = s.scalars(select(OutboxRow).order_by(OutboxRow.id)).all()
    assert [(r.dedupe_key, r.attempts, r.last_error) for r in rows] == [
        ("T-000001:opened:1", 2, None), ("T-000002:opened:1", 2, None), ("T-000002:closed:1", 1, None)]


def test_broker_unreachable_keeps_the_request_queued_then_it_is_produced_once(
        sessions, publish, mock_cluster: MockCluster):
    """The broker is unreachable at the first attempt (nothing listens on the configured port); the request stays
    queued with the reason. The mock cluster cannot be started on a chosen port, so "the broker is back" is the
    service restarted with the broker's address — the queued row is then produced exactly once."""
    down = feed_config(bootstrap_servers=f"127.0.0.1:{free_port()}", timeout_seconds=1)
    publish(down)
    with sessions.begin() as s:
        ticket_actions.opened(s, s.get(TicketRow, "T-000002"), "vigil-pipeline")
    feed = TicketFeed(sessions, down)
    T0 = datetime.now(UTC)  # noqa: N806 (the clock the test drives from here on)
    try:
        failed = feed.deliver_due(T0)
    finally:
        feed.close()
    assert (failed.delivered, failed.failed) == (0, 1)
    assert "no broker reachable" in failed.errors[0] and down.bootstrap_servers[0] in failed.errors[0]
    with sessions() as s:
        row = s.scalars(select(OutboxRow)).one()
    assert (row.attempts, row.delivered_at, row.next_attempt_at) == (1, None, T0 + timedelta(seconds=10))

    up = feed_config(bootstrap_servers=mock_cluster.bootstrap, topic=down.topic)
    feed = TicketFeed(sessions, up)
    try:
        assert feed.deliver_due(T0 + timedelta(seconds=10)).delivered == 1
        assert feed.deliver_due(T0 + timedelta(minutes=5)).delivered == 0
    finally:
        feed.close()
    [record] = consume(mock_cluster.bootstrap, down.topic, 1)
    assert (record.key, json.loads(record.value)["event_id"]) == (b"aki-risk", "T-000002:opened:1")


def test_enqueue_is_idempotent_and_rides_on_the_ticket_change_transaction(sessions, publish, hook):
    config = feed_config(webhook_url=hook.start(), secret_env=SECRET_ENV,
                         bootstrap_servers="127.0.0.1:9")  # two sinks: two rows per event
    publish(config)
    with sessions.begin() as s:
        ticket = s.get(TicketRow, "T-000001")
        ticket_actions.opened(s, ticket, "vigil-pipeline")
        assert ticket_feed.enqueue(s, ticket, "opened", config) == []  # already queued: nothing new
    with pytest.raises(RuntimeError, match="the request failed later"):
        with sessions.begin() as s:
            ticket_actions.close(s, "T-000001", "ra.carol", "not needed")
            raise RuntimeError("the request failed later")
    with sessions.begin() as s:
        settings = load_settings()
        ticket_actions.reclassify(s, settings, "T-000001", "eng", "rollback")
        ticket_actions.reclassify(s, settings, "T-000001", "eng", "recalibration")
    with sessions() as s:
        rows = s.execute(select(OutboxRow.receiver, OutboxRow.kind, OutboxRow.dedupe_key, OutboxRow.alert_id)
                         .order_by(OutboxRow.id)).all()
        assert s.get(TicketRow, "T-000001").status == "open"  # the close was rolled back, and its message with it
    assert rows == [
        ("ticket-feed:kafka", "ticket-kafka", "T-000001:opened:1", None),
        ("ticket-feed:webhook", "ticket-webhook", "T-000001:opened:1", None),
        ("ticket-feed:kafka", "ticket-kafka", "T-000001:reclassified:1", None),
        ("ticket-feed:webhook", "ticket-webhook", "T-000001:reclassified:1", None),
        ("ticket-feed:kafka", "ticket-kafka", "T-000001:reclassified:2", None),
        ("ticket-feed:webhook", "ticket-webhook", "T-000001:reclassified:2", None),
    ]
    with pytest.raises(ValueError, match="ticket event 'started' is not published"):
        with sessions.begin() as s:
            ticket_feed.enqueue(s, s.get(TicketRow, "T-000001"), "started", config)


def test_api_actions_publish_and_alert_delivery_leaves_the_feed_rows_alone(sessions, publish, hook):
    config = feed_config(webhook_url=hook.start(), secret_env=SECRET_ENV)
    publish(config)
    url = str(sessions.kw["bind"].url)
    with sessions.begin() as s:
        token = auth.create_token(s, "eng-1", "engineer", actor="test-admin")
    with TestClient(create_app(url)) as client:
        r = client.post("/tickets/T-000002/close", json={"comment": "monitoring only"},
                        headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    alerts_only = notify.deliver_due(sessions, RoutingConfig(), datetime.now(UTC) + timedelta(days=1))
    assert (alerts_only.delivered, alerts_only.failed) == (0, 0)
    with sessions() as s:
        row = s.scalars(select(OutboxRow)).one()
        assert (row.dedupe_key, row.attempts, row.payload["status"]) == ("T-000002:closed:1", 0, "closed")
    assert TicketFeed(sessions, config).deliver_due().delivered == 1
    assert hook.accepted[0]["ticket_id"] == "T-000002"


def test_config_is_refused_with_the_field_and_what_to_do():
    with pytest.raises(ValidationError, match="give bootstrap_servers"):
        TicketFeedConfig()
    with pytest.raises(ValidationError, match="webhook_url needs secret_env"):
        TicketFeedConfig(webhook_url="https://eqms.example/hook")
    with pytest.raises(ValidationError, match="sasl_pasword is not a kafka-python KafkaProducer option"):
        TicketFeedConfig(bootstrap_servers="k1:9092", security={"sasl_pasword": "x"})
    with pytest.raises(ValidationError, match="lease .* must exceed twice timeout_seconds"):
        TicketFeedConfig(bootstrap_servers="k1:9092", timeout_seconds=90)
    config = TicketFeedConfig(bootstrap_servers="k1:9092, k2:9092")
    assert config.bootstrap_servers == ["k1:9092", "k2:9092"] and config.sinks() == [("ticket-feed:kafka",
                                                                                        "ticket-kafka")]


def test_background_worker_delivers_what_is_queued(sessions, publish, hook):
    config = feed_config(webhook_url=hook.start(), secret_env=SECRET_ENV)
    publish(config)
    worker = ticket_feed.FeedWorker(sessions, config, interval_seconds=0.2)
    try:
        with sessions.begin() as s:
            ticket_actions.opened(s, s.get(TicketRow, "T-000001"), "vigil-pipeline")
        deadline = time.monotonic() + 10
        while not hook.accepted and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.shutdown()
    assert [(b["ticket_id"], b["event"]) for b in hook.accepted] == [("T-000001", "opened")]
