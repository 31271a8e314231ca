"""Configuration: one YAML file, validated by pydantic; environment variables override (prefix ``VIGIL_``).

Relative paths in the file are resolved against the file's own directory, so ``examples/vigil.yaml`` works from
any working directory.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from alerts.routing import RoutingConfig
from ingest.bulk_export import BulkDirectorySourceConfig, BulkExportSourceConfig
from ingest.kafka_source import KafkaSourceConfig
from ingest.rest_poll import FhirHttpConfig, RestPollSourceConfig
from vigil.store_outage import StoreRetry
from ingest.subscription import SubscriptionConfig
from vigil.ticket_feed import TicketFeedConfig

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_CONFIG = EXAMPLES_DIR / "vigil.yaml"


class CodeRef(BaseModel):
    system: str
    code: str
    display: str | None = None


class OutcomeConfig(BaseModel):
    """A computable outcome definition (versioned; recorded with every case)."""

    id: str
    version: int = 1
    kind: Literal["code_set", "lab_rise"]
    codes: list[CodeRef] = Field(default_factory=list, description="code_set: standard concepts that count")
    analyte: CodeRef | None = Field(None, description="lab_rise: the LOINC code of the analyte")
    unit: str | None = Field(None, description="lab_rise: canonical UCUM unit, e.g. mg/dL")
    absolute_rise: float | None = Field(None, description="lab_rise: rise over baseline that counts (KDIGO 0.3)")
    absolute_rise_within: timedelta = Field(timedelta(hours=48), description="lab_rise: the absolute rise counts only "
                                            "over a reference value measured at most this long before (KDIGO 48 h)")
    relative_rise: float | None = Field(None, description="lab_rise: ratio to baseline that counts (KDIGO 1.5)")
    baseline_lookback: timedelta = Field(timedelta(hours=24), description="lab_rise: how far back a baseline may be")

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"


class ModelConfig(BaseModel):
    id: str
    name: str
    threshold: float = Field(..., ge=0, le=1, description="operating threshold: decision = score >= threshold")
    label_window: timedelta = Field(..., description="outcomes count if they occur within this after the prediction")
    label_grace: timedelta = Field(timedelta(0), description="how long after the window closes late outcomes may arrive")
    outcome: OutcomeConfig
    claims: dict[str, float] = Field(default_factory=dict, description="labeled performance, e.g. sensitivity: 0.85")
    pccp: Path | None = None


class SubgroupConfig(BaseModel):
    attributes: list[str] = ["sex", "age_band", "race", "ethnicity", "scanner"]
    age_bands: list[int] = Field([18, 50, 65, 80], description="lower bounds of the age bands, ascending")
    intersections: list[list[str]] = Field(default_factory=list)
    min_n: int = Field(30, description="cells with fewer baseline events are reported as insufficient data")


class BudgetConfig(BaseModel):
    """Family false-alarm budget across all streams of one device."""

    false_alarms: float = 1.0
    per_days: float = 365.0


class MonitorConfig(BaseModel):
    baseline_days: float = Field(60, description="first days of each stream estimate the in-control baseline")
    metrics: list[str] = ["error_rate", "fnr", "fpr", "outcome_rate", "score_mean", "calibration_oe",
                          "unmapped_rate", "no_followup_rate"]
    budget: BudgetConfig = BudgetConfig()
    odds_ratio: float = Field(2.0, description="Bernoulli CUSUM design: detect the odds of an error multiplied by this")
    ewma_lambda: float = 0.1
    ewma_shift: float = Field(0.5, description="EWMA design shift in sd units of the baseline score")
    max_arl0: float = Field(1e7, description="cap on a stream's ARL0 so thresholds stay finite")
    auto_resolve_after: timedelta | None = Field(
        timedelta(days=30), description="resolve an open alert once its stream has not alarmed for this long (feed "
                                        "time); null keeps alerts open until a person resolves them")


class SourceConfig(BaseModel):
    """Files or directories read once, in arrival order (``vigil ingest``, ``vigil run`` with file sources)."""

    kind: Literal["files"] = "files"
    paths: list[Path] = Field(default_factory=list)


AnySource = Annotated[
    SourceConfig | KafkaSourceConfig | BulkExportSourceConfig | BulkDirectorySourceConfig | RestPollSourceConfig
    | SubscriptionConfig,
    Field(discriminator="kind"),
]


class StagesConfig(BaseModel):
    """The two-stage deployment (``vigil run --stage cases|monitor``, DESIGN.md §The flow): stage 1 consumes the
    configured Kafka source and publishes observations to ``cases_topic``; stage 2 consumes that topic in its own
    consumer group. Same brokers and security as the Kafka source."""

    model_config = ConfigDict(extra="forbid")

    cases_topic: str = Field("vigil.cases", min_length=1, description="stage 1 → stage 2, keyed by model")
    monitor_group_id: str = Field("vigil-monitor", min_length=1, description="stage 2's consumer group")


class TerminologyServerConfig(FhirHttpConfig):
    """Where the licensed terminology server is, and how hard to try. The auth header value is read from the
    environment variable named by ``auth_env`` (e.g. ``VIGIL_TX_TOKEN='Bearer ...'``), never from the config file.
    """

    timeout_s: float = Field(5.0, gt=0, description="connect/read timeout per request")
    max_retries: int = Field(3, ge=0, description="retries on 429, 5xx and connection errors")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles per retry")
    max_backoff_s: float = Field(30.0, ge=0, description="cap on one delay, Retry-After included")
    cache_size: int = Field(10_000, ge=0, description="answers kept (LRU); 0 disables the cache")
    cache_ttl_s: float = Field(86_400.0, gt=0, description="how long an answer is reused, in seconds")
    cooldown_s: float = Field(60.0, ge=0, description="after an outage, fail fast this long before asking again")
    target_systems: list[str] = Field(
        default_factory=list,
        description="fallback: code systems to translate into (targetsystem), asked in order; empty: one request "
        "without targetsystem, and a match in any standard system (SNOMED CT, LOINC) counts",
    )
    conceptmap_url: str | None = Field(None, description="fallback: translate with this ConceptMap only (url)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_", extra="forbid")

    store_url: str = "sqlite:///vigil.db"
    subject_key: str = Field("vigil-demo-key-change-me", description="secret for the keyed hash of subjects")
    deid_policy: Literal["strip", "quarantine"] = "strip"
    sources: list[AnySource] = Field(default_factory=list)
    routing: RoutingConfig = RoutingConfig()
    ticket_feed: TicketFeedConfig | None = Field(
        None, description="publish ticket events to a Kafka topic keyed by device and/or a signed webhook")
    stages: StagesConfig = StagesConfig()
    store_retry: StoreRetry = Field(StoreRetry(), description="how `vigil run` waits out a store outage")
    terminology: TerminologyServerConfig | None = Field(
        None, description="a licensed FHIR terminology server asked for codes no local ConceptMap covers")
    concept_maps: list[Path] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    subgroups: SubgroupConfig = SubgroupConfig()
    monitors: MonitorConfig = MonitorConfig()
    config_path: Path | None = None

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        ids = [m.id for m in models]
        if len(ids) != len(set(ids)):
            raise ValueError(f"model ids must be unique, got {ids}")
        return models

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    def config_hash(self) -> str:
        """Hash of the effective configuration, recorded with every run and report."""
        blob = self.model_dump_json(exclude={"subject_key", "config_path"})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def analysis_hash(self) -> str:
        """Hash of what decides the results (models, outcomes, maps, subgroups, monitors, de-identification), not of
        where data comes from or goes: a pipeline checkpoint stays valid when a broker address or receiver changes."""
        blob = self.model_dump_json(exclude={"subject_key", "config_path", "sources", "routing", "store_url",
                                            "ticket_feed", "stages", "store_retry"})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_settings(path: Path | str | None = None, **overrides) -> Settings:
    """Read the YAML file (default: the embedded example), resolve its relative paths, apply env and overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SystemExit(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SystemExit(f"config file {path} is not valid YAML: {exc}") from None
    base = path.resolve().parent
    raw["concept_maps"] = [str(_resolve(base, p)) for p in raw.get("concept_maps", [])]
    for src in raw.get("sources", []):
        if src.get("kind", "files") == "files":
            src["paths"] = [str(_resolve(base, p)) for p in src.get("paths", [])]
        elif src.get("kind") == "bulk-directory" and src.get("path"):
            src["path"] = str(_resolve(base, src["path"]))
    for m in raw.get("models", []):
        if m.get("pccp"):
            m["pccp"] = str(_resolve(base, m["pccp"]))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw["config_path"] = str(path)
    # pydantic-settings gives init kwargs priority over env; env must win over the file, so drop file keys set in env.
    import os

    for key in list(raw):
        if f"VIGIL_{key.upper()}" in os.environ and key not in overrides:
            raw.pop(key)
    return Settings(**raw)


def _resolve(base: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else (base / p)
