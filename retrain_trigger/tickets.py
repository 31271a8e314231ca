"""Retraining ticket drafts: triage → evidence bundle → PCCP classification, one ticket per root cause.

A ticket carries what FDA would otherwise ask for (reference/pccp.md §9): the identity and regulatory context (A),
the signal evidence (B) and the data lineage vigil knows (C). Sections D–I are filled by the people who act on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from retrain_trigger.classify import Decision, EvidenceBundle, bundle_from, classify, reclassify, with_remedy
from retrain_trigger.pccp import Pccp
from retrain_trigger.triage import CauseHypothesis, TriageContext, triage
from vigil.domain import Alert, PccpCategory


@dataclass(slots=True)
class TicketDraft:
    model: str
    model_version: str
    category: PccpCategory
    safety_overlay: bool
    matched_mod: str | None
    cause: str
    cause_confidence: float
    remedy: str
    rationale: list[tuple[str, str, str]]
    required_actions: list[str]
    alert_ids: list[str]
    scope: dict[str, Any]
    evidence: dict[str, Any]  # JSON-serialisable; evidence["bundle"] re-validates as an EvidenceBundle

    @property
    def key(self) -> str:
        """A stable id: the same alerts grouped under the same cause give the same key on every replay."""
        digest = hashlib.sha256(f"{self.model}|{self.cause}|{','.join(self.alert_ids)}".encode()).hexdigest()
        return f"{self.model}-{digest[:12]}"


def plan_tickets(alerts: Sequence[Alert], ctx: TriageContext, pccp: Pccp, model_version: str) -> list[TicketDraft]:
    """One draft per root cause among the alerts of one model, classified against its PCCP."""
    tickets = []
    for hypothesis, members in triage(alerts, ctx):
        bundle = bundle_from(hypothesis, members, pccp, model_version)
        tickets.append(_draft(hypothesis, members, bundle, classify(bundle, pccp), pccp))
    return tickets


def reclassify_ticket(ticket: TicketDraft, pccp: Pccp, new_remedy: str) -> TicketDraft:
    """The same ticket classified again with the remedy an engineer proposes."""
    bundle = EvidenceBundle.model_validate(ticket.evidence["bundle"])
    decision = reclassify(bundle, pccp, new_remedy)
    return dataclasses.replace(
        ticket,
        remedy=new_remedy,
        evidence={
            **ticket.evidence,
            "bundle": with_remedy(bundle, new_remedy).model_dump(mode="json"),
            "reporting_clocks": decision.reporting_clocks,
        },
        **_decision_fields(decision),
    )


def _decision_fields(decision: Decision) -> dict[str, Any]:
    return {
        "category": decision.category,
        "safety_overlay": decision.safety_overlay,
        "matched_mod": decision.matched_mod,
        "rationale": decision.rationale,
        "required_actions": decision.required_actions,
    }


def _draft(
    hypothesis: CauseHypothesis, alerts: Sequence[Alert], bundle: EvidenceBundle, decision: Decision, pccp: Pccp
) -> TicketDraft:
    start, end = bundle.data_window
    return TicketDraft(
        model=bundle.model,
        model_version=bundle.deployed_model_version,
        cause=hypothesis.cause,
        cause_confidence=hypothesis.confidence,
        remedy=hypothesis.remedy,
        alert_ids=bundle.alert_ids,
        scope=bundle.scope.model_dump(mode="json") | {"subgroups": hypothesis.scope_subgroups},
        evidence={
            "identity": {
                "pccp_id": pccp.pccp_id,
                "pccp_version": pccp.version,
                "authorized_in": pccp.authorized_in,
                "device": pccp.device.model_dump(mode="json"),
                "authorized_baseline_version": pccp.authorized_baseline_version,
                "last_modified_version": pccp.last_modified_version,
                "deployed_version": bundle.deployed_model_version,
            },
            "awareness_date": bundle.awareness_date.isoformat(),
            "reporting_clocks": decision.reporting_clocks,
            "data_window": {"start": start.isoformat(), "end": end.isoformat()},
            "data_lineage": {
                "source_sites": bundle.proposed_remedy.data_sources,
                "monitoring_reference_standard": pccp.monitoring_plan.reference_standard_id,
            },
            "signals": [_signal_evidence(a) for a in sorted(alerts, key=lambda a: a.id)],
            "bundle": bundle.model_dump(mode="json"),
        },
        **_decision_fields(decision),
    )


def _signal_evidence(alert: Alert) -> dict[str, Any]:
    s = alert.signal
    return {
        "alert_id": alert.id,
        "stream": str(s.stream),
        "metric": s.stream.metric,
        "site": s.stream.site,
        "subgroup": s.stream.subgroup,
        "detector": s.detector,
        "detected_at": s.detected_at.isoformat(),
        "change_estimate": s.change_estimate.isoformat(),
        "statistic": s.statistic,
        "threshold": s.threshold,
        "baseline": s.baseline,
        "current": s.current,
        "current_ci": list(s.current_ci),
        "n_baseline": s.n_baseline,
        "n_current": s.n_current,
        "fire_count": alert.fire_count,
        "state": alert.state.value,
    }
