"""ingest.decode and ingest.load: FHIR → domain records, de-identification policies, dead letters, strict mode."""

from __future__ import annotations

import copy
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from ingest import Decoder, SubjectKeyer, load, parse_datetime, reason_category
from ingest.deid import oldest_safe_birth_year
from vigil.domain import (
    Coding,
    DeadLetter,
    DeviceInfo,
    EncounterInfo,
    Fact,
    Position,
    Prediction,
    SiteInfo,
    SubjectInfo,
)

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"  # ../shared beside the repo
HERE = Position("test.ndjson", 7)
KEYER = SubjectKeyer("test-secret")


def _key(patient_id: str) -> str:
    return KEYER.key(f"Patient/{patient_id}")


def risk_assessment(**changes) -> dict:
    resource = {
        "resourceType": "RiskAssessment",
        "id": "ra-17",
        "meta": {"versionId": "2", "lastUpdated": "2024-03-06T08:00:00Z"},
        "status": "final",
        "subject": {"reference": "Patient/p1", "display": "Jane Roe"},
        "encounter": {"reference": "Encounter/e9"},
        "occurrenceDateTime": "2024-03-05T21:30:00-05:00",
        "method": {
            "coding": [
                {"system": "http://example.org/other", "code": "nope"},
                {"system": "https://vigil.dev/fhir/CodeSystem/model", "code": "cta-stenosis"},
            ]
        },
        "performer": {"reference": "Device/cta-stenosis-2.1.0"},
        "basis": [{"reference": "Observation/o1"}, {"reference": "Device/scanner-ge-7"}, {"reference": "Device/x"}],
        "prediction": [{"probabilityDecimal": 0.83}],
    }
    resource.update(changes)
    return resource


@pytest.fixture(scope="module")
def synthea_patients() -> list[dict]:
    with (SYNTHEA / "Patient.000.ndjson").open("rb") as lines:
        return [orjson.loads(line) for line in lines]


@pytest.fixture(scope="module")
def stripped_load():
    return load([SYNTHEA], Decoder(KEYER, "strip"))


# --- events --------------------------------------------------------------------------------


def test_risk_assessment_decodes_to_a_prediction():
    prediction = Decoder(KEYER).decode(risk_assessment(), HERE)
    assert prediction == Prediction(
        resource_id="ra-17",
        version_id="2",
        status="final",
        model_id="cta-stenosis",
        model_version="",
        subject=_key("p1"),
        encounter=KEYER.key("Encounter/e9"),  # visit numbers are keyed like subjects
        time=datetime(2024, 3, 6, 2, 30, tzinfo=UTC),
        score=0.83,
        model_device="cta-stenosis-2.1.0",
        scanner_device="scanner-ge-7",
        received=datetime(2024, 3, 6, 8, 0, tzinfo=UTC),
    )


