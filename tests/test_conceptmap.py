"""ConceptMap $translate semantics, site scoping, the example map, and FactMapper on top of them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fhir.resources.R4B.conceptmap import ConceptMap

from ontology import ConceptMapError, ConceptMaps, FactMapper, Match
from vigil.domain import Coding, Fact
from vigil.settings import EXAMPLES_DIR, CodeRef, OutcomeConfig

HILLCREST = EXAMPLES_DIR / "conceptmaps" / "hillcrest.json"
DX = "https://hillcrest.example.org/fhir/CodeSystem/dx"
LAB = "https://hillcrest.example.org/fhir/CodeSystem/lab"
RIVERSIDE_DX = "https://riverside.example.org/fhir/CodeSystem/dx"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
LOCAL = "urn:local:dx"
SITE_SYSTEM = "https://vigil.dev/fhir/CodeSystem/site"


def write_map(tmp_path: Path, name: str, groups: list[dict], url: str | None = None, site: str | None = None) -> Path:
    cm: dict = {"resourceType": "ConceptMap", "url": url or f"https://test/{name}", "status": "active", "group": groups}
    if site:
        cm["useContext"] = [
            {
                "code": {"system": "http://terminology.hl7.org/CodeSystem/usage-context-type", "code": "venue"},
                "valueCodeableConcept": {"coding": [{"system": SITE_SYSTEM, "code": site}]},
            }
        ]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cm, indent=2))
    return path


def element(code: str, *targets: tuple[str, str]) -> dict:
    return {"code": code, "target": [{"code": c, "equivalence": eq} for c, eq in targets]}


def fact(codings: tuple[Coding, ...], site: str | None, value: float | None = None, unit: str | None = None) -> Fact:
    return Fact(
        resource_type="Observation" if value is not None else "Condition",
        resource_id="r1",
        version_id="1",
        status="final",
        subject="s1",
        encounter="e1",
        codings=codings,
        time=datetime(2025, 3, 1, tzinfo=UTC),
        value=value,
        unit=unit,
        site=site,
    )


AKI = OutcomeConfig(
    id="aki", kind="lab_rise", analyte=CodeRef(system=LOINC, code="2160-0"), unit="mg/dL", absolute_rise=0.3
)


# --- the example map -------------------------------------------------------------------------------------------


def test_hillcrest_example_is_a_valid_r4_conceptmap_scoped_to_site_c() -> None:
    cm = ConceptMap.model_validate(json.loads(HILLCREST.read_text()))
    assert cm.useContext[0].valueCodeableConcept.coding[0].code == "site-c"
    sctargets = [t for g in cm.group if g.target == SCT for e in g.element for t in e.target]
    assert sctargets and all(t.display is None for t in sctargets), "SNOMED CT concepts are shipped as ids only"


def test_hillcrest_translates_local_codes_at_site_c() -> None:
    maps = ConceptMaps.load([HILLCREST])
    url = "https://vigil.dev/fhir/ConceptMap/hillcrest"
    assert maps.translate(DX, "CAD-STEN", "site-c") == [Match(SCT, "233970002", "equivalent", url)]
    assert maps.translate(DX, "ICA", "site-c") == [Match(SCT, "33367005", "equivalent", url)]
    assert maps.translate(LAB, "CREAT", "site-c") == [Match(LOINC, "2160-0", "equivalent", url)]


def test_site_scoped_map_does_not_apply_elsewhere_or_at_an_unknown_site() -> None:
    maps = ConceptMaps.load([HILLCREST])
    assert maps.translate(DX, "CAD-STEN", "site-a") == []
    assert maps.translate(DX, "CAD-STEN", None) == []


def test_riverside_sten2_is_unmapped_at_site_a() -> None:
    maps = ConceptMaps.load([HILLCREST])
    assert maps.translate(RIVERSIDE_DX, "STEN-2", "site-a") == []
    mapper = FactMapper(maps, [AKI])
    out = mapper.map(fact((Coding(RIVERSIDE_DX, "STEN-2"),), "site-a"))
    assert (out.mapped, out.concept) == (False, None)
    assert mapper.unmapped_codes == {("site-a", RIVERSIDE_DX, "STEN-2"): 1}


# --- $translate semantics --------------------------------------------------------------------------------------


def test_only_acceptable_equivalences_are_returned_and_disjoint_never(tmp_path: Path) -> None:
    path = write_map(
        tmp_path,
        "eq",
        [
            {
                "source": LOCAL,
                "target": SCT,
                "element": [
                    element("A", ("111", "disjoint"), ("222", "narrower"), ("333", "equivalent"), ("444", "wider"))
                ],
            }
        ],
    )
    assert [m.code for m in ConceptMaps.load([path]).translate(LOCAL, "A")] == ["333", "444"]
    lenient = ConceptMaps.load([path], accept=frozenset({"equivalent", "narrower", "disjoint"}))
    assert {m.code for m in lenient.translate(LOCAL, "A")} == {"222", "333", "111"}


def test_unmapped_fixed_covers_absent_codes_but_not_explicit_negatives(tmp_path: Path) -> None:
    path = write_map(
        tmp_path,
        "fixed",
        [
            {
                "source": LOCAL,
                "target": SCT,
                "element": [element("NOT-CAD", ("233970002", "unmatched")), element("CAD", ("233970002", "equal"))],
                "unmapped": {"mode": "fixed", "code": "999"},
            }
        ],
    )
    maps = ConceptMaps.load([path])
    assert maps.translate(LOCAL, "CAD") == [Match(SCT, "233970002", "equal", "https://test/fixed")]
    assert maps.translate(LOCAL, "NOT-CAD") == [], "an explicit 'unmatched' suppresses the unmapped fallback"
    assert maps.translate(LOCAL, "ANYTHING") == [Match(SCT, "999", "wider", "https://test/fixed")]
    assert maps.translate("urn:other", "ANYTHING") == [], "the fallback covers only the group's source system"


def test_unmapped_provided_reuses_the_source_code(tmp_path: Path) -> None:
    group = {"source": LOCAL, "target": SCT, "element": [element("X", ("1", "equal"))]}
    path = write_map(tmp_path, "prov", [{**group, "unmapped": {"mode": "provided"}}])
    assert ConceptMaps.load([path]).translate(LOCAL, "233970002") == [
        Match(SCT, "233970002", "equal", "https://test/prov")
    ]


def test_unmapped_other_map_delegates_and_survives_a_cycle(tmp_path: Path) -> None:
    first = write_map(
        tmp_path,
        "first",
        [{"source": LOCAL, "target": SCT, "element": [element("A", ("1", "equal"))],
          "unmapped": {"mode": "other-map", "url": "https://test/second"}}],
    )
    second = write_map(
        tmp_path,
        "second",
        [{"source": LOCAL, "target": SCT, "element": [element("B", ("2", "equivalent"))],
          "unmapped": {"mode": "other-map", "url": "https://test/first"}}],
        site="site-z",  # scoped elsewhere: reachable only through the reference
    )
    maps = ConceptMaps.load([first, second])
    assert maps.translate(LOCAL, "B", "site-a") == [Match(SCT, "2", "equivalent", "https://test/second")]
    assert maps.translate(LOCAL, "C", "site-a") == []


def test_global_and_site_maps_combine_best_equivalence_first(tmp_path: Path) -> None:
    wide = write_map(tmp_path, "wide", [{"source": LOCAL, "target": SCT, "element": [element("A", ("10", "wider"))]}])
    site = write_map(
        tmp_path, "site", [{"source": LOCAL, "target": SCT, "element": [element("A", ("20", "equal"))]}], site="site-b"
    )
    maps = ConceptMaps.load([wide, site])
    assert [m.code for m in maps.translate(LOCAL, "A", "site-b")] == ["20", "10"]
    assert [m.code for m in maps.translate(LOCAL, "A", "site-a")] == ["10"]
    assert [m.code for m in maps.translate(LOCAL, "A", None)] == ["10"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "bad.json:1: not valid JSON"),
        (json.dumps({"resourceType": "ValueSet"}), "expected a FHIR R4 ConceptMap, found 'ValueSet'"),
        (json.dumps({"resourceType": "ConceptMap", "url": "u"}), "status: Value for the field 'status' is required"),
        (json.dumps({"resourceType": "ConceptMap", "status": "active"}), "ConceptMap has no url"),
        (
            json.dumps({"resourceType": "ConceptMap", "url": "u", "status": "active",
                        "group": [{"source": "s", "target": "t", "element": [element("A", ("1", "same"))]}]}),
            "element 'A' has equivalence 'same'",
        ),
        (
            json.dumps({"resourceType": "ConceptMap", "url": "u", "status": "active",
                        "group": [{"source": "s", "target": "t", "element": [element("A", ("1", "equal"))],
                                   "unmapped": {"mode": "fixed"}}]}),
            "group[0].unmapped mode 'fixed' needs a code",
        ),
        (
            json.dumps({"resourceType": "ConceptMap", "url": "u", "status": "active",
                        "group": [{"element": [element("A", ("1", "equal"))]}]}),
            "group[0] has no source system",
        ),
    ],
)
def test_bad_map_error_names_the_file_and_the_problem(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConceptMapError) as err:
        ConceptMaps.load([path])
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_duplicate_map_urls_are_refused(tmp_path: Path) -> None:
    group = [{"source": LOCAL, "target": SCT, "element": [element("A", ("1", "equal"))]}]
    a = write_map(tmp_path, "a", group, url="https://test/same")
    b = write_map(tmp_path, "b", group, url="https://test/same")
    with pytest.raises(ConceptMapError, match="also used by .*a.json"):
        ConceptMaps.load([a, b])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConceptMapError, match="not found: .*nope.json"):
        ConceptMaps.load([tmp_path / "nope.json"])


# --- FactMapper ------------------------------------------------------------------------------------------------


class CountingMaps(ConceptMaps):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def translate(self, system: str, code: str, site: str | None = None) -> list[Match]:
        self.calls += 1
        return super().translate(system, code, site)


def test_standard_codes_pass_through_and_the_first_mappable_coding_wins() -> None:
    mapper = FactMapper(ConceptMaps.load([HILLCREST]), [AKI])
    standard = mapper.map(fact((Coding(SCT, "233970002", "Coronary stenosis"),), "site-a"))
    assert (standard.mapped, standard.concept) == (True, Coding(SCT, "233970002"))
    mixed = mapper.map(fact((Coding(RIVERSIDE_DX, "STEN-2"), Coding(SCT, "233970002")), "site-a"))
    assert mixed.concept == Coding(SCT, "233970002")
    local = mapper.map(fact((Coding(DX, "CAD-STEN"),), "site-c"))
    assert local.concept == Coding(SCT, "233970002")
    assert not mapper.unmapped_codes


def test_site_c_creatinine_is_converted_to_the_outcome_unit() -> None:
    mapper = FactMapper(ConceptMaps.load([HILLCREST]), [AKI])
    out = mapper.map(fact((Coding(LAB, "CREAT"),), "site-c", value=88.42, unit="umol/L"))
    assert out.concept == Coding(LOINC, "2160-0")
    assert out.unit == "mg/dL"
    assert out.value == pytest.approx(1.000, abs=0.001)
    same = mapper.map(fact((Coding(LOINC, "2160-0"),), "site-a", value=1.2, unit="mg/dL"))
    assert (same.value, same.unit) == (1.2, "mg/dL")


def test_unconvertible_unit_keeps_the_concept_drops_the_value_and_is_counted() -> None:
    mapper = FactMapper(ConceptMaps.load([HILLCREST]), [AKI])
    for _ in range(2):
        out = mapper.map(fact((Coding(LOINC, "2160-0"),), "site-b", value=1.0, unit="mg/h"))
        assert (out.mapped, out.concept, out.value, out.unit) == (True, Coding(LOINC, "2160-0"), None, "mg/dL")
    no_unit = mapper.map(fact((Coding(LOINC, "2160-0"),), "site-b", value=1.0, unit=None))
    assert no_unit.value is None
    assert mapper.unit_errors == {("site-b", "mg/h"): 2, ("site-b", ""): 1}


def test_translations_are_cached_per_system_code_and_site() -> None:
    maps = CountingMaps.load([HILLCREST])
    mapper = FactMapper(maps, [AKI])
    for _ in range(3):
        assert mapper.map(fact((Coding(DX, "CAD-STEN"),), "site-c")).mapped
        assert not mapper.map(fact((Coding(DX, "CAD-STEN"),), "site-a")).mapped
    assert maps.calls == 2


def test_outcomes_disagreeing_on_an_analyte_unit_are_refused() -> None:
    molar = AKI.model_copy(update={"id": "aki-si", "unit": "umol/L"})
    with pytest.raises(ValueError, match="aki@1 and aki-si@1 both measure 2160-0 but in 'mg/dL' and 'umol/L'"):
        FactMapper(ConceptMaps(), [AKI, molar])
