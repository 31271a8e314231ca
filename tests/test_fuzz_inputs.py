"""Hostile input (issue #9): property-based fuzzing of the decoders, the pipeline and the subscription webhook.

The strategies and checks live in scripts/reliability/fuzz.py, which runs the same properties at campaign size
(thousands of inputs per target) for RELIABILITY.md; here they run derandomized (same inputs every run, so CI is
reproducible), scaled by ``VIGIL_SLOW_SCALE``. Everything is real: the decoder and pipeline in-process, the webhook
as `vigil serve` mounts it (FastAPI over ASGI) forwarding to librdkafka's mock cluster (a real Kafka-protocol server
on loopback, tests/kafka_mock.py). Each crash the fuzzer found is kept below as an explicit reproducer.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from kafka_mock import MockCluster

from ingest import Decoder, Message, SubjectKeyer, load_messages
from vigil.domain import Position

_SPEC = importlib.util.spec_from_file_location(
    "vigil_fuzz", Path(__file__).resolve().parents[1] / "scripts" / "reliability" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_SPEC)
sys.modules["vigil_fuzz"] = fuzz
_SPEC.loader.exec_module(fuzz)

SCALE = float(os.environ.get("VIGIL_SLOW_SCALE", "1.0"))


def _examples(n: int) -> settings:
    """``n`` examples at full scale; derandomized and without the example database, so every run tries the same."""
    return settings(max_examples=max(10, int(n * SCALE)), derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- 1. the decoder ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@_examples(1000)
@given(fuzz.payloads)
def test_every_hostile_message_is_accepted_ignored_or_dead_lettered_with_a_reason(payload: bytes):
    """Fast path (strip, models configured) and strict path (fhir.resources, quarantine) alike: never raises, and
    accepted + ignored + dead letters = resources read (check_decode asserts it, and that every reason is set)."""
    for decoder in fuzz.new_decoders():
        fuzz.check_decode(payload, decoder)


def _ra() -> dict:
    return orjson.loads(next(line for line in fuzz.simulator_lines() if b'"RiskAssessment"' in line))


def _patient(**changes) -> dict:
    patient = orjson.loads(next(line for line in fuzz.simulator_lines() if b'"Patient"' in line))
    return {**patient, **changes}


# crashes the fuzzer found in ingest/ (fixed there); name → (payload, decoder policy, text the reason must hold)
DECODER_CRASHES = {
    "rejected resource nested deeper than orjson writes (TypeError: Recursion limit reached)": (
        f'{{"resourceType":"Condition","id":"c1","code":{_nested(300)}}}'.encode(), "strip",
        "Condition/c1: missing onsetDateTime or recordedDate; payload not kept: nested too deeply to store"),
    "rejected resource nested deeper than Python recurses (RecursionError in deid.redact)": (
        f'{{"resourceType":"Condition","x":{_nested(1000)}}}'.encode(), "strip", "payload not kept"),
    "Bundle nested deeper than Python recurses (RecursionError in reader._rewrite_references)": (
        orjson.dumps({"resourceType": "Bundle", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"}}, {"resource": {
                "resourceType": "Basic", "x": "SLOT"}}]}).replace(b'"SLOT"', _nested(1000).encode()), "strip",
        "invalid Bundle: nested deeper"),
    "Bundle.entry not a list (TypeError: 'int' object is not iterable)": (
        b'{"resourceType":"Bundle","type":"collection","entry":5}', "strip", "invalid Bundle.entry"),
    "birth year of superscript digits (ValueError in int(), fast path)": (
        orjson.dumps(_patient(birthDate="²²²²")), "strip", "invalid birthDate"),
    "birth date of superscript digits (ValueError in deid.find_identifiers, quarantine)": (
        orjson.dumps(_patient(birthDate="²⁰²⁶-01-01")), "quarantine",
        "identifiers present: birthDate (full date)"),
    "OperationOutcome.issue not a list (TypeError)": (
        b'{"resourceType":"OperationOutcome","issue":5}', "strip", "server error (no issues"),
    "OperationOutcome issue.details.coding not a list (TypeError)": (
        b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","details":'
        b'{"coding":5}}]}', "strip", "server error (error/processing"),
    "OperationOutcome severity nested 300 deep (TypeError: Recursion limit reached)": (
        f'{{"resourceType":"OperationOutcome","issue":[{{"severity":{_nested(300)},"code":"x"}}]}}'.encode(),
        "strip", "server error (None/x"),
}


@pytest.mark.parametrize("name", DECODER_CRASHES)
def test_decoder_crashers_found_by_the_fuzzer_are_dead_letters_with_reasons(name: str):
    payload, policy, reason = DECODER_CRASHES[name]
    decoder = Decoder(SubjectKeyer("fuzz-secret"), policy=policy, models=["cta-stenosis", "aki-risk"])
    outcome = fuzz.check_decode(payload, decoder)
    assert outcome.items == 1 and len(outcome.reasons) == 1, outcome
    assert reason in outcome.reasons[0]


def test_the_ignored_types_are_exactly_those_vigil_does_not_decode():
    """What "ignored" means, on real Synthea FHIR: Immunization, MedicationRequest, Practitioner... are counted as
    ignored, never dead-lettered; the eight decoded types never are."""
    lines = fuzz.synthea_lines()
    assert lines, f"no Synthea export under {fuzz.SYNTHEA}"
    result = load_messages([Message(Position("synthea", i, 0), line) for i, line in enumerate(lines)],
                           fuzz.new_decoders()[0])
    assert {"Immunization", "MedicationRequest", "Practitioner", "AllergyIntolerance"} <= set(result.ignored)
    assert not set(result.ignored) & fuzz.HANDLED_TYPES
    assert sum(result.accepted.values()) + sum(result.ignored.values()) + len(result.dead_letters) == len(lines)


# --- 2. the pipeline -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@_examples(100)
@given(fuzz.hostile_batches)
def test_hostile_messages_in_a_valid_feed_lose_no_case(hostile: list[tuple[int, bytes]]):
    """Pipeline.ingest never raises, and when the hostile messages are all rejected or ignored, the 37 cases of the
    valid simulated feed come out exactly as without them."""
    fuzz.check_pipeline(hostile)


def test_garbage_between_valid_messages_changes_no_case():
    garbage = [(0, b""), (7, b"\xff\xfe"), (50, b'{"resourceType":"Bundle","entry":5}'),
               (120, orjson.dumps({**_ra(), "prediction": [{"probabilityDecimal": 7}]})), (283, b"[1,2")]
    out = fuzz.check_pipeline(garbage)
    assert out["clean"] and len(out["dead_letters"]) == 5
    assert len(fuzz.baseline_cases()) == 37


def _lab() -> dict:
    return orjson.loads(next(line for line in fuzz.simulator_lines() if b'"valueQuantity"' in line))


# accepted-but-hostile resources that crashed a later step (fixed in ingest/decode.py: string elements must be
# strings); name → (message, text of its dead letter)
PIPELINE_CRASHES = {
    "lab unit an object (TypeError: unhashable type: 'dict' in ontology/units.py)": (
        {**_lab(), "valueQuantity": {"value": 0.95, "unit": "mg/dL", "code": {"reference": "x"}}},
        "invalid valueQuantity.code or unit (must be a string, got dict)"),
    "Patient gender a list (AttributeError: no attribute lower, in ontology/subgroups.py)": (
        _patient(gender=[["male"]]), "invalid gender (must be a string, got list)"),
    "race category code a number": (
        _patient(extension=[{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                             "extension": [{"url": "ombCategory", "valueCoding": {"code": 2106}}]}]),
        "ombCategory code (must be a string, got int)"),
    "RiskAssessment status an object": ({**_ra(), "status": {"code": "final"}}, "invalid status (must be a code)"),
}


@pytest.mark.parametrize("name", PIPELINE_CRASHES)
def test_pipeline_crashers_found_by_the_fuzzer_are_dead_letters_and_lose_no_case(name: str):
    resource, reason = PIPELINE_CRASHES[name]
    out = fuzz.check_pipeline([(2, orjson.dumps(resource)), (200, orjson.dumps(resource))])
    assert out["clean"] and len(out["dead_letters"]) == 2
    assert all(reason in r for r in out["dead_letters"]), out["dead_letters"]


def test_a_prediction_whose_version_id_is_made_of_superscript_digits_does_not_stop_the_pipeline():
    """Found by the fuzzer: ``meta.versionId`` "²" passes ``str.isdigit`` but not ``int``; the pipeline's version
    order (vigil/pipeline.py ``_version_order``) raised ValueError and the whole batch failed. The decoder now
    rejects a versionId that is not a FHIR id (ASCII)."""
    ra = _ra()
    ra["meta"]["versionId"] = "²"
    out = fuzz.check_pipeline([(5, orjson.dumps(ra))])
    assert out["clean"] and ["invalid meta.versionId" in r for r in out["dead_letters"]] == [True]


# --- 3. the subscription webhook -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook() -> Iterator[fuzz.WebhookHarness]:
    cluster = MockCluster()
    harness = fuzz.WebhookHarness(cluster.bootstrap)
    try:
        yield harness
    finally:
        harness.close()
        cluster.close()


@pytest.mark.slow
@_examples(300)
@given(request=fuzz.webhook_requests)
def test_hostile_notifications_get_a_4xx_with_a_reason_never_a_5xx(webhook: fuzz.WebhookHarness, request):
    """Hostile bodies, Bundles, content types and secrets: every refusal is a 4xx OperationOutcome with a reason;
    every resource forwarded to Kafka decodes to a record, an ignored type or a dead letter with a reason."""
    fuzz.check_webhook(webhook, *request)


def _notification(status: dict, *focus: dict, r5: bool = True) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "subscription-notification" if r5 else "history",
                         "entry": [{"fullUrl": "urn:uuid:1", "resource": status},
                                   *({"fullUrl": f"urn:uuid:f{i}", "resource": r} for i, r in enumerate(focus))]})


def _status(**changes) -> dict:
    return {"resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
            "eventsSinceSubscriptionStart": 1, "subscription": {"reference": fuzz.SUBSCRIPTION},
            "notificationEvent": [{"eventNumber": 1, "timestamp": "2026-02-01T10:00:00Z"}], **changes}


def _parameters(*parameters: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": fuzz.SUBSCRIPTION}},
        {"name": "type", "valueCode": "event-notification"}, *parameters]}


# crashes the fuzzer found in ingest/subscription.py (answered 500, so the FHIR server retries the same notification
# for ever); name → body
WEBHOOK_CRASHES = {
    "eventsSinceSubscriptionStart '²' (ValueError in _int: isdigit passes, int refuses)": _notification(
        _status(eventsSinceSubscriptionStart="²", notificationEvent=[])),
    "R4 events-since-subscription-start valueString '²' (ValueError in _int)": _notification(
        _parameters({"name": "events-since-subscription-start", "valueString": "²"}), r5=False),
    "notification-event part name an object (TypeError: unhashable type: 'dict')": _notification(
        _parameters({"name": "notification-event", "part": [{"name": {"x": 1}, "valueString": "1"}]}), r5=False),
    "event timestamps of mixed JSON types (TypeError in max())": _notification(_status(notificationEvent=[
        {"eventNumber": 1, "timestamp": "2026-02-01T10:00:00Z"}, {"eventNumber": 2, "timestamp": {"x": 1}}]),
        {"resourceType": "Observation", "id": "o1"}),
    "focus resource nested 300 deep (orjson.dumps TypeError: Recursion limit reached)": _notification(
        _status(), {"resourceType": "Observation", "id": "o1", "code": [[[]]]}).replace(b"[[[]]]",
                                                                                       _nested(300).encode()),
    "Bundle.entry not a list (TypeError)": b'{"resourceType":"Bundle","type":"history","entry":5}',
    "notificationEvent not a list (TypeError)": _notification(_status(notificationEvent=5)),
    "SubscriptionStatus.error not a list (TypeError)": _notification(_status(error=5)),
    "Parameters.parameter not a list (TypeError)": _notification({"resourceType": "Parameters", "parameter": 5},
                                                                 r5=False),
    "notification-event part not a list (TypeError)": _notification(
        _parameters({"name": "notification-event", "part": 5}), r5=False),
}


@pytest.mark.parametrize("name", WEBHOOK_CRASHES)
def test_webhook_crashers_found_by_the_fuzzer_are_refused_or_accepted_never_500(
        webhook: fuzz.WebhookHarness, name: str):
    fuzz.check_webhook(webhook, WEBHOOK_CRASHES[name], "application/fhir+json", fuzz.SECRET)
