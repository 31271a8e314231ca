"""The simulated feed: deterministic, valid FHIR, the intended performance, and each drift only where and when the
ground truth says. Checked with plain dicts, independently of ingest/ontology/monitors."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from vigil.scenarios import GroundTruth
from vigil.simulator import SCENARIOS, simulate

DAYS, CHANGE_DAY, START = 60, 30, date(2026, 1, 1)
CHANGE_AT = datetime(2026, 1, 31)  # START + CHANGE_DAY, naive UTC
STENOSIS_CODES = {("http://snomed.info/sct", "233970002"), ("https://hillcrest.example.org/fhir/CodeSystem/dx",
                  "CAD-STEN"), ("https://riverside.example.org/fhir/CodeSystem/dx", "STEN-2")}
TYPES = ("Organization", "Device", "Patient", "Encounter", "RiskAssessment", "Condition", "Procedure", "Observation")


def when(stamp: str) -> datetime:
    """FHIR instant → naive UTC datetime (all simulator times end in Z)."""
    assert stamp.endswith("Z"), stamp
    return datetime.fromisoformat(stamp[:-1])


class Feed:
    """One simulated feed directory, parsed on first use."""

    def __init__(self, out: Path, truth: GroundTruth) -> None:
        self.out, self.truth = out, truth
        self.raw = {t: (out / f"{t}.000.ndjson").read_bytes() for t in TYPES}
        self._parsed: dict[str, list[dict]] = {}
        self._cases: dict[str, list[dict]] = {}

    def of(self, rtype: str) -> list[dict]:
        if rtype not in self._parsed:
            self._parsed[rtype] = [orjson.loads(line) for line in self.raw[rtype].splitlines()]
        return self._parsed[rtype]

    def cases(self, model: str) -> list[dict]:
        """Each prediction of `model` with its site, age, scanner, score and true label (re-derived from outcomes).
        Derived once per feed and model (several tests read the same cases; none modifies them)."""
        if model not in self._cases:
            self._cases[model] = self._derive_cases(model)
        return self._cases[model]

    def _derive_cases(self, model: str) -> list[dict]:
        by_id = {(r["resourceType"], r["id"]): r for t in ("Patient", "Encounter") for r in self.of(t)}
        facts: dict[str, list[dict]] = defaultdict(list)
        for r in self.of("Condition" if model == "cta-stenosis" else "Observation"):
            facts[r["subject"]["reference"]].append(r)
        cases = []
        for ra in self.of("RiskAssessment"):
            if ra["method"]["coding"][0]["code"] != model:
                continue
            subject = ra["subject"]["reference"]
            t = when(ra["occurrenceDateTime"])
            patient = by_id[("Patient", subject.split("/")[1])]
            encounter = by_id[("Encounter", ra["encounter"]["reference"].split("/")[1])]
            label = (_stenosis(facts[subject], t) if model == "cta-stenosis" else _aki(facts[subject], t))
            cases.append({"site": encounter["serviceProvider"]["reference"].split("/")[1], "time": t,
                          "age": t.year - int(patient["birthDate"]), "score": ra["prediction"][0]["probabilityDecimal"],
                          "scanner": ra.get("basis", [{"reference": None}])[0]["reference"], "label": label})
        return cases


def _stenosis(facts: list[dict], t: datetime) -> bool:
    return any((c["system"], c["code"]) in STENOSIS_CODES and t <= when(f["onsetDateTime"]) <= t + timedelta(days=90)
               for f in facts for c in f["code"]["coding"])


def _aki(facts: list[dict], t: datetime) -> bool:
    """KDIGO 2012: creatinine rise >= 0.3 mg/dL within 48 h, or >= 1.5 × baseline."""
    values = []
    for f in facts:
        q = f["valueQuantity"]
        mg_dl = q["value"] / 88.42 if q["code"] == "umol/L" else q["value"]
        values.append((when(f["effectiveDateTime"]), mg_dl))
    baseline = max((v for v in values if v[0] < t), key=lambda v: v[0])[1]
    peak = max(v for ts, v in values if t <= ts <= t + timedelta(hours=48))
    return peak - baseline >= 0.3 or peak >= 1.5 * baseline


def rates(cases: list[dict], threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) at the operating threshold."""
    pos = [c["score"] >= threshold for c in cases if c["label"]]
    neg = [c["score"] < threshold for c in cases if not c["label"]]
    return sum(pos) / len(pos), sum(neg) / len(neg)


