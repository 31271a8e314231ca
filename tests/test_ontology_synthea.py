"""Issue 4's must-show on real codes: the Synthea bulk export (../shared/data/synthea-bulk-10, CC0) through the real
decoder, FactMapper and Pipeline — SNOMED CT Conditions/Procedures are recognised as standard and kept, a site's local
codes map through its ConceptMap, unmapped codes are counted per site — plus the worked numbers for creatinine units
and the KDIGO 7-day rule that tests/test_units.py and tests/test_outcomes.py do not already pin.

Sites are Synthea's Organizations, referred to from ``Encounter.serviceProvider`` by identifier; the expected sites
below are read straight from the raw NDJSON, independently of the decoder, so the pipeline's site resolution is
checked too. The export has no Observation file (over 4 MiB, left out), so labs are built in the test.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from ingest.decode import Decoder
from ingest.deid import SubjectKeyer
from ingest.load import load
from ontology import ConceptMaps, FactMapper, definition_for
from ontology.units import convert
from vigil.domain import Coding, EncounterInfo, Fact, Label, OutcomeFact
from vigil.pipeline import Pipeline
from vigil.settings import CodeRef, OutcomeConfig, load_settings

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-bulk-10"
SCT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
SITE_SYSTEM = "https://vigil.dev/fhir/CodeSystem/site"
NEWMAN_LOCAL = "https://newman.example.org/fhir/CodeSystem/local"
# SNOMED CT ids as coded in the export: sepsis; renal dialysis; E. coli urinary tract infection; chemo-radiation
SEPSIS, DIALYSIS, ECOLI_UTI, CHEMO_RT = "91302008", "265764009", "301011002", "703423002"
LOCAL_CODES = {DIALYSIS: "HD", ECOLI_UTI: "UTI-EC", CHEMO_RT: "CHEMO-RT"}  # what the rewritten feed sends instead
AKI = OutcomeConfig(id="aki", kind="lab_rise", analyte=CodeRef(system=LOINC, code="2160-0"), unit="mg/dL",
                    absolute_rise=0.3, relative_rise=1.5, baseline_lookback=timedelta(hours=24))


def ndjson(name: str) -> list[dict]:
    return [orjson.loads(line) for line in (SYNTHEA / f"{name}.000.ndjson").read_bytes().splitlines() if line]


@pytest.fixture(scope="module")
def raw() -> dict[str, list[dict]]:
    return {t: ndjson(t) for t in ("Encounter", "Condition", "Procedure")}


@pytest.fixture(scope="module")
def site_of(raw: dict[str, list[dict]]) -> dict[str, str]:
    """Raw Condition/Procedure id → the Organization identifier value of its encounter's serviceProvider."""
    encounter_site = {e["id"]: e["serviceProvider"]["reference"].rsplit("|", 1)[1] for e in raw["Encounter"]}
    return {r["id"]: encounter_site[r["encounter"]["reference"].removeprefix("Encounter/")]
            for r in raw["Condition"] + raw["Procedure"]}


@pytest.fixture(scope="module")
def newman(raw: dict[str, list[dict]], site_of: dict[str, str]) -> str:
    """The site with the most dialysis records (NEWMAN MEMORIAL COUNTY HOSPITAL): the one whose local dictionary
    we map."""
    sites = Counter(site_of[r["id"]] for r in raw["Procedure"] if r["code"]["coding"][0]["code"] == DIALYSIS)
    return sites.most_common(1)[0][0]


def decode_facts(paths: list[Path]) -> list[Fact]:
    """Decode like the pipeline and give each fact its site the way Pipeline._on_fact does (encounter's provider)."""
    loaded = load(paths, Decoder(SubjectKeyer("synthea-test-key")))
    encounters = {r.encounter: r for _, r in loaded.records if isinstance(r, EncounterInfo)}
    facts = [r for _, r in loaded.records if isinstance(r, Fact)]
    for f in facts:
        f.site = encounters[f.encounter].site
    return facts


