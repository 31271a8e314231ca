"""`vigil serve`'s FHIR subscription endpoint against librdkafka's mock cluster (a real Kafka-protocol server): a
notification's resources are on the forward topic before the 200, a gap is recorded for catch-up, and a topic that
cannot be written answers 500 so the FHIR server retries."""

from __future__ import annotations

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, KafkaProducer
from kafka_mock import MockCluster, mock_cluster  # noqa: F401 (fixture)
from test_subscription import FHIR_JSON, _obs, _ra, r4_backport

from ingest.subscription import SubscriptionConfig
from vigil.webhook import SubscriptionForwarder

TOPIC = "fhir.notified"


def _config(bootstrap: str) -> SubscriptionConfig:
    return SubscriptionConfig(name="emr-hook", path="/fhir/subscription", forward_bootstrap_servers=bootstrap,
                              forward_topic=TOPIC, resource_types=["RiskAssessment", "Observation"])


def _client(forwarder: SubscriptionForwarder) -> TestClient:
    app = FastAPI()
    app.include_router(forwarder.router())
    return TestClient(app)


def _consume(bootstrap: str, n: int) -> list:
    consumer = KafkaConsumer(TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id="t",
                             api_version=(2, 3), consumer_timeout_ms=8000)
    records = []
    for record in consumer:
        records.append(record)
        if len(records) == n:
            break
    consumer.close()
    return records


def test_notified_resources_are_on_the_topic_before_the_answer_and_gaps_are_recorded(mock_cluster: MockCluster):
    forwarder = SubscriptionForwarder(_config(mock_cluster.bootstrap),
                                      KafkaProducer(bootstrap_servers=mock_cluster.bootstrap, acks="all",
                                                    api_version=(2, 3)))
    client = _client(forwarder)
    ra, obs = _ra("ra-1", "2026-02-01T10:00:00Z"), _obs("obs-1", "2026-02-01T10:05:00Z")
    handshake = client.post("/fhir/subscription", content=r4_backport("handshake", 0),
                            headers={"Content-Type": FHIR_JSON})
    first = client.post("/fhir/subscription", headers={"Content-Type": FHIR_JSON}, content=r4_backport(
        "event-notification", 1, [(1, "2026-02-01T10:00:00Z", "RiskAssessment/ra-1")], [ra]))
    gap = client.post("/fhir/subscription", headers={"Content-Type": FHIR_JSON}, content=r4_backport(
        "event-notification", 4, [(4, "2026-02-01T10:05:00Z", "Observation/obs-1")], [obs]))
    garbage = client.post("/fhir/subscription", content=b"{not json", headers={"Content-Type": FHIR_JSON})
    assert [r.status_code for r in (handshake, first, gap, garbage)] == [200, 200, 200, 400]
    assert forwarder.forwarded == 2
    assert [(q.first, q.last) for q in forwarder.catch_ups] == [(2, 3)]
    records = _consume(mock_cluster.bootstrap, 2)
    assert sorted(orjson.loads(r.value)["id"] for r in records) == ["obs-1", "ra-1"]
    assert {r.key for r in records} == {b"Subscription/sepsis-feed"}
    forwarder.close()


def test_a_topic_that_cannot_be_written_answers_500_so_the_server_retries(mock_cluster: MockCluster):
    class Unwritable:
        def send(self, *args, **kwargs):
            raise RuntimeError("broker unavailable")

        def flush(self, timeout=None):
            pass

        def close(self, timeout=None):
            pass

    forwarder = SubscriptionForwarder(_config(mock_cluster.bootstrap), Unwritable())
    client = TestClient(_client(forwarder).app, raise_server_exceptions=False)
    answer = client.post("/fhir/subscription", headers={"Content-Type": FHIR_JSON}, content=r4_backport(
        "event-notification", 1, [(1, "2026-02-01T10:00:00Z", "RiskAssessment/ra-1")],
        [_ra("ra-1", "2026-02-01T10:00:00Z")]))
    assert answer.status_code == 500 and forwarder.forwarded == 0


def test_a_subscription_without_a_forward_topic_is_refused_with_what_to_set():
    with pytest.raises(ValueError, match="forward_bootstrap_servers and forward_topic"):
        SubscriptionForwarder(SubscriptionConfig(name="emr-hook"))


def test_a_gap_is_caught_up_over_rest_and_the_lost_resources_are_forwarded(mock_cluster: MockCluster):
    """Events 2–3 never arrive; with ``catch_up_base_url`` the endpoint re-reads from the last good event against a
    FHIR server (tests/fhir_server.py, a real HTTP server on loopback) and forwards what it finds."""
    from fhir_server import FhirServer

    with FhirServer() as server:
        server.add(*[_ra(f"ra-{n}", f"2026-02-01T10:0{n}:00Z") for n in range(1, 5)])
        config = _config(mock_cluster.bootstrap).model_copy(update={"catch_up_base_url": server.base_url})
        forwarder = SubscriptionForwarder(config, KafkaProducer(bootstrap_servers=mock_cluster.bootstrap,
                                                                acks="all", api_version=(2, 3)))
        client = _client(forwarder)
        client.post("/fhir/subscription", content=r4_backport("handshake", 0), headers={"Content-Type": FHIR_JSON})
        for n in (1, 4):
            answer = client.post("/fhir/subscription", headers={"Content-Type": FHIR_JSON}, content=r4_backport(
                "event-notification", n, [(n, f"2026-02-01T10:0{n}:00Z", f"RiskAssessment/ra-{n}")],
                [_ra(f"ra-{n}", f"2026-02-01T10:0{n}:00Z")]))
            assert answer.status_code == 200
        forwarder.wait_for_catch_up()
    assert [(q.first, q.last) for q in forwarder.catch_ups] == [(2, 3)]
    assert forwarder.recovered == 4  # ra-1 (the last good event, re-read from its time) to ra-4
    ids = [orjson.loads(r.value)["id"] for r in _consume(mock_cluster.bootstrap, 6)]
    assert {"ra-2", "ra-3"} <= set(ids) and len(ids) == 6
    forwarder.close()