def run(out: Path, scenario: str, **kw) -> Feed:
    return Feed(out, simulate(scenario, out, **kw))


@pytest.fixture(scope="module")
def feeds(tmp_path_factory) -> dict[str, Feed]:
    return {name: run(tmp_path_factory.mktemp(name), name, seed=11, days=DAYS, change_day=CHANGE_DAY, start=START)
            for name in SCENARIOS}



def test_scenario_names_and_errors(tmp_path):
    assert SCENARIOS == ("stable", "scanner-upgrade", "mapping-break", "population-shift", "subgroup-decay")
    with pytest.raises(ValueError, match="valid scenarios: stable, scanner-upgrade, mapping-break"):
        simulate("scanner-swap", tmp_path)
    with pytest.raises(ValueError, match="change_day=40, days=30"):
        simulate("mapping-break", tmp_path, days=30, change_day=40)
    assert not list(tmp_path.iterdir())


def test_a_rerun_into_the_same_directory_leaves_nothing_stale(tmp_path):
    simulate("stable", tmp_path / "reused", days=20, volume=0.2)
    small = {"days": 1, "volume": 0.02, "seed": 5}
    simulate("stable", tmp_path / "reused", **small)
    simulate("stable", tmp_path / "fresh", **small)
    assert (tmp_path / "fresh" / "Condition.000.ndjson").read_bytes() == b""  # too few CTAs for a stenosis
    assert sorted(p.name for p in (tmp_path / "reused").iterdir()) == sorted(
        p.name for p in (tmp_path / "fresh").iterdir())
    for p in (tmp_path / "fresh").iterdir():
        assert (tmp_path / "reused" / p.name).read_bytes() == p.read_bytes(), p.name


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    kw = {"days": 8, "volume": 0.3, "change_day": 4}
    a, b, c = (run(tmp_path / d, "scanner-upgrade", seed=s, **kw) for d, s in (("a", 3), ("b", 3), ("c", 4)))
    assert a.raw == b.raw
    assert (tmp_path / "a" / "ground_truth.json").read_bytes() == (tmp_path / "b" / "ground_truth.json").read_bytes()
    for t in ("Patient", "RiskAssessment", "Observation", "Condition"):
        assert a.raw[t] != c.raw[t], t
    assert a.raw["Organization"] == c.raw["Organization"]  # the world itself does not depend on the seed


def test_every_resource_type_validates_as_fhir_r4b(feeds):
    """fhir.resources is slow, so a random sample of each type, plus every line only a scenario writes."""
    rng = random.Random(0)
    lines = []
    for t in TYPES:
        every = feeds["stable"].raw[t].splitlines()
        lines += rng.sample(every, min(40, len(every)))
    lines += [ln for ln in feeds["stable"].raw["Condition"].splitlines() if b'"versionId":"2"' in ln]
    lines += [ln for ln in feeds["mapping-break"].raw["Condition"].splitlines() if b"STEN-2" in ln][:20]
    lines += [ln for ln in feeds["scanner-upgrade"].raw["Device"].splitlines() if b"spectral" in ln]
    lines += [ln for ln in feeds["scanner-upgrade"].raw["RiskAssessment"].splitlines() if b"spectral" in ln][:20]
    assert len(lines) > 6 * 40 + 40
    for line in lines:
        resource = orjson.loads(line)
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    with pytest.raises(ValueError):  # the validator does reject what is not FHIR
        get_fhir_model_class("Patient").model_validate({"resourceType": "Patient", "birthDate": "1950-13"})