def test_prediction_defaults_version_and_reads_partial_or_naive_times():
    resource = risk_assessment(occurrenceDateTime="2024-03", meta={}, basis=[], encounter=None)
    prediction = Decoder(KEYER).decode(resource, HERE)
    assert prediction.time == datetime(2024, 3, 1, tzinfo=UTC)
    assert (prediction.version_id, prediction.received) == ("1", None)
    assert (prediction.scanner_device, prediction.encounter) == (None, None)
    naive = Decoder(KEYER).decode(risk_assessment(occurrenceDateTime="2024-03-05T10:00:00"), HERE)
    assert naive.time == datetime(2024, 3, 5, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"prediction": []}, "RiskAssessment/ra-17: missing prediction[0].probabilityDecimal"),
        (
            {"prediction": [{"probabilityDecimal": 1.7}]},
            "RiskAssessment/ra-17: invalid prediction[0].probabilityDecimal 1.7 (must be a number from 0 to 1)",
        ),
        ({"status": None}, "RiskAssessment/ra-17: missing status"),
        ({"performer": None}, "RiskAssessment/ra-17: missing performer"),
        (
            {"performer": {"reference": "Practitioner/dr-1"}},
            "RiskAssessment/ra-17: invalid performer (must reference Device/<id> of the AI model)",
        ),
        ({"subject": {"reference": "Group/g1"}}, "RiskAssessment/ra-17: invalid subject (must reference Patient/<id>)"),
        (
            {"method": {"text": "a model"}},
            "RiskAssessment/ra-17: missing method.coding with system https://vigil.dev/fhir/CodeSystem/model"
            " (the model id)",
        ),
        (
            {"occurrenceDateTime": "yesterday"},
            "RiskAssessment/ra-17: invalid occurrenceDateTime (not a FHIR dateTime)",
        ),
        ({"id": None}, "RiskAssessment (no id): missing id"),
    ],
)
def test_broken_risk_assessment_is_dead_lettered_with_the_element(changes, reason):
    dead = Decoder(KEYER).decode(risk_assessment(**changes), HERE)
    assert isinstance(dead, DeadLetter)
    assert (dead.reason, dead.position, dead.resource_type) == (reason, HERE, "RiskAssessment")
    payload = orjson.loads(dead.payload)
    assert "Jane Roe" not in dead.payload and "Patient/p1" not in dead.payload
    if "subject" not in changes:
        assert payload["subject"] == {"reference": f"Patient/{KEYER.marked('Patient/p1')}"}
        # decoding the stored payload again keys the subject once (what `vigil deadletters replay` relies on)
        assert Decoder(KEYER)._subject(payload) == _key("p1")


def test_wrong_json_types_are_dead_lettered_not_raised():
    dead = Decoder(KEYER).decode(risk_assessment(method={"coding": "cta-stenosis"}), HERE)
    assert dead.reason.startswith("RiskAssessment/ra-17: invalid structure (AttributeError")
    assert reason_category(dead.reason) == "invalid value"


def test_condition_status_code_and_time():
    condition = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "encounter": {"reference": "Encounter/e9"},
        "code": {"coding": [{"system": "urn:site-a:dx", "code": "STEN"}, {"display": "no system"}]},
        "recordedDate": "2024-03-20",
        "clinicalStatus": {"coding": [{"code": "resolved"}]},
    }
    fact = Decoder(KEYER).decode(condition, HERE)
    assert fact == Fact(
        resource_type="Condition",
        resource_id="c1",
        version_id="1",
        status="resolved",
        subject=_key("p1"),
        encounter=KEYER.key("Encounter/e9"),  # visit numbers are keyed like subjects
        codings=(Coding("urn:site-a:dx", "STEN"),),
        time=datetime(2024, 3, 20, tzinfo=UTC),
    )
    retracted = {**condition, "verificationStatus": {"coding": [{"code": "entered-in-error"}]}}
    assert Decoder(KEYER).decode(retracted, HERE).status == "entered-in-error"
    del condition["clinicalStatus"]
    assert Decoder(KEYER).decode(condition, HERE).status == "active"
    del condition["recordedDate"]
    assert Decoder(KEYER).decode(condition, HERE).reason == "Condition/c1: missing onsetDateTime or recordedDate"


def test_observation_value_and_unit():
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "meta": {"versionId": "3", "lastUpdated": "2024-03-07T00:00:00+01:00"},
        "status": "amended",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Creatinine"}]},
        "effectiveDateTime": "2024-03-06T12:00:00Z",
        "valueQuantity": {"value": 1.9, "unit": "milligram per deciliter", "code": "mg/dL"},
    }
    fact = Decoder(KEYER).decode(observation, HERE)
    assert (fact.value, fact.unit, fact.status, fact.version_id) == (1.9, "mg/dL", "amended", "3")
    assert fact.received == datetime(2024, 3, 6, 23, tzinfo=UTC)
    observation["valueQuantity"] = {"value": 168, "unit": "umol/L"}
    fact = Decoder(KEYER).decode(observation, HERE)
    assert (fact.unit, fact.value) == ("umol/L", 168.0)
    observation["code"] = {"text": "creatinine"}
    assert reason_category(Decoder(KEYER).decode(observation, HERE).reason) == "missing element"


