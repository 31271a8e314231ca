"""The retraining ticket's lifecycle: open → in_progress → acceptance_recorded → closed (pccp.md §8.2, §9).

Pure rules, no database: ``vigil.ticket_actions`` applies them to stored tickets and writes the audit trail.

Recording the Modification Protocol's acceptance result is rule R6 of pccp.md §8.4 done by people: every acceptance
row versus the original *and* the last modified version, every listed subgroup and trade-off guard, and full-device
V&V must pass for the ticket to stay C2; any failure makes it C2-F, an "unresolvable failure" that is recorded and
never implemented (FDA PCCP guidance for AI-enabled device software functions, Dec 2024, §VII.B(3)). After a failure
the protocol may be run again only once the root cause is shown to be unrelated to the PCCP (e.g. a test-harness bug),
so ``acceptance_recorded → in_progress`` is allowed only after a failed result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from retrain_trigger.pccp import Modification, Pccp, format_cell
from vigil.domain import PccpCategory

OPEN, IN_PROGRESS, ACCEPTANCE_RECORDED, CLOSED = "open", "in_progress", "acceptance_recorded", "closed"

NEXT_STATES: dict[str, tuple[str, ...]] = {
    OPEN: (IN_PROGRESS, CLOSED),  # closing unstarted: C0/C1/C3/C4/C5 tickets never run a modification protocol
    IN_PROGRESS: (ACCEPTANCE_RECORDED, CLOSED),
    ACCEPTANCE_RECORDED: (CLOSED, IN_PROGRESS),  # back to work only to re-test after a failure (S3 §VII.B(3))
    CLOSED: (),
}
"""Allowed transitions; must list the same states as ``vigil.store.TICKET_STATUSES``."""

RECLASSIFIABLE = (OPEN, IN_PROGRESS, ACCEPTANCE_RECORDED)
"""A closed ticket is a record; a new proposal after closing needs a new ticket."""

ACCEPTS_PROTOCOL = (PccpCategory.C2, PccpCategory.C2F)
"""Only a remedy matched to a PCCP modification has a Modification Protocol whose acceptance can be recorded."""

R6_CITE = "S3 §VII.B(3)"


class TicketLifecycleError(ValueError):
    """A lifecycle step that is not allowed for this ticket now; the message says why and what is allowed."""


class TicketLike(Protocol):
    """What the rules read from a ticket (``vigil.store.TicketRow`` has these attributes)."""

    id: str
    status: str
    category: str
    matched_mod: str | None
    remedy: str
    acceptance: dict[str, Any] | None


def check_transition(ticket: TicketLike, target: str) -> None:
    """Refuse a transition that the state machine does not allow, naming the ticket, its state and the options."""
    if ticket.status not in NEXT_STATES:
        raise TicketLifecycleError(
            f"ticket {ticket.id} has unknown status {ticket.status!r}; known: {', '.join(NEXT_STATES)}"
        )
    allowed = NEXT_STATES[ticket.status]
    if target not in allowed:
        options = " or ".join(allowed) if allowed else "nothing (closed is final)"
        raise TicketLifecycleError(
            f"ticket {ticket.id} is {ticket.status}; it cannot become {target}. Allowed next: {options}"
        )
    if ticket.status == ACCEPTANCE_RECORDED and target == IN_PROGRESS:
        if not ticket.acceptance or ticket.acceptance.get("passed") is not False:
            raise TicketLifecycleError(
                f"ticket {ticket.id} passed acceptance; it can only be closed. Re-testing is for a failed result "
                "whose root cause is unrelated to the PCCP (S3 §VII.B(3))"
            )


def start(ticket: TicketLike) -> str:
    """The status after an engineer starts work (runs the protocol, or fixes the pipeline for C1)."""
    check_transition(ticket, IN_PROGRESS)
    return IN_PROGRESS


def close(ticket: TicketLike, comment: str) -> str:
    """The status after closing; a comment (what was done, or why nothing is) is required for the record."""
    if not comment or not comment.strip():
        raise TicketLifecycleError(f"closing ticket {ticket.id} needs a comment: what was done, or why nothing is")
    check_transition(ticket, CLOSED)
    return CLOSED


# --- acceptance (R6) ---------------------------------------------------------------------------------------


def acceptance_criteria(mod: Modification) -> list[str]:
    """The names of every gate the protocol of ``mod`` sets, as keys for the recorded results.

    One per acceptance row, per subgroup row and trade-off guard versus each comparator, and full-device V&V (S3
    §VII.B(3), App. A 3): ``"sensitivity non_inferiority vs original"``, ``"sensitivity [age_band=80+] vs
    last_modified"``, ``"sensitivity trade-off guard vs original"``, ``"full-device V&V"``.
    """
    pe = mod.protocol.performance_evaluation
    keys = [f"{row.metric} {row.type} vs {row.vs}" for row in pe.acceptance]
    keys += [f"{row.metric} [{format_cell(row.def_)}] vs {vs}" for row in pe.subgroups for vs in pe.compare_to]
    keys += [f"{g.protect} trade-off guard vs {vs}" for g in pe.tradeoff_guards for vs in pe.compare_to]
    keys.append("full-device V&V")
    return list(dict.fromkeys(keys))


@dataclass(slots=True, frozen=True)
class CriterionResult:
    value: float | bool | None
    passed: bool | None  # None: the engineer reported a value without a per-criterion verdict


@dataclass(slots=True)
class AcceptanceOutcome:
    """What recording an acceptance result changes on the ticket."""

    status: str
    category: PccpCategory
    record: dict[str, Any]
    rationale: tuple[str, str, str]
    required_actions: list[str] = field(default_factory=list)


def parse_results(ticket_id: str, mod: Modification, results: Mapping[str, Any]) -> dict[str, CriterionResult]:
    """Read ``{criterion: value}`` or ``{criterion: {"value": v, "passed": bool}}``; unknown criteria are refused."""
    known = acceptance_criteria(mod)
    unknown = sorted(set(results) - set(known))
    if unknown:
        raise TicketLifecycleError(
            f"ticket {ticket_id}: {mod.mod_id} has no acceptance criteria {unknown}; its criteria are: "
            + "; ".join(known)
        )
    parsed: dict[str, CriterionResult] = {}
    for key in known:
        if key not in results:
            continue
        raw = results[key]
        if isinstance(raw, Mapping):
            extra = sorted(set(raw) - {"value", "passed"})
            passed = raw.get("passed")
            if extra or not (passed is None or isinstance(passed, bool)):
                raise TicketLifecycleError(
                    f"ticket {ticket_id}: result for {key!r} must be a number or {{\"value\": number, "
                    f"\"passed\": true|false}}, got {dict(raw)!r}"
                )
            value = raw.get("value")
        else:
            value, passed = raw, None
        if value is not None and not isinstance(value, bool | int | float):
            raise TicketLifecycleError(f"ticket {ticket_id}: result for {key!r} must be a number, got {value!r}")
        parsed[key] = CriterionResult(value, passed)
    return parsed


def record_acceptance(
    ticket: TicketLike,
    pccp: Pccp,
    *,
    passed: bool,
    results: Mapping[str, Any],
    evidence_ref: str,
    by: str,
    at: datetime,
) -> AcceptanceOutcome:
    """R6 recorded: a pass keeps (or makes) the ticket C2, a fail makes it C2-F (do not implement).

    A pass must report every criterion and contradict none of them; a fail must name at least one failed criterion,
    so the record says what failed (pccp.md §9 E: "verdict: pass, or unresolvable failure ... with RCA").
    """
    check_transition(ticket, ACCEPTANCE_RECORDED)
    category = PccpCategory(ticket.category)
    if category not in ACCEPTS_PROTOCOL or ticket.matched_mod is None:
        raise TicketLifecycleError(
            f"ticket {ticket.id} is {category.value} with no matched PCCP modification: there is no Modification "
            "Protocol whose acceptance could be recorded (only C2 / C2-F tickets run one). Reclassify with a remedy "
            "the PCCP covers, or close the ticket"
        )
    if not evidence_ref or not evidence_ref.strip():
        raise TicketLifecycleError(
            f"ticket {ticket.id}: name the evidence of the acceptance result (test report id, document or URL)"
        )
    mod = pccp.modification(ticket.matched_mod)
    parsed = parse_results(ticket.id, mod, results)
    failed = [k for k, r in parsed.items() if r.passed is False]
    if passed:
        missing = [k for k in acceptance_criteria(mod) if k not in parsed]
        if missing:
            raise TicketLifecycleError(
                f"ticket {ticket.id}: a pass needs a result for every {mod.mod_id} criterion (S3 §VII.B(3)); "
                f"missing: {'; '.join(missing)}"
            )
        if failed:
            raise TicketLifecycleError(
                f"ticket {ticket.id}: recorded as passed, but these criteria are marked failed: {'; '.join(failed)}"
            )
    elif not failed:
        raise TicketLifecycleError(
            f"ticket {ticket.id}: a failed result must mark the failed criteria, e.g. "
            f'{{"{acceptance_criteria(mod)[0]}": {{"value": 0.81, "passed": false}}}}'
        )
    record = {
        "passed": passed,
        "mod_id": mod.mod_id,
        "remedy": ticket.remedy,
        "pccp_id": pccp.pccp_id,
        "pccp_version": pccp.version,
        "results": {k: {"value": r.value, "passed": r.passed} for k, r in parsed.items()},
        "failed_criteria": failed,
        "evidence_ref": evidence_ref,
        "recorded_by": by,
        "recorded_at": at.isoformat(),
        "previous": _previous(ticket.acceptance),
    }
    if passed:
        return AcceptanceOutcome(
            ACCEPTANCE_RECORDED,
            PccpCategory.C2,
            record,
            (
                "R6",
                f"{mod.mod_id} acceptance recorded as passed by {by} ({evidence_ref}): every acceptance row vs "
                "original and last modified, subgroup and trade-off guard, and full-device V&V → C2",
                "S3 §V.C, §V.D, §VII.B(3)-(4)",
            ),
            [
                "check the cumulative change since the authorized baseline against the Impact Assessment (R8)",
                "update labeling, new UDI-DI (21 CFR 830.50), release notes and QS design-change record per the PCCP",
                "arm post-update monitoring and the rollback criteria",
            ],
        )
    return AcceptanceOutcome(
        ACCEPTANCE_RECORDED,
        PccpCategory.C2F,
        record,
        ("R6", f"{mod.mod_id} acceptance failed ({evidence_ref}): {'; '.join(failed)} → C2-F (unresolvable failure)",
         R6_CITE),
        [
            "record the failure; do not implement the modification",
            "root-cause analysis",
            "re-test only if the root cause is unrelated to the PCCP; otherwise escalate to C4/C5 (reclassify) and "
            "consider rollback or a labeling limitation",
        ],
    )


def _previous(acceptance: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Earlier attempts, oldest first, so a re-test never hides the failure before it."""
    if not acceptance:
        return []
    earlier = list(acceptance.get("previous", []))
    return [*earlier, {k: v for k, v in acceptance.items() if k != "previous"}]