def test_world_ids_and_reference_data(feeds):
    feed = feeds["scanner-upgrade"]
    orgs = {r["id"]: r["name"] for r in feed.of("Organization")}
    assert orgs == {"site-a": "Riverside General", "site-b": "Lakeshore Medical Center",
                    "site-c": "Hillcrest University Hospital"}
    devices = {r["id"]: r for r in feed.of("Device")}
    kinds = {i: d["type"]["coding"][0]["code"] for i, d in devices.items()}
    assert kinds == {"cta-stenosis-2.1.0": "ai-model", "aki-risk-1.4.0": "ai-model",
                     "site-a-somatom-force": "acquisition-device", "site-b-revolution-ct": "acquisition-device",
                     "site-c-aquilion-one": "acquisition-device", "site-b-spectral-ct-7500": "acquisition-device"}
    assert devices["cta-stenosis-2.1.0"]["version"][0]["value"] == "2.1.0"
    assert devices["aki-risk-1.4.0"]["deviceName"][0]["name"] == "aki-risk"
    assert "owner" not in devices["aki-risk-1.4.0"]
    philips = devices["site-b-spectral-ct-7500"]
    assert (philips["manufacturer"], philips["modelNumber"], philips["owner"]["reference"]) == (
        "Philips", "Spectral CT 7500", "Organization/site-b")
    assert "site-b-spectral-ct-7500" not in {r["id"] for r in feeds["stable"].of("Device")}


def test_stable_world_meets_its_targets_everywhere(feeds):
    for model, threshold, prevalence, n_per_day in (("cta-stenosis", 0.5, 0.25, 90), ("aki-risk", 0.3, 0.12, 120)):
        cases = feeds["stable"].cases(model)
        assert len(cases) == pytest.approx(n_per_day * DAYS, rel=0.03)
        assert np.mean([c["label"] for c in cases]) == pytest.approx(prevalence, abs=0.02)
        sens, spec = rates(cases, threshold)
        assert sens == pytest.approx(0.85, abs=0.05) and spec == pytest.approx(0.80, abs=0.05), (model, sens, spec)
        assert 0.86 <= _auroc(cases) <= 0.91
        for cell in ("site-a", "site-b", "site-c"):
            sens, spec = rates([c for c in cases if c["site"] == cell], threshold)
            assert abs(sens - 0.85) < 0.07 and abs(spec - 0.80) < 0.07, (model, cell, sens, spec)
        old = [c for c in cases if c["age"] >= 80]
        assert abs(rates(old, threshold)[0] - 0.85) < 0.1


def _auroc(cases: list[dict]) -> float:
    """Mann–Whitney: the chance a random positive outscores a random negative."""
    pos = np.array([c["score"] for c in cases if c["label"]])
    neg = np.sort([c["score"] for c in cases if not c["label"]])
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + ties / 2).sum() / (pos.size * neg.size))


def test_patients_are_deidentified_adults_with_a_realistic_mix(feeds):
    patients = feeds["stable"].of("Patient")
    assert all(set(p) == {"resourceType", "id", "meta", "extension", "gender", "birthDate"} for p in patients)
    assert all(len(p["birthDate"]) == 4 for p in patients)
    ages = np.array([c["age"] for m in ("cta-stenosis", "aki-risk") for c in feeds["stable"].cases(m)])
    assert ages.min() >= 18 and ages.max() <= 95
    assert (ages >= 80).mean() >= 0.12
    races = {p["extension"][0]["extension"][0]["valueCoding"]["code"] for p in patients}
    assert {"2106-3", "2054-5", "2028-9", "UNK"} <= races
    assert {p["gender"] for p in patients} >= {"female", "male"}


def test_no_resource_arrives_before_the_time_it_describes_or_before_what_it_references(feeds):
    described = ("occurrenceDateTime", "onsetDateTime", "recordedDate", "performedDateTime", "effectiveDateTime",
                 "issued")
    for name in ("stable", "scanner-upgrade"):  # timing is the same in every scenario but for the new scanner
        feed = feeds[name]
        arrival = {(r["resourceType"], r["id"]): when(r["meta"]["lastUpdated"])
                   for t in ("Organization", "Device", "Patient", "Encounter") for r in feed.of(t)}
        for t in TYPES:
            resources = feed.of(t)
            stamps = [r["meta"]["lastUpdated"] for r in resources]
            assert stamps == sorted(stamps), f"{name}: {t} not in arrival order"
            for r in resources:
                got = when(r["meta"]["lastUpdated"])
                times = [r[k] for k in described if k in r] + ([r["period"]["start"]] if "period" in r else [])
                assert all(when(s) <= got for s in times), (name, r)
                refs = [r[k]["reference"] for k in ("subject", "encounter", "performer") if k in r]
                refs += [b["reference"] for b in r.get("basis", [])]
                assert all(arrival[tuple(ref.split("/"))] <= got for ref in refs), (name, r)


