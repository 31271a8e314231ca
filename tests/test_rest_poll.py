"""FHIR REST polling against a real HTTP server on loopback (tests/fhir_server.py): paging, retry, cursor, dedupe.

The sources get an injected ``sleep`` that records the delays instead of waiting them out; the HTTP traffic, the
server and the retry decisions are real.
"""

from __future__ import annotations


import orjson
import pytest

from ingest import Decoder, SubjectKeyer, load, load_messages
from ingest.rest_poll import (
    FhirHttpError,
    RestPollSource,
    RestPollSourceConfig,
    cursor_since,
    decode_cursor,
    retry_after_seconds,
)
from ingest.sources import Checkpoint
from fhir_server import FhirServer  # tests/ is on sys.path (no __init__.py)
from vigil.simulator import simulate

KEYER = SubjectKeyer("test-secret")


def _obs(rid: str, updated: str, version: str = "1") -> dict:
    return {"resourceType": "Observation", "id": rid, "meta": {"versionId": version, "lastUpdated": updated},
            "status": "final", "subject": {"reference": "Patient/p1"}, "effectiveDateTime": updated,
            "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
            "valueQuantity": {"value": 1.1, "unit": "mg/dL", "code": "mg/dL"}}


def _source(server: FhirServer, sleeps: list[float], **overrides) -> RestPollSource:
    config = RestPollSourceConfig(name="emr", base_url=server.base_url, **{
        "resource_types": ["Observation"], "page_size": 3, "backoff_s": 0.5, **overrides})
    return RestPollSource(config, sleep=sleeps.append, keyer=KEYER)


def _drain(source: RestPollSource, max_records: int = 100) -> list:
    out = []
    for _ in range(50):
        batch = source.poll(max_records, timeout_s=0.0)
        out.extend(batch)
        if source.exhausted:
            return out
    raise AssertionError("the source never became exhausted")


@pytest.mark.parametrize("relative_links", [False, True])
def test_pages_through_next_links_and_waits_out_a_429(relative_links, monkeypatch):
    monkeypatch.setenv("VIGIL_TEST_EMR_TOKEN", "Bearer s3cret")
    with FhirServer(relative_links=relative_links) as server:
        server.add(*[_obs(f"o{i}", f"2026-02-01T10:0{i}:00Z") for i in (5, 1, 3, 2, 4, 7, 6)])
        server.fail_next("_offset=3", 429, {"Retry-After": "2"})  # the second page is throttled once
        sleeps: list[float] = []
        source = _source(server, sleeps, auth_env="VIGIL_TEST_EMR_TOKEN")
        messages = _drain(source)

    assert [orjson.loads(m.payload)["id"] for m in messages] == [f"o{i}" for i in range(1, 8)]
    page_1 = f"{server.base_url}/Observation?_sort=_lastUpdated&_count=3"
    page_2 = f"{server.base_url}/Observation?_sort=_lastUpdated&_count=3&_offset=3"
    assert [(m.position.source, m.position.line) for m in messages[:4]] == [
        (page_1, 1), (page_1, 2), (page_1, 3), (page_2, 1)]  # positions name the page and the entry
    assert sleeps == [2.0]  # Retry-After honoured, not the 0.5 s backoff
    searches = server.requests_to("/fhir/Observation")
    # cycle 1: page 1, page 2 (429), page 2, page 3; cycle 2 (nothing new, so exhausted): one page
    assert len(searches) == 5
    assert searches[0].query == {"_sort": ["_lastUpdated"], "_count": ["3"]}
    assert [r.query.get("_offset") for r in searches[:4]] == [None, ["3"], ["3"], ["6"]]
    assert searches[4].query["_lastUpdated"] == ["ge2026-02-01T10:07:00Z"]
    assert {r.headers.get("Authorization") for r in searches} == {"Bearer s3cret"}
    assert decode_cursor(source.checkpoint().cursor)["Observation"].since == "2026-02-01T10:07:00Z"