def newman_map(tmp_path: Path, site: str) -> Path:
    """Newman's ConceptMap: two of its local codes to the SNOMED CT ids Synthea uses; CHEMO-RT deliberately absent."""
    cm = {
        "resourceType": "ConceptMap", "url": "https://vigil.dev/fhir/ConceptMap/newman-test", "status": "draft",
        "useContext": [{"code": {"system": "http://terminology.hl7.org/CodeSystem/usage-context-type",
                                 "code": "venue"},
                        "valueCodeableConcept": {"coding": [{"system": SITE_SYSTEM, "code": site}]}}],
        "group": [{"source": NEWMAN_LOCAL, "target": SCT, "element": [
            {"code": "UTI-EC", "target": [{"code": ECOLI_UTI, "equivalence": "equivalent"}]},
            {"code": "HD", "target": [{"code": DIALYSIS, "equivalence": "equivalent"}]},
        ]}],
    }
    path = tmp_path / "newman.json"
    path.write_text(json.dumps(cm))
    return path


def localised_export(tmp_path: Path, raw: dict[str, list[dict]]) -> Path:
    """A copy of the export in which every site sends its dialysis, E. coli UTI and chemo-radiation records with the
    local codes of NEWMAN_LOCAL instead of SNOMED CT — as a site whose feed bypasses its terminology service would."""
    out = tmp_path / "export"
    out.mkdir()
    for rtype, resources in raw.items():
        lines = []
        for r in resources:
            coding = r.get("code", {}).get("coding", [{}])[0]
            if rtype != "Encounter" and coding.get("code") in LOCAL_CODES:
                r = {**r, "code": {"coding": [{"system": NEWMAN_LOCAL, "code": LOCAL_CODES[coding["code"]]}]}}
            lines.append(orjson.dumps(r))
        (out / f"{rtype}.000.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    return out


# --- SNOMED CT as sent by Synthea -----------------------------------------------------------------------------------


def test_synthea_snomed_conditions_and_procedures_are_standard_and_kept(raw: dict[str, list[dict]]) -> None:
    facts = decode_facts([SYNTHEA / f"{t}.000.ndjson" for t in ("Encounter", "Condition", "Procedure")])
    assert Counter(f.resource_type for f in facts) == {"Condition": 555, "Procedure": 2056}
    mapper = FactMapper(ConceptMaps(), [AKI])  # no maps at all: SNOMED CT needs none
    mapped = [mapper.map(f) for f in facts]
    assert all(of.mapped for of in mapped)
    assert [(of.concept.system, of.concept.code) for of in mapped] == [
        (f.codings[0].system, f.codings[0].code) for f in facts]
    assert len({of.concept.code for of in mapped}) == len({r["code"]["coding"][0]["code"] for r in
                                                           raw["Condition"] + raw["Procedure"]}) == 202
    assert mapper.unmapped_codes == Counter() and mapper.unit_errors == Counter()
    sepsis = [of for of in mapped if of.concept.code == SEPSIS]
    assert len(sepsis) == sum(r["code"]["coding"][0]["code"] == SEPSIS for r in raw["Condition"]) > 0


# --- a site's local codes ---------------------------------------------------------------------------------------------


def test_local_codes_map_through_the_site_conceptmap_and_unmapped_ones_are_counted_per_site(
    tmp_path: Path, raw: dict[str, list[dict]], site_of: dict[str, str], newman: str
) -> None:
    export = localised_export(tmp_path, raw)
    facts = decode_facts([export])
    mapper = FactMapper(ConceptMaps.load([newman_map(tmp_path, newman)]), [AKI])
    by_id = {f.resource_id: mapper.map(f) for f in facts}

    original = {r["id"]: r["code"]["coding"][0]["code"] for r in raw["Condition"] + raw["Procedure"]}
    local = {rid: code for rid, code in original.items() if code in LOCAL_CODES}
    assert Counter(local.values()) == {DIALYSIS: 430, CHEMO_RT: 221, ECOLI_UTI: 4}
    expected_unmapped: Counter = Counter()
    for rid, code in local.items():
        of = by_id[rid]
        assert of.fact.site == site_of[rid]
        if site_of[rid] == newman and code != CHEMO_RT:  # Newman's map, at Newman: the original SNOMED concept
            assert (of.mapped, of.concept) == (True, Coding(SCT, code)), rid
        else:  # CHEMO-RT is in no map; Newman's codes mean nothing at another site
            assert (of.mapped, of.concept) == (False, None), rid
            expected_unmapped[(site_of[rid], NEWMAN_LOCAL, LOCAL_CODES[code])] += 1
    mapped_here = Counter(of.concept.code for rid, of in by_id.items() if rid in local and of.mapped)
    assert mapped_here == {DIALYSIS: 430, ECOLI_UTI: 1}  # both codes of Newman's map, at Newman
    assert mapper.unmapped_codes == expected_unmapped
    assert len({site for site, _, _ in expected_unmapped}) > 1  # counted per site, not pooled
    untouched = [of for rid, of in by_id.items() if rid not in local]
    assert len(untouched) == 555 + 2056 - len(local) and all(of.mapped for of in untouched)


def test_the_pipeline_counts_unmapped_synthea_codes_per_site(
    tmp_path: Path, raw: dict[str, list[dict]], site_of: dict[str, str], newman: str
) -> None:
    """The real Pipeline over the localised export (Encounter, Condition, Procedure NDJSON), with Newman's map."""
    export = localised_export(tmp_path, raw)
    settings = load_settings(None, concept_maps=[str(newman_map(tmp_path, newman))],
                             store_url=f"sqlite:///{tmp_path / 'unused.db'}")
    result = Pipeline(settings).run_paths([export])
    assert result.accepted == {"Encounter": len(raw["Encounter"]), "Condition": 555, "Procedure": 2056}
    expected = Counter()
    for r in raw["Condition"] + raw["Procedure"]:
        code = r["code"]["coding"][0]["code"]
        if code == CHEMO_RT or (code in LOCAL_CODES and site_of[r["id"]] != newman):
            expected[(site_of[r["id"]], NEWMAN_LOCAL, LOCAL_CODES[code])] += 1
    assert result.unmapped == expected
    assert sorted(result.unmapped.values()) == [1, 2, 221]  # UTI-EC at two other sites, CHEMO-RT at a third
    assert not any(site == newman for site, _, _ in result.unmapped)


# --- units: the worked number ---------------------------------------------------------------------------------


def test_creatinine_88_4_umol_per_litre_is_1_0_mg_per_decilitre() -> None:
    # 88.4 µmol/L × 113.12 g/mol = 9,999.8 µg/L = 0.99998 mg/dL
    assert convert(88.4, "umol/L", "mg/dL", "2160-0") == pytest.approx(0.99998, abs=1e-5)
    assert convert(1.0, "mg/dL", "umol/L", "2160-0") == pytest.approx(88.40, abs=0.005)


# --- KDIGO with a 7-day window ------------------------------------------------------------------------------------


T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
D7 = timedelta(days=7)
H48 = timedelta(hours=48)


def creatinine(rid: str, hours: float, mg_dl: float) -> OutcomeFact:
    f = Fact("Observation", rid, "1", "final", "s1", None, (Coding(LOINC, "2160-0"),), T0 + timedelta(hours=hours),
             mg_dl, "mg/dL")
    return OutcomeFact(f, Coding(LOINC, "2160-0"), mg_dl, "mg/dL", True)


def test_kdigo_meets_by_the_48_h_rule() -> None:
    aki = definition_for(AKI)
    facts = [creatinine("base", -6, 1.0), creatinine("h36", 36, 1.3)]  # +0.3 mg/dL, only 1.3 × baseline
    assert aki.evaluate(T0, D7, facts, closed=False) == (Label.POSITIVE, ("base", "h36"))


def test_kdigo_meets_by_the_7_day_rule_only_with_a_7_day_window() -> None:
    aki = definition_for(AKI)
    facts = [creatinine("base", -6, 0.5), creatinine("h30", 30, 0.6), creatinine("d5", 120, 0.76)]
    # day 5: 0.76 = 1.52 × baseline, yet only +0.26 mg/dL: the 1.5× rule alone makes it AKI
    assert aki.evaluate(T0, D7, facts, closed=False) == (Label.POSITIVE, ("base", "d5"))
    assert aki.evaluate(T0, H48, facts, closed=True) == (Label.NEGATIVE, ("base", "h30"))


def test_kdigo_neither_rule() -> None:
    aki = definition_for(AKI)
    facts = [creatinine("base", -6, 1.0), creatinine("h24", 24, 1.2), creatinine("d5", 120, 1.29)]
    assert aki.evaluate(T0, D7, facts, closed=False) is None
    assert aki.evaluate(T0, D7, facts, closed=True) == (Label.NEGATIVE, ("base", "h24", "d5"))


def test_kdigo_a_0_3_rise_reached_only_after_48_h_is_not_aki_by_itself() -> None:
    aki = definition_for(AKI)
    facts = [creatinine("base", -6, 1.0), creatinine("d5", 120, 1.35)]  # +0.35 mg/dL on day 5, only 1.35 × baseline
    assert aki.evaluate(T0, D7, facts, closed=True) == (Label.NEGATIVE, ("base", "d5"))