def test_outcomes_arrive_late_and_some_are_amended(feeds):
    feed = feeds["stable"]
    occurred = {r["subject"]["reference"]: when(r["occurrenceDateTime"]) for r in feed.of("RiskAssessment")}
    conditions = feed.of("Condition")
    onset_days = np.array([(when(c["onsetDateTime"]) - occurred[c["subject"]["reference"]]).days for c in conditions])
    assert onset_days.min() >= 1 and onset_days.max() <= 60 and (onset_days < 30).mean() > 0.85
    lag = np.array([(when(c["meta"]["lastUpdated"]) - when(c["onsetDateTime"])).days for c in conditions
                    if c["meta"]["versionId"] == "1"])
    assert lag.max() <= 14 and lag.mean() > 1
    amended = [c for c in conditions if c["meta"]["versionId"] == "2"]
    first = {c["id"]: c for c in conditions if c["meta"]["versionId"] == "1"}
    assert 0 < len(amended) < 0.03 * len(first)
    for c in amended:
        assert {**c, "meta": None} == {**first[c["id"]], "meta": None}
    # every stenosis had an angiogram; some false positives had one too, with no Condition
    with_condition = {c["subject"]["reference"] for c in conditions}
    angiogram = {p["subject"]["reference"] for p in feed.of("Procedure")}
    assert with_condition < angiogram
    fp = [c for c in feed.cases("cta-stenosis") if not c["label"] and c["score"] >= 0.5]
    assert 0.3 < (len(angiogram) - len(with_condition)) / len(fp) < 0.5


def test_site_c_sends_local_codes_and_si_units(feeds):
    feed = feeds["stable"]
    site_of = {r["subject"]["reference"]: r["serviceProvider"]["reference"] for r in feed.of("Encounter")}
    seen = defaultdict(set)
    for t in ("Condition", "Procedure", "Observation"):
        for r in feed.of(t):
            coding = r["code"]["coding"][0]
            unit = r["valueQuantity"]["code"] if t == "Observation" else None
            seen[site_of[r["subject"]["reference"]]].add((t, coding["system"], coding["code"], unit))
    assert seen["Organization/site-c"] == {
        ("Condition", "https://hillcrest.example.org/fhir/CodeSystem/dx", "CAD-STEN", None),
        ("Procedure", "https://hillcrest.example.org/fhir/CodeSystem/dx", "ICA", None),
        ("Observation", "https://hillcrest.example.org/fhir/CodeSystem/lab", "CREAT", "umol/L")}
    for site in ("Organization/site-a", "Organization/site-b"):
        assert seen[site] == {("Condition", "http://snomed.info/sct", "233970002", None),
                              ("Procedure", "http://snomed.info/sct", "33367005", None),
                              ("Observation", "http://loinc.org", "2160-0", "mg/dL")}
    umol = [o["valueQuantity"]["value"] for o in feed.of("Observation")
            if o["valueQuantity"]["code"] == "umol/L"]
    assert all(isinstance(v, int) for v in umol) and 40 <= np.median(umol) <= 130  # ≈ 0.5–1.5 mg/dL


_DESCRIBED = re.compile(rb'"(?:occurrenceDateTime|onsetDateTime|performedDateTime|effectiveDateTime|start)":"([^"]+)"')
_ARRIVED = re.compile(rb'"lastUpdated":"([^"]+)"')


