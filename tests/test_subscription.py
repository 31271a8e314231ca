"""Subscription notifications (R4 backport Parameters, R4B/R5 SubscriptionStatus): handshake, heartbeat, events
with full resources, id-only, retries, and a gap caught up through the REST poller against a real FHIR server.

The webhook route runs in a real uvicorn server on loopback and is called over HTTP by httpx.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_server import FhirServer  # tests/ is on sys.path (no __init__.py)
from ingest import Decoder, SubjectKeyer, load_messages
from ingest.rest_poll import RestPollSource, RestPollSourceConfig
from ingest.sources import Checkpoint
from ingest.subscription import (
    NotificationError,
    SubscriptionConfig,
    SubscriptionSource,
    check_authentication,
    parse_notification,
    subscription_router,
)
from vigil.domain import Fact, Prediction

SUB = "Subscription/sepsis-feed"
TOPIC = "https://vigil.dev/fhir/SubscriptionTopic/model-output"
FHIR_JSON = "application/fhir+json"
KEYER = SubjectKeyer("test-secret")


def _ra(rid: str, updated: str, score: float = 0.7) -> dict:
    """A RiskAssessment shaped like the simulator's (vigil/simulator.py)."""
    return {"resourceType": "RiskAssessment", "id": rid, "meta": {"versionId": "1", "lastUpdated": updated},
            "status": "final", "method": {"coding": [{"system": "https://vigil.dev/fhir/CodeSystem/model",
                                                      "code": "cta-stenosis"}]},
            "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            "occurrenceDateTime": updated, "performer": {"reference": "Device/cta-stenosis-2.1"},
            "prediction": [{"probabilityDecimal": score}]}


def _obs(rid: str, updated: str) -> dict:
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": "1", "lastUpdated": updated},
            "status": "final", "subject": {"reference": "Patient/p1"}, "effectiveDateTime": updated,
            "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
            "valueQuantity": {"value": 1.3, "unit": "mg/dL", "code": "mg/dL"}}


