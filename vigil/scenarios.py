"""The simulated world and the drifts `vigil simulate` can inject into it.

The ids here (sites, model Devices, local code systems) are the ones `examples/` and the ConceptMaps refer to, so a
simulated feed runs through the demo configuration unchanged. A scenario is data, not code: the simulator reads its
effects and applies them from the change time on, and its ground truth is what the pipeline should find.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import orjson

from vigil.domain import ALL, Coding

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DEVICE_KIND = "https://vigil.dev/fhir/CodeSystem/device-kind"
MODEL_SYSTEM = "https://vigil.dev/fhir/CodeSystem/model"
HILLCREST_DX = "https://hillcrest.example.org/fhir/CodeSystem/dx"
HILLCREST_LAB = "https://hillcrest.example.org/fhir/CodeSystem/lab"
RIVERSIDE_DX = "https://riverside.example.org/fhir/CodeSystem/dx"

CREATININE_UMOL_PER_MG_DL = 88.42
"""1 mg/dL creatinine = 88.42 µmol/L (molar mass 113.12 g/mol)."""


@dataclass(frozen=True, slots=True)
class Scanner:
    """A CT scanner: a Device of kind acquisition-device owned by a site."""

    device_id: str
    manufacturer: str
    model: str


@dataclass(frozen=True, slots=True)
class Site:
    """A hospital (an Organization) and the codes and units its EMR sends."""

    id: str
    name: str
    scanner: Scanner
    stenosis: Coding
    angiography: Coding
    creatinine: Coding
    creatinine_unit: str  # UCUM code: mg/dL, or umol/L at sites that report SI units


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A deployed AI device and the population it sees in the stable world."""

    id: str
    version: str
    threshold: float
    per_site_day: float  # mean predictions per site per day at volume 1.0
    prevalence: float
    age_weights: tuple[float, ...]  # over AGE_BANDS
    male_share: float
    outcome: Coding  # what RiskAssessment.prediction[0].outcome names
    encounter_class: str  # v3-ActCode of the prediction's Encounter
    hours: tuple[float, float]  # time of day (UTC hours) predictions are made in
    encounter_lead: tuple[float, float]  # hours between the Encounter's start and the prediction
    sensitivity: float = 0.85
    specificity: float = 0.80

    @property
    def device_id(self) -> str:
        return f"{self.id}-{self.version}"


AGE_BANDS: tuple[tuple[int, int], ...] = ((18, 49), (50, 64), (65, 79), (80, 89), (90, 95))
"""Inclusive age ranges patients are drawn from; the last two together are the 80+ band."""

