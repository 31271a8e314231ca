"""`vigil serve`'s FHIR subscription endpoint against librdkafka's mock cluster (a real Kafka-protocol server): a
notification's resources are on the forward topic before the 200, a gap is recorded for catch-up, a topic that
cannot be written answers 500 so the FHIR server retries, and id-only notifications are read from a real loopback
FHIR server (tests/fhir_server.py, with the read interaction added here) with failures forwarded as dead letters."""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner
from fhir_server import FhirServer, Recorded
from kafka_mock import MockCluster, mock_cluster  # noqa: F401 (fixture)
from test_subscription import FHIR_JSON, _obs, _ra, r4_backport

from ingest import Decoder, Message, SubjectKeyer, load_messages
from ingest.id_only import IdOnlyFetcher
from ingest.rest_poll import FhirHttpConfig
from ingest.subscription import SubscriptionConfig
from vigil.domain import Position
from vigil.observability import IngestMetrics
from vigil.webhook import FETCH, SubscriptionForwarder

TOPIC = "fhir.notified"
SECRET_ENV, SECRET = "VIGIL_TEST_WEBHOOK_SECRET", "Bearer webhook-s3cret"


@pytest.fixture(autouse=True)
def _secret(monkeypatch):
    """The route reads its secret from the environment when it is built (Subscription.channel.header's value)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _config(bootstrap: str) -> SubscriptionConfig:
    return SubscriptionConfig(name="emr-hook", path="/fhir/subscription", forward_bootstrap_servers=bootstrap,
                              forward_topic=TOPIC, resource_types=["RiskAssessment", "Observation"],
                              secret_env=SECRET_ENV)


def _client(forwarder: SubscriptionForwarder, raise_server_exceptions: bool = True) -> TestClient:
    app = FastAPI()
    app.include_router(forwarder.router())
    return TestClient(app, headers={"Authorization": SECRET}, raise_server_exceptions=raise_server_exceptions)


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
    client = _client(forwarder, raise_server_exceptions=False)
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


class ReadableFhirServer(FhirServer):
    """tests/fhir_server.py's real loopback FHIR server plus the FHIR ``read`` interaction (GET [base]/Type/id),
    which id-only notifications need; faults injected with ``fail_next`` apply to reads too."""

    def _handler(self):
        server, base = self, super()._handler()

        class Reads(base):
            def _dispatch(self, method: str) -> None:
                path = urlsplit(self.path).path.removeprefix("/fhir/")
                rtype, _, rid = path.partition("/")
                faulted = any(f.times > 0 and f.path_contains in self.path for f in server.faults)
                if method != "GET" or faulted or not rtype[:1].isupper() or not rid or "/" in rid:
                    return super()._dispatch(method)
                server.requests.append(Recorded(method, "/fhir/" + path, {}, dict(self.headers.items())))
                found = [r for r in server.resources if r["resourceType"] == rtype and r["id"] == rid]
                if not found:
                    return self._send(404, {"resourceType": "OperationOutcome", "issue": [
                        {"severity": "error", "code": "not-found", "diagnostics": f"{path} is unknown"}]})
                return self._send(200, found[0])

        return Reads


def test_id_only_notifications_are_read_over_rest_and_failures_are_dead_lettered(mock_cluster: MockCluster,
                                                                                 monkeypatch):
    """Five resources named id-only: one is read and forwarded; one unknown (404), one Patient unknown (404, its id
    never stored), one whose server keeps failing (503 after the retries) and one on another server (not asked)
    are forwarded as fetch failures, which the decoder turns into dead letters with the reason. The notification
    is answered 200 and the next one goes through."""
    monkeypatch.setenv("VIGIL_TEST_FHIR_TOKEN", "Bearer t0k3n")
    sleeps: list[float] = []
    with ReadableFhirServer() as server:
        server.add(_ra("ra-1", "2026-02-01T10:01:00Z"), _ra("ra-2", "2026-02-01T10:02:00Z"))
        server.fail_next("RiskAssessment/ra-2", 503, times=3)  # FETCH: 2 retries, so 3 attempts fail
        config = _config(mock_cluster.bootstrap).model_copy(update={"catch_up_base_url": server.base_url,
                                                                    "catch_up_auth_env": "VIGIL_TEST_FHIR_TOKEN"})
        fetcher = IdOnlyFetcher(FhirHttpConfig(base_url=server.base_url, auth_env="VIGIL_TEST_FHIR_TOKEN", **FETCH),
                                sleep=sleeps.append)
        forwarder = SubscriptionForwarder(config, KafkaProducer(bootstrap_servers=mock_cluster.bootstrap, acks="all",
                                                                api_version=(2, 3)), fetcher)
        client = _client(forwarder)
        named = [f"{server.base_url}/RiskAssessment/ra-1", f"{server.base_url}/RiskAssessment/ra-3",
                 f"{server.base_url}/Patient/p-secret-42", f"{server.base_url}/RiskAssessment/ra-2",
                 "https://other.example.org/fhir/RiskAssessment/ra-9"]
        client.post("/fhir/subscription", content=r4_backport("handshake", 0), headers={"Content-Type": FHIR_JSON})
        answer = client.post("/fhir/subscription", headers={"Content-Type": FHIR_JSON}, content=r4_backport(
            "event-notification", 5, [(n, f"2026-02-01T10:0{n}:00Z", url) for n, url in enumerate(named, 1)],
            id_only=named))
        later = client.post("/fhir/subscription", headers={"Content-Type": FHIR_JSON}, content=r4_backport(
            "event-notification", 6, [(6, "2026-02-01T10:06:00Z", "Observation/obs-6")],
            [_obs("obs-6", "2026-02-01T10:06:00Z")]))
        reads = [r for r in server.requests if "/RiskAssessment/" in r.path or "/Patient/" in r.path]
    assert (answer.status_code, later.status_code) == (200, 200)
    assert (forwarder.fetched, forwarder.fetch_failures, forwarder.forwarded) == (1, 4, 6)
    assert sorted(r.path.rsplit("/fhir/", 1)[-1] for r in reads) == [
        "Patient/p-secret-42", "RiskAssessment/ra-1", "RiskAssessment/ra-2", "RiskAssessment/ra-2",
        "RiskAssessment/ra-2", "RiskAssessment/ra-3"]  # nothing asked of the other server
    assert all(r.headers["Authorization"] == "Bearer t0k3n" for r in reads)
    assert sleeps == [0.5, 1.0]

    records = _consume(mock_cluster.bootstrap, 6)
    messages = [Message(Position(TOPIC, r.offset, r.partition), r.value) for r in records]
    result = load_messages(messages, Decoder(SubjectKeyer("k")))
    assert result.accepted == {"RiskAssessment": 1, "Observation": 1}
    tail = ("the notification was acknowledged and the stream went on without it — fix the cause on the FHIR "
            "server, then have it resend the resource or re-read it with a REST catch-up")
    assert sorted(d.reason for d in result.dead_letters) == sorted(
        f"{where}: not fetched for an id-only subscription notification ({why}); {tail}" for where, why in [
            ("RiskAssessment/ra-3", "not-found, http-404"), ("Patient/(id not kept)", "not-found, http-404"),
            ("RiskAssessment/ra-2", "transient, http-503"), ("RiskAssessment/ra-9", "security, foreign-server")])
    assert {(d.resource_type, d.resource_id) for d in result.dead_letters} == {
        ("RiskAssessment", "ra-3"), ("Patient", None), ("RiskAssessment", "ra-2"), ("RiskAssessment", "ra-9")}
    stored = " ".join(f"{d.reason} {d.payload}" for d in result.dead_letters)
    assert "p-secret-42" not in stored and "unknown" not in stored  # no Patient id, no server free text
    forwarder.close()


def test_id_only_without_a_server_to_read_from_is_logged_not_guessed(mock_cluster: MockCluster, caplog):
    forwarder = SubscriptionForwarder(_config(mock_cluster.bootstrap),
                                      KafkaProducer(bootstrap_servers=mock_cluster.bootstrap, acks="all",
                                                    api_version=(2, 3)))
    client = _client(forwarder)
    url = "https://emr.example.org/fhir/RiskAssessment/ra-1"
    client.post("/fhir/subscription", content=r4_backport("handshake", 0), headers={"Content-Type": FHIR_JSON})
    answer = client.post("/fhir/subscription", headers={"Content-Type": FHIR_JSON}, content=r4_backport(
        "event-notification", 1, [(1, "2026-02-01T10:01:00Z", url)], id_only=[url]))
    assert answer.status_code == 200 and (forwarder.fetched, forwarder.forwarded) == (0, 0)
    assert "no catch_up_base_url is set" in caplog.text
    forwarder.close()


def test_refusals_and_drops_are_counted_on_the_metrics_of_vigil_serve(mock_cluster: MockCluster):
    """Each 4xx and each acknowledged-but-unforwarded entry increments ``vigil_webhook_refused_total`` /
    ``vigil_webhook_dropped_total`` with a fixed-vocabulary reason, read back from the Prometheus exposition."""
    registry = CollectorRegistry()
    forwarder = SubscriptionForwarder(_config(mock_cluster.bootstrap),
                                      KafkaProducer(bootstrap_servers=mock_cluster.bootstrap, acks="all",
                                                    api_version=(2, 3)), metrics=IngestMetrics(registry))
    client = _client(forwarder)
    url = "https://emr.example.org/fhir/RiskAssessment/ra-9"
    headers = {"Content-Type": FHIR_JSON}
    answers = [client.post("/fhir/subscription", content=b"{", headers=headers),
               client.post("/fhir/subscription", content=b"{}", headers={**headers, "Authorization": "guess"}),
               client.post("/fhir/subscription", content=r4_backport("handshake", 0), headers=headers),
               client.post("/fhir/subscription", headers=headers, content=r4_backport(
                   "event-notification", 1, [(1, "2026-02-01T10:01:00Z", url)], id_only=[url]))]
    assert [a.status_code for a in answers] == [400, 401, 200, 200]
    exposition = generate_latest(registry).decode()
    samples = {(s.name, s.labels.get("reason")): s.value for family in text_string_to_metric_families(exposition)
               for s in family.samples if s.name.startswith("vigil_webhook_")}
    assert samples[("vigil_webhook_refused_total", "invalid_json")] == 1
    assert samples[("vigil_webhook_refused_total", "unauthorized")] == 1
    assert samples[("vigil_webhook_refused_total", "too_deep")] == 0  # every reason exists from the start
    assert samples[("vigil_webhook_dropped_total", "id_only_unfetchable")] == 1
    forwarder.close()


def test_vigil_serve_refuses_to_start_with_a_webhook_without_a_secret(tmp_path, monkeypatch):
    """The real `vigil serve` command: it exits before listening, naming the source and what to set."""
    from vigil.cli import app

    config = tmp_path / "vigil.yaml"
    config.write_text(f"store_url: sqlite:///{tmp_path / 'vigil.db'}\nsources:\n"
                      "  - {kind: fhir-subscription, name: emr-hook, forward_bootstrap_servers: '127.0.0.1:9',"
                      " forward_topic: fhir.notified}\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(config), "--port", "1"])
    assert result.exit_code == 2, result.output
    assert "source 'emr-hook'" in result.output and "set secret_env" in result.output
    assert "allow_unauthenticated: true" in result.output
