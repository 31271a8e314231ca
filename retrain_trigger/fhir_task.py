"""A retraining ticket as a FHIR R4 ``Task``, so an EMR, a QMS or a work-queue can take it up.

Task (https://hl7.org/fhir/R4/task.html) is FHIR's resource for "an activity that can be performed and tracked". The
ticket's PCCP category and remedy are the Task's ``code``/``description``; the classifier's rule trace with its
guidance citations is in ``note`` (pccp.md §9 A "rule trace with citations"); the AI model is the ``focus`` (Device by
model@version identifier) and the authorized device the ``for`` (Device by GS1 UDI-DI); evidence (alerts, data window,
evidence hash, dataset manifest hash, reporting clocks) is in ``input``; a recorded acceptance result is in ``output``.

Validated with ``fhir.resources.R4B`` (R4B's Task is R4's, field for field). fhir.resources does not enforce the
required code bindings, so ``validate_task`` checks status, intent and priority against the R4 value sets itself.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.task import Task
from pydantic import ValidationError

from retrain_trigger.lifecycle import ACCEPTANCE_RECORDED, CLOSED, IN_PROGRESS, OPEN, summarize
from vigil.audit import canonical_json
from vigil.domain import PccpCategory
from vigil.store import TicketRow

SYSTEM = "urn:vigil"
"""Root of vigil's identifier and code systems; a deployment may publish them under its own URL."""
GS1_DI = "http://hl7.org/fhir/NamingSystem/gs1-di"

TASK_STATUS = frozenset(
    "draft requested received accepted rejected ready cancelled in-progress on-hold failed completed "
    "entered-in-error".split()
)  # http://hl7.org/fhir/R4/valueset-task-status.html (required binding)
TASK_INTENT = frozenset(
    "unknown proposal plan order original-order reflex-order filler-order instance-order option".split()
)  # http://hl7.org/fhir/R4/valueset-task-intent.html (required binding)
REQUEST_PRIORITY = frozenset({"routine", "urgent", "asap", "stat"})


class TaskValidationError(ValueError):
    """The Task would not be valid FHIR R4; the message names the ticket and the field."""


def task_status(ticket: TicketRow) -> str:
    """Ticket status → Task.status: a failed acceptance (C2-F) is a failed task, whether or not it is closed."""
    failed = ticket.category == PccpCategory.C2F.value
    return {
        OPEN: "requested",
        IN_PROGRESS: "in-progress",
        ACCEPTANCE_RECORDED: "failed" if failed else "in-progress",
        CLOSED: "failed" if failed else "completed",
    }[ticket.status]


