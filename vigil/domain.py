"""The few types every step speaks (DESIGN.md §Domain).

Hot-path records are slotted dataclasses; pydantic lives at the edges (config, API).
Every package imports from here and from the steps before it, never from the steps after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

ALL = "all"
"""The value that stands for "every site" or "every subgroup" in a stream key."""

CLAIM_OF = {"fnr": "sensitivity", "fpr": "specificity"}
"""Monitored error rates and the labeled performance claims they are the complement of."""


@dataclass(slots=True, frozen=True)
class Coding:
    system: str
    code: str
    display: str | None = None


@dataclass(slots=True, frozen=True)
class Position:
    """Where an input came from, so an error or dead letter can name it."""

    source: str  # file path, topic, URL
    line: int | None = None  # 1-based line in an NDJSON file, or Kafka offset
    partition: int | None = None

    def __str__(self) -> str:
        if self.partition is not None:
            return f"{self.source}[{self.partition}]@{self.line}"
        return f"{self.source}:{self.line}" if self.line is not None else self.source


# --- Decoded FHIR facts (ingest → ontology) ---------------------------------------------


@dataclass(slots=True)
class SubjectInfo:
    """A de-identified Patient: only what subgroups need."""

    subject: str  # keyed hash of the Patient reference, never the raw id
    birth_year: int | None
    sex: str | None  # administrative gender: female | male | other | unknown
    race: str | None  # OMB category code (urn:oid:2.16.840.1.113883.6.238), e.g. 2106-3
    ethnicity: str | None  # 2135-2 | 2186-5


@dataclass(slots=True)
class SiteInfo:
    site: str  # Organization id
    name: str | None


@dataclass(slots=True)
class DeviceInfo:
    """A Device: either an AI model version (kind="model") or an acquisition device (kind="scanner")."""

    device_id: str
    kind: str  # "model" | "scanner" | "other"
    manufacturer: str | None
    model: str | None  # modelNumber, or the model id for an AI device
    version: str | None  # software version for an AI device
    site: str | None  # owner Organization id


@dataclass(slots=True)
class EncounterInfo:
    encounter: str
    subject: str
    site: str | None  # serviceProvider Organization id
    start: datetime | None


@dataclass(slots=True)
class Prediction:
    """One model output (a FHIR RiskAssessment). Site, device and subgroups are resolved by ontology."""

    resource_id: str
    version_id: str
    status: str  # final | amended | entered-in-error | ...
    model_id: str
    model_version: str
    subject: str
    encounter: str | None
    time: datetime
    score: float
    model_device: str | None = None  # Device id of the AI model (RiskAssessment.performer); gives the version
    scanner_device: str | None = None  # Device id of the acquisition device (RiskAssessment.basis)
    site: str | None = None
    received: datetime | None = None  # meta.lastUpdated: when the feed delivered it
    attributes: dict[str, str] = field(default_factory=dict)  # subgroup attributes, filled by ontology
    cells: list[str] = field(default_factory=list)  # the stream cells of those attributes ("all", "sex=female", …)


@dataclass(slots=True, frozen=True)
class FeedClock:
    """The feed's clock on one partition: everything sent before it was last updated at or before ``time``.

    Sent by the feed's producer to every partition (a FHIR ``Parameters`` with a ``vigil-feed-clock`` instant,
    ``vigil.keyed_feed.feed_clock``), it moves a partition's watermark when its own patients are quiet — label windows
    close, stage 2 hears progress — the heartbeat of stream processing (a "punctuation", Tucker et al. 2003)."""

    time: datetime
    resource_type: str = "Parameters"
    resource_id: str = "vigil-feed-clock"
    version_id: str = ""

    @property
    def received(self) -> datetime:
        return self.time


@dataclass(slots=True)
class Fact:
    """A clinical fact that may be an outcome: Condition, Procedure or Observation, still in local codes."""

    resource_type: str
    resource_id: str
    version_id: str
    status: str
    subject: str
    encounter: str | None
    codings: tuple[Coding, ...]
    time: datetime  # clinically relevant time (onset / performed / effective)
    value: float | None = None
    unit: str | None = None  # UCUM code as sent
    received: datetime | None = None
    site: str | None = None


@dataclass(slots=True)
class OutcomeFact:
    """A Fact after ontology: a standard concept (SNOMED/LOINC), value in the canonical unit."""

    fact: Fact
    concept: Coding | None  # None when the local code is unmapped
    value: float | None  # converted to the concept's canonical unit
    unit: str | None
    mapped: bool


# --- Cases, streams, alerts, tickets ---------------------------------------------------


class Label(str, Enum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    CENSORED = "censored"


@dataclass(slots=True)
class Case:
    """A prediction joined to its outcome label inside the model's label window."""

    prediction: Prediction
    label: Label | None  # None: the label was withdrawn (its outcome retracted) and the case waits again
    decision: bool  # score >= the operating threshold
    labeled_at: datetime  # feed time at which the label became known (watermark)
    outcome_definition: str  # id@version of the outcome definition that produced the label
    evidence: tuple[str, ...] = ()  # resource ids of the outcome facts used