def r4_backport(kind: str, since: int, events: list[tuple[int, str, str | None]] = (),
                resources: list[dict] = (), id_only: list[str] = ()) -> bytes:
    """R4 + Subscriptions Backport: a history Bundle whose first entry is a backport-subscription-status-r4
    Parameters (IG BackportNotificationR4.fsh); events-since-subscription-start and event-number are strings."""
    params = [{"name": "subscription", "valueReference": {"reference": SUB}},
              {"name": "topic", "valueCanonical": TOPIC},
              {"name": "status", "valueCode": "requested" if kind == "handshake" else "active"},
              {"name": "type", "valueCode": kind},
              {"name": "events-since-subscription-start", "valueString": str(since)}]
    for number, timestamp, focus in events:
        parts = [{"name": "event-number", "valueString": str(number)},
                 {"name": "timestamp", "valueInstant": timestamp}]
        if focus:
            parts.append({"name": "focus", "valueReference": {"reference": focus}})
        params.append({"name": "notification-event", "part": parts})
    status = {"resourceType": "Parameters", "meta": {"profile": [
        "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]},
              "parameter": params}
    entries = [{"fullUrl": "urn:uuid:9e41ff6d-5be6-4e6a-8b85-abd4e7f58400", "resource": status,
                "request": {"method": "GET", "url": f"{SUB}/$status"}, "response": {"status": "200"}}]
    for r in resources:
        entries.append({"fullUrl": f"https://emr.example.org/fhir/{r['resourceType']}/{r['id']}", "resource": r,
                        "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                        "response": {"status": "200"}})
    for url in id_only:
        entries.append({"fullUrl": url, "request": {"method": "PUT", "url": url.split("/fhir/", 1)[-1]},
                        "response": {"status": "200"}})
    return orjson.dumps({"resourceType": "Bundle", "type": "history", "timestamp": "2026-02-01T10:00:00Z",
                         "entry": entries})


def r5(kind: str, since: int, events: list[tuple[int, str, str | None]] = (), resources: list[dict] = ()) -> bytes:
    """R5: a subscription-notification Bundle whose first entry is a SubscriptionStatus."""
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": kind,
              "eventsSinceSubscriptionStart": since, "subscription": {"reference": SUB}, "topic": TOPIC,
              "notificationEvent": [{"eventNumber": n, "timestamp": t, **({"focus": {"reference": f}} if f else {})}
                                    for n, t, f in events]}
    entries = [{"fullUrl": "urn:uuid:1f4e0b1c-93a6-4a31-9c0b-3b6f3b2d9d01", "resource": status}]
    entries += [{"fullUrl": f"https://emr.example.org/fhir/{r['resourceType']}/{r['id']}", "resource": r}
                for r in resources]
    return orjson.dumps({"resourceType": "Bundle", "type": "subscription-notification", "entry": entries})


def _receiver(**overrides) -> SubscriptionSource:
    return SubscriptionSource(SubscriptionConfig(name="emr-hook", **{
        "resource_types": ["RiskAssessment", "Observation"], **overrides}),
        now=lambda: datetime(2026, 2, 1, 12, 0, tzinfo=UTC))


def test_handshake_and_heartbeat_are_acknowledged_without_data():
    receiver = _receiver()
    shake = receiver.handle_notification(r4_backport("handshake", 0), FHIR_JSON)
    assert (shake.type, shake.subscription, shake.status) == ("handshake", SUB, "requested")
    assert (shake.messages, shake.fetch, shake.catch_up) == ([], [], None)
    beat = receiver.handle_notification(r5("heartbeat", 0), f"{FHIR_JSON}; charset=utf-8")
    assert (beat.type, beat.messages, beat.catch_up) == ("heartbeat", [], None)
    assert receiver.poll(10, 0.0) == [] and receiver.last_event(SUB) == 0


def test_events_with_full_resources_become_messages_that_decode():
    receiver = _receiver()
    receiver.handle_notification(r4_backport("handshake", 0), FHIR_JSON)
    first = receiver.handle_notification(r4_backport(
        "event-notification", 1, [(1, "2026-02-01T10:00:00Z", "RiskAssessment/ra-1")],
        [_ra("ra-1", "2026-02-01T10:00:00Z")]), FHIR_JSON)
    second = receiver.handle_notification(r5(
        "event-notification", 2, [(2, "2026-02-01T10:05:00Z", "Observation/ob-1")],
        [_obs("ob-1", "2026-02-01T10:05:00Z")]), "application/json")
    assert [(str(m.position)) for m in first.messages + second.messages] == [
        f"{SUB}#event-1:2", f"{SUB}#event-2:2"]
    assert first.fetch == [] and first.catch_up is None and second.catch_up is None
    queued = receiver.poll(10, 0.0)
    assert queued == first.messages + second.messages
    result = load_messages(queued, Decoder(KEYER))
    assert [type(r).__name__ for _, r in result.records] == ["Prediction", "Fact"]
    prediction = result.records[0][1]
    assert isinstance(prediction, Prediction) and prediction.score == 0.7 and prediction.model_id == "cta-stenosis"
    assert isinstance(result.records[1][1], Fact)
    assert orjson.loads(receiver.checkpoint().cursor) == {SUB: {"last": 2, "timestamp": "2026-02-01T10:05:00Z"}}


def test_a_gap_returns_a_catch_up_query_that_recovers_the_lost_events_over_rest():
    receiver = _receiver()
    receiver.handle_notification(r4_backport("handshake", 0), FHIR_JSON)
    for n in range(1, 6):
        receiver.handle_notification(r4_backport(
            "event-notification", n, [(n, f"2026-02-01T10:0{n}:00Z", f"RiskAssessment/ra-{n}")],
            [_ra(f"ra-{n}", f"2026-02-01T10:0{n}:00Z")]), FHIR_JSON)
    jumped = receiver.handle_notification(r4_backport(
        "event-notification", 8, [(8, "2026-02-01T10:08:00Z", "RiskAssessment/ra-8")],
        [_ra("ra-8", "2026-02-01T10:08:00Z")]), FHIR_JSON)
    query = jumped.catch_up
    assert (query.subscription, query.first, query.last, query.since) == (SUB, 6, 7, "2026-02-01T10:05:00Z")
    assert query.search_params() == {"_sort": "_lastUpdated", "_lastUpdated": "ge2026-02-01T10:05:00Z"}
    assert [orjson.loads(m.payload)["id"] for m in jumped.messages] == ["ra-8"]  # event 8 itself is kept

    with FhirServer() as server:  # the EMR: every RiskAssessment is there, 6 and 7 among them
        server.add(*[_ra(f"ra-{n}", f"2026-02-01T10:0{n}:00Z") for n in range(1, 9)])
        poller = RestPollSource(RestPollSourceConfig(name="catch-up", base_url=server.base_url,
                                                     resource_types=["RiskAssessment"]), sleep=lambda s: None)
        poller.resume(Checkpoint(cursor=query.rest_cursor()))
        recovered = []
        while not poller.exhausted:
            recovered.extend(poller.poll(100, 0.0))
    assert [orjson.loads(m.payload)["id"] for m in recovered] == ["ra-5", "ra-6", "ra-7", "ra-8"]
    receiver.caught_up(query)
    after = receiver.handle_notification(r5("event-notification", 9, [(9, "2026-02-01T10:09:00Z", None)],
                                            [_ra("ra-9", "2026-02-01T10:09:00Z")]), FHIR_JSON)
    assert after.catch_up is None
    assert orjson.loads(receiver.checkpoint().cursor) == {}  # nothing delivered to the service yet
    receiver.poll(100, 0.0)
    assert orjson.loads(receiver.checkpoint().cursor) == {SUB: {"last": 9, "timestamp": "2026-02-01T10:09:00Z"}}


def test_retries_are_dropped_and_a_late_event_fills_its_gap():
    receiver = _receiver()
    receiver.handle_notification(r5("handshake", 0), FHIR_JSON)
    receiver.handle_notification(r5("event-notification", 1, [(1, "2026-02-01T10:01:00Z", None)],
                                    [_obs("ob-1", "2026-02-01T10:01:00Z")]), FHIR_JSON)
    gap = receiver.handle_notification(r5("event-notification", 3, [(3, "2026-02-01T10:03:00Z", None)],
                                          [_obs("ob-3", "2026-02-01T10:03:00Z")]), FHIR_JSON)
    assert (gap.catch_up.first, gap.catch_up.last) == (2, 2)
    retried = receiver.handle_notification(r5("event-notification", 3, [(3, "2026-02-01T10:03:00Z", None)],
                                              [_obs("ob-3", "2026-02-01T10:03:00Z")]), FHIR_JSON)
    assert (retried.duplicate_events, retried.messages, retried.catch_up) == ([3], [], None)
    late = receiver.handle_notification(r5("event-notification", 2, [(2, "2026-02-01T10:02:00Z", None)],
                                           [_obs("ob-2", "2026-02-01T10:02:00Z")]), FHIR_JSON)
    assert late.duplicate_events == [] and [orjson.loads(m.payload)["id"] for m in late.messages] == ["ob-2"]


def test_a_heartbeat_ahead_of_our_count_is_a_gap():
    receiver = _receiver()
    receiver.handle_notification(r5("handshake", 0), FHIR_JSON)
    beat = receiver.handle_notification(r5("heartbeat", 4), FHIR_JSON)
    assert (beat.catch_up.first, beat.catch_up.last, beat.catch_up.since) == (1, 4, None)


def test_id_only_and_empty_payloads():
    receiver = _receiver()
    receiver.handle_notification(r4_backport("handshake", 0), FHIR_JSON)
    id_only = receiver.handle_notification(r4_backport(
        "event-notification", 1, [(1, "2026-02-01T10:01:00Z", "https://emr.example.org/fhir/RiskAssessment/ra-1")],
        id_only=["https://emr.example.org/fhir/RiskAssessment/ra-1"]), FHIR_JSON)
    assert id_only.messages == [] and id_only.catch_up is None
    assert id_only.fetch == ["https://emr.example.org/fhir/RiskAssessment/ra-1"]
    empty = receiver.handle_notification(r4_backport("event-notification", 2, [(2, "2026-02-01T10:02:00Z", None)]),
                                         FHIR_JSON)
    assert (empty.catch_up.reason, empty.catch_up.first, empty.catch_up.since) == (
        "empty payload", 2, "2026-02-01T10:01:00Z")


def test_a_restart_from_the_delivered_checkpoint_detects_what_was_not_processed():
    """Events acknowledged to the server but not yet processed when the process died show up as a gap."""
    receiver = _receiver()
    receiver.handle_notification(r5("handshake", 0), FHIR_JSON)
    receiver.handle_notification(r5("event-notification", 1, [(1, "2026-02-01T10:01:00Z", None)],
                                    [_obs("ob-1", "2026-02-01T10:01:00Z")]), FHIR_JSON)
    receiver.poll(10, 0.0)
    stored = receiver.checkpoint()  # event 1 processed and stored
    receiver.handle_notification(r5("event-notification", 2, [(2, "2026-02-01T10:02:00Z", None)],
                                    [_obs("ob-2", "2026-02-01T10:02:00Z")]), FHIR_JSON)  # acked, then SIGKILL
    restarted = _receiver()
    restarted.resume(stored)
    next_one = restarted.handle_notification(r5("event-notification", 3, [(3, "2026-02-01T10:03:00Z", None)],
                                                [_obs("ob-3", "2026-02-01T10:03:00Z")]), FHIR_JSON)
    assert (next_one.catch_up.first, next_one.catch_up.last, next_one.catch_up.since) == (
        2, 2, "2026-02-01T10:01:00Z")


@pytest.mark.parametrize(("body", "content_type", "reason"), [
    (b"{}", "text/plain", "unsupported Content-Type 'text/plain'"),
    (b"{not json", FHIR_JSON, "invalid JSON: "),
    (orjson.dumps({"resourceType": "Observation"}), FHIR_JSON, "not a notification: expected a Bundle"),
    (orjson.dumps({"resourceType": "Bundle", "type": "searchset"}), FHIR_JSON, "Bundle.type is 'searchset'"),
    (orjson.dumps({"resourceType": "Bundle", "type": "history", "entry": [{"resource": _obs("o", "2026")}]}),
     FHIR_JSON, "the first entry must be a Parameters"),
    (r5("event-storm", 1), FHIR_JSON, "unknown notification type 'event-storm'"),
])
def test_unreadable_notifications_say_what_is_wrong(body, content_type, reason):
    with pytest.raises(NotificationError, match=None) as caught:
        parse_notification(body, content_type)
    assert reason in str(caught.value)


@pytest.fixture
def webhook(monkeypatch):
    """The router mounted in a FastAPI app served by uvicorn on a loopback port."""
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", "Bearer hook-s3cret")
    receiver = _receiver(secret_env="VIGIL_TEST_HOOK_SECRET")
    results = []
    app = FastAPI()
    app.include_router(subscription_router(receiver, results.append))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/fhir/subscription", receiver, results
    server.should_exit = True
    thread.join(5)


def test_webhook_over_http(webhook):
    url, receiver, results = webhook
    headers = {"Content-Type": FHIR_JSON, "Authorization": "Bearer hook-s3cret"}
    with httpx.Client(timeout=5) as client:
        assert client.post(url, content=r4_backport("handshake", 0), headers=headers).status_code == 200
        event = r4_backport("event-notification", 1, [(1, "2026-02-01T10:01:00Z", None)],
                            [_ra("ra-1", "2026-02-01T10:01:00Z")])
        assert client.post(url, content=event, headers=headers).status_code == 200
        refused = client.post(url, content=event, headers={**headers, "Authorization": "Bearer guess"})
        broken = client.post(url, content=b'{"resourceType": "Bundle", "type": "batch"}', headers=headers)
    assert refused.status_code == 401 and refused.json()["issue"][0]["code"] == "security"
    assert broken.status_code == 400
    assert "Bundle.type is 'batch'" in broken.json()["issue"][0]["diagnostics"]
    assert [r.type for r in results] == ["handshake", "event-notification"]
    assert [orjson.loads(m.payload)["id"] for m in receiver.poll(10, 0.0)] == ["ra-1"]


# --- hostile input (issue #9): refused with a reason, never a crash; refusals and drops logged and counted ---------


def _deep_notification(levels: int) -> bytes:
    """A notification whose focus resource nests ``levels`` objects deep (written as text: orjson.dumps cannot)."""
    body = r5("event-notification", 1, [(1, "2026-02-01T10:00:00Z", None)],
              [{"resourceType": "Observation", "id": "deep", "extension": "DEEP"}])
    return body.replace(b'"DEEP"', b'{"extension":' * levels + b'{"value":1}' + b"}" * levels)


def _status_with(**fields) -> bytes:
    status = {"resourceType": "SubscriptionStatus", "type": "event-notification", "status": "active",
              "subscription": {"reference": SUB}, **fields}
    return orjson.dumps({"resourceType": "Bundle", "type": "subscription-notification",
                         "entry": [{"resource": status}]})


@pytest.mark.parametrize(("body", "code", "reason"), [
    (orjson.dumps({"resourceType": "Bundle", "type": "history", "entry": {"resource": {}}}), "malformed",
     "Bundle.entry is a JSON object, expected an array"),
    (_status_with(notificationEvent={"eventNumber": 1}), "malformed",
     "SubscriptionStatus.notificationEvent is a JSON object"),
    (_status_with(error="boom"), "malformed", "SubscriptionStatus.error is a JSON string"),
    (orjson.dumps({"resourceType": "Bundle", "type": "history", "entry": [
        {"resource": {"resourceType": "Parameters", "parameter": 7}}]}), "malformed",
     "Parameters.parameter is a JSON number"),
    (orjson.dumps({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [{"name": "notification-event", "part": "x"}]}}]}), "malformed",
     "Parameters.parameter.part is a JSON string"),
    (_deep_notification(300), "too_deep",
     "entry 2: the Observation resource cannot be re-encoded"),
    (r5("event-storm", 1), "unknown_type", "unknown notification type 'event-storm'"),
    (b"{not json", "invalid_json", "invalid JSON"),
])
def test_malformed_notifications_are_refused_with_a_code_and_a_reason(body, code, reason):
    with pytest.raises(NotificationError) as caught:
        parse_notification(body, FHIR_JSON)
    assert caught.value.code == code and reason in str(caught.value)