def test_cursor_resumes_without_losing_or_repeating_the_boundary():
    """Two resources share the newest timestamp; a third with that same timestamp arrives after the poll (``gt``
    would lose it). A restarted source resumed from the checkpoint returns exactly the new resources."""
    with FhirServer() as server:
        server.add(_obs("a", "2026-02-01T10:00:00Z"), _obs("b", "2026-02-01T11:00:00Z"),
                   _obs("c", "2026-02-01T11:00:00Z"))
        sleeps: list[float] = []
        first = _source(server, sleeps)
        assert [orjson.loads(m.payload)["id"] for m in _drain(first)] == ["a", "b", "c"]
        stored = first.checkpoint()
        cursor = decode_cursor(stored.cursor)["Observation"]
        assert (cursor.since, cursor.at_since) == ("2026-02-01T11:00:00Z", {
            KEYER.key("Observation/b/_history/1"), KEYER.key("Observation/c/_history/1")})
        first.close()

        server.add(_obs("d", "2026-02-01T11:00:00Z"), _obs("a", "2026-02-01T12:00:00Z", version="2"))
        restarted = _source(server, sleeps)
        restarted.resume(stored)
        again = [(orjson.loads(m.payload)["id"], orjson.loads(m.payload)["meta"]["versionId"])
                 for m in _drain(restarted)]
        assert again == [("d", "1"), ("a", "2")]
        assert restarted.poll(10, 0.0) == []  # idle until poll_interval_s: nothing new, nothing repeated
        assert restarted.exhausted


def test_a_stopped_poll_checkpoints_only_what_was_handed_out():
    with FhirServer() as server:
        server.add(*[_obs(f"o{i}", f"2026-02-01T10:0{i}:00Z") for i in range(1, 6)])
        source = _source(server, [], page_size=5)
        batch = source.poll(2, timeout_s=0.0)  # a page of 5 fetched, 2 handed out
        assert [orjson.loads(m.payload)["id"] for m in batch] == ["o1", "o2"]
        stored = source.checkpoint()
        restarted = _source(server, [], page_size=5)
        restarted.resume(stored)
        assert [orjson.loads(m.payload)["id"] for m in _drain(restarted)] == ["o3", "o4", "o5"]


def test_simulated_feed_polled_over_http_decodes_like_the_files(tmp_path):
    simulate("stable", tmp_path, days=3, volume=0.05)
    types = ["Organization", "Device", "Patient", "Encounter", "RiskAssessment", "Condition", "Procedure",
             "Observation"]
    with FhirServer() as server:
        for rtype in types:
            server.add(*[orjson.loads(line) for line in (tmp_path / f"{rtype}.000.ndjson").read_bytes().splitlines()])
        source = _source(server, [], resource_types=types, page_size=50)
        messages = _drain(source)
    polled = load_messages(messages, Decoder(KEYER))
    direct = load(tmp_path, Decoder(KEYER))
    assert polled.accepted == direct.accepted
    assert polled.accepted["RiskAssessment"] == 42 and polled.accepted["Observation"] == 63
    assert not polled.dead_letters
    predictions = [sorted((r for _, r in result.records if hasattr(r, "score")), key=lambda p: p.resource_id)
                   for result in (polled, direct)]
    assert predictions[0] == predictions[1]


def test_a_catch_up_cursor_re_reads_from_the_given_instant():
    with FhirServer() as server:
        server.add(_obs("old", "2026-01-01T00:00:00Z"), _obs("new", "2026-02-01T00:00:00Z"))
        source = _source(server, [])
        source.resume(Checkpoint(cursor=cursor_since(["Observation"], "2026-01-15T00:00:00Z")))
        assert [orjson.loads(m.payload)["id"] for m in _drain(source)] == ["new"]
        assert server.requests_to("Observation")[0].query["_lastUpdated"] == ["ge2026-01-15T00:00:00Z"]


def test_server_unavailable_backs_off_exponentially_then_reports_the_url_and_keeps_the_stream():
    with FhirServer() as server:
        server.add(_obs("a", "2026-02-01T10:00:00Z"))
        server.fail_next("Observation", 503, times=3)
        sleeps: list[float] = []
        source = _source(server, sleeps, max_retries=2)
        assert source.poll(10, 0.0) == []
        assert sleeps == [0.5, 1.0]  # exponential backoff: 0.5 s, then 1 s
        assert "HTTP 503 after 3 attempt(s)" in str(source.last_error)
        assert f"{server.base_url}/Observation" in str(source.last_error)
        assert "retries on the next poll" in str(source.last_error)
        assert [orjson.loads(m.payload)["id"] for m in _drain(source)] == ["a"]  # the next poll succeeds