@dataclass(slots=True, frozen=True)
class StreamKey:
    """One monitored series: (model, version, metric, site, subgroup cell); "all" is a value."""

    model: str
    version: str
    metric: str
    site: str = ALL
    subgroup: str = ALL  # "all" or "attribute=value" (intersections: "a=x&b=y")

    def __str__(self) -> str:
        return f"{self.model}@{self.version}/{self.metric}/site={self.site}/{self.subgroup}"


class AlertState(str, Enum):
    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    SILENCED = "silenced"


@dataclass(slots=True)
class Signal:
    """What a detector says when it alarms on a stream; monitors produce it, alerts consume it."""

    stream: StreamKey
    detector: str
    detected_at: datetime
    change_estimate: datetime
    statistic: float
    threshold: float
    baseline: float
    current: float
    current_ci: tuple[float, float]
    n_baseline: int
    n_current: int


class PccpCategory(str, Enum):
    """reference/pccp.md §8.2."""

    C0 = "C0"  # NO_CHANGE_MONITOR
    C1 = "C1"  # NO_MODEL_CHANGE_DATA_QUALITY
    C2 = "C2"  # WITHIN_PCCP_IMPLEMENT_PER_PROTOCOL
    C2F = "C2-F"  # WITHIN_PCCP_FAILED_ACCEPTANCE
    C3 = "C3"  # OUTSIDE_PCCP_DOCUMENT_ONLY
    C4 = "C4"  # PCCP_DEVIATION_RISK
    C5 = "C5"  # OUTSIDE_PCCP_NEW_SUBMISSION

    @property
    def title(self) -> str:
        return _CATEGORY_TITLES[self]


_CATEGORY_TITLES = {
    PccpCategory.C0: "NO_CHANGE_MONITOR",
    PccpCategory.C1: "NO_MODEL_CHANGE_DATA_QUALITY",
    PccpCategory.C2: "WITHIN_PCCP_IMPLEMENT_PER_PROTOCOL",
    PccpCategory.C2F: "WITHIN_PCCP_FAILED_ACCEPTANCE",
    PccpCategory.C3: "OUTSIDE_PCCP_DOCUMENT_ONLY",
    PccpCategory.C4: "PCCP_DEVIATION_RISK",
    PccpCategory.C5: "OUTSIDE_PCCP_NEW_SUBMISSION",
}


@dataclass(slots=True)
class DeadLetter:
    """A rejected input: where it came from and why. ``payload`` only once it is free of identifiers."""

    position: Position
    reason: str
    resource_type: str | None = None
    resource_id: str | None = None
    payload: str | None = None


@dataclass(slots=True)
class Alert:
    """A detector signal with a lifecycle; one open alert per identity (stream + detector)."""

    id: str
    signal: Signal
    state: AlertState = AlertState.FIRING
    severity: str = "warning"  # warning | critical
    fire_count: int = 1
    last_fired_at: datetime | None = None
    resolved_at: datetime | None = None  # set when the pipeline resolves it (stream back in control)
