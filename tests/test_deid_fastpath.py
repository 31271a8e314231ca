"""The ingest fast paths (BENCHMARKS.md §Ingest fast path) change speed, never what is found, stripped, keyed or
parsed.

De-identification first: ``find_identifiers`` skips the element-by-element checks when a person's top-level keys
cannot hold a direct identifier (``ingest.deid._SUSPECT_PERSON_KEYS``). Here it is compared, on random resources with
identifier elements sprinkled in (hypothesis), with the full walk as it was before the shortcut: ``_full_walk`` below is
a verbatim copy of ``find_identifiers`` at commit 7670d9b, the version reviewed against HIPAA Safe Harbor and
tests/test_deid.py. The decoder is held to it too: the same elements counted as stripped, the same resources
quarantined, and no sprinkled identifier value in what it keeps. Then the decoder's memoised reference keys and its
inline dateTime parse are compared with the uncached functions they replace.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import Decoder, SubjectKeyer, parse_datetime, reference_id
from ingest.decode import Rejected, _time
from ingest.deid import find_identifiers
from vigil.domain import DeadLetter, Position

OLDEST = 1936
HERE = Position("fastpath.ndjson", 1)
SECRET = "fastpath-secret"
MARK = "IDENT-"  # every identifier value sprinkled in starts with this, so a leak is easy to see
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the full walk, verbatim from commit 7670d9b (ingest/deid.py) -------------------------------------------------

_PERSON_TYPES = frozenset({"Patient", "RelatedPerson", "Person"})
_DIRECT_ELEMENTS = ("name", "telecom", "address", "identifier", "photo", "contact")
_IDENTIFYING_VALUES = ("valueHumanName", "valueAddress", "valueContactPoint", "valueIdentifier", "valueAttachment")


def _full_walk(resource: dict, oldest_year: int) -> list[str]:
    found: list[str] = []
    if resource.get("resourceType") in _PERSON_TYPES:
        found.extend(_full_person(resource, oldest_year))
    contained = resource.get("contained")
    for inner in contained if isinstance(contained, list) else ():
        if isinstance(inner, dict):
            found.extend(f"contained.{name}" for name in _full_walk(inner, oldest_year))
    return list(dict.fromkeys(found))


def _full_person(person: dict, oldest_year: int) -> list[str]:
    found = [name for name in _DIRECT_ELEMENTS if person.get(name)]
    birth = person.get("birthDate")
    if isinstance(birth, str) and birth:
        if len(birth) > 4:
            found.append("birthDate (full date)")
        if birth[:4].isdigit() and int(birth[:4]) < oldest_year:
            found.append("age over 89")
    if person.get("deceasedDateTime"):
        found.append("deceasedDateTime")
    text = person.get("text")
    if isinstance(text, dict) and text.get("div"):
        found.append("text.div")
    found.extend(f"extension {_last_segment(ext.get('url'))}" for ext in _full_extensions(person))
    return found


def _full_extensions(element: dict) -> list[dict]:
    extensions = element.get("extension")
    return [
        ext
        for ext in (extensions if isinstance(extensions, list) else ())
        if isinstance(ext, dict)
        and (any(k in ext for k in _IDENTIFYING_VALUES) or str(ext.get("url")).endswith("patient-mothersMaidenName"))
    ]


def _last_segment(url: object) -> str:
    return str(url or "").rstrip("/").rsplit("/", 1)[-1] or "(no url)"


# --- random resources -----------------------------------------------------------------------------------------------

marked = st.text(alphabet="abcXYZ019 -", min_size=0, max_size=6).map(lambda s: MARK + s)
# values an element may carry: empty (not reported), or holding a marked identifier (reported when truthy)
empty_values = st.sampled_from([None, "", [], {}, 0, False])
identifying_values = st.one_of(
    marked,
    st.lists(st.fixed_dictionaries({"value": marked}), min_size=1, max_size=2),
    st.fixed_dictionaries({"family": marked}),
)
element_values = st.one_of(empty_values, identifying_values)
birth_dates = st.one_of(
    st.sampled_from(["", "1980", "1935", "1936", "1899", "19", "abcd", "2001-07", "1927-05-21", "1950-01-02T10:00:00Z"]),
    st.integers(1800, 2030).map(str),
    st.integers(1800, 2030),
    st.none(),
)
urls = st.one_of(
    st.sampled_from([
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
        "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
        "http://example.org/patient-mothersMaidenName/",
        "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
        "",
    ]),
    st.none(),
    st.integers(0, 9),
)
extension_value_keys = st.sampled_from(
    [*_IDENTIFYING_VALUES, "valueString", "valueCoding", "valueCode", "extension", "valueBoolean"])
extensions = st.lists(
    st.one_of(
        st.builds(lambda url, keys, value: {"url": url, **{k: value for k in keys}},
                  urls, st.lists(extension_value_keys, max_size=2), st.one_of(marked, identifying_values)),
        st.builds(dict),
        st.just("not an extension"),
    ),
    max_size=3,
)
optional_elements = {
    **{name: element_values for name in _DIRECT_ELEMENTS},
    "deceasedDateTime": st.one_of(empty_values, st.just("2020-01-01"), marked),
    "text": st.one_of(empty_values, st.fixed_dictionaries({"div": st.one_of(st.just(""), marked)}), marked),
    "birthDate": birth_dates,
    "extension": st.one_of(extensions, st.just("not a list"), st.none()),
    "gender": st.sampled_from(["female", "male", "unknown"]),
    "maritalStatus": st.fixed_dictionaries({"text": st.just("M")}),
    "active": st.booleans(),
}


def _person(resource_types: st.SearchStrategy[str]) -> st.SearchStrategy[dict]:
    return st.builds(
        lambda rtype, rid, extra: {"resourceType": rtype, "id": rid, **extra},
        resource_types,
        st.sampled_from(["p1", "p2", "p-3"]),
        st.fixed_dictionaries({}, optional=optional_elements),
    )


any_type = st.sampled_from(["Patient", "RelatedPerson", "Person", "Observation", "RiskAssessment", "Encounter"])
contained_lists = st.one_of(st.lists(st.one_of(_person(any_type), st.just("x")), max_size=3), st.just({"not": "list"}))
resources = st.builds(
    lambda base, contained: {**base, **({"contained": contained} if contained is not None else {})},
    _person(any_type),
    st.one_of(st.none(), contained_lists),
)
patients = st.builds(
    lambda base, contained: {**base, **({"contained": contained} if contained is not None else {})},
    _person(st.just("Patient")),
    st.one_of(st.none(), contained_lists),
)


def _marks(value: object) -> set[str]:
    """Every sprinkled identifier string inside ``value``."""
    if isinstance(value, str):
        return {value} if value.startswith(MARK) else set()
    if isinstance(value, dict):
        return set().union(*map(_marks, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_marks, value)) if value else set()
    return set()


# --- de-identification ------------------------------------------------------------------------------------------------

@FAST
@given(resources)
def test_find_identifiers_equals_the_full_walk(resource):
    assert find_identifiers(resource, OLDEST) == _full_walk(resource, OLDEST)


@FAST
@given(patients)
def test_strip_counts_what_the_full_walk_finds_and_keeps_no_identifier(patient):
    expected = _full_walk(patient, OLDEST)
    decoder = Decoder(SubjectKeyer(SECRET), "strip")
    decoder._oldest_year = OLDEST  # pin "today" so the over-89 rule matches the oracle
    outcome = decoder.decode(patient, HERE)
    assert decoder.stripped == Counter(expected)
    if outcome is not None and not isinstance(outcome, DeadLetter):
        assert not [m for m in _marks(patient) if m in repr(outcome)], "an identifier value reached the record"
        assert outcome.subject == SubjectKeyer(SECRET).key("Patient/" + patient["id"])


@FAST
@given(patients)
def test_quarantine_holds_back_exactly_what_the_full_walk_flags(patient):
    expected = _full_walk(patient, OLDEST)
    decoder = Decoder(SubjectKeyer(SECRET), "quarantine")
    decoder._oldest_year = OLDEST
    outcome = decoder.decode(patient, HERE)
    if expected:
        assert isinstance(outcome, DeadLetter)
        assert outcome.reason == "identifiers present: " + ", ".join(expected)
        assert outcome.payload is None and outcome.resource_id == SubjectKeyer(SECRET).key("Patient/" + patient["id"])
    else:
        assert not (isinstance(outcome, DeadLetter) and outcome.reason.startswith("identifiers present"))
    assert not decoder.stripped


def test_the_shortcut_is_taken_and_still_reports_birth_date_and_extensions():
    """A Patient whose top-level keys hold no direct element (the simulator's shape) skips the element checks, yet
    its full birth date, an age over 89 and an identifying extension are still found, by both paths."""
    patient = {"resourceType": "Patient", "id": "p", "gender": "male", "birthDate": "1930-02-03",
               "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                              "valueAddress": {"city": MARK + "Springfield"}}]}
    expected = ["birthDate (full date)", "age over 89", "extension patient-birthPlace"]
    assert _full_walk(patient, OLDEST) == expected
    assert find_identifiers(patient, OLDEST) == expected
    assert find_identifiers({**patient, "name": [{"family": MARK + "Doe"}]}, OLDEST) == ["name", *expected]


# --- decoder: memoised reference keys, inline dateTime parse ------------------------------------------------------

reference_strings = st.one_of(
    st.builds(lambda t, i: f"{t}/{i}", st.sampled_from(["Patient", "Encounter", "Device"]),
              st.sampled_from(["p1", "p2", "e1", "x/_history/2", ""])),
    st.builds(lambda t, i: f"https://ehr.example/fhir/{t}/{i}/_history/3", st.sampled_from(["Patient", "Encounter"]),
              st.sampled_from(["p1", "e1"])),
    st.sampled_from(["urn:uuid:123", "Patient?identifier=x|1", "Encounter?identifier=x|1", "#contained", ""]),
)
references = st.one_of(st.builds(lambda r: {"reference": r}, reference_strings), st.just({"display": "x"}),
                       st.just("Patient/p1"), st.none())


@FAST
@given(st.lists(st.tuples(references, references), min_size=1, max_size=6))
def test_memoised_subject_and_encounter_keys_equal_the_uncached_ones(pairs):
    """Each pair is decoded twice by one decoder (the second time from its cache) and once by a fresh decoder: the
    outcomes are equal, and an accepted one's keys are ``keyer.key(Type/ + reference_id(...))``."""
    keyer = SubjectKeyer(SECRET)
    decoder = Decoder(keyer)
    for subject, encounter in pairs + pairs:
        resource = {"resourceType": "Procedure", "id": "pr1", "status": "completed",
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]},
                    "performedDateTime": "2024-01-01", "encounter": encounter}
        if subject is not None:
            resource["subject"] = subject
        outcome = decoder.decode(resource, HERE)
        assert outcome == Decoder(SubjectKeyer(SECRET)).decode(resource, HERE)
        patient = reference_id(subject, "Patient")
        if patient is None:
            assert isinstance(outcome, DeadLetter)
            continue
        assert outcome.subject == keyer.key("Patient/" + patient)
        enc = reference_id(encounter, "Encounter")
        assert outcome.encounter == (keyer.key("Encounter/" + enc) if enc else None)


datetime_texts = st.one_of(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1),
                 timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-5)), timezone(timedelta(0))])
                 ).map(lambda d: d.isoformat()),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")),
    st.sampled_from(["2024", "2024-03", "2024-03-05", "2024-13-01", "2024-03-05T25:00:00Z", "yesterday", "20240305",
                     "", "2024-3", "12345678"]),
    st.text(max_size=12),
    st.integers(),
    st.none(),
    st.lists(st.just("2024-03-05"), max_size=9),
)


@FAST
@given(datetime_texts)
def test_inline_datetime_parse_equals_parse_datetime(text):
    try:
        expected = parse_datetime(text)
    except (TypeError, ValueError):
        expected = None
    try:
        got = _time(text, "element")
    except Rejected as exc:
        assert expected is None and str(exc) == "invalid element (not a FHIR dateTime)"
        return
    assert got == expected and got.tzinfo is UTC