def test_procedure_time_from_period_start():
    procedure = {
        "resourceType": "Procedure",
        "id": "pr1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "36969009"}]},
        "performedPeriod": {"start": "2024-03-08T09:00:00+02:00", "end": "2024-03-08T10:00:00+02:00"},
    }
    fact = Decoder(KEYER).decode(procedure, HERE)
    assert (fact.time, fact.status) == (datetime(2024, 3, 8, 7, tzinfo=UTC), "completed")


# --- reference data --------------------------------------------------------------------


def test_devices_by_kind():
    decoder = Decoder(KEYER)
    kind = "https://vigil.dev/fhir/CodeSystem/device-kind"
    model = decoder.decode(
        {
            "resourceType": "Device",
            "id": "cta-stenosis-2.1.0",
            "type": {"coding": [{"system": kind, "code": "ai-model"}]},
            "deviceName": [{"name": "cta-stenosis", "type": "model-name"}],
            "version": [{"value": "2.1.0"}],
            "manufacturer": "Vigil Labs",
            "owner": {"reference": "Organization/site-a"},
        },
        HERE,
    )
    assert model == DeviceInfo("cta-stenosis-2.1.0", "model", "Vigil Labs", "cta-stenosis", "2.1.0", "site-a")
    scanner = decoder.decode(
        {
            "resourceType": "Device",
            "id": "ct-7",
            "type": {"coding": [{"system": kind, "code": "acquisition-device"}]},
            "deviceName": [{"name": "Revolution"}],
            "modelNumber": "REV-CT",
            "manufacturer": "GE",
        },
        HERE,
    )
    assert scanner == DeviceInfo("ct-7", "scanner", "GE", "REV-CT", None, None)


def test_synthea_reference_data(stripped_load):
    encounters = {r.encounter: r for _, r in stripped_load.records if isinstance(r, EncounterInfo)}
    sites = {r.site: r for _, r in stripped_load.records if isinstance(r, SiteInfo)}
    encounter = encounters[KEYER.key("Encounter/00c7f717-4030-5582-2ed8-888ad2bc878e")]
    assert encounter == EncounterInfo(
        encounter=KEYER.key("Encounter/00c7f717-4030-5582-2ed8-888ad2bc878e"),
        subject=_key("79a66c97-6131-3213-f3c9-4606946ab056"),
        site="a261e1fc-9361-3633-a2c4-8569a04b818d",  # conditional reference Organization?identifier=...|<id>
        start=datetime(1989, 10, 4, 6, 25, 16, tzinfo=UTC),
    )
    assert sites["048630ac-ba97-3386-9ac5-d8bf6392db50"].name == "HILLTOP MANOR NURSING CENTER"
    devices = [r for _, r in stripped_load.records if isinstance(r, DeviceInfo)]
    assert len(devices) == 16 and {d.kind for d in devices} == {"other"}  # implants, not AI models or scanners


# --- the Synthea bulk export end to end ---------------------------------------------------


def test_every_synthea_line_is_accepted_ignored_or_rejected(stripped_load):
    by_type = stripped_load.accepted + stripped_load.ignored
    by_type.update(d.resource_type for d in stripped_load.dead_letters if d.resource_type)
    for path in SYNTHEA.glob("*.000.ndjson"):
        assert by_type[path.name.split(".")[0]] == sum(1 for _ in path.open()), path.name
    assert stripped_load.accepted == Counter(
        Procedure=2056, Encounter=1215, Condition=555, Organization=43, Device=16, Patient=13
    )
    assert stripped_load.ignored["MedicationRequest"] == 1745
    assert stripped_load.rejected == Counter({"not a FHIR resource": 4})  # log.ndjson
    assert {Path(d.position.source).name for d in stripped_load.dead_letters} == {"log.ndjson"}