def test_aki_labels_are_unambiguous_after_rounding_and_unit_conversion(feeds):
    """Creatinine moves by <= 0.2 mg/dL or rises by >= 0.4 mg/dL, so the KDIGO 0.3 mg/dL cut never sits on a value."""
    feed = feeds["stable"]
    occurred = {r["subject"]["reference"]: when(r["occurrenceDateTime"]) for r in feed.of("RiskAssessment")}
    series: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for o in feed.of("Observation"):
        q = o["valueQuantity"]
        series[o["subject"]["reference"]].append(
            (when(o["effectiveDateTime"]), q["value"] / 88.42 if q["code"] == "umol/L" else q["value"]))
    rises = []
    for subject, values in series.items():
        t = occurred[subject]
        (_, baseline), *follow_ups = sorted(values)
        assert len(follow_ups) == 2 and all(t < ts <= t + timedelta(hours=48) for ts, _ in follow_ups)
        assert baseline >= 0.49
        peak = max(v for _, v in follow_ups)
        rises.append((peak - baseline, peak / baseline))
    rises, ratios = np.array(rises).T
    assert not ((rises > 0.215) & (rises < 0.385)).any()
    assert (ratios[rises < 0.3] < 1.45).all()  # nor does the relative (1.5 × baseline) criterion
    assert (rises >= 0.385).mean() == pytest.approx(0.12, abs=0.02)


def _before(feed: Feed) -> dict[str, list[bytes]]:
    """Lines for what happened before the change: the part of the feed a scenario must not touch."""
    change = CHANGE_AT.isoformat().encode()
    patients_by = (CHANGE_AT - timedelta(days=2)).isoformat().encode()  # patients arrive < 1.6 days before use
    out = {}
    for t, raw in feed.raw.items():
        pattern, bound = ((_ARRIVED, patients_by) if t == "Patient" else (_ARRIVED, change) if t in
                          ("Organization", "Device") else (_DESCRIBED, change))
        out[t] = [ln for ln in raw.splitlines() if pattern.search(ln)[1] < bound]
    return out


@pytest.mark.parametrize("scenario", SCENARIOS[1:])
def test_nothing_changes_before_the_change(feeds, scenario):
    stable, drifted = _before(feeds["stable"]), _before(feeds[scenario])
    assert sum(map(len, stable.values())) > 10_000
    assert stable == drifted


def test_scanner_upgrade_lowers_sensitivity_at_site_b_after_the_change_only(feeds):
    cases = feeds["scanner-upgrade"].cases("cta-stenosis")
    own = {"site-a": "site-a-somatom-force", "site-b": "site-b-revolution-ct", "site-c": "site-c-aquilion-one"}
    for c in cases:
        new = c["site"] == "site-b" and c["time"] >= CHANGE_AT
        assert c["scanner"] == ("Device/site-b-spectral-ct-7500" if new else f"Device/{own[c['site']]}")
    for site in ("site-a", "site-b", "site-c"):
        for after in (False, True):
            cell = [c for c in cases if c["site"] == site and (c["time"] >= CHANGE_AT) == after]
            sens, spec = rates(cell, 0.5)
            if site == "site-b" and after:
                assert sens == pytest.approx(0.60, abs=0.08)
            else:
                assert sens > 0.77, (site, after, sens)
            assert abs(spec - 0.80) < 0.07, (site, after, spec)
    assert feeds["scanner-upgrade"].raw["Observation"] == feeds["stable"].raw["Observation"]  # AKI untouched


def test_mapping_break_sends_sten2_only_from_site_a_after_the_change(feeds):
    feed = feeds["mapping-break"]
    site_of = {r["subject"]["reference"]: r["serviceProvider"]["reference"] for r in feed.of("Encounter")}
    occurred = {r["subject"]["reference"]: when(r["occurrenceDateTime"]) for r in feed.of("RiskAssessment")}
    codes = defaultdict(set)
    for r in feed.of("Condition"):
        subject, coding = r["subject"]["reference"], r["code"]["coding"][0]
        after = occurred[subject] >= CHANGE_AT
        codes[(site_of[subject], after)].add(coding["code"])
        if coding["code"] == "STEN-2":
            assert coding["system"] == "https://riverside.example.org/fhir/CodeSystem/dx"
            assert when(r["meta"]["lastUpdated"]) >= CHANGE_AT and when(r["onsetDateTime"]) >= CHANGE_AT
    assert codes[("Organization/site-a", True)] == {"STEN-2"}
    assert codes[("Organization/site-a", False)] == {"233970002"}
    assert all("STEN-2" not in codes[(s, a)] for s in ("Organization/site-b", "Organization/site-c")
               for a in (False, True))
    # the model is unchanged: scores are exactly the stable world's
    assert feed.raw["RiskAssessment"] == feeds["stable"].raw["RiskAssessment"]