def test_odd_but_harmless_values_are_read_not_crashed_on():
    """What the fuzzer found: '²' passes str.isdigit() but not int(); part names and timestamps of other types."""
    superscript = r4_backport("event-notification", 1).replace(b'"valueString":"1"', '"valueString":"²"'.encode())
    assert parse_notification(superscript, FHIR_JSON).events_since_start is None
    odd_parts = orjson.dumps({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {
        "resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": SUB}},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [{"name": ["event-number"], "valueString": "5"},
                                                    {"name": "event-number", "valueString": "3"},
                                                    {"name": "timestamp", "valueInteger": 20260201}]}]}}]})
    note = parse_notification(odd_parts, FHIR_JSON)
    assert [(e.number, e.timestamp) for e in note.events] == [(3, None)]
    receiver = _receiver()
    receiver.handle_notification(r5("handshake", 0), FHIR_JSON)
    mixed = orjson.loads(r5("event-notification", 2, [(1, "2026-02-01T10:00:00Z", None),
                                                      (2, "2026-02-01T10:01:00Z", None)],
                          [_ra("ra-1", "2026-02-01T10:00:00Z")]))
    mixed["entry"][0]["resource"]["notificationEvent"][1]["timestamp"] = 1
    receiver.handle_notification(orjson.dumps(mixed), FHIR_JSON)
    assert orjson.loads(receiver.checkpoint().cursor) == {}  # nothing delivered yet
    receiver.poll(10, 0.0)
    assert orjson.loads(receiver.checkpoint().cursor)[SUB] == {"last": 2, "timestamp": "2026-02-01T10:00:00Z"}