def test_strip_copies_nothing_identifying(stripped_load, synthea_patients):
    secrets = set()
    for patient in synthea_patients:
        secrets.add(patient["birthDate"])
        secrets |= {i["value"] for i in patient.get("identifier", ())}  # includes the Patient id itself
        secrets |= {t["value"] for t in patient.get("telecom", ())}
        for name in patient.get("name", ()):
            secrets |= {name["family"], *name.get("given", ())}
        for address in patient.get("address", ()):
            secrets |= {*address.get("line", ()), address["city"], address.get("postalCode", "")} - {""}
    assert len(secrets) > 100
    text = "\n".join(map(repr, [r for _, r in stripped_load.records] + stripped_load.dead_letters))
    # whole tokens: a ZIP code such as 67501 also occurs by chance inside uuids and SNOMED codes
    pattern = re.compile(r"(?<![\w-])(?:%s)(?![\w-])" % "|".join(map(re.escape, secrets)))
    assert pattern.findall(text) == []
    assert stripped_load.stripped["name"] == 13 and stripped_load.stripped["birthDate (full date)"] == 13
    subjects = {r.subject: r for _, r in stripped_load.records if isinstance(r, SubjectInfo)}
    assert subjects[_key("3af3708d-41f1-cd80-f3dd-ec5ac76072bf")] == SubjectInfo(
        _key("3af3708d-41f1-cd80-f3dd-ec5ac76072bf"), 1960, "male", "2106-3", "2186-5"
    )
    # born 1927: an age over 89 is aggregated into the "90 or older" birth year
    assert subjects[_key("129c6ac7-8d06-89de-ad63-0204a93e76c3")].birth_year == oldest_safe_birth_year()
    assert stripped_load.stripped["age over 89"] == 3


def test_quarantine_dead_letters_every_identified_patient(synthea_patients):
    result = load([SYNTHEA / "Patient.000.ndjson", SYNTHEA / "Condition.000.ndjson"], Decoder(KEYER, "quarantine"))
    assert result.rejected == Counter({"identifiers present": len(synthea_patients)}) and len(synthea_patients) == 13
    assert result.accepted == Counter(Condition=555)
    assert {d.resource_id for d in result.dead_letters} == {_key(p["id"]) for p in synthea_patients}
    first = result.dead_letters[0]
    assert first.reason.startswith("identifiers present: name, telecom, address, identifier, birthDate (full date)")
    assert (first.payload, first.resource_type, first.position.line) == (None, "Patient", 1)
    assert not result.stripped


def test_a_clean_patient_passes_quarantine():
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970"}
    assert Decoder(KEYER, "quarantine").decode(patient, HERE) == SubjectInfo(_key("p1"), 1970, "female", None, None)


def test_quarantine_also_catches_a_contained_patient():
    resource = risk_assessment(contained=[{"resourceType": "Patient", "id": "c", "telecom": [{"value": "555-0100"}]}])
    dead = Decoder(KEYER, "quarantine").decode(resource, HERE)
    assert dead.reason == "identifiers present: contained.telecom"
    stripping = Decoder(KEYER, "strip")
    assert isinstance(stripping.decode(resource, HERE), Prediction)
    assert stripping.stripped == Counter({"contained.telecom": 1})


def test_bad_lines_are_dead_lettered_and_good_lines_still_decode(tmp_path):
    feed = tmp_path / "RiskAssessment.000.ndjson"
    good = orjson.dumps(risk_assessment()).decode()
    feed.write_text(f'{good}\n{{"resourceType": "RiskAss\n{{"eventId": "kickoff"}}\n{good.replace("ra-17", "ra-18")}\n')
    result = load(feed, Decoder(KEYER))
    assert [(p.line, r.resource_id) for p, r in result.records] == [(1, "ra-17"), (4, "ra-18")]
    assert [(str(d.position), reason_category(d.reason)) for d in result.dead_letters] == [
        (f"{feed}:2", "invalid JSON"),
        (f"{feed}:3", "not a FHIR resource"),
    ]


