"""PCCP classification of a proposed remedy: the ordered rules R0–R9 of reference/pccp.md §8.4 and §8.5.

Two axes, two outputs (§8.1): a change-control category (C0–C5, C2-F) and a safety overlay (U) that neither
overrides. The engine proposes; Regulatory Affairs decides. Every rule evaluated leaves a line in the rationale
(rule, what was found, citation) so a safety officer can answer an inspector.

Acceptance decisions (R6) use the confidence-interval rules for non-inferiority, equivalence (two one-sided
tests) and superiority: Schuirmann, J Pharmacokinet Biopharm 15:657 (1987); Piaggio et al., CONSORT extension for
non-inferiority and equivalence trials, JAMA 308:2594 (2012); FDA, Non-Inferiority Clinical Trials to Establish
Effectiveness (2016). A one-sided test at level α is decided by the two-sided (1 − 2α) interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from retrain_trigger.pccp import (
    REMEDY_TYPES,
    Comparator,
    DeviceIdentity,
    Implementation,
    Locality,
    Modification,
    Pccp,
    RemedyType,
    Severity,
    format_cell,
    inside_ifu,
    parse_cell,
)
from retrain_trigger.triage import DATA_QUALITY_METRICS, CauseHypothesis, is_data_quality, is_score
from vigil.domain import ALL, CLAIM_OF, Alert, PccpCategory

LOWER_IS_BETTER = frozenset({"error_rate", "calibration_oe"} | DATA_QUALITY_METRICS)

IFU_BREAKING = frozenset({"intended_use_change", "new_output_or_claim", "population_outside_IFU"})
MODEL_CHANGING = frozenset(
    {
        "recalibration",
        "threshold_change",
        "retrain_same_arch_new_data",
        "retrain_arch_change",
        "new_input_source_same_type",
        "new_input_type",
        "subpopulation_within_IFU",
    }
)
CYBER_INCIDENT = "open the cybersecurity vulnerability and incident process (S4 §XII)"
SCOPE_LEVEL = {
    "data_quality": "site",
    "acquisition_device": "acquisition_device",
    "population_shift": "global",
    "subgroup_performance": "subgroup",
}


# --- The alert/evidence bundle (pccp.md §8.3, first half: the fields vigil can fill) ------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MetricEvidence(_Model):
    """One monitored metric in claim space: fnr/fpr alerts appear as sensitivity/specificity."""

    name: str
    alert_id: str | None = None
    site: str = ALL
    subgroup: str = ALL
    labeled_claim: float | None = None
    acceptance_floor: float | None = None
    baseline_value: float
    current_value: float
    ci95: tuple[float, float]
    n: int
    higher_is_better: bool = True

    def breaches_claim(self) -> bool:
        """§8.5 item 2: the whole CI is on the wrong side of the labeled claim (or the acceptance floor)."""
        bounds = [b for b in (self.labeled_claim, self.acceptance_floor) if b is not None]
        if self.higher_is_better:
            return any(self.ci95[1] < b for b in bounds)
        return any(self.ci95[0] > b for b in bounds)


class Scope(_Model):
    level: Literal["global", "site", "subgroup", "device_type", "acquisition_device", "user_group"]
    site_ids: list[str]
    subgroup: dict[str, str] = Field(default_factory=dict)
    acquisition: dict[str, str] = Field(default_factory=dict)


class Magnitude(_Model):
    abs_delta: float
    rel_delta: float
    statistic: float
    threshold: float
    persistence_windows: int
    control_chart_rule: str

    @property
    def significant(self) -> bool:
        return self.statistic >= self.threshold


class InputIntegrity(_Model):
    unmapped_rate_delta: float | None = None
    missing_rate_delta: float | None = None
    schema_mismatch: bool = False
    unit_change: bool = False
    pipeline_change_events: list[str] = Field(default_factory=list)
    dicom_tag_anomalies: list[str] = Field(default_factory=list)
    data_quality_alerts: list[str] = Field(default_factory=list)

    def flags(self) -> list[str]:
        return [
            name
            for name, on in (
                ("schema mismatch", self.schema_mismatch),
                ("unit change", self.unit_change),
                (f"pipeline change events {self.pipeline_change_events}", self.pipeline_change_events),
                (f"DICOM tag anomalies {self.dicom_tag_anomalies}", self.dicom_tag_anomalies),
                (f"data-quality alerts {self.data_quality_alerts}", self.data_quality_alerts),
            )
            if on
        ]


class CovariateShift(_Model):
    score_mean_delta: float | None = None
    new_acquisition_devices: list[dict[str, str]] = Field(default_factory=list)


class Security(_Model):
    poisoning_suspected: bool = False
    anomalous_inputs: bool = False


class DriftDiagnostics(_Model):
    input_integrity: InputIntegrity = InputIntegrity()
    covariate_shift: CovariateShift = CovariateShift()
    security: Security = Security()
    cause_hypothesis: str
    cause_confidence: float = Field(ge=0, le=1)
    cause_rationale: list[str] = Field(default_factory=list)


class PopulationContext(_Model):
    patients_outside_ifu_fraction: float | None = None


class HarmSignals(_Model):
    complaints: list[str] = Field(default_factory=list)
    adverse_events: list[str] = Field(default_factory=list)
    deaths: int = 0
    serious_injuries: int = 0
    clinical_severity_if_missed: Severity = "serious"

    def any(self) -> bool:
        return bool(self.complaints or self.adverse_events or self.deaths or self.serious_injuries)


class ArchitectureChange(_Model):
    changed: bool = False
    description: str = ""


class ProposedRemedy(_Model):
    type: RemedyType
    locality: Locality = "global"
    implementation: Implementation = "manual"
    data_sources: list[str] = Field(default_factory=list)
    reference_standard_id: str | None = None
    threshold: float | None = None
    architecture_change: ArchitectureChange = ArchitectureChange()
    input_source: dict[str, str | float] = Field(default_factory=dict)
    subpopulation: dict[str, str] = Field(default_factory=dict)
    labeling_claim_change: bool = False
    cybersecurity_only: bool = False
    restores_cleared_spec: bool = False
    test_sets_sequestered: bool | None = None
    test_set_reuse: dict[str, int] | None = None
    projected_subgroup_n: dict[str, int] | None = Field(None, description='cell ("age_band=80+") → projected n')


class EvidenceBundle(_Model):
    model: str
    alert_ids: list[str]
    device: DeviceIdentity
    deployed_model_version: str
    authorized_baseline_version: str
    last_modified_version: str
    awareness_date: datetime
    data_window: tuple[datetime, datetime]
    metric: MetricEvidence
    supporting: list[MetricEvidence] = Field(default_factory=list)
    scope: Scope
    magnitude: Magnitude
    drift_diagnostics: DriftDiagnostics
    population_context: PopulationContext = PopulationContext()
    harm_signals: HarmSignals = HarmSignals()
    proposed_remedy: ProposedRemedy

    def metrics(self) -> list[MetricEvidence]:
        return [self.metric, *self.supporting]


def _metric_evidence(alert: Alert, pccp: Pccp) -> MetricEvidence:
    s = alert.signal
    k = s.stream
    sub = parse_cell(k.subgroup)
    if k.metric in CLAIM_OF:
        name = CLAIM_OF[k.metric]
        base, cur, ci = 1 - s.baseline, 1 - s.current, (1 - s.current_ci[1], 1 - s.current_ci[0])
    else:
        name, base, cur, ci = k.metric, s.baseline, s.current, s.current_ci
    return MetricEvidence(
        name=name,
        alert_id=alert.id,
        site=k.site,
        subgroup=k.subgroup,
        labeled_claim=pccp.labeled_performance.claim(name, sub),
        baseline_value=base,
        current_value=cur,
        ci95=ci,
        n=s.n_current,
        higher_is_better=k.metric not in LOWER_IS_BETTER,
    )


def bundle_from(hypothesis: CauseHypothesis, alerts: Sequence[Alert], pccp: Pccp, model_version: str) -> EvidenceBundle:
    """Fill an evidence bundle from one triaged root cause and its alerts."""
    if not alerts:
        raise ValueError(f"cause {hypothesis.cause!r} has no alerts; a bundle needs at least one")
    models = sorted({a.signal.stream.model for a in alerts})
    if models != [pccp.device.id]:
        raise ValueError(
            f"alerts {[a.id for a in alerts]} are for model(s) {models}, but PCCP {pccp.pccp_id} is for "
            f"{pccp.device.id!r}; pass the PCCP named in that model's config (models[].pccp)"
        )
    evidence = [_metric_evidence(a, pccp) for a in alerts]
    primary_i = min(
        range(len(alerts)),
        key=lambda i: (
            evidence[i].labeled_claim is None,
            -abs(evidence[i].current_value - evidence[i].baseline_value),
            alerts[i].id,
        ),
    )
    primary, p_alert = evidence[primary_i], alerts[primary_i].signal
    delta = primary.current_value - primary.baseline_value
    cells = [c for c in hypothesis.scope_subgroups if c != ALL]
    subgroup = parse_cell(cells[0]) if len(cells) == 1 and ALL not in hypothesis.scope_subgroups else {}
    acq = [{"manufacturer": c.manufacturer, "model": c.model, "site": c.site} for c in hypothesis.acquisition_changes]
    dq = [a for a in alerts if is_data_quality(a)]
    unmapped = [a.signal.current - a.signal.baseline for a in dq if a.signal.stream.metric == "unmapped_rate"]
    scores = [a.signal.current - a.signal.baseline for a in alerts if is_score(a)]
    return EvidenceBundle(
        model=pccp.device.id,
        alert_ids=sorted(a.id for a in alerts),
        device=pccp.device,
        deployed_model_version=model_version,
        authorized_baseline_version=pccp.authorized_baseline_version,
        last_modified_version=pccp.last_modified_version,
        awareness_date=min(a.signal.detected_at for a in alerts),
        data_window=(min(a.signal.change_estimate for a in alerts), max(a.signal.detected_at for a in alerts)),
        metric=primary,
        supporting=[e for i, e in enumerate(evidence) if i != primary_i],
        scope=Scope(
            level=SCOPE_LEVEL.get(hypothesis.cause, "site"),
            site_ids=hypothesis.scope_sites,
            subgroup=subgroup,
            acquisition={k: v for k, v in acq[0].items() if k != "site"} if acq else {},
        ),
        magnitude=Magnitude(
            abs_delta=delta,
            rel_delta=delta / primary.baseline_value if primary.baseline_value else 0.0,
            statistic=p_alert.statistic,
            threshold=p_alert.threshold,
            persistence_windows=alerts[primary_i].fire_count,
            control_chart_rule=f"{p_alert.detector}: statistic {p_alert.statistic:.3g} ≥ h {p_alert.threshold:.3g}",
        ),
        drift_diagnostics=DriftDiagnostics(
            input_integrity=InputIntegrity(
                unmapped_rate_delta=max(unmapped) if unmapped else None, data_quality_alerts=sorted(a.id for a in dq)
            ),
            covariate_shift=CovariateShift(
                score_mean_delta=max(scores, key=abs) if scores else None, new_acquisition_devices=acq
            ),
            cause_hypothesis=hypothesis.cause,
            cause_confidence=hypothesis.confidence,
            cause_rationale=hypothesis.rationale,
        ),
        harm_signals=HarmSignals(clinical_severity_if_missed=pccp.monitoring_plan.clinical_severity_if_missed),
        proposed_remedy=ProposedRemedy(
            type=hypothesis.remedy,
            data_sources=hypothesis.scope_sites,
            reference_standard_id=pccp.monitoring_plan.reference_standard_id,
            input_source={k: v for k, v in acq[0].items() if k != "site"} if acq else {},
            subpopulation=subgroup,
        ),
    )


# --- The result of running a Modification Protocol (input to R6) ------------------------------------


class Estimate(_Model):
    """Candidate vs one comparator for one metric; ``diff_ci`` is the CI of candidate − comparator."""

    candidate: float
    candidate_ci: tuple[float, float]
    comparator: float
    diff_ci: tuple[float, float]
    ci_level: float = 0.95


class SubgroupResult(_Model):
    def_: dict[str, str] = Field(alias="def")
    metric: str
    n: int
    versus: dict[Comparator, Estimate]


class AcceptanceResult(_Model):
    mod_id: str
    candidate_version: str
    overall: dict[Comparator, dict[str, Estimate]]
    subgroups: list[SubgroupResult] = Field(default_factory=list)
    device_vv_passed: bool
    root_cause_unrelated_to_pccp: bool = False


# --- The decision ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Decision:
    category: PccpCategory
    safety_overlay: bool
    matched_mod: str | None
    rationale: list[tuple[str, str, str]] = field(default_factory=list)  # (rule, what was found, citation)
    required_actions: list[str] = field(default_factory=list)
    reporting_clocks: list[str] = field(default_factory=list)

    def note(self, rule: str, found: str, citation: str) -> None:
        self.rationale.append((rule, found, citation))

    def act(self, *actions: str) -> None:
        self.required_actions.extend(a for a in actions if a not in self.required_actions)


def classify(bundle: EvidenceBundle, pccp: Pccp, acceptance: AcceptanceResult | None = None) -> Decision:
    """Apply R0 (safety overlay), then R1..R9 in order; the first terminal rule sets the category."""
    if bundle.model != pccp.device.id:
        raise ValueError(
            f"bundle for model {bundle.model!r} cannot be classified against PCCP {pccp.pccp_id} "
            f"of device {pccp.device.id!r}"
        )
    d = Decision(PccpCategory.C0, safety_overlay=False, matched_mod=None)
    _r0_safety(d, bundle, pccp)
    if _r1_validity(d, bundle, pccp) or _r2_cause(d, bundle, pccp) or _r3_ifu(d, bundle, pccp):
        return _finish(d, bundle, pccp)
    mod = _r4_match(d, bundle, pccp)
    if mod is None:
        if bundle.proposed_remedy.type != "none":
            _r7_2017(d, bundle)
        return _finish(d, bundle, pccp)
    if _r5_preconditions(d, bundle, mod):
        return _finish(d, bundle, pccp)
    _r6_acceptance(d, pccp, mod, acceptance)
    return _finish(d, bundle, pccp, measured=acceptance is not None)


def with_remedy(bundle: EvidenceBundle, new_remedy: str) -> EvidenceBundle:
    """The same evidence with another proposed remedy type."""
    if new_remedy not in REMEDY_TYPES:
        raise ValueError(f"unknown remedy {new_remedy!r}; choose one of: {', '.join(REMEDY_TYPES)}")
    return bundle.model_copy(update={"proposed_remedy": bundle.proposed_remedy.model_copy(update={"type": new_remedy})})


def reclassify(bundle: EvidenceBundle, pccp: Pccp, new_remedy: str) -> Decision:
    """Classify the same evidence with a remedy an engineer proposes instead of the triaged one."""
    decision = classify(with_remedy(bundle, new_remedy), pccp)
    decision.rationale.insert(
        0,
        (
            "reclassify",
            f"remedy changed from {bundle.proposed_remedy.type} to {new_remedy} by an engineer",
            "pccp.md §8.6",
        ),
    )
    return decision


# --- R0 safety overlay (§8.5) ---------------------------------------------------------------------


def _r0_safety(d: Decision, b: EvidenceBundle, pccp: Pccp) -> None:
    harm, remedy = b.harm_signals, b.proposed_remedy
    serious = harm.clinical_severity_if_missed in ("serious", "critical")
    persistent = b.magnitude.persistence_windows >= pccp.monitoring_plan.min_persistence_windows
    breaches = [m for m in b.metrics() if m.breaches_claim()] if persistent else []
    triggers: list[str] = []
    mdr = False
    if harm.deaths or harm.serious_injuries:
        triggers.append(f"{harm.deaths} death(s), {harm.serious_injuries} serious injury(ies) reported")
        mdr = True
    for m in breaches:
        bound = m.labeled_claim if m.labeled_claim is not None else m.acceptance_floor
        scope = f"site={m.site} {m.subgroup}"
        triggers.append(
            f"{m.name} CI [{m.ci95[0]:.3f}, {m.ci95[1]:.3f}] beyond the labeled claim/floor {bound:.3f} at {scope}: "
            "a malfunction (21 CFR 803.3)" + (" in a subgroup" if m.subgroup != ALL else "")
        )
    if breaches and serious:
        mdr = True
    correction = remedy.type == "rollback" or (bool(breaches) and remedy.type != "none")
    if remedy.type == "rollback":
        triggers.append("the remedy is a rollback: a correction to reduce a risk to health")
    if b.drift_diagnostics.security.poisoning_suspected and (breaches or harm.any()):
        triggers.append("suspected data poisoning with a safety effect")
        d.act(CYBER_INCIDENT)
    if not triggers:
        d.note(
            "R0",
            "no harm signals, no labeled-claim breach in any scope, no field correction: no overlay",
            "pccp.md §8.5; 21 CFR 803.3",
        )
        return
    d.safety_overlay = True
    d.note("R0", "; ".join(triggers) + " → U", "21 CFR 803.50/803.53/806.10; S4 §XI; S3 App. A 4.d")
    d.act(
        "interim risk control: roll back, suspend at the affected sites or notify users per the PCCP rollback criteria",
        "escalate to RA/QA within 24 hours",
        "open a CAPA",
        "recall-versus-enhancement determination (FDA 2014 guidance; 21 CFR Part 7)",
    )
    if breaches and not serious:
        d.act("MDR evaluation: malfunction with non-serious severity; document the reportability decision (803.18)")
    if mdr:
        aware = b.awareness_date
        d.reporting_clocks += [
            f"MDR 30-day (21 CFR 803.50): evaluate and report by {(aware + timedelta(days=30)):%Y-%m-%d} if reportable",
            f"MDR 5-work-day (21 CFR 803.53): by {_work_days(aware, 5):%Y-%m-%d} if remedial action is needed to "
            "prevent an unreasonable risk of substantial harm",
        ]
    if correction:
        d.reporting_clocks.append(
            "corrections and removals (21 CFR 806.10): report within 10 working days of "
            "initiating the correction, unless already reported under 803"
        )
    if breaches and pccp.notification_requirements:
        d.reporting_clocks += [f"PCCP/authorization notification (§515C): {n}" for n in pccp.notification_requirements]


def _work_days(start: datetime, days: int) -> datetime:
    day = np.busday_offset(np.datetime64(start.date()), days, roll="forward")
    return datetime.combine(day.astype(object), start.time(), start.tzinfo)


# --- R1–R3 ------------------------------------------------------------------------------------------


def _r1_validity(d: Decision, b: EvidenceBundle, pccp: Pccp) -> bool:
    m, need = b.magnitude, pccp.monitoring_plan.min_persistence_windows
    confirmed = m.significant and m.persistence_windows >= need
    found = f"{m.control_chart_rule}; persistence {m.persistence_windows} of {need} window(s) required → " + (
        "confirmed" if confirmed else "not confirmed"
    )
    if confirmed or b.harm_signals.any():
        d.note("R1", found + ("" if confirmed else ", but harm signals exist: continue"), "S4 §XI")
        return False
    d.category = PccpCategory.C0
    d.note("R1", found + ", no harm signals → C0", "S4 §XI; IMDRF N88 P10 (risk-based)")
    d.act("keep monitoring; consider increased label sampling at the affected scope")
    return True


def _r2_cause(d: Decision, b: EvidenceBundle, pccp: Pccp) -> bool:
    dd, tau = b.drift_diagnostics, pccp.monitoring_plan.cause_confidence_min
    flags = dd.input_integrity.flags()
    cause = f"cause {dd.cause_hypothesis} (confidence {dd.cause_confidence:.2f}, τ = {tau:.2f})"
    start, end = (f"{t:%Y-%m-%d}" for t in b.data_window)
    if dd.security.poisoning_suspected or dd.cause_hypothesis == "security":
        d.category = PccpCategory.C1
        d.note(
            "R2", f"{cause}; poisoning or evasion suspected → C1 + cybersecurity incident", "S4 §XII; S3 App. A 1.b.8"
        )
        d.act(
            CYBER_INCIDENT,
            f"freeze re-training data from the affected window {start} to {end}",
        )
        return True
    if (dd.cause_hypothesis == "data_quality" and dd.cause_confidence >= tau) or flags:
        d.category = PccpCategory.C1
        found = cause + (f"; input-integrity flags: {', '.join(flags)}" if flags else "")
        d.note(
            "R2",
            found + " → C1 (fix the pipeline, re-measure, do not re-train)",
            "S4 §XI (input data integrity); S3 App. A 1.b; S7 Q2",
        )
        d.act(
            f"fix the pipeline or integration at {', '.join(b.scope.site_ids)} and re-measure",
            f"do not re-train on data from {start} to {end} at the affected sites",
            "if the fix is device software restoring the cleared specification: S7 Q2 → document",
        )
        return True
    if dd.cause_hypothesis == "unknown" or dd.cause_confidence < tau:
        d.category = PccpCategory.C0
        d.note("R2", f"{cause} below τ or unknown → C0, investigation required", "S4 §XI; pccp.md §8.1(2)")
        d.act("investigation required: establish the cause before any model change (do not re-train blindly)")
        return True
    d.note("R2", f"{cause}: not a data-quality or security cause, no input-integrity flag", "S4 §XI")
    return False


def _r3_ifu(d: Decision, b: EvidenceBundle, pccp: Pccp) -> bool:
    r = b.proposed_remedy
    population = pccp.indications_for_use.population
    outside = bool(r.subpopulation) and not inside_ifu(r.subpopulation, population.min_age, population.max_age)
    off_label = (
        outside or r.type == "population_outside_IFU" or bool(b.population_context.patients_outside_ifu_fraction)
    )
    unplanned_claim = r.labeling_claim_change and not any(
        m.type == "use_subpopulation" and r.subpopulation in m.bounds.subpopulations for m in pccp.modifications
    )
    reasons = [
        text
        for text, on in (
            (f"remedy {r.type} changes intended use, indications or claims", r.type in IFU_BREAKING),
            (f"target {r.subpopulation} lies outside the indicated population ({population.description})", outside),
            ("the labeling claim change is not pre-specified in any PCCP modification", unplanned_claim),
        )
        if on
    ]
    if off_label:
        d.act(
            "signal comes from off-label use: reinforce labeling and IFU, consider an input-age guard or other use "
            "restriction, and run the safety evaluation; re-training is not the remedy"
        )
    if not reasons:
        d.note(
            "R3", f"remedy {r.type} stays inside the intended use and indications", "S3 §VI.C; FD&C §515C(a)(2)/(b)(2)"
        )
        return False
    d.category = PccpCategory.C5
    d.note("R3", "; ".join(reasons) + " → C5", "FD&C §515C(a)(2)/(b)(2); S3 §VI.C; S1 §III(iii)")
    return True


# --- R4–R6 ------------------------------------------------------------------------------------------


def _r4_match(d: Decision, b: EvidenceBundle, pccp: Pccp) -> Modification | None:
    r = b.proposed_remedy
    if r.type == "none":
        d.note("R4", "no device change proposed → C0, keep monitoring", "S4 §XI")
        d.act("keep monitoring; no device change proposed")
        return None
    rejected: list[str] = []
    for mod in pccp.modifications:
        misses, unverified = _mod_fit(mod, b, pccp)
        if misses:
            rejected.append(f"{mod.mod_id}: {'; '.join(misses)}")
            continue
        d.matched_mod = mod.mod_id
        extra = f" (not matched: {' | '.join(rejected)})" if rejected else ""
        d.note(
            "R4",
            f"remedy {r.type} matches {mod.mod_id} ({mod.description.strip()}){extra}",
            "S3 §V.D, §VI; PCCP principle 'focused and bounded' (S6)",
        )
        d.act(*unverified)
        return mod
    d.note(
        "R4",
        f"remedy {r.type} matches no modification: {' | '.join(rejected) or 'the PCCP lists none'}",
        "S3 §V.D; pccp.md §8.1(3)",
    )
    return None


def _mod_fit(mod: Modification, b: EvidenceBundle, pccp: Pccp) -> tuple[list[str], list[str]]:
    """Why ``mod`` does not cover the remedy, and what must still be verified if it does."""
    r, bounds = b.proposed_remedy, mod.bounds
    if r.type not in mod.allowed_remedies:
        return [f"allows {', '.join(mod.allowed_remedies)}, not {r.type}"], []
    misses: list[str] = []
    unverified: list[str] = []
    if r.type == "threshold_change" and bounds.threshold_range:
        lo, hi = bounds.threshold_range
        if r.threshold is None:
            unverified.append(f"state the new operating threshold; {mod.mod_id} allows [{lo}, {hi}]")
        elif not lo <= r.threshold <= hi:
            misses.append(f"threshold {r.threshold} outside [{lo}, {hi}]")
    if r.architecture_change.changed and r.architecture_change.description not in bounds.arch_changes_allowed:
        misses.append(f"architecture change {r.architecture_change.description!r} not pre-specified")
    for key, bound in bounds.input_specs.items():
        if key not in r.input_source:
            unverified.append(f"verify the new input source meets {mod.mod_id} input spec {key} {bound}")
        elif not bound.admits(r.input_source[key]):
            misses.append(f"input {key} = {r.input_source[key]} fails spec {bound}")
    if r.subpopulation and bounds.subpopulations and r.subpopulation not in bounds.subpopulations:
        misses.append(f"subpopulation {r.subpopulation} not among {bounds.subpopulations}")
    if r.locality not in mod.locality:
        misses.append(f"locality {r.locality} not in {mod.locality}")
    if r.implementation not in mod.implementation:
        misses.append(f"implementation {r.implementation} not in {mod.implementation}")
    if mod.min_days_between_updates and pccp.last_modified_on:
        since = (b.awareness_date.date() - pccp.last_modified_on).days
        if since < mod.min_days_between_updates:
            misses.append(f"last update {since} days ago, frequency limit {mod.min_days_between_updates} days")
    return misses, unverified


def _r5_preconditions(d: Decision, b: EvidenceBundle, mod: Modification) -> bool:
    r, dm = b.proposed_remedy, mod.protocol.data_management
    gaps: list[str] = []
    foreign = sorted(set(r.data_sources) - set(dm.allowed_sources))
    if foreign:
        gaps.append(f"data sources {foreign} not allowed (allowed: {dm.allowed_sources})")
    if len(set(r.data_sources)) < dm.min_sites:
        gaps.append(f"{len(set(r.data_sources))} site(s) of data, protocol needs {dm.min_sites}")
    if r.reference_standard_id != dm.reference_standard_id:
        gaps.append(f"reference standard {r.reference_standard_id!r} ≠ protocol {dm.reference_standard_id!r}")
    if r.test_sets_sequestered is False:
        gaps.append("test sets not sequestered")
    if r.test_set_reuse is None or r.test_sets_sequestered is None:
        d.act(f"attest sequestration of test sets {dm.test_set_ids} and reuse count < {dm.test_set_max_reuse}")
    else:
        over = {t: n for t, n in r.test_set_reuse.items() if n >= dm.test_set_max_reuse}
        if over:
            gaps.append(f"test sets reused to the limit {dm.test_set_max_reuse}: {over}")
    rows = mod.protocol.performance_evaluation.subgroups
    if r.projected_subgroup_n is None:
        if rows:
            d.act(
                "confirm projected n per protocol subgroup: "
                + ", ".join(f"{format_cell(row.def_)} ≥ {row.min_n}" for row in rows)
            )
    else:
        for row in rows:
            n = next((n for cell, n in r.projected_subgroup_n.items() if parse_cell(cell) == row.def_), 0)
            if n < row.min_n:
                gaps.append(f"subgroup {format_cell(row.def_)} projected n {n} < min_n {row.min_n}")
    if gaps:
        d.category = PccpCategory.C4
        d.note(
            "R5",
            f"{mod.mod_id} protocol cannot be followed: {'; '.join(gaps)} → C4",
            "S3 §V, §V.D; S3 App. B ex. 3 scen. 2",
        )
        d.act(
            "do not implement; RA decides: discuss with the review division or Q-Sub if believed non-significant, "
            "otherwise a new submission"
        )
        return True
    d.note(
        "R5",
        f"{mod.mod_id} preconditions met: sources {sorted(set(r.data_sources))} allowed, "
        f"reference standard {r.reference_standard_id}, {len(set(r.data_sources))} ≥ {dm.min_sites} site(s)",
        "S3 §VII.B(1); App. A 1.a–1.d",
    )
    return False


def _r6_acceptance(d: Decision, pccp: Pccp, mod: Modification, acceptance: AcceptanceResult | None) -> None:
    if acceptance is None:
        d.category = PccpCategory.C2
        d.note(
            "R6",
            f"modification protocol of {mod.mod_id} not yet run: execute it, then classify with its result",
            "S3 §V.D, §VII",
        )
        d.act(
            f"run the {mod.mod_id} modification protocol: data management → re-training → performance evaluation "
            "→ update procedures"
        )
        return
    if acceptance.mod_id != mod.mod_id:
        raise ValueError(
            f"acceptance result is for {acceptance.mod_id}, but the remedy matched {mod.mod_id}; "
            f"run the {mod.mod_id} protocol"
        )
    failures = acceptance_failures(mod, acceptance)
    if failures:
        d.category = PccpCategory.C2F
        d.note(
            "R6",
            f"{acceptance.candidate_version} failed: {'; '.join(failures)} → C2-F (unresolvable failure)",
            "S3 §VII.B(3)",
        )
        d.act("record the failure; do not implement the modification", "root-cause analysis")
        if acceptance.root_cause_unrelated_to_pccp:
            d.act("root cause unrelated to the PCCP (e.g. test harness): re-test permitted")
        else:
            d.act("escalate to C4/C5 and consider rollback or a labeling limitation")
        return
    d.category = PccpCategory.C2
    d.note(
        "R6",
        f"{acceptance.candidate_version} passed every acceptance row vs original and last modified, every "
        "subgroup NI margin, trade-off guards and full-device V&V → C2",
        "S3 §V.C, §V.D, §VII.B(3)-(4)",
    )
    if _r8_cumulative(d, pccp, acceptance):
        return
    up = mod.protocol.update_procedures
    d.act(
        f"update labeling sections: {', '.join(up.labeling_sections)}",
        "new UDI-DI for the new version (21 CFR 830.50)",
        *(["release notes to users"] if up.release_notes else []),
        "QS design-change record (820.30(i) / ISO 13485 §7.3.9)",
        f"arm post-update monitoring {up.post_update_monitoring} and rollback criteria {up.rollback_criteria}",
    )


def acceptance_failures(mod: Modification, result: AcceptanceResult) -> list[str]:
    """Every acceptance row, subgroup row and trade-off guard of the protocol that the result does not pass."""
    pe = mod.protocol.performance_evaluation
    out: list[str] = []
    for row in pe.acceptance:
        est = result.overall.get(row.vs, {}).get(row.metric)
        if est is None:
            out.append(f"{row.metric} vs {row.vs}: not reported")
        elif est.ci_level < 1 - 2 * row.alpha - 1e-9:
            out.append(f"{row.metric} vs {row.vs}: CI level {est.ci_level} below the {1 - 2 * row.alpha:.2f} α needs")
        elif not _passes(row.type, row.margin, est):
            out.append(
                f"{row.metric} vs {row.vs}: {row.type} at margin {row.margin} fails (diff CI "
                f"[{est.diff_ci[0]:.3f}, {est.diff_ci[1]:.3f}], candidate CI "
                f"[{est.candidate_ci[0]:.3f}, {est.candidate_ci[1]:.3f}])"
            )
    for row in pe.subgroups:
        name = f"subgroup {format_cell(row.def_)} {row.metric}"
        res = next((s for s in result.subgroups if s.def_ == row.def_ and s.metric == row.metric), None)
        if res is None:
            out.append(f"{name}: not evaluated")
            continue
        if res.n < row.min_n:
            out.append(f"{name}: n {res.n} < min_n {row.min_n}")
        for comparator in pe.compare_to:
            est = res.versus.get(comparator)
            if est is None:
                out.append(f"{name} vs {comparator}: not reported")
            elif not _passes("non_inferiority", row.ni_margin, est):
                out.append(f"{name} vs {comparator}: diff CI lower {est.diff_ci[0]:.3f} < −{row.ni_margin}")
    for guard in pe.tradeoff_guards:
        for comparator in pe.compare_to:
            est = result.overall.get(comparator, {}).get(guard.protect)
            if est is None:
                out.append(f"trade-off guard {guard.protect} vs {comparator}: not reported")
            elif not _passes("non_inferiority", guard.ni_margin, est):
                out.append(
                    f"trade-off guard: {guard.protect} vs {comparator} lower {est.diff_ci[0]:.3f} "
                    f"< −{guard.ni_margin} while improving {guard.improve}"
                )
    if not result.device_vv_passed:
        out.append("full-device V&V failed")
    return out


def _passes(kind: str, margin: float, est: Estimate) -> bool:
    lo, hi = est.diff_ci
    if kind == "non_inferiority":
        return lo > -margin
    if kind == "superiority":
        return lo > margin
    if kind == "equivalence":
        return -margin < lo and hi < margin
    return est.candidate_ci[0] >= margin  # floor


# --- R7–R9 ------------------------------------------------------------------------------------------


def _r7_2017(d: Decision, b: EvidenceBundle) -> None:
    r = b.proposed_remedy
    if r.cybersecurity_only:
        d.category = PccpCategory.C3
        d.note("R7", "Q1: change made solely to strengthen cybersecurity → C3 (document)", "S7 Q1; 807.81(a)(3)")
    elif r.restores_cleared_spec or r.type == "rollback":
        d.category = PccpCategory.C3
        d.note(
            "R7",
            f"Q2: {r.type} solely returns the device to its most recently cleared specification → C3 (document)",
            "S7 Q2; 21 CFR 806.10",
        )
    elif r.type in MODEL_CHANGING:
        d.category = PccpCategory.C5
        d.note(
            "R7",
            f"Q4: {r.type} changes weights, calibration, threshold or inputs, so it could significantly "
            "affect performance specifications (presumed yes) → C5",
            "S7 Q4, §VI core algorithm; 807.81(a)(3)",
        )
    elif b.harm_signals.any() or d.safety_overlay:
        d.category = PccpCategory.C5
        d.note(
            "R7",
            "intent: the change responds to a safety signal or adverse events → presume C5",
            "S7 §V guiding principles (intent)",
        )
    else:
        d.category = PccpCategory.C3
        d.note(
            "R7",
            f"Q1–Q4 give no submission trigger for {r.type}; Q3a/Q3b need RA confirmation → C3 (document, RA sign-off)",
            "S7 Figure 1",
        )
    if d.category == PccpCategory.C3:
        d.act("letter to file under QS design-change control with RA sign-off")


def _finish(d: Decision, b: EvidenceBundle, pccp: Pccp, measured: bool = False) -> Decision:
    """R8 for a C2/C3 not yet measured (the measured C2 ran R8 inside R6), R9 for a C5, and the PMA report."""
    if d.category == PccpCategory.C3 or (d.category == PccpCategory.C2 and not measured):
        d.note(
            "R8",
            f"cumulative change since {pccp.authorized_baseline_version} is checked against "
            f"{pccp.impact_assessment_ref} once the new version's performance is measured",
            R8_CITE,
        )
        d.act(f"add to the cumulative change log since {pccp.authorized_baseline_version}")
    if d.category == PccpCategory.C5:
        _r9_pathway(d, b, pccp)
    if measured and d.category == PccpCategory.C2 and pccp.device.authorization.type == "pma":
        d.act("include the implemented modification in the PMA periodic report (814.39(b)/814.84)")
    return d


R8_CITE = "S3 §VIII(5); S7 principle 7"


def _r8_cumulative(d: Decision, pccp: Pccp, acceptance: AcceptanceResult) -> bool:
    """Whether the measured change from the authorized baseline leaves the Impact Assessment's bounds."""
    original = acceptance.overall.get("original", {})
    beyond = [
        f"{metric} moved {original[metric].candidate - original[metric].comparator:+.3f} (bound ±{bound})"
        for metric, bound in sorted(pccp.cumulative_bounds.items())
        if metric in original and abs(original[metric].candidate - original[metric].comparator) > bound
    ]
    if beyond:
        d.category = PccpCategory.C5
        d.note(
            "R8",
            f"cumulative change since {pccp.authorized_baseline_version} beyond {pccp.impact_assessment_ref}: "
            f"{'; '.join(beyond)} → escalate to RA (C5)",
            R8_CITE,
        )
        return True
    d.note(
        "R8",
        f"cumulative change since {pccp.authorized_baseline_version} within {pccp.impact_assessment_ref} "
        f"bounds {pccp.cumulative_bounds}",
        R8_CITE,
    )
    return False


def _r9_pathway(d: Decision, b: EvidenceBundle, pccp: Pccp) -> None:
    kind = pccp.device.authorization.type
    new_use = b.proposed_remedy.type in IFU_BREAKING
    hint = {
        "510k": "new Traditional 510(k) (Special 510(k) if only the PCCP changes, with well-established methods)",
        "denovo": "De Novo-granted device, treated as 510(k) for later changes: new Traditional 510(k)",
        "pma": "PMA supplement (180-day, panel-track or real-time by scope)",
    }[kind]
    if new_use and kind != "pma":
        hint += "; a new intended use that is not substantially equivalent needs a De Novo or PMA"
    d.note("R9", f"{kind} device → {hint}", "807.81(a)(3); 814.39(a); S3 §V.E–F")
    d.act(
        f"submission: {hint}; optionally with a new or modified PCCP",
        "summarise the modifications already implemented under the PCCP (S3 §V.F)",
        "do not implement under the PCCP",
    )