STENOSIS = Coding(SNOMED, "233970002", "Coronary artery stenosis")
ANGIOGRAPHY = Coding(SNOMED, "33367005", "Coronary angiography")
CREATININE = Coding(LOINC, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma")

SITES: tuple[Site, ...] = (
    Site("site-a", "Riverside General", Scanner("site-a-somatom-force", "Siemens", "SOMATOM Force"),
         STENOSIS, ANGIOGRAPHY, CREATININE, "mg/dL"),
    Site("site-b", "Lakeshore Medical Center", Scanner("site-b-revolution-ct", "GE", "Revolution CT"),
         STENOSIS, ANGIOGRAPHY, CREATININE, "mg/dL"),
    Site("site-c", "Hillcrest University Hospital", Scanner("site-c-aquilion-one", "Canon", "Aquilion ONE"),
         Coding(HILLCREST_DX, "CAD-STEN", "Coronary stenosis"),
         Coding(HILLCREST_DX, "ICA", "Invasive coronary angiography"),
         Coding(HILLCREST_LAB, "CREAT", "Creatinine"), "umol/L"),
)

CTA = ModelSpec(
    id="cta-stenosis", version="2.1.0", threshold=0.5, per_site_day=30, prevalence=0.25,
    age_weights=(0.18, 0.35, 0.33, 0.12, 0.02), male_share=0.56, outcome=STENOSIS, encounter_class="AMB",
    hours=(7.0, 20.0), encounter_lead=(0.2, 2.0),
)
AKI = ModelSpec(
    id="aki-risk", version="1.4.0", threshold=0.3, per_site_day=40, prevalence=0.12,
    age_weights=(0.20, 0.27, 0.35, 0.15, 0.03), male_share=0.50,
    outcome=Coding(SNOMED, "14669001", "Acute renal failure syndrome"), encounter_class="IMP", hours=(0.0, 24.0),
    encounter_lead=(12.0, 36.0),
)
MODELS: tuple[ModelSpec, ...] = (CTA, AKI)


# --- effects -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScannerSwap:
    """From the change on, `site` acquires every CTA on `scanner`, where the model finds fewer stenoses."""

    site: str
    scanner: Scanner
    sensitivity: float


@dataclass(frozen=True, slots=True)
class Recode:
    """`site` sends the stenosis Condition under a code no ConceptMap knows, for every CT done from the change on.

    Keyed to the CT's time (not the Condition's arrival) so that the cases the monitors see, which are indexed by
    prediction time, change exactly at the change time; every recoded Condition also arrives after it."""

    site: str
    stenosis: Coding


@dataclass(frozen=True, slots=True)
class PopulationDrift:
    """For `model` at every site, prevalence and age mix move linearly to new values over `ramp_days`."""

    model: str
    prevalence: float
    age_weights: tuple[float, ...]
    ramp_days: float


@dataclass(frozen=True, slots=True)
class SubgroupDecay:
    """For `model` at every site, sensitivity in patients aged `min_age`+ falls to `sensitivity`."""

    model: str
    min_age: int
    sensitivity: float


@dataclass(frozen=True, slots=True)
class ChangeSpec:
    """What the pipeline should find, where, and how the PCCP should classify it."""

    model: str
    site: str
    subgroup: str
    cause: str
    expected_category: str
    metrics_affected: tuple[str, ...]
    description: str


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    changes: tuple[ChangeSpec, ...] = ()
    swap: ScannerSwap | None = None
    recode: Recode | None = None
    drift: PopulationDrift | None = None
    decay: SubgroupDecay | None = None


PHILIPS = Scanner("site-b-spectral-ct-7500", "Philips", "Spectral CT 7500")

SCENARIO_LIST: tuple[Scenario, ...] = (
    Scenario("stable"),
    Scenario(
        "scanner-upgrade",
        changes=(ChangeSpec(
            CTA.id, "site-b", ALL, "acquisition_device", "C2", ("fnr", "error_rate"),
            "site-b replaced its GE Revolution CT with a Philips Spectral CT 7500; on it the CTA model's "
            "sensitivity falls from 0.85 to about 0.60 (stenoses score lower)."),),
        swap=ScannerSwap("site-b", PHILIPS, sensitivity=0.60),
    ),
    Scenario(
        "mapping-break",
        changes=(ChangeSpec(
            CTA.id, "site-a", ALL, "data_quality", "C1", ("unmapped_rate", "fpr", "error_rate"),
            f"site-a started sending the stenosis Condition as {RIVERSIDE_DX}|STEN-2, which no ConceptMap maps; "
            "confirmed stenoses look like negatives. The model is unchanged."),),
        recode=Recode("site-a", Coding(RIVERSIDE_DX, "STEN-2", "Coronary artery stenosis")),
    ),
    Scenario(
        "population-shift",
        changes=(ChangeSpec(
            AKI.id, ALL, ALL, "population_shift", "C2", ("score_mean", "error_rate"),
            "AKI prevalence rises linearly from 12 % to 24 % over 60 days at every site and the age mix shifts "
            "older; scores given the outcome are unchanged, so the model under-predicts risk."),),
        drift=PopulationDrift(AKI.id, prevalence=0.24, age_weights=(0.10, 0.20, 0.38, 0.27, 0.05), ramp_days=60),
    ),
    Scenario(
        "subgroup-decay",
        changes=(ChangeSpec(
            CTA.id, ALL, "age_band=80+", "subgroup_performance", "C2", ("fnr",),
            "At every site the CTA model's sensitivity in patients aged 80+ falls from 0.85 to about 0.55."),),
        decay=SubgroupDecay(CTA.id, min_age=80, sensitivity=0.55),
    ),
)
BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIO_LIST}


def scenario(name: str) -> Scenario:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; valid scenarios: {', '.join(BY_NAME)}") from None


# --- ground truth ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """An injected change as it happened in one simulated feed."""

    spec: ChangeSpec
    change_time: datetime

    def to_dict(self) -> dict:
        s = self.spec
        return {
            "model": s.model, "site": s.site, "subgroup": s.subgroup,
            "change_time": self.change_time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cause": s.cause, "expected_category": s.expected_category,
            "metrics_affected": list(s.metrics_affected), "description": s.description,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Change:
        spec = ChangeSpec(d["model"], d["site"], d["subgroup"], d["cause"], d["expected_category"],
                          tuple(d["metrics_affected"]), d["description"])
        return cls(spec, datetime.fromisoformat(d["change_time"]))


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """What a simulated feed contains: the changes a perfect pipeline would report (none for `stable`)."""

    scenario: str
    seed: int
    start: date
    days: int
    changes: tuple[Change, ...]

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "seed": self.seed, "start": self.start.isoformat(), "days": self.days,
                "changes": [c.to_dict() for c in self.changes]}

    @classmethod
    def from_dict(cls, d: dict) -> GroundTruth:
        return cls(d["scenario"], d["seed"], date.fromisoformat(d["start"]), d["days"],
                   tuple(Change.from_dict(c) for c in d["changes"]))

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        """Read `ground_truth.json` (or the directory holding it)."""
        path = path / "ground_truth.json" if path.is_dir() else path
        try:
            return cls.from_dict(orjson.loads(path.read_bytes()))
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a vigil ground-truth file ({exc}); regenerate it with "
                             "`vigil simulate`") from None