def _fhir_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def _concept(kind: str, code: str, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    coding = {"system": f"{SYSTEM}:{kind}", "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding], "text": text or display or code}


def _input(kind: str, **value: Any) -> dict[str, Any]:
    return {"type": _concept("task-input", kind), **value}


def ticket_to_task(ticket: TicketRow) -> dict[str, Any]:
    """The ticket as a FHIR R4 Task (JSON dict), validated."""
    category = PccpCategory(ticket.category)
    evidence = ticket.evidence or {}
    identity = evidence.get("identity", {})
    device = identity.get("device", {})
    mod = f" under PCCP modification {ticket.matched_mod}" if ticket.matched_mod else ""
    overlay = " + U (urgent safety overlay: MDR/806 evaluation)" if ticket.safety_overlay else ""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": ticket.id,
        "identifier": [{"system": f"{SYSTEM}:ticket", "value": ticket.id}],
        "status": task_status(ticket),
        "businessStatus": {"text": ticket.status + (f", {category.value}" if ticket.acceptance else "")},
        "intent": "proposal" if ticket.status == OPEN else "order",
        "priority": "urgent" if ticket.safety_overlay else "routine",
        "code": _concept("pccp-category", category.value, category.title),
        "description": f"PCCP {category.value} {category.title}{overlay}: remedy {ticket.remedy}{mod} "
                       f"for {ticket.model}@{ticket.model_version} (cause {ticket.cause}, confidence "
                       f"{ticket.cause_confidence:.2f})",
        "focus": {
            "type": "Device",
            "identifier": {"system": f"{SYSTEM}:model-version", "value": f"{ticket.model}@{ticket.model_version}"},
            "display": f"AI model {ticket.model} version {ticket.model_version}",
        },
        "for": {
            "type": "Device",
            "identifier": {"system": GS1_DI, "value": device["udi_di"]} if device.get("udi_di")
            else {"system": f"{SYSTEM}:model", "value": ticket.model},
            "display": device.get("name", ticket.model),
        },
        "authoredOn": _fhir_time(ticket.created_at),
        "lastModified": _fhir_time(ticket.updated_at or ticket.created_at),
        "requester": {"display": "vigil post-market monitoring (proposal; Regulatory Affairs decides)"},
        "reasonCode": _concept("cause", ticket.cause,
                               text=f"{ticket.cause} (confidence {ticket.cause_confidence:.2f})"),
        "note": [{"text": line} for line in summarize(ticket.rationale)]
        + [{"text": f"Required action: {a}"} for a in ticket.required_actions],
        "input": _inputs(ticket, evidence, identity),
    }
    if ticket.acceptance:
        task["output"] = _outputs(ticket.acceptance)
    validate_task(task, ticket.id)
    return task


def _inputs(ticket: TicketRow, evidence: dict[str, Any], identity: dict[str, Any]) -> list[dict[str, Any]]:
    out = [_input("alert", valueIdentifier={"system": f"{SYSTEM}:alert", "value": a.id}) for a in ticket.alerts]
    out.append(_input("remedy", valueString=ticket.remedy))
    if identity.get("pccp_id"):
        out.append(_input("pccp", valueIdentifier={"system": f"{SYSTEM}:pccp",
                                                   "value": f"{identity['pccp_id']}|{identity.get('pccp_version')}"}))
    if ticket.matched_mod:
        out.append(_input("pccp-modification", valueString=ticket.matched_mod))
    if evidence.get("awareness_date"):
        out.append(_input("awareness-date", valueDateTime=_as_utc(evidence["awareness_date"])))
    window = evidence.get("data_window")
    if window:
        period = {"start": _as_utc(window["start"]), "end": _as_utc(window["end"])}
        out.append(_input("data-window", valuePeriod=period))
    for clock in evidence.get("reporting_clocks", []):
        out.append(_input("reporting-clock", valueString=clock))
    out.append(_input("evidence-sha256", valueString=hashlib.sha256(canonical_json(evidence).encode()).hexdigest()))
    for m in (evidence.get("data_lineage") or {}).get("manifests", []):
        out.append(_input("dataset-manifest-sha256", valueString=m["sha256"]))
    return out


def _as_utc(value: str) -> str:
    t = datetime.fromisoformat(value)
    return _fhir_time(t if t.tzinfo else t.replace(tzinfo=UTC))


def _outputs(acceptance: dict[str, Any]) -> list[dict[str, Any]]:
    verdict = "passed" if acceptance.get("passed") else "failed: " + "; ".join(acceptance.get("failed_criteria", []))
    return [
        {"type": _concept("task-output", "acceptance-passed"), "valueBoolean": bool(acceptance.get("passed"))},
        {"type": _concept("task-output", "acceptance-result"),
         "valueString": f"{acceptance.get('mod_id')} acceptance {verdict} (evidence {acceptance.get('evidence_ref')}, "
                        f"recorded by {acceptance.get('recorded_by')} at {acceptance.get('recorded_at')})"},
    ]


def validate_task(task: dict[str, Any], ticket_id: str = "?") -> Task:
    """Parse with fhir.resources (R4B) and check the required bindings it leaves unchecked."""
    for field, allowed in (("status", TASK_STATUS), ("intent", TASK_INTENT), ("priority", REQUEST_PRIORITY)):
        if field in task and task[field] not in allowed:
            raise TaskValidationError(
                f"ticket {ticket_id}: Task.{field} {task[field]!r} is not in the R4 value set "
                f"({', '.join(sorted(allowed))})"
            )
    try:
        return Task.model_validate(task)
    except ValidationError as exc:
        problems = "; ".join(f"Task.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise TaskValidationError(f"ticket {ticket_id}: the exported Task is not valid FHIR R4: {problems}") from None