def test_bundle_with_urn_uuid_references_decodes_linked(tmp_path):
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:aa", "resource": {"resourceType": "Patient", "id": "p1", "birthDate": "1970"}},
            {"fullUrl": "urn:uuid:bb", "resource": risk_assessment(subject={"reference": "urn:uuid:aa"})},
        ],
    }
    path = tmp_path / "bundle.json"
    path.write_bytes(orjson.dumps(bundle))
    result = load([path], Decoder(KEYER))
    (_, subject), (position, prediction) = result.records
    assert prediction.subject == subject.subject == _key("p1")
    assert position == Position(str(path), 2)


# --- strict mode -----------------------------------------------------------------------------


def test_strict_rejects_what_the_fast_path_accepts():
    resource = risk_assessment(occurrenceDateTime="2024-03-05T10:00:00")  # a time without a zone: not FHIR
    assert isinstance(Decoder(KEYER).decode(copy.deepcopy(resource), HERE), Prediction)
    dead = Decoder(KEYER, strict=True).decode(resource, HERE)
    assert dead.reason.startswith("RiskAssessment/ra-17: fails FHIR R4B validation at occurrenceDateTime: ")
    assert reason_category(dead.reason) == "FHIR validation"
    extra = risk_assessment(prediction=[{"probabilityDecimal": 0.5, "x": 1}])
    nested = Decoder(KEYER, strict=True).decode(extra, HERE)
    assert nested.reason == (
        "RiskAssessment/ra-17: fails FHIR R4B validation at prediction[0].x: Extra inputs are not permitted"
    )


def test_strict_accepts_valid_resources_and_validates_unused_types():
    strict = Decoder(KEYER, strict=True)
    assert isinstance(strict.decode(risk_assessment(), HERE), Prediction)
    assert strict.decode({"resourceType": "Location", "id": "l1", "status": "active"}, HERE) is None
    invalid = strict.decode({"resourceType": "Location", "id": "l1", "mode": 3}, HERE)
    assert invalid.reason == "Location/l1: fails FHIR R4B validation at mode: Input should be a valid string"
    assert Decoder(KEYER).decode({"resourceType": "Foo", "id": "f"}, HERE) is None
    assert strict.decode({"resourceType": "Foo", "id": "f"}, HERE).reason == (
        "Foo/f: invalid resourceType 'Foo' (not a FHIR R4B resource)"
    )


# --- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024", datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-02", datetime(2024, 2, 1, tzinfo=UTC)),
        ("2024-02-29", datetime(2024, 2, 29, tzinfo=UTC)),
        ("2024-02-29T23:30:00.250+01:00", datetime(2024, 2, 29, 22, 30, 0, 250000, tzinfo=UTC)),
        ("2024-02-29T23:30:00Z", datetime(2024, 2, 29, 23, 30, tzinfo=UTC)),
    ],
)
def test_parse_datetime(text, expected):
    assert parse_datetime(text) == expected
    assert parse_datetime(text).tzinfo is UTC


def test_reason_categories():
    assert [
        reason_category(r)
        for r in (
            "invalid JSON: unexpected character at column 3",
            "not a FHIR resource (no resourceType)",
            "identifiers present: name, telecom",
            "file not found: /x/y.ndjson (check the path; other inputs were read)",
            "Patient/ab12: invalid birthDate (must be YYYY, YYYY-MM or YYYY-MM-DD)",
            "RiskAssessment (no id): missing id",
        )
    ] == [
        "invalid JSON",
        "not a FHIR resource",
        "identifiers present",
        "file not found",
        "invalid value",
        "missing element",
    ]