def deployable(ticket: TicketLike) -> bool:
    """Whether the modification may be implemented: C2 with a passed acceptance for the ticket's current remedy."""
    a = ticket.acceptance
    return (
        ticket.category == PccpCategory.C2.value
        and ticket.status in (ACCEPTANCE_RECORDED, CLOSED)
        and bool(a)
        and a.get("passed") is True
        and a.get("remedy") == ticket.remedy
        and a.get("mod_id") == ticket.matched_mod
    )


def check_reclassifiable(ticket: TicketLike) -> None:
    """Reclassify only while the ticket is still a proposal, or after a failed acceptance (escalation to C4/C5)."""
    if ticket.status not in RECLASSIFIABLE:
        raise TicketLifecycleError(
            f"ticket {ticket.id} is {ticket.status}; only {', '.join(RECLASSIFIABLE)} tickets can be reclassified "
            "(open a new ticket for a new proposal)"
        )
    if ticket.status == ACCEPTANCE_RECORDED and (ticket.acceptance or {}).get("passed") is True:
        raise TicketLifecycleError(
            f"ticket {ticket.id} passed acceptance for {ticket.remedy}; close it rather than reclassify"
        )


def summarize(rationale: Sequence[Sequence[str]]) -> list[str]:
    """A rule trace as one line per rule, for audit payloads and notes."""
    return [f"{r[0]}: {r[1]} [{r[2]}]" if len(r) > 2 else " ".join(r) for r in rationale]
