"""What people do to a stored retraining ticket: start, record acceptance, close, reclassify, attach a manifest.

Used by the CLI (``vigil tickets ...``) and the REST API. Each action changes the ``TicketRow`` and appends an audit
record (``vigil.audit.record``) in the caller's transaction, so the change and its record land or vanish together
(pccp.md §9 A: "classification output ... RA/QA sign-offs and dates"). The rules live in
``retrain_trigger.lifecycle``; this module only loads, applies and records.

Consumers hook in with ``subscribe(listener)``, like ``vigil.alert_actions.subscribe``: each listener is called with
the session and a ``TicketEvent`` inside the same transaction (``vigil.ticket_feed`` queues the retraining request
for Kafka and the webhook there), so the message is stored exactly when the change is. The pipeline announces a
newly opened ticket with ``opened``. ``context`` (e.g. the API caller's role) is added to the audit payload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from retrain_trigger import lifecycle
from retrain_trigger.lifecycle import OPEN, TicketLifecycleError, check_reclassifiable, deployable
from retrain_trigger.pccp import Pccp, load_pccp
from retrain_trigger.tickets import TicketDraft, reclassify_ticket
from vigil import audit
from vigil.domain import PccpCategory
from vigil.listeners import Listeners
from vigil.settings import Settings
from vigil.store import TicketRow, utcnow

__all__ = [
    "TicketLifecycleError",
    "TicketEvent",
    "TicketNotFound",
    "attach_manifest",
    "close",
    "get",
    "opened",
    "pccp_for",
    "reclassify",
    "record_acceptance",
    "start",
    "subscribe",
]


class TicketNotFound(LookupError):
    """No ticket with this id in the store."""


@dataclass(slots=True, frozen=True)
class TicketEvent:
    """What happened to a ticket, for listeners: ``event`` is opened, started, acceptance_recorded, closed,
    reclassified or manifest (the audit action without its ``ticket.`` prefix)."""

    ticket: TicketRow
    event: str
    by: str
    at: datetime


TicketListener = Callable[[Session, TicketEvent], None]
_listeners: Listeners[TicketEvent] = Listeners()


def subscribe(listener: TicketListener) -> Callable[[], None]:
    """Call ``listener(session, event)`` after every ticket change, inside the caller's transaction; an exception
    in it rolls the change back. Returns a function that unsubscribes it."""
    return _listeners.subscribe(listener)


def _emit(session: Session, row: TicketRow, event: str, who: str) -> None:
    session.flush()
    _listeners.emit(session, TicketEvent(row, event, who, utcnow()))


def opened(session: Session, row: TicketRow, who: str) -> None:
    """Announce a ticket the pipeline has just stored (and audit-logged as ``ticket.opened``) to the listeners."""
    _emit(session, row, "opened", who)


def get(session: Session, ticket_id: str, *, for_update: bool = False) -> TicketRow:
    """The ticket; ``for_update`` locks its row until the transaction ends (PostgreSQL ``SELECT ... FOR UPDATE``;
    SQLite's write lock is already held from BEGIN), so two people acting at once queue and the second sees the
    first's result instead of overwriting it."""
    row = session.get(TicketRow, ticket_id, with_for_update=for_update or None, populate_existing=for_update)
    if row is None:
        raise TicketNotFound(f"no ticket {ticket_id} in the store (list them with `vigil tickets list`)")
    return row


def pccp_for(settings: Settings, ticket: TicketRow) -> Pccp:
    """The PCCP the configuration names for the ticket's model (``models[].pccp``)."""
    model = settings.model(ticket.model)
    if model is None or model.pccp is None:
        where = settings.config_path or "the configuration"
        raise TicketLifecycleError(
            f"ticket {ticket.id} is for model {ticket.model!r}, but {where} names no PCCP for it; "
            "add `pccp: FILE` to that model under `models:`"
        )
    return load_pccp(model.pccp)


def start(session: Session, ticket_id: str, who: str, *, context: Mapping[str, Any] | None = None) -> TicketRow:
    """open → in_progress: an engineer takes the ticket."""
    row = get(session, ticket_id, for_update=True)
    previous, row.status = row.status, lifecycle.start(row)
    audit.record(session, who, "ticket.started", "ticket", row.id,
                 {"from": previous, "to": row.status, **(context or {})})
    _emit(session, row, "started", who)
    return row


def record_acceptance(
    session: Session,
    settings: Settings,
    ticket_id: str,
    who: str,
    *,
    passed: bool,
    results: Mapping[str, Any],
    evidence_ref: str,
    context: Mapping[str, Any] | None = None,
) -> TicketRow:
    """in_progress → acceptance_recorded; pass → C2, fail → C2-F (R6, S3 §VII.B(3))."""
    row = get(session, ticket_id, for_update=True)
    pccp = pccp_for(settings, row)
    _same_pccp(row, pccp)
    outcome = lifecycle.record_acceptance(
        row, pccp, passed=passed, results=results, evidence_ref=evidence_ref, by=who, at=utcnow()
    )
    previous = {"status": row.status, "category": row.category}
    row.status, row.category, row.acceptance = outcome.status, outcome.category.value, outcome.record
    row.rationale = [*row.rationale, list(outcome.rationale)]
    row.required_actions = [*row.required_actions, *(a for a in outcome.required_actions
                                                     if a not in row.required_actions)]
    audit.record(
        session, who, "ticket.acceptance_recorded", "ticket", row.id,
        {"from": previous, "to": {"status": row.status, "category": row.category},
         "acceptance": {k: v for k, v in outcome.record.items() if k != "previous"}, "deployable": deployable(row),
         **(context or {})},
    )
    _emit(session, row, "acceptance_recorded", who)
    return row


def close(session: Session, ticket_id: str, who: str, comment: str, *,
          context: Mapping[str, Any] | None = None) -> TicketRow:
    """Any open state → closed, with the comment kept on the ticket and in the audit log."""
    row = get(session, ticket_id, for_update=True)
    previous, row.status = row.status, lifecycle.close(row, comment)
    row.evidence = {**row.evidence, "closure": {"by": who, "at": utcnow().isoformat(), "comment": comment,
                                                "deployable": deployable(row)}}
    audit.record(session, who, "ticket.closed", "ticket", row.id,
                 {"from": previous, "comment": comment, "category": row.category, "deployable": deployable(row),
                  **(context or {})})
    _emit(session, row, "closed", who)
    return row


def reclassify(session: Session, settings: Settings, ticket_id: str, who: str, new_remedy: str, *,
               context: Mapping[str, Any] | None = None) -> TicketRow:
    """Re-run the classifier on the ticket's stored evidence with the remedy an engineer proposes.

    The new category, rule trace and actions replace the old ones on the ticket; the audit record keeps both
    decisions. The ticket returns to ``open``: a new remedy is a new plan (its acceptance, if any, stays as history).
    """
    row = get(session, ticket_id, for_update=True)
    check_reclassifiable(row)
    if "bundle" not in (row.evidence or {}):
        raise TicketLifecycleError(
            f"ticket {row.id} stores no evidence bundle (evidence.bundle), so it cannot be classified again"
        )
    pccp = pccp_for(settings, row)
    before = _decision(row)
    try:
        new = reclassify_ticket(_draft(row), pccp, new_remedy)
    except ValueError as exc:  # unknown remedy, or a PCCP for another device
        raise TicketLifecycleError(f"ticket {row.id}: {exc}") from None
    previous_status = row.status
    row.remedy = new.remedy
    row.category = new.category.value
    row.safety_overlay = new.safety_overlay
    row.matched_mod = new.matched_mod
    row.rationale = [list(r) for r in new.rationale]
    row.required_actions = list(new.required_actions)
    row.evidence = {
        **new.evidence,
        "identity": {**new.evidence.get("identity", {}), "pccp_id": pccp.pccp_id, "pccp_version": pccp.version},
    }
    row.status = OPEN
    audit.record(
        session, who, "ticket.reclassified", "ticket", row.id,
        {"from": before, "to": _decision(row), "status": {"from": previous_status, "to": row.status},
         "pccp": {"id": pccp.pccp_id, "version": pccp.version}, **(context or {})},
    )
    _emit(session, row, "reclassified", who)
    return row


def attach_manifest(session: Session, ticket_id: str, who: str, manifest: Mapping[str, Any], *,
                    context: Mapping[str, Any] | None = None) -> TicketRow:
    """Record a dataset manifest's content hash on the ticket (pccp.md §9 C: dataset ids with content hashes)."""
    row = get(session, ticket_id, for_update=True)
    if manifest.get("ticket_id") != row.id:
        raise TicketLifecycleError(f"manifest is for ticket {manifest.get('ticket_id')}, not {row.id}")
    summary = {
        "sha256": manifest["content_hash"]["sha256"],
        "case_count": manifest["case_count"],
        "data_window": manifest["data_window"],
        "sites": manifest["sites"],
        "created_at": manifest["created_at"],
    }
    lineage = dict(row.evidence.get("data_lineage", {}))
    lineage["manifests"] = [*lineage.get("manifests", []), summary]
    row.evidence = {**row.evidence, "data_lineage": lineage}
    audit.record(session, who, "ticket.manifest", "ticket", row.id, {**summary, **(context or {})})
    _emit(session, row, "manifest", who)
    return row


def _same_pccp(row: TicketRow, pccp: Pccp) -> None:
    """Acceptance criteria come from the PCCP the ticket was classified against; a newer PCCP needs reclassifying."""
    identity = (row.evidence or {}).get("identity", {})
    stored = (identity.get("pccp_id"), identity.get("pccp_version"))
    if stored != (None, None) and stored != (pccp.pccp_id, pccp.version):
        raise TicketLifecycleError(
            f"ticket {row.id} was classified against PCCP {stored[0]} version {stored[1]}, but the configuration "
            f"now names {pccp.pccp_id} version {pccp.version}: reclassify the ticket first "
            f"(`vigil tickets reclassify {row.id} --remedy {row.remedy} --by ...`)"
        )


def _decision(row: TicketRow) -> dict[str, Any]:
    return {
        "remedy": row.remedy,
        "category": row.category,
        "safety_overlay": row.safety_overlay,
        "matched_mod": row.matched_mod,
        "rationale": [list(r) for r in row.rationale],
    }


def _draft(row: TicketRow) -> TicketDraft:
    """The stored ticket as the draft ``reclassify_ticket`` works on."""
    evidence = row.evidence or {}
    return TicketDraft(
        model=row.model,
        model_version=row.model_version,
        category=PccpCategory(row.category),
        safety_overlay=row.safety_overlay,
        matched_mod=row.matched_mod,
        cause=row.cause,
        cause_confidence=row.cause_confidence,
        remedy=row.remedy,
        rationale=[tuple(r) for r in row.rationale],
        required_actions=list(row.required_actions),
        alert_ids=[a.id for a in row.alerts],
        scope=evidence.get("bundle", {}).get("scope", {}),
        evidence=evidence,
    )
