"""ingest.deid: keyed subjects, detection of direct identifiers, redacted copies (real Synthea Patients)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import orjson
import pytest

from ingest.deid import SubjectKeyer, find_identifiers, keyed_reference, oldest_safe_birth_year, redact

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"  # ../shared beside the repo
OLDEST = 1936  # births before 1936 are ages over 89 when "today" is in 2026


def _first(resource_type: str) -> dict:
    with (SYNTHEA / f"{resource_type}.000.ndjson").open("rb") as lines:
        return orjson.loads(next(lines))


def _identifier_strings(patient: dict) -> set[str]:
    """Every string a reader could use to re-identify this Synthea patient."""
    found = {patient["birthDate"], patient["id"]}
    for name in patient["name"]:
        found |= {name["family"], *name["given"]}
    found |= {t["value"] for t in patient["telecom"]}
    found |= {i["value"] for i in patient["identifier"]}
    for address in patient["address"]:
        found |= {*address["line"], address["city"], address["postalCode"]}
    return found


def test_subject_key_is_the_truncated_hmac_of_the_patient_reference():
    keyer = SubjectKeyer("s3cret")
    expected = hmac.new(b"s3cret", b"Patient/p1", hashlib.sha256).hexdigest()[:32]
    assert keyer.key("Patient/p1") == expected
    assert keyer.key("Patient/p1") == expected  # memoised value is the same
    assert SubjectKeyer("other").key("Patient/p1") != expected
    assert keyer.key("Patient/p2") != expected


def test_an_empty_secret_is_refused_with_what_to_set():
    with pytest.raises(ValueError, match="subject_key"):
        SubjectKeyer("")


def test_synthea_patient_identifiers_are_all_found():
    patient = _first("Patient")  # born 1927-05-21, died 1989: over 89 today
    assert find_identifiers(patient, OLDEST) == [
        "name",
        "telecom",
        "address",
        "identifier",
        "birthDate (full date)",
        "age over 89",
        "deceasedDateTime",
        "text.div",
        "extension patient-mothersMaidenName",
        "extension patient-birthPlace",
    ]


def test_a_deidentified_patient_has_none_and_a_year_over_89_is_one():
    clean = {
        "resourceType": "Patient",
        "id": "p1",
        "gender": "male",
        "birthDate": "1980",
        "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": []}],
    }
    assert find_identifiers(clean, OLDEST) == []
    assert find_identifiers({**clean, "birthDate": "1935"}, OLDEST) == ["age over 89"]
    assert find_identifiers({**clean, "birthDate": "1936"}, OLDEST) == []


def test_oldest_safe_birth_year_is_ninety_years_back():
    from datetime import UTC, datetime

    assert oldest_safe_birth_year(datetime(2026, 6, 1, tzinfo=UTC)) == 1936


def test_business_identifiers_are_not_person_identifiers_but_contained_persons_are():
    risk = {"resourceType": "RiskAssessment", "id": "ra-1", "identifier": [{"value": "inference-77"}]}
    assert find_identifiers(risk, OLDEST) == []
    risk["contained"] = [{"resourceType": "Patient", "id": "c", "name": [{"family": "Doe"}], "birthDate": "1970-02-03"}]
    assert find_identifiers(risk, OLDEST) == ["contained.name", "contained.birthDate (full date)"]


def test_redacted_patient_keeps_nothing_identifying():
    patient = _first("Patient")
    keyer = SubjectKeyer("k")
    safe = redact(patient, keyer, OLDEST)
    blob = orjson.dumps(safe).decode()
    assert not [s for s in _identifier_strings(patient) if s in blob]
    assert safe["id"] == keyer.marked(f"Patient/{patient['id']}")
    assert keyer.key(f"Patient/{safe['id']}") == keyer.key(f"Patient/{patient['id']}")  # keyed once, when re-read
    assert safe["birthDate"] == "1936"  # 1927 aggregated into "90 or older"
    assert find_identifiers(safe, OLDEST) == []
    assert safe["gender"] == "female" and safe["maritalStatus"] == patient["maritalStatus"]
    race = [e["url"].rsplit("-", 1)[-1] for e in safe["extension"]]
    assert race[:2] == ["race", "ethnicity"]


def test_redacted_event_keys_patient_references_and_drops_displays_and_attachments():
    keyer = SubjectKeyer("k")
    encounter = _first("Encounter")
    safe = redact(encounter, keyer, OLDEST)
    assert safe["subject"] == {"reference": f"Patient/{keyer.marked('Patient/79a66c97-6131-3213-f3c9-4606946ab056')}"}
    assert "Upton904" not in orjson.dumps(safe).decode()  # the patient's name was in subject.display
    assert safe["period"] == encounter["period"]
    assert safe["id"] == keyer.marked(f"Encounter/{encounter['id']}")  # a visit number identifies a person too
    document = _first("DocumentReference")
    safe_doc = redact(document, keyer, OLDEST)
    attachment = safe_doc["content"][0]["attachment"]
    assert "data" not in attachment and attachment["contentType"] == "text/plain; charset=utf-8"
    assert document["content"][0]["attachment"]["data"]  # the original is untouched


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/p1", "Patient/{key}"),
        ("https://ehr.example/fhir/Patient/p1/_history/3", "Patient/{key}"),
        ("Patient?identifier=http://hl7.org/fhir/sid/us-ssn|999-94-5397", "Patient?(redacted)"),
        ("Encounter/e1", "Encounter/{visit}"),
        ("https://ehr.example/fhir/Encounter/e1/_history/2", "Encounter/{visit}"),
        ("Encounter?identifier=http://hospital.example/visit|V123", "Encounter?(redacted)"),
        ("RelatedPatient/p1", "RelatedPatient/p1"),
        ("Observation/o1", "Observation/o1"),
    ],
)
def test_keyed_reference(reference, expected):
    keyer = SubjectKeyer("k")
    assert keyed_reference(reference, keyer) == expected.format(key=keyer.marked("Patient/p1"),
                                                                visit=keyer.marked("Encounter/e1"))


def test_a_marked_key_keys_to_itself_and_only_with_a_valid_tag():
    """What lets a stored (redacted) payload be decoded again without keying its subject twice, and why a feed
    cannot choose a pseudonym by sending an id that looks marked."""
    keyer = SubjectKeyer("k")
    key = keyer.key("Patient/p1")
    marked = keyer.marked("Patient/p1")
    prefix, inner, tag = marked.split(".")
    assert (prefix, inner, len(tag), len(marked)) == ("vigil-key", key, 16, 59)
    assert keyer.key(f"Patient/{marked}") == key
    assert keyed_reference(f"Patient/{marked}", keyer) == f"Patient/{marked}"  # redacting again changes nothing
    assert SubjectKeyer("k").key(f"Patient/{marked}") == key  # another process with the same secret
    visit = keyer.marked("Encounter/e1")
    assert keyer.key(f"Encounter/{visit}") == keyer.key("Encounter/e1")  # visits are keyed and marked alike
    forged = f"vigil-key.{key}.{'0' * 16}"
    other = SubjectKeyer("other").marked("Patient/p1")
    for not_ours in (forged, other, f"vigil-key.{key}"):
        assert keyer.key(f"Patient/{not_ours}") == hmac.new(b"k", f"Patient/{not_ours}".encode(),
                                                            hashlib.sha256).hexdigest()[:32]
    assert keyer.key(f"Encounter/{marked}") != key  # a patient's mark is not a visit's