def test_resources_that_go_nowhere_are_logged_and_counted_by_reason(caplog):
    dropped: list[tuple[str, int]] = []
    receiver = SubscriptionSource(SubscriptionConfig(name="emr-hook"), on_dropped=lambda c, n: dropped.append((c, n)))
    ra = _ra("ra-1", "2026-02-01T10:00:00Z")
    with caplog.at_level("WARNING", logger="ingest.subscription"):
        receiver.handle_notification(r4_backport("heartbeat", 0, resources=[ra]), FHIR_JSON)
        event = r4_backport("event-notification", 1, [(1, "2026-02-01T10:00:00Z", None)], [ra])
        assert len(receiver.handle_notification(event, FHIR_JSON).messages) == 1
        assert receiver.handle_notification(event, FHIR_JSON).dropped == {"retried_notification": 1}
        junk = orjson.loads(r4_backport("event-notification", 2, [(2, "2026-02-01T10:01:00Z", None)]))
        junk["entry"] += [7, {"request": {"method": "PUT"}}]
        receiver.handle_notification(orjson.dumps(junk), FHIR_JSON)
    assert dropped == [("not_an_event", 1), ("retried_notification", 1), ("unreadable_entry", 2)]
    assert ("2 entries of a notification of type event-notification acknowledged but not forwarded "
            "(unreadable_entry") in caplog.text
    assert "p1" not in caplog.text and "ra-1" not in caplog.text  # counts and codes only


