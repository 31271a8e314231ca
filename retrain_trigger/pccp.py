"""The manufacturer's authorized PCCP as machine-readable configuration (reference/pccp.md §8.3, second half).

The engine must never infer a permission that is not in the authorized text (pccp.md §10.1), so every model
forbids unknown keys: a misspelt field is an error, not a silently ignored permission.
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RemedyType = Literal[
    "none",
    "pipeline_fix",
    "recalibration",
    "threshold_change",
    "retrain_same_arch_new_data",
    "retrain_arch_change",
    "new_input_source_same_type",
    "new_input_type",
    "subpopulation_within_IFU",
    "population_outside_IFU",
    "new_output_or_claim",
    "intended_use_change",
    "rollback",
]
REMEDY_TYPES: tuple[str, ...] = RemedyType.__args__  # type: ignore[attr-defined]

Locality = Literal["global", "local"]
Implementation = Literal["automatic", "manual"]
Comparator = Literal["original", "last_modified"]
Severity = Literal["non-serious", "serious", "critical"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Authorization(_Strict):
    type: Literal["510k", "denovo", "pma"]
    number: str


class DeviceIdentity(_Strict):
    id: str = Field(description="the model id vigil monitors (ModelConfig.id)")
    name: str
    udi_di: str
    product_code: str
    authorization: Authorization


class Population(_Strict):
    description: str
    min_age: int | None = None
    max_age: int | None = None


class IndicationsForUse(_Strict):
    population: Population
    conditions: list[str]
    users: list[str]
    settings: list[str]
    compatible_inputs: list[str] = Field(default_factory=list)


class LabeledPerformance(_Strict):
    """Labeled claims (the MDR malfunction test, 21 CFR 803.3). YAML keeps them flat: ``sensitivity: 0.85``."""

    claims: dict[str, float]
    subgroup_claims: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='cell ("age_band=80+") → metric → claimed value'
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_claims(cls, raw: object) -> object:
        if isinstance(raw, dict) and "claims" not in raw:
            raw = dict(raw)
            sub = raw.pop("subgroup_claims", {})
            return {"claims": raw, "subgroup_claims": sub}
        return raw

    def claim(self, metric: str, subgroup: dict[str, str] | None = None) -> float | None:
        """The claim for ``metric`` in a subgroup cell if the labeling states one there, else the overall claim."""
        if subgroup:
            for cell, claims in self.subgroup_claims.items():
                if parse_cell(cell) == subgroup and metric in claims:
                    return claims[metric]
        return self.claims.get(metric)


class SpecBound(_Strict):
    """One input-specification bound: exactly one of equals / one_of / max / min."""

    equals: str | None = None
    one_of: list[str] | None = None
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SpecBound:
        if sum(v is not None for v in (self.equals, self.one_of, self.max, self.min)) != 1:
            raise ValueError("an input spec bound needs exactly one of equals, one_of, max, min")
        return self

    def admits(self, value: str | float) -> bool:
        if self.equals is not None:
            return str(value).casefold() == self.equals.casefold()
        if self.one_of is not None:
            return str(value).casefold() in {v.casefold() for v in self.one_of}
        if self.max is not None:
            return float(value) <= self.max
        return float(value) >= self.min  # type: ignore[operator]

    def __str__(self) -> str:
        if self.equals is not None:
            return f"= {self.equals}"
        if self.one_of is not None:
            return f"∈ {{{', '.join(self.one_of)}}}"
        return f"≤ {self.max:g}" if self.max is not None else f"≥ {self.min:g}"


class Bounds(_Strict):
    threshold_range: tuple[float, float] | None = None
    arch_changes_allowed: list[str] = Field(default_factory=list)
    input_specs: dict[str, SpecBound] = Field(default_factory=dict)
    subpopulations: list[dict[str, str]] = Field(default_factory=list, description="must be inside the IFU")


class DataManagement(_Strict):
    allowed_sources: list[str]
    inclusion_exclusion: str = ""
    min_sites: int = 1
    reference_standard_id: str
    test_set_ids: list[str]
    test_set_max_reuse: int
    representativeness_targets: dict[str, str] = Field(default_factory=dict)


class Retraining(_Strict):
    triggers: list[str] = Field(default_factory=list)
    components_modifiable: list[str]
    overfit_controls: str = ""


class AcceptanceCriterion(_Strict):
    """``margin`` is the NI/equivalence margin, the superiority margin, or (type floor) the floor value itself."""

    metric: str
    type: Literal["superiority", "non_inferiority", "equivalence", "floor"]
    margin: float
    alpha: float = Field(0.025, description="one-sided level; decided by the two-sided (1 − 2α) CI (95 % by default)")
    vs: Comparator


class SubgroupCriterion(_Strict):
    def_: dict[str, str] = Field(alias="def")
    metric: str
    ni_margin: float
    min_n: int


class TradeoffGuard(_Strict):
    improve: str
    protect: str
    ni_margin: float


class PerformanceEvaluation(_Strict):
    compare_to: list[Comparator]
    acceptance: list[AcceptanceCriterion]
    subgroups: list[SubgroupCriterion] = Field(default_factory=list)
    tradeoff_guards: list[TradeoffGuard] = Field(default_factory=list)

    @model_validator(mode="after")
    def _both_comparators(self) -> PerformanceEvaluation:
        missing = {"original", "last_modified"} - set(self.compare_to)
        if missing:
            raise ValueError(
                f"compare_to must list both 'original' and 'last_modified' (S3 §VII.B(3)); missing {sorted(missing)}"
            )
        return self


class UpdateProcedures(_Strict):
    labeling_sections: list[str]
    release_notes: bool = True
    rollback_criteria: dict[str, str | float]
    post_update_monitoring: dict[str, str | float] = Field(default_factory=dict)


class ModificationProtocol(_Strict):
    data_management: DataManagement
    retraining: Retraining
    performance_evaluation: PerformanceEvaluation
    update_procedures: UpdateProcedures


class Modification(_Strict):
    mod_id: str
    type: Literal["performance", "input", "use_subpopulation"]
    description: str
    allowed_remedies: list[RemedyType]
    bounds: Bounds = Bounds()
    locality: list[Locality]
    local_factors: list[str] = Field(default_factory=list)
    implementation: list[Implementation]
    min_days_between_updates: int | None = Field(None, description="the update-frequency limit, in days")
    protocol: ModificationProtocol


class MonitoringPlan(_Strict):
    reference_standard_id: str = Field(description="the reference standard the post-market monitoring labels use")
    clinical_severity_if_missed: Severity
    min_persistence_windows: int = Field(1, description="alarms a signal needs before it counts as confirmed (R1)")
    cause_confidence_min: float = Field(0.5, ge=0, le=1, description="τ of rule R2")


class Pccp(_Strict):
    pccp_id: str
    version: str
    authorized_in: str
    device: DeviceIdentity
    authorized_baseline_version: str
    last_modified_version: str
    last_modified_on: date | None = None
    intended_use: str
    indications_for_use: IndicationsForUse
    labeled_performance: LabeledPerformance
    modifications: list[Modification]
    monitoring_plan: MonitoringPlan
    impact_assessment_ref: str
    cumulative_bounds: dict[str, float] = Field(
        default_factory=dict,
        description="metric → largest change from the authorized baseline the Impact Assessment covers (R8)",
    )
    notification_requirements: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Pccp:
        ids = [m.mod_id for m in self.modifications]
        if len(ids) != len(set(ids)):
            raise ValueError(f"mod_id values must be unique, got {ids}")
        for mod in self.modifications:
            for sub in mod.bounds.subpopulations:
                population = self.indications_for_use.population
                if not inside_ifu(sub, population.min_age, population.max_age):
                    raise ValueError(
                        f"modification {mod.mod_id}: subpopulation {sub} lies outside the indicated population "
                        f"({population.description}); no PCCP can cover it (S3 §VI.C)"
                    )
        return self

    def modification(self, mod_id: str) -> Modification:
        for mod in self.modifications:
            if mod.mod_id == mod_id:
                return mod
        raise KeyError(
            f"PCCP {self.pccp_id} has no modification {mod_id!r}; it has {[m.mod_id for m in self.modifications]}"
        )


class PccpError(ValueError):
    """A PCCP file that cannot be read or does not validate; the message names the file and the fields."""


def load_pccp(path: Path | str) -> Pccp:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PccpError(f"PCCP file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise PccpError(f"PCCP file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PccpError(f"PCCP file {path} must hold a mapping with a top-level 'pccp:' key")
    body = raw.get("pccp", raw)
    try:
        return Pccp.model_validate(body)
    except ValidationError as exc:
        problems = "\n".join(f"  pccp.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise PccpError(
            f"PCCP file {path} does not validate:\n{problems}\nFix these fields (schema: pccp.md §8.3)."
        ) from None


# --- Subgroup cells --------------------------------------------------------------------------

_BAND = re.compile(r"^(?:(\d+)\s*-\s*(\d+)|(\d+)\+|<\s*(\d+))$")


def parse_cell(cell: str) -> dict[str, str]:
    """``"age_band=80+&sex=female"`` → ``{"age_band": "80+", "sex": "female"}``; ``"all"`` → ``{}``."""
    if cell in ("", "all"):
        return {}
    out: dict[str, str] = {}
    for part in cell.split("&"):
        attr, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"subgroup cell {cell!r}: {part!r} is not attribute=value")
        out[attr.strip()] = value.strip()
    return out


def format_cell(subgroup: dict[str, str]) -> str:
    """The inverse of :func:`parse_cell`: ``{}`` → ``"all"``."""
    return "&".join(f"{k}={v}" for k, v in subgroup.items()) or "all"


def age_band_range(band: str) -> tuple[int, int | None]:
    """``"65-79"`` → (65, 79); ``"80+"`` → (80, None); ``"<18"`` → (0, 17)."""
    m = _BAND.match(band.strip())
    if not m:
        raise ValueError(f"age band {band!r} is not of the form 'lo-hi', 'lo+' or '<hi'")
    if m[1]:
        return int(m[1]), int(m[2])
    if m[3]:
        return int(m[3]), None
    return 0, int(m[4]) - 1


def inside_ifu(subgroup: dict[str, str], min_age: int | None, max_age: int | None = None) -> bool:
    """Whether a subgroup cell's age band lies wholly inside the indicated age range (⊂ IFU, S3 §VI.C(iii)).

    Age is the only population bound vigil can check; a cell without an age band is taken as inside.
    """
    band = subgroup.get("age_band")
    if band is None:
        return True
    lo, hi = age_band_range(band)
    if min_age is not None and lo < min_age:
        return False
    return max_age is None or (hi is not None and hi <= max_age)