def test_a_prediction_of_a_model_not_configured_is_dead_lettered_with_its_payload_when_models_are_given():
    """With ``models`` the decoder rejects another model's prediction itself, keeping the redacted payload that
    `vigil deadletters replay` needs once the model is configured; without it the pipeline decides (no payload)."""
    letter = Decoder(KEYER, models=["aki-risk"]).decode(risk_assessment(), HERE)
    assert letter.reason == ("RiskAssessment/ra-17: unknown model 'cta-stenosis' (configure it under models: to "
                             "monitor it)")
    assert reason_category(letter.reason) == "unknown model"
    assert "Patient/p1" not in letter.payload and "Jane Roe" not in letter.payload
    replayed = Decoder(KEYER, models=["aki-risk", "cta-stenosis"]).decode(orjson.loads(letter.payload), HERE)
    assert isinstance(replayed, Prediction) and replayed.subject == _key("p1") and replayed.score == 0.83
    assert isinstance(Decoder(KEYER).decode(risk_assessment(), HERE), Prediction)


@pytest.mark.parametrize("where", ["Encounter/VISIT-12345678", "Patient/MRN-445566"])
def test_a_fetch_failure_outcome_never_carries_a_person_id_into_the_dead_letter(where):
    """The id-only fetch-failure OperationOutcome is also what a feed could send: a visit or patient id in its
    expression is dropped from the reason and the resource id (the payload is redacted as always)."""
    from ingest.decode import FETCH_FAILURE_SYSTEM
    outcome = {"resourceType": "OperationOutcome", "id": "fetch-1", "issue": [{
        "severity": "error", "code": "not-found", "expression": [where],
        "details": {"coding": [{"system": FETCH_FAILURE_SYSTEM, "code": "http-404"}]}}]}
    outcome["issue"][0]["diagnostics"] = "see the note"
    outcome["note"] = [{"text": f"called about {secret_of(where)}"}]
    letter = Decoder(SubjectKeyer("k")).decode(outcome, Position("feed", 1))
    rtype, secret = where.split("/")
    assert secret_of(where) == secret
    assert letter.reason.startswith(f"{rtype}/(id not kept): not fetched")
    assert secret not in letter.reason and secret not in (letter.payload or "") and letter.resource_id is None


def secret_of(where: str) -> str:
    return where.split("/", 1)[1]


@pytest.mark.parametrize(
    ("score", "shown"),
    [
        ("987-00-0042", "(a JSON string; value not kept)"),
        (987000042, "(a JSON number outside -100 to 100; value not kept)"),
        ({"value": "Jane Roe"}, "(a JSON object; value not kept)"),
        (True, "(a JSON boolean; value not kept)"),
        (73, "73"),  # a percentage: harmless, and the clue the sender needs
    ],
)
def test_a_wrong_score_is_named_by_its_json_type_not_its_value(score, shown):
    """Issue #9: a non-numeric score was quoted (repr) in the dead-letter reason and kept in the redacted payload; a
    sender's column mix-up can put an SSN or MRN there."""
    letter = Decoder(KEYER).decode(risk_assessment(prediction=[{"probabilityDecimal": score}]), HERE)
    assert isinstance(letter, DeadLetter)
    assert letter.reason == (f"RiskAssessment/ra-17: invalid prediction[0].probabilityDecimal {shown} "
                             "(must be a number from 0 to 1)")
    kept = orjson.loads(letter.payload)["prediction"][0]["probabilityDecimal"]
    assert kept == (score if shown == "73" else "(not kept: not a number)")
    assert "987" not in letter.payload and "Jane" not in letter.payload
    replayed = Decoder(KEYER).decode(orjson.loads(letter.payload), HERE)  # the copy is rejected again, same category
    assert reason_category(replayed.reason) == reason_category(letter.reason) == "invalid value"