def _app(config: SubscriptionConfig, refused: list[str]) -> TestClient:
    app = FastAPI()
    app.include_router(subscription_router(SubscriptionSource(config), on_refused=refused.append))
    return TestClient(app)


def test_refusals_are_logged_with_their_code_not_the_senders_data(monkeypatch, caplog):
    monkeypatch.setenv("VIGIL_TEST_HOOK_SECRET", "Bearer hook-s3cret")
    refused: list[str] = []
    client = _app(SubscriptionConfig(name="emr-hook", secret_env="VIGIL_TEST_HOOK_SECRET"), refused)
    secret = {"Authorization": "Bearer hook-s3cret", "Content-Type": FHIR_JSON}
    hostile = orjson.dumps({"resourceType": "Bundle", "type": "MRN-0042-SMITH", "entry": []})
    with caplog.at_level("WARNING", logger="ingest.subscription"):
        answers = [client.post("/fhir/subscription", content=hostile, headers=secret),
                   client.post("/fhir/subscription", content=hostile, headers={**secret, "Authorization": "guess"}),
                   client.post("/fhir/subscription", content=_status_with(error={"a": 1}), headers=secret)]
    assert [a.status_code for a in answers] == [400, 401, 400]
    assert all(a.headers["content-type"] == FHIR_JSON for a in answers)
    assert "MRN-0042-SMITH" in answers[0].json()["issue"][0]["diagnostics"]  # the sender learns what was wrong
    assert refused == ["not_a_notification", "unauthorized", "malformed"]
    assert caplog.text.count("refused a notification") == 3 and "MRN-0042-SMITH" not in caplog.text
    assert "HTTP 401 (unauthorized: missing or wrong secret header)" in caplog.text