def test_population_shift_raises_aki_prevalence_and_age_but_not_the_models_behaviour(feeds):
    stable, shifted = feeds["stable"].cases("aki-risk"), feeds["population-shift"].cases("aki-risk")
    late = CHANGE_AT + timedelta(days=20)

    def window(cases, lo, hi):
        return [c for c in cases if lo <= c["time"] < hi]

    before = window(shifted, datetime(2026, 1, 1), CHANGE_AT)
    ramped = window(shifted, late, datetime(2026, 3, 2))  # 20–30 days after the change: prevalence ≈ 0.16–0.18
    assert np.mean([c["label"] for c in before]) == pytest.approx(0.12, abs=0.02)
    assert np.mean([c["label"] for c in ramped]) == pytest.approx(0.12 + 0.12 * 25 / 60, abs=0.03)
    assert np.mean([c["score"] for c in ramped]) > np.mean([c["score"] for c in before]) + 0.02
    assert np.mean([c["age"] >= 80 for c in ramped]) > np.mean([c["age"] >= 80 for c in before]) + 0.05
    for cell in (before, ramped):
        sens, spec = rates(cell, 0.3)
        assert abs(sens - 0.85) < 0.06 and abs(spec - 0.80) < 0.05
    assert len(shifted) == len(stable)
    cta = [ln for ln in feeds["population-shift"].raw["RiskAssessment"].splitlines() if b"cta-stenosis" in ln]
    assert cta == [ln for ln in feeds["stable"].raw["RiskAssessment"].splitlines() if b"cta-stenosis" in ln]


def test_subgroup_decay_hits_only_patients_aged_80_and_over_after_the_change(feeds):
    cases = feeds["subgroup-decay"].cases("cta-stenosis")
    old_after = [c for c in cases if c["age"] >= 80 and c["time"] >= CHANGE_AT]
    assert rates(old_after, 0.5)[0] == pytest.approx(0.55, abs=0.1)
    assert rates([c for c in cases if c["age"] >= 80 and c["time"] < CHANGE_AT], 0.5)[0] > 0.77
    for low, high in ((18, 50), (50, 65), (65, 80)):
        band = [c for c in cases if low <= c["age"] < high and c["time"] >= CHANGE_AT]
        assert rates(band, 0.5)[0] > 0.76, (low, high)


EXPECTED = {
    "stable": [],
    "scanner-upgrade": [("cta-stenosis", "site-b", "all", "acquisition_device", "C2", ["fnr", "error_rate"])],
    "mapping-break": [("cta-stenosis", "site-a", "all", "data_quality", "C1", ["unmapped_rate", "fpr", "error_rate"])],
    "population-shift": [("aki-risk", "all", "all", "population_shift", "C2", ["score_mean", "error_rate"])],
    "subgroup-decay": [("cta-stenosis", "all", "age_band=80+", "subgroup_performance", "C2", ["fnr"])],
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ground_truth_file_matches_the_injected_changes(feeds, scenario):
    feed = feeds[scenario]
    written = GroundTruth.load(feed.out)
    assert written == feed.truth
    data = orjson.loads((feed.out / "ground_truth.json").read_bytes())
    assert {k: data[k] for k in ("scenario", "seed", "start", "days")} == {
        "scenario": scenario, "seed": 11, "start": "2026-01-01", "days": DAYS}
    got = [(c["model"], c["site"], c["subgroup"], c["cause"], c["expected_category"], c["metrics_affected"])
           for c in data["changes"]]
    assert got == EXPECTED[scenario]
    assert all(c["change_time"] == "2026-01-31T00:00:00Z" and c["description"] for c in data["changes"])
