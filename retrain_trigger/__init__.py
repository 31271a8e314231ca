"""vigil: retrain_trigger step — cause triage, PCCP classification (pccp.md §8) and retraining ticket drafts (§9)."""

from retrain_trigger.classify import (
    AcceptanceResult,
    Decision,
    Estimate,
    EvidenceBundle,
    SubgroupResult,
    acceptance_failures,
    bundle_from,
    classify,
    reclassify,
    with_remedy,
)
from retrain_trigger.pccp import REMEDY_TYPES, Pccp, PccpError, load_pccp
from retrain_trigger.tickets import TicketDraft, plan_tickets, reclassify_ticket
from retrain_trigger.triage import AcquisitionChange, CauseHypothesis, TriageContext, triage

__all__ = [
    "REMEDY_TYPES",
    "AcceptanceResult",
    "AcquisitionChange",
    "CauseHypothesis",
    "Decision",
    "Estimate",
    "EvidenceBundle",
    "Pccp",
    "PccpError",
    "SubgroupResult",
    "TicketDraft",
    "TriageContext",
    "acceptance_failures",
    "bundle_from",
    "classify",
    "load_pccp",
    "plan_tickets",
    "reclassify",
    "reclassify_ticket",
    "triage",
    "with_remedy",
]