def test_a_webhook_without_a_secret_refuses_everything_unless_explicitly_opened_for_testing(caplog):
    config = SubscriptionConfig(name="emr-hook")
    assert check_authentication(config) is not None
    assert "source 'emr-hook'" in check_authentication(config) and "set secret_env" in check_authentication(config)
    refused: list[str] = []
    answer = _app(config, refused).post("/fhir/subscription", content=r5("handshake", 0),
                                        headers={"Content-Type": FHIR_JSON})
    assert answer.status_code == 401 and answer.json()["issue"][0]["code"] == "security"
    assert refused == ["no_secret_configured"] and "refuses every notification" in caplog.text
    opened = SubscriptionConfig(name="local-test", allow_unauthenticated=True)
    assert check_authentication(opened) is None
    assert _app(opened, refused).post("/fhir/subscription", content=r5("handshake", 0),
                                      headers={"Content-Type": FHIR_JSON}).status_code == 200


def test_the_openapi_document_declares_the_body_and_every_answer():
    app = FastAPI()
    open_for_test = SubscriptionConfig(name="t", allow_unauthenticated=True)
    app.include_router(subscription_router(SubscriptionSource(open_for_test)))
    post = app.openapi()["paths"]["/fhir/subscription"]["post"]
    assert set(post["responses"]) == {"200", "400", "401"}
    for status in ("400", "401"):
        schema = post["responses"][status]["content"][FHIR_JSON]["schema"]
        assert schema["properties"]["resourceType"]["enum"] == ["OperationOutcome"]
    assert post["requestBody"]["required"] and FHIR_JSON in post["requestBody"]["content"]
    from vigil.observability import metrics_router

    app.include_router(metrics_router())
    assert set(app.openapi()["paths"]["/metrics"]["get"]["responses"]) >= {"200", "401", "403"}
