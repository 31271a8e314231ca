"""A synthetic multi-site FHIR R4 feed with known drifts, for the demo, the tests and the benchmarks.

Writes the bulk-export layout `OUT/<ResourceType>.000.ndjson` (docs/feed.md; each file in arrival order) and
`OUT/ground_truth.json`. Deterministic by seed, and every scenario draws the same random numbers as `stable`
(common random numbers), so for one seed all scenarios share the same feed up to the change and differ only by
what the scenario injects after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from pathlib import Path

import numpy as np
import orjson
from scipy.special import expit, logit, ndtri

from vigil.domain import Coding
from vigil.scenarios import (
    AGE_BANDS, CREATININE_UMOL_PER_MG_DL, CTA, DEVICE_KIND, MODEL_SYSTEM, MODELS, SCENARIO_LIST, SITES, UCUM,
    Change, GroundTruth, ModelSpec, Scanner, Scenario, Site, scenario as find_scenario,
)

SCENARIOS: tuple[str, ...] = tuple(s.name for s in SCENARIO_LIST)
RESOURCE_TYPES = ("Organization", "Device", "Patient", "Encounter", "RiskAssessment", "Condition", "Procedure",
                  "Observation")

MINUTE, HOUR, DAY = 60, 3600, 86_400
SCORE_SD = (1.5, 0.75)
"""Spread of logit(score) among negatives and positives; their ratio sets the ROC curve's shape (AUROC ≈ 0.89)."""
FP_ANGIOGRAM_SHARE = 0.40  # CTA false positives referred to invasive angiography
AMENDED_SHARE = 0.01  # outcome Conditions re-sent as version 2 with the same content

_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_OMB = "urn:oid:2.16.840.1.113883.6.238"
_NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
_US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition/"
_AIAST = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST",
          "display": "artificial intelligence asserted"}
_LAB = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]
_ACTIVE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}
_CONFIRMED = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                          "code": "confirmed"}]}

_RACES = ((_OMB, "2106-3", "White", 0.66), (_OMB, "2054-5", "Black or African American", 0.15),
          (_OMB, "2028-9", "Asian", 0.07), (_OMB, "1002-5", "American Indian or Alaska Native", 0.01),
          (_OMB, "2076-8", "Native Hawaiian or Other Pacific Islander", 0.01), (_NULL_FLAVOR, "UNK", "Unknown", 0.10))
_ETHNICITIES = ((_OMB, "2135-2", "Hispanic or Latino", 0.17), (_OMB, "2186-5", "Not Hispanic or Latino", 0.78),
                (_NULL_FLAVOR, "UNK", "Unknown", 0.05))
_UNKNOWN_GENDER_SHARE = 0.003


def simulate(scenario: str, out: Path, seed: int = 7, days: int = 180, start: date = date(2026, 1, 1),
             change_day: int = 100, volume: float = 1.0) -> GroundTruth:
    """Write the feed for `scenario` into `out` and return (and write) its ground truth.

    Predictions are made over `days` days from `start`; their outcomes are followed up past that (angiography up to
    60 days later, arriving up to 14 days after), so every prediction can be labelled. The change happens at
    midnight UTC of `start + change_day`; `volume` scales the number of predictions.
    """
    spec = find_scenario(scenario)
    if seed < 0 or days < 1 or volume <= 0:
        raise ValueError(f"need seed >= 0, days >= 1 and volume > 0; got seed={seed}, days={days}, volume={volume}")
    if spec.changes and not 0 < change_day < days:
        raise ValueError(f"scenario {scenario!r} needs 0 < change_day < days so there is a before and an after; "
                         f"got change_day={change_day}, days={days}")
    t0 = int(datetime.combine(start, time(), timezone.utc).timestamp())
    change = t0 + change_day * DAY
    feed = _Feed()
    _reference_data(feed, spec, t0 - 30 * DAY, change)
    for m, model in enumerate(MODELS):
        for s, site in enumerate(SITES):
            rng = np.random.default_rng([seed, m, s])
            cohort = _draw_predictions(rng, model, site, spec, t0, change, days, volume)
            _emit_predictions(feed, cohort)
            if model is CTA:
                _emit_angiography(feed, rng, cohort, spec, change)
            else:
                _emit_creatinine(feed, rng, cohort)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    feed.write(out)
    when = datetime.fromtimestamp(change, timezone.utc)
    truth = GroundTruth(scenario, seed, start, days, tuple(Change(c, when) for c in spec.changes))
    (out / "ground_truth.json").write_bytes(orjson.dumps(truth.to_dict(), option=orjson.OPT_INDENT_2))
    return truth


