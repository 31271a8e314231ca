"""Prometheus ``/metrics`` (served by the FastAPI router under uvicorn on loopback, fetched over HTTP, parsed with
prometheus_client's own parser) and structured JSON logs. The store gauges are read from a real SQLite store holding
known alerts and tickets."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from vigil.observability import (
    DEAD_LETTER_VOCABULARY,
    IngestMetrics,
    StoreCollector,
    configure_json_logging,
    dead_letter_reason,
    metrics_router,
)
from vigil.store import AlertRow, RunRow, SourceOffsetRow, TicketRow, session_factory, upgrade

T0 = datetime(2026, 4, 1, tzinfo=UTC)


def _alert(n: int, state: str, severity: str, site: str = "site-a") -> AlertRow:
    return AlertRow(id=f"A-{n:06d}", model="cta-stenosis", model_version="2.1.0", metric="fnr", site=site,
                    subgroup=f"cell-{n}", detector="bernoulli_cusum", state=state, severity=severity,
                    detected_at=T0, change_estimate=T0 - timedelta(days=5), statistic=5.1, threshold=4.0,
                    baseline=0.15, current=0.3, ci_low=0.2, ci_high=0.4, n_baseline=300, n_current=80,
                    last_fired_at=T0)


def _ticket(tid: str, category: str, status: str) -> TicketRow:
    return TicketRow(id=tid, model="cta-stenosis", model_version="2.1.0", category=category, cause="c",
                     cause_confidence=0.7, remedy="r", status=status)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """The same rows on SQLite (embedded default) and PostgreSQL (production)."""
    if request.param == "postgres":
        url = request.getfixturevalue("fresh_postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'vigil.db'}"
    upgrade(url)
    with session_factory(url)() as s, s.begin():
        s.add_all([_ticket("T-000001", "C1", "open"), _ticket("T-000002", "C2", "open"),
                   _ticket("T-000003", "C2", "closed")])
        s.flush()
        s.add_all([_alert(1, "firing", "warning"), _alert(2, "firing", "warning"), _alert(3, "firing", "warning"),
                   _alert(4, "acknowledged", "critical"), _alert(5, "resolved", "critical"),
                   _alert(6, "silenced", "warning")])
        s.add(RunRow(started_at=T0, finished_at=T0 + timedelta(minutes=2), config_hash="abc", code_version="0.1.0"))
        s.add(SourceOffsetRow(source="kafka:fhir.outcomes", partition=0, offset=41,
                              updated_at=T0 + timedelta(minutes=3)))
    return url


@contextmanager
def serving(app: FastAPI) -> Iterator[httpx.Client]:
    """The app under a real uvicorn server on a free loopback port, and an HTTP client for it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def _scrape(client: httpx.Client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def _v(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def test_metrics_endpoint_reports_ingest_counters_and_store_gauges(store):
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    metrics.observe("kafka:fhir.outcomes", accepted=120, rejected=3, ignored=7,
                    dead_letter_reasons=["invalid JSON: Expecting value at line 1 column 1",
                                         "RiskAssessment/ra-9: missing occurrenceDateTime",
                                         "Patient/x1: identifiers present: name, telecom"])
    metrics.observe_counts("files", {"Observation": 10, "Patient": 5}, {}, {}, {"Observation": 2},
                           ["something nobody foresaw"])
    metrics.set_lag("kafka:fhir.outcomes", 42)
    metrics.set_watermark("kafka:fhir.outcomes", T0)
    app = FastAPI()
    app.include_router(metrics_router(store, registry=registry))
    with serving(app) as client:
        samples = _scrape(client)

    assert _v(samples, "vigil_ingest_records_total", source="kafka:fhir.outcomes", outcome="accepted") == 120
    assert _v(samples, "vigil_ingest_records_total", source="kafka:fhir.outcomes", outcome="rejected") == 3
    assert _v(samples, "vigil_ingest_records_total", source="kafka:fhir.outcomes", outcome="ignored") == 7
    assert _v(samples, "vigil_ingest_records_total", source="files", outcome="accepted") == 15
    assert _v(samples, "vigil_ingest_records_total", source="files", outcome="duplicate") == 2
    assert _v(samples, "vigil_dead_letters_total", reason="invalid_json") == 1
    assert _v(samples, "vigil_dead_letters_total", reason="missing_element") == 1
    assert _v(samples, "vigil_dead_letters_total", reason="identifiers_present") == 1
    assert _v(samples, "vigil_dead_letters_total", reason="other") == 1
    assert _v(samples, "vigil_dead_letters_total", reason="fhir_validation") == 0  # pre-created series
    assert _v(samples, "vigil_consumer_lag_records", source="kafka:fhir.outcomes") == 42
    assert _v(samples, "vigil_watermark_timestamp_seconds", source="kafka:fhir.outcomes") == T0.timestamp()

    assert _v(samples, "vigil_store_up") == 1
    assert _v(samples, "vigil_open_alerts", severity="warning", state="firing") == 3
    assert _v(samples, "vigil_open_alerts", severity="critical", state="acknowledged") == 1
    assert _v(samples, "vigil_open_alerts", severity="warning", state="silenced") == 1
    assert _v(samples, "vigil_open_alerts", severity="critical", state="firing") == 0
    assert sum(v for (n, _), v in samples.items() if n == "vigil_open_alerts") == 5  # the resolved one is not open
    assert len([1 for (n, _) in samples if n == "vigil_open_alerts"]) == 6  # 2 severities x 3 open states
    assert _v(samples, "vigil_tickets", category="C1", status="open") == 1
    assert _v(samples, "vigil_tickets", category="C2", status="open") == 1
    assert _v(samples, "vigil_tickets", category="C2", status="closed") == 1
    assert _v(samples, "vigil_tickets", category="C5", status="open") == 0
    assert _v(samples, "vigil_last_run_finished_timestamp_seconds") == (T0 + timedelta(minutes=2)).timestamp()
    assert _v(samples, "vigil_source_committed_timestamp_seconds", source="kafka:fhir.outcomes") == (
        T0 + timedelta(minutes=3)).timestamp()


def test_store_gauges_follow_the_store_at_each_scrape(store):
    app = FastAPI()
    app.include_router(metrics_router(store, registry=CollectorRegistry()))
    with serving(app) as client:
        assert _v(_scrape(client), "vigil_open_alerts", severity="warning", state="firing") == 3
        with session_factory(store)() as s, s.begin():
            s.get(AlertRow, "A-000001").state = "resolved"
        assert _v(_scrape(client), "vigil_open_alerts", severity="warning", state="firing") == 2


def test_unreadable_store_reports_store_up_zero_instead_of_failing_the_scrape(tmp_path):
    registry = CollectorRegistry()
    registry.register(StoreCollector(f"sqlite:///{tmp_path / 'no-such-dir' / 'vigil.db'}"))
    app = FastAPI()
    app.include_router(metrics_router(registry=registry))
    with serving(app) as client:
        samples = _scrape(client)
    assert _v(samples, "vigil_store_up") == 0
    assert not any(n == "vigil_open_alerts" for n, _ in samples)


def test_label_cardinality_is_bounded():
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry, max_sources=4)
    for i in range(50):
        metrics.observe(f"feed-{i}", accepted=1)
        metrics.set_lag(f"feed-{i}", i)
    families = {f.name: f for f in registry.collect()}
    sources = {s.labels["source"] for s in families["vigil_ingest_records"].samples if s.name.endswith("_total")}
    assert sources == {"feed-0", "feed-1", "feed-2", "feed-3", "other"}
    other = [s.value for s in families["vigil_ingest_records"].samples
             if s.name.endswith("_total") and s.labels["source"] == "other"]
    assert other == [46]
    reasons = {s.labels["reason"] for s in families["vigil_dead_letters"].samples}
    assert reasons == set(DEAD_LETTER_VOCABULARY)
    assert dead_letter_reason("Observation/o-1: invalid valueQuantity.value (must be a number)") == "invalid_value"
    assert dead_letter_reason("not a FHIR resource (no resourceType)") == "not_fhir"


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_logs_are_one_object_per_line_with_extras_and_no_payload(root_logging):
    stream = io.StringIO()
    configure_json_logging("DEBUG", stream=stream)
    log = logging.getLogger("vigil.ingest")
    secret = '{"resourceType": "Patient", "name": [{"family": "Doe"}]}'
    log.info("batch stored", extra={"source": "kafka:fhir", "records": 120, "at": T0, "payload": secret})
    log.debug("quiet detail")
    try:
        raise ValueError("bad offset")
    except ValueError:
        log.exception("commit failed", extra={"partition": 3})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "batch stored" and first["level"] == "INFO" and first["logger"] == "vigil.ingest"
    assert datetime.fromisoformat(first["ts"]).tzinfo is not None
    assert first["source"] == "kafka:fhir" and first["records"] == 120 and first["at"] == T0.isoformat()
    assert first["payload"] == "[withheld]" and "Doe" not in stream.getvalue()
    assert second["level"] == "DEBUG"
    assert third["level"] == "ERROR" and third["partition"] == 3 and "ValueError: bad offset" in third["exception"]


def test_metrics_route_takes_the_api_guard_as_a_dependency(store):
    """The API mounts the router with its auth dependency (``Depends(require(...))``); a plain header check stands
    in for it here, to show the route is guarded like any other."""
    from fastapi import Depends, Header, HTTPException

    def guard(authorization: str | None = Header(None)) -> None:
        if authorization != "Bearer scrape-token":
            raise HTTPException(401, "missing or wrong bearer token")

    app = FastAPI()
    app.include_router(metrics_router(store, registry=CollectorRegistry(), dependencies=[Depends(guard)]))
    with serving(app) as client:
        assert client.get("/metrics").status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert ok.status_code == 200 and "vigil_open_alerts" in ok.text


def test_the_api_with_the_metrics_route_still_publishes_its_openapi_schema(tmp_path):
    """`vigil serve` mounts /metrics into the API: the OpenAPI document must still build (it once failed with 500)."""
    from fastapi.testclient import TestClient

    from vigil import store
    from vigil.api import create_app
    from vigil.observability import metrics_router

    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    store.upgrade(url)
    client = TestClient(create_app(url, extra_routers=[metrics_router(url)]))
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and "/metrics" in schema.json()["paths"]


def test_kafka_record_contents_stay_out_of_a_debug_log(root_logging):
    """Issue #9: kafka-python logs each record it sends at DEBUG ("Sending (key=.. value=..)"), so a root logger at
    DEBUG wrote forwarded resources to the log. Real producer against librdkafka's mock cluster (tests/kafka_mock.py);
    the positive control lowers the pin and sees the value appear, so the check is not vacuous."""
    from kafka import KafkaProducer

    from kafka_mock import MockCluster  # tests/ is on sys.path (no __init__.py)

    stream = io.StringIO()
    configure_json_logging("DEBUG", stream=stream)
    logging.getLogger("vigil.ingest").debug("vigil's own debug line")
    cluster = MockCluster()
    producer = KafkaProducer(bootstrap_servers=cluster.bootstrap, api_version=(2, 3), acks="all")
    try:
        producer.send("fhir.notified", value=b'{"resourceType":"Patient","id":"canary-pinned-4711"}').get(10)
        logging.getLogger("kafka").setLevel(logging.DEBUG)  # positive control: what the pin prevents
        producer.send("fhir.notified", value=b'{"resourceType":"Patient","id":"canary-unpinned-4712"}').get(10)
    finally:
        logging.getLogger("kafka").setLevel(logging.INFO)
        producer.close(5)
        cluster.close()
    text = stream.getvalue()
    assert "vigil's own debug line" in text  # the root logger really is at DEBUG
    assert "canary-unpinned-4712" in text  # kafka-python does log record values at DEBUG
    assert "canary-pinned-4711" not in text


def test_importing_vigil_pins_the_kafka_loggers():
    """A program that sets the root level itself (the campaign harness, an embedding service) never calls
    configure_json_logging: importing vigil.observability (which vigil.service and vigil.webhook do) pins the level."""
    import subprocess
    import sys

    code = ("import logging; logging.getLogger().setLevel(logging.DEBUG); import vigil.webhook; "
            "print(logging.getLogger('kafka.producer.kafka').getEffectiveLevel(), "
            "logging.getLogger('kafka.conn').isEnabledFor(logging.DEBUG))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [str(logging.INFO), "False"]