def test_refused_credentials_raise_with_what_to_do(monkeypatch):
    monkeypatch.setenv("VIGIL_TEST_EMR_TOKEN", "Bearer wrong")
    with FhirServer() as server:
        server.fail_next("Observation", 401)
        source = _source(server, [], auth_env="VIGIL_TEST_EMR_TOKEN")
        with pytest.raises(FhirHttpError) as caught:
            source.poll(10, 0.0)
    message = str(caught.value)
    assert message.startswith(f"GET {server.base_url}/Observation: HTTP 401 after 1 attempt(s)")
    assert "(OperationOutcome: error/transient)" in message
    assert "check the token in $VIGIL_TEST_EMR_TOKEN" in message
    assert "Bearer wrong" not in message


def test_unreachable_server_names_the_url():
    config = RestPollSourceConfig(name="emr", base_url="http://127.0.0.1:9", resource_types=["Observation"],
                                  max_retries=1, backoff_s=0.0, timeout_s=2)
    source = RestPollSource(config, sleep=lambda s: None)
    assert source.poll(1, 0.0) == []
    assert str(source.last_error).startswith("GET http://127.0.0.1:9/Observation: cannot reach the FHIR server")


def test_missing_token_env_is_a_config_error():
    with pytest.raises(ValueError, match="VIGIL_NOT_SET_ANYWHERE.*not set"):
        RestPollSource(RestPollSourceConfig(name="emr", base_url="https://emr.example.org/fhir",
                                            resource_types=["Observation"], auth_env="VIGIL_NOT_SET_ANYWHERE"))


def test_retry_after_forms():
    from datetime import UTC, datetime

    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds("Sun, 01 Mar 2026 12:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Sun, 01 Mar 2026 11:00:00 GMT", now) == 0.0
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


def test_the_stored_cursor_holds_keyed_hashes_not_resource_ids():
    """Issue #9 (scripts/reliability/identifiers.py): the seen-set at the cursor instant used to store raw Patient and
    Encounter ids in source_cursors. It now holds the subject keyer's HMAC of (type, id, version); another key gives
    other hashes, so the stored text confirms no guessed id without the secret."""
    patients = [{"resourceType": "Patient", "id": f"mrn-{n}", "meta": {"versionId": "3",
                                                                       "lastUpdated": "2026-02-01T11:00:00Z"}}
                for n in (4711, 4712)]
    with FhirServer() as server:
        server.add(*patients)
        source = _source(server, [], resource_types=["Patient"])
        assert len(_drain(source)) == 2
        text = source.checkpoint().cursor
    assert "mrn-" not in text and "4711" not in text
    stored = orjson.loads(text)["Patient"]
    assert stored == {"since": "2026-02-01T11:00:00Z",
                      "seen": sorted(KEYER.key(f"Patient/mrn-{n}/_history/3") for n in (4711, 4712))}
    other = RestPollSource(RestPollSourceConfig(name="emr", base_url="https://emr.example.org/fhir",
                                                resource_types=["Patient"]), keyer=SubjectKeyer("other-secret"))
    assert other.seen_keys("Patient", "mrn-4711", "3") not in stored["seen"]


def test_an_old_format_cursor_still_resumes_and_is_rewritten_without_ids(caplog):
    """A cursor stored before the fix (``at_since``: raw [id, versionId] pairs) resumes with the same semantics: the
    resources it names at the cursor instant are not re-read; the next checkpoint holds only keyed hashes."""
    old = orjson.dumps({"Observation": {"since": "2026-02-01T11:00:00Z", "at_since": [["b", "1"], ["c", "1"]]}})
    with FhirServer() as server:
        server.add(_obs("a", "2026-02-01T10:00:00Z"), _obs("b", "2026-02-01T11:00:00Z"),
                   _obs("c", "2026-02-01T11:00:00Z"), _obs("d", "2026-02-01T11:00:00Z"))
        source = _source(server, [])
        with caplog.at_level("WARNING", logger="ingest.rest_poll"):
            source.resume(Checkpoint(cursor=old.decode()))
        assert [orjson.loads(m.payload)["id"] for m in _drain(source)] == ["d"]
        rewritten = source.checkpoint().cursor
    assert "old format" in caplog.text and '"b"' not in caplog.text
    assert orjson.loads(rewritten) == {"Observation": {"since": "2026-02-01T11:00:00Z", "seen": sorted(
        KEYER.key(f"Observation/{rid}/_history/1") for rid in "bcd")}}


def test_an_unreadable_cursor_error_does_not_quote_the_stored_text():
    with pytest.raises(ValueError, match="delete the source's row in source_cursors") as raised:
        decode_cursor('{"Patient": {"since": "2026-01-01T00:00:00Z", "at_since": [["mrn-4711"]]}}')
    assert "mrn-4711" not in str(raised.value)