class _Feed:
    """Resources by type, each kept with its arrival time so the files come out in arrival order."""

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        # every type gets a file, even an empty one, so a rerun into the same directory leaves nothing stale
        self._lines: dict[str, list[tuple[str, str, bytes]]] = {t: [] for t in RESOURCE_TYPES}

    def add(self, resource: dict) -> None:
        key = (resource["meta"]["lastUpdated"], resource["id"])
        self._lines[resource["resourceType"]].append((*key, orjson.dumps(resource)))

    def write(self, out: Path) -> None:
        for rtype, lines in self._lines.items():
            lines.sort(key=lambda line: line[:2])
            (out / f"{rtype}.000.ndjson").write_bytes(b"".join(line[2] + b"\n" for line in lines))


def _meta(when: str, version: str = "1") -> dict:
    return {"versionId": version, "lastUpdated": when}


def _ref(rtype: str, rid: str) -> dict:
    return {"reference": f"{rtype}/{rid}"}


def _coding(c: Coding) -> dict:
    return {"system": c.system, "code": c.code, "display": c.display}


def _iso(seconds: np.ndarray) -> list[str]:
    """Epoch seconds → FHIR instants (`2026-01-01T08:00:00Z`), vectorised."""
    return np.char.add(np.datetime_as_string(seconds.astype("datetime64[s]")), "Z").tolist()


def _ids(rng: np.random.Generator, n: int) -> list[str]:
    """Opaque resource ids (128 random bits as hex), as EMRs export them."""
    raw = rng.bytes(16 * n).hex()
    return [raw[i:i + 32] for i in range(0, 32 * n, 32)]


def _pick(u: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """Category index for each uniform draw in `u`."""
    cum = np.cumsum(weights) / sum(weights)
    return np.searchsorted(cum[:-1], u, side="right")


# --- reference data -----------------------------------------------------------------------------------------


def _reference_data(feed: _Feed, spec: Scenario, when: int, change: int) -> None:
    """Sites and Devices, delivered before anything uses them (a swapped-in scanner arrives at the change)."""
    stamp, arrives_at_change = _iso(np.array([when, change]))
    for site in SITES:
        feed.add({"resourceType": "Organization", "id": site.id, "meta": _meta(stamp), "active": True,
                  "name": site.name})
        feed.add(_scanner_device(site.scanner, site.id, stamp))
    for model in MODELS:
        feed.add({"resourceType": "Device", "id": model.device_id, "meta": _meta(stamp), "status": "active",
                  "type": _device_kind("ai-model"), "manufacturer": "Vigil Demo AI",
                  "deviceName": [{"name": model.id, "type": "model-name"}],
                  "version": [{"type": {"text": "software-version"}, "value": model.version}]})
    if spec.swap:
        feed.add(_scanner_device(spec.swap.scanner, spec.swap.site, arrives_at_change))


def _device_kind(code: str) -> dict:
    return {"coding": [{"system": DEVICE_KIND, "code": code}]}


def _scanner_device(scanner: Scanner, site: str, stamp: str) -> dict:
    return {"resourceType": "Device", "id": scanner.device_id, "meta": _meta(stamp), "status": "active",
            "type": _device_kind("acquisition-device"), "manufacturer": scanner.manufacturer,
            "deviceName": [{"name": scanner.model, "type": "model-name"}], "modelNumber": scanner.model,
            "owner": _ref("Organization", site)}


# --- predictions --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Cohort:
    """One model's predictions at one site: one new patient and encounter each."""

    model: ModelSpec
    site: Site
    occurrence: np.ndarray  # epoch seconds
    encounter_start: np.ndarray
    arrival: np.ndarray  # RiskAssessment meta.lastUpdated
    age: np.ndarray  # whole years at prediction time = prediction year - birth year
    positive: np.ndarray  # the true outcome
    score: np.ndarray
    scanner: list[Scanner] | None
    gender: list[str]
    race: list[int]  # index into _RACES
    ethnicity: list[int]  # index into _ETHNICITIES
    ids: tuple[list[str], list[str], list[str]]  # patient, encounter, RiskAssessment


def _draw_predictions(rng: np.random.Generator, model: ModelSpec, site: Site, spec: Scenario, t0: int,
                      change: int, days: int, volume: float) -> _Cohort:
    per_day = rng.poisson(model.per_site_day * volume, days)
    day = np.repeat(np.arange(days), per_day)
    n = day.size
    occurrence = t0 + day * DAY + (rng.uniform(*model.hours, n) * HOUR).astype(np.int64)
    u_age, u_age_within, u_gender, u_race, u_ethnicity, u_positive = rng.random((6, n))
    z = rng.standard_normal(n)
    encounter_start = occurrence - (rng.uniform(*model.encounter_lead, n) * HOUR).astype(np.int64)
    arrival = occurrence + (rng.uniform(1, 30, n) * MINUTE).astype(np.int64)
    ids = (_ids(rng, n), _ids(rng, n), _ids(rng, n))

    after = occurrence >= change
    drift = spec.drift if spec.drift and spec.drift.model == model.id else None
    ramp = np.clip((occurrence - change) / (drift.ramp_days * DAY), 0, 1) if drift else np.zeros(n)
    cum_before = np.cumsum(model.age_weights)[:-1]
    cum_after = np.cumsum(drift.age_weights)[:-1] if drift else cum_before
    band = (u_age[:, None] >= cum_before + ramp[:, None] * (cum_after - cum_before)).sum(axis=1)
    low, high = (np.array(b) for b in zip(*AGE_BANDS))
    age = low[band] + (u_age_within * (high[band] - low[band] + 1)).astype(np.int64)
    prevalence = model.prevalence + ramp * ((drift.prevalence if drift else model.prevalence) - model.prevalence)
    positive = u_positive < prevalence

    sensitivity = np.full(n, model.sensitivity)
    scanner = None
    if model is CTA:
        scanner = [site.scanner] * n
        if spec.swap and spec.swap.site == site.id:
            scanner = [spec.swap.scanner if a else site.scanner for a in after.tolist()]
            sensitivity[after] = spec.swap.sensitivity
    if spec.decay and spec.decay.model == model.id:
        sensitivity[after & (age >= spec.decay.min_age)] = spec.decay.sensitivity
    score = _binormal_scores(positive, z, sensitivity, model.specificity, model.threshold)

    gender = np.where(u_gender < model.male_share, "male",
                      np.where(u_gender > 1 - _UNKNOWN_GENDER_SHARE, "unknown", "female")).tolist()
    race = _pick(u_race, tuple(r[3] for r in _RACES)).tolist()
    ethnicity = _pick(u_ethnicity, tuple(e[3] for e in _ETHNICITIES)).tolist()
    return _Cohort(model, site, occurrence, encounter_start, arrival, age, positive, score, scanner, gender, race,
                   ethnicity, ids)


def _binormal_scores(positive: np.ndarray, z: np.ndarray, sensitivity: np.ndarray, specificity: float,
                     threshold: float) -> np.ndarray:
    """Scores from the binormal ROC model (Dorfman & Alf 1969; Metz 1978, Semin Nucl Med 8:283).

    logit(score) ~ N(mu_y, sd_y²), with mu_y placed so that P(score >= threshold | positive) = sensitivity and
    P(score < threshold | negative) = specificity. The AUROC is Φ((sd₁·Φ⁻¹(sens) + sd₀·Φ⁻¹(spec)) / √(sd₀² + sd₁²)):
    0.89 at 0.85/0.80 with SCORE_SD. Lowering a positive's sensitivity moves only its own mean, so decay shows up as
    false negatives alone.
    """
    sd_negative, sd_positive = SCORE_SD
    cut = logit(threshold)
    sd = np.where(positive, sd_positive, sd_negative)
    mean = np.where(positive, cut + sd_positive * ndtri(sensitivity), cut - sd_negative * ndtri(specificity))
    return np.round(expit(mean + sd * z), 4)


def _emit_predictions(feed: _Feed, c: _Cohort) -> None:
    """Patient and Encounter (delivered before use), then the RiskAssessment minutes after it was made."""
    model, site = c.model, c.site
    patient_ids, encounter_ids, ra_ids = c.ids
    years = (c.occurrence.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970 - c.age).tolist()
    starts, occurred, arrived = _iso(c.encounter_start), _iso(c.occurrence), _iso(c.arrival)
    patient_arrival = _iso(c.encounter_start - 15 * MINUTE)
    races = [_omb_extension("us-core-race", r) for r in _RACES]
    ethnicities = [_omb_extension("us-core-ethnicity", e) for e in _ETHNICITIES]
    site_ref, performer = _ref("Organization", site.id), _ref("Device", model.device_id)
    method = {"coding": [{"system": MODEL_SYSTEM, "code": model.id}]}
    outcome = {"coding": [_coding(model.outcome)]}
    encounter_class = {"system": _ACT_CODE, "code": model.encounter_class}
    scores = c.score.tolist()
    for i, (pid, eid, rid) in enumerate(zip(patient_ids, encounter_ids, ra_ids)):
        feed.add({"resourceType": "Patient", "id": pid, "meta": _meta(patient_arrival[i]),
                  "extension": [races[c.race[i]], ethnicities[c.ethnicity[i]]],
                  "gender": c.gender[i], "birthDate": str(years[i])})
        feed.add({"resourceType": "Encounter", "id": eid, "meta": _meta(starts[i]), "status": "in-progress",
                  "class": encounter_class, "subject": _ref("Patient", pid), "period": {"start": starts[i]},
                  "serviceProvider": site_ref})
        assessment = {"resourceType": "RiskAssessment", "id": rid,
                      "meta": {**_meta(arrived[i]), "security": [_AIAST]}, "status": "final", "method": method,
                      "subject": _ref("Patient", pid), "encounter": _ref("Encounter", eid),
                      "occurrenceDateTime": occurred[i], "performer": performer,
                      "prediction": [{"outcome": outcome, "probabilityDecimal": scores[i]}]}
        if c.scanner is not None:
            assessment["basis"] = [_ref("Device", c.scanner[i].device_id)]
        feed.add(assessment)


def _omb_extension(name: str, category: tuple[str, str, str, float]) -> dict:
    system, code, display, _ = category
    return {"url": _US_CORE + name, "extension": [
        {"url": "ombCategory", "valueCoding": {"system": system, "code": code, "display": display}},
        {"url": "text", "valueString": display}]}


# --- outcomes -----------------------------------------------------------------------------------------------


def _emit_angiography(feed: _Feed, rng: np.random.Generator, c: _Cohort, spec: Scenario, change: int) -> None:
    """Invasive angiography 1–60 days after the CT (most within 30) for every stenosis and for some false
    positives; a stenosis Condition for every true positive. Each arrives 0–14 days after it happened."""
    n = c.occurrence.size
    performed = c.occurrence + (np.clip(1 + rng.exponential(10, n), 1, 60) * DAY).astype(np.int64)
    procedure_arrival = performed + (np.minimum(rng.exponential(3, n), 14) * DAY).astype(np.int64)
    condition_arrival = performed + (np.minimum(rng.exponential(4, n), 14) * DAY).astype(np.int64)
    encounter_start = performed - (rng.uniform(30, 180, n) * MINUTE).astype(np.int64)
    u_referred, u_amended = rng.random((2, n))
    amendment_arrival = condition_arrival + (rng.uniform(1, 10, n) * DAY).astype(np.int64)
    encounter_ids, procedure_ids, condition_ids = _ids(rng, n), _ids(rng, n), _ids(rng, n)

    referred = c.positive | ((c.score >= c.model.threshold) & (u_referred < FP_ANGIOGRAM_SHARE))
    recoded = (c.occurrence >= change) if spec.recode and spec.recode.site == c.site.id else np.zeros(n, bool)
    stenosis = {"coding": [_coding(c.site.stenosis)]}
    broken = {"coding": [_coding(spec.recode.stenosis)]} if spec.recode else stenosis
    angiography = {"coding": [_coding(c.site.angiography)]}
    site_ref = _ref("Organization", c.site.id)
    patient_ids = c.ids[0]
    when, starts = _iso(performed), _iso(encounter_start)
    p_arr, c_arr, a_arr = _iso(procedure_arrival), _iso(condition_arrival), _iso(amendment_arrival)
    for i in np.flatnonzero(referred).tolist():
        subject, encounter = _ref("Patient", patient_ids[i]), _ref("Encounter", encounter_ids[i])
        feed.add({"resourceType": "Encounter", "id": encounter_ids[i], "meta": _meta(starts[i]),
                  "status": "in-progress", "class": {"system": _ACT_CODE, "code": "AMB"}, "subject": subject,
                  "period": {"start": starts[i]}, "serviceProvider": site_ref})
        feed.add({"resourceType": "Procedure", "id": procedure_ids[i], "meta": _meta(p_arr[i]),
                  "status": "completed", "code": angiography, "subject": subject, "encounter": encounter,
                  "performedDateTime": when[i]})
        if not c.positive[i]:
            continue
        condition = {"resourceType": "Condition", "id": condition_ids[i], "meta": _meta(c_arr[i]),
                     "clinicalStatus": _ACTIVE, "verificationStatus": _CONFIRMED,
                     "code": broken if recoded[i] else stenosis, "subject": subject, "encounter": encounter,
                     "onsetDateTime": when[i], "recordedDate": c_arr[i]}
        feed.add(condition)
        if u_amended[i] < AMENDED_SHARE:
            feed.add({**condition, "meta": _meta(a_arr[i], version="2")})


NEGATIVE_WOBBLE = 0.12  # mg/dL: twice this plus rounding stays below KDIGO's 0.3 mg/dL


def _emit_creatinine(feed: _Feed, rng: np.random.Generator, c: _Cohort) -> None:
    """Serum creatinine: a baseline 1–6 h before the prediction and follow-ups at ~23 h and ~38 h, so a positive's
    peak is never more than 48 h after its baseline (KDIGO's window for the absolute rise).

    Positives rise by at least 0.4 mg/dL within 48 h and negatives move by at most 0.12 mg/dL from a baseline of at
    least 0.5 mg/dL — so no two of a negative's values differ by 0.3 mg/dL either (KDIGO's absolute rise counts
    against any earlier value within 48 h, not only the baseline) — and the KDIGO 2012 AKI criterion (rise >= 0.3
    mg/dL within 48 h, or >= 1.5 × baseline) gives the intended label even after the site's rounding (0.01 mg/dL,
    or 1 µmol/L ≈ 0.011 mg/dL) and unit conversion.
    """
    n = c.occurrence.size
    effective = np.stack([
        c.occurrence - (rng.uniform(1, 6, n) * HOUR).astype(np.int64),
        c.occurrence + (rng.uniform(20, 26, n) * HOUR).astype(np.int64),
        c.occurrence + (rng.uniform(36, 41, n) * HOUR).astype(np.int64),
    ])
    arrival = effective + (rng.uniform(20, 360, (3, n)) * MINUTE).astype(np.int64)
    baseline = np.clip(rng.lognormal(np.log(0.95), 0.3, n), 0.5, 3.5)
    wobble = rng.uniform(-NEGATIVE_WOBBLE, NEGATIVE_WOBBLE, (2, n))
    peak = 0.4 + np.minimum(rng.exponential(0.6, n), 2.6)
    early_share = rng.uniform(0.3, 1.0, n)
    ids = [_ids(rng, n) for _ in range(3)]

    rise = np.where(c.positive, np.stack([peak * early_share, peak]), wobble)
    mg_dl = np.vstack([baseline, baseline + rise])
    if c.site.creatinine_unit == "umol/L":
        values, unit = np.round(mg_dl * CREATININE_UMOL_PER_MG_DL).astype(np.int64).tolist(), ("µmol/L", "umol/L")
    else:
        values, unit = np.round(mg_dl, 2).tolist(), ("mg/dL", "mg/dL")
    code = {"coding": [_coding(c.site.creatinine)]}
    patient_ids, encounter_ids = c.ids[0], c.ids[1]
    for k in range(3):
        when, arrived = _iso(effective[k]), _iso(arrival[k])
        for i, oid in enumerate(ids[k]):
            feed.add({"resourceType": "Observation", "id": oid, "meta": _meta(arrived[i]), "status": "final",
                      "category": _LAB, "code": code, "subject": _ref("Patient", patient_ids[i]),
                      "encounter": _ref("Encounter", encounter_ids[i]), "effectiveDateTime": when[i],
                      "issued": arrived[i],
                      "valueQuantity": {"value": values[k][i], "unit": unit[0], "system": UCUM, "code": unit[1]}})
