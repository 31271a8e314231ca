"""What a person does to a stored alert — acknowledge, resolve, silence, unsilence, comment — for the CLI and the API.

One implementation for both, so `vigil alerts ack` and ``POST /alerts/{id}/ack`` cannot drift apart. Each action checks
the transition, changes the row and appends an audit entry (``vigil.audit.record``) in the caller's transaction: the
change and its record land together or not at all (21 CFR Part 11 §11.10(e): secure, time-stamped audit trails).

The lifecycle (issue 6, Build §1; ``AlertState``)::

    action        allowed from (effective state)         becomes
    acknowledge   firing, silenced                       acknowledged   (taking ownership ends a silence)
    resolve       firing, acknowledged, silenced         resolved       (resolved is final: a re-fire opens a new alert)
    silence       firing, acknowledged, silenced         silenced       (time-boxed; silencing again replaces the box)
    unsilence     silenced                               firing
    comment       any state, resolved included           (unchanged)

A silence is time-boxed: ``silenced_until`` must lie in the future and at most ``MAX_SILENCE`` ahead. Once it has
passed the alert counts as **firing** again (``effective_state``) without anyone having to write that down; list
filters and transitions use the effective state. ``expire_silences`` records the expiry in the store and audit log for
a scheduler that wants it materialised.

Notifiers hook in with ``subscribe(listener)``: each listener is called with the session and the ``Transition``
inside the same transaction (e.g. to enqueue an outbox row that tells Alertmanager the alert is resolved), so the
notification is stored exactly when the transition is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from vigil import audit
from vigil.domain import AlertState
from vigil.listeners import Listeners
from vigil.store import AlertCommentRow, AlertRow, utcnow

FIRING, ACKNOWLEDGED, RESOLVED, SILENCED = (s.value for s in AlertState)

OPEN_STATES = (FIRING, ACKNOWLEDGED, SILENCED)
"""States in which an alert is still open: a re-fire of its stream should update it, not open another."""

MAX_SILENCE = timedelta(days=30)
"""Longest single silence. Longer quiet needs a new decision (silence again), so nothing is muted and forgotten."""

MAX_TEXT = 4000
"""Longest comment, acknowledgement note or silence reason, in characters."""

TRANSITIONS: Mapping[str, tuple[tuple[str, ...], str | None]] = {
    "acknowledge": ((FIRING, SILENCED), ACKNOWLEDGED),
    "resolve": ((FIRING, ACKNOWLEDGED, SILENCED), RESOLVED),
    "silence": ((FIRING, ACKNOWLEDGED, SILENCED), SILENCED),
    "unsilence": ((SILENCED,), FIRING),
    "comment": ((FIRING, ACKNOWLEDGED, SILENCED, RESOLVED), None),
}
"""action → (effective states it is allowed from, state it leads to; None = unchanged)."""

AUDIT_ACTIONS: Mapping[str, str] = {
    "acknowledge": "alert.acknowledged",
    "resolve": "alert.resolved",
    "silence": "alert.silenced",
    "unsilence": "alert.unsilenced",
    "comment": "alert.commented",
}
"""action → the audit log's ``action`` (``alert.acknowledged``, ``alert.resolved``: as the CLI always wrote them)."""


class AlertActionError(ValueError):
    """An action on an alert that cannot be done; the message says what, on which alert, and what to do."""


class AlertNotFound(AlertActionError):
    def __init__(self, alert_id: str) -> None:
        self.alert_id = alert_id
        super().__init__(f"no alert {alert_id} in the store (list them with `vigil alerts list` or GET /alerts)")


class InvalidTransition(AlertActionError):
    def __init__(self, alert_id: str, state: str, action: str) -> None:
        self.alert_id, self.state, self.action = alert_id, state, action
        self.allowed_from = TRANSITIONS[action][0]
        self.allowed_actions = allowed_actions(state)
        super().__init__(
            f"alert {alert_id} is {state}: cannot {action} it ({action} is allowed only from "
            f"{' or '.join(self.allowed_from)}); from {state} you may {', '.join(self.allowed_actions)}"
        )


class InvalidInput(AlertActionError):
    """A value given with an action (silence end, comment text) is unusable; ``field`` names it (the API's body
    field: ``until``, ``reason``, ``text``, ``comment``; ``by`` for the actor)."""

    def __init__(self, message: str, field: str) -> None:
        self.field = field
        super().__init__(message)


@dataclass(slots=True, frozen=True)
class Transition:
    """What an action did, for the caller to print or return (and for notifiers to react to)."""

    alert: AlertRow
    action: str
    from_state: str
    to_state: str
    by: str
    at: datetime


TransitionListener = Callable[[Session, Transition], None]
_listeners: Listeners[Transition] = Listeners()


def subscribe(listener: TransitionListener) -> Callable[[], None]:
    """Call ``listener(session, transition)`` after every transition (expiries included), inside the caller's
    transaction; an exception in it rolls the transition back. Returns a function that unsubscribes it."""
    return _listeners.subscribe(listener)


def allowed_actions(state: str) -> tuple[str, ...]:
    """The actions allowed on an alert whose effective state is ``state``."""
    return tuple(action for action, (sources, _) in TRANSITIONS.items() if state in sources)


def effective_state(alert: AlertRow, now: datetime | None = None) -> str:
    """The state that counts: a silence whose time box has passed (or that has none) is firing again."""
    if alert.state == SILENCED and (alert.silenced_until is None or alert.silenced_until <= (now or utcnow())):
        return FIRING
    return alert.state


def state_clause(state: str, now: datetime) -> Any:
    """SQL condition for "effective state is ``state``" (see ``effective_state``)."""
    expired = and_(AlertRow.state == SILENCED,
                   or_(AlertRow.silenced_until.is_(None), AlertRow.silenced_until <= now))
    if state == FIRING:
        return or_(AlertRow.state == FIRING, expired)
    if state == SILENCED:
        return and_(AlertRow.state == SILENCED, AlertRow.silenced_until > now)
    return AlertRow.state == state


def query(*, state: str | None = None, site: str | None = None, metric: str | None = None, model: str | None = None,
          severity: str | None = None, now: datetime | None = None) -> Select[tuple[AlertRow]]:
    """Alerts matching the filters (``None`` = any), newest detection first; ``state`` is the effective state."""
    q = select(AlertRow).order_by(AlertRow.detected_at.desc(), AlertRow.id)
    if state is not None:
        q = q.where(state_clause(state, now or utcnow()))
    for column, value in ((AlertRow.site, site), (AlertRow.metric, metric), (AlertRow.model, model),
                          (AlertRow.severity, severity)):
        if value is not None:
            q = q.where(column == value)
    return q


def get(session: Session, alert_id: str, *, for_update: bool = False) -> AlertRow:
    """The alert with this id, or ``AlertNotFound`` naming it."""
    alert = session.get(AlertRow, alert_id, with_for_update=for_update)
    if alert is None:
        raise AlertNotFound(alert_id)
    return alert


def comments(session: Session, alert_id: str) -> Sequence[AlertCommentRow]:
    """The alert's comments, oldest first."""
    get(session, alert_id)
    return session.scalars(select(AlertCommentRow).where(AlertCommentRow.alert_id == alert_id)
                           .order_by(AlertCommentRow.at, AlertCommentRow.id)).all()


def acknowledge(session: Session, alert_id: str, who: str, comment: str | None = None, *,
                context: Mapping[str, Any] | None = None, now: datetime | None = None) -> Transition:
    """Someone owns the alert now: record who, when and why (ends a silence)."""
    comment = _text(comment, "acknowledgement comment", "comment", alert_id, required=False)

    def apply(alert: AlertRow, at: datetime) -> dict[str, Any]:
        alert.acked_by, alert.acked_at, alert.ack_comment = who, at, comment
        return {"comment": comment}

    return _transition(session, alert_id, "acknowledge", who, apply, context, now)


def resolve(session: Session, alert_id: str, who: str, comment: str | None = None, *,
            context: Mapping[str, Any] | None = None, now: datetime | None = None) -> Transition:
    """Close the alert; a later firing of the same stream opens a new alert."""
    comment = _text(comment, "resolution comment", "comment", alert_id, required=False)

    def apply(alert: AlertRow, at: datetime) -> dict[str, Any]:
        alert.resolved_by, alert.resolved_at = who, at
        return {"comment": comment}

    return _transition(session, alert_id, "resolve", who, apply, context, now)


def silence(session: Session, alert_id: str, who: str, until: datetime, reason: str, *,
            context: Mapping[str, Any] | None = None, now: datetime | None = None) -> Transition:
    """Mute the alert until ``until`` (tz-aware, in the future, at most ``MAX_SILENCE`` ahead), with a reason."""
    at = now or utcnow()
    reason = _text(reason, "silence reason", "reason", alert_id, required=True)
    if until.tzinfo is None or until.utcoffset() is None:
        raise InvalidInput(f"silence of alert {alert_id}: the end {until.isoformat()} has no time zone; give one "
                           "(e.g. 2026-12-01T08:00:00Z)", "until")
    if until <= at:
        raise InvalidInput(f"silence of alert {alert_id}: the end {until.isoformat()} is not in the future "
                           f"(now {at.isoformat(timespec='seconds')})", "until")
    if until - at > MAX_SILENCE:
        raise InvalidInput(f"silence of alert {alert_id}: {until.isoformat()} is more than {MAX_SILENCE.days} days "
                           "ahead; silences are time-boxed — silence again when this one ends", "until")

    def apply(alert: AlertRow, _at: datetime) -> dict[str, Any]:
        alert.silenced_until, alert.silenced_by, alert.silence_reason = until, who, reason
        return {"until": until, "reason": reason}

    return _transition(session, alert_id, "silence", who, apply, context, at)


def unsilence(session: Session, alert_id: str, who: str, *, context: Mapping[str, Any] | None = None,
              now: datetime | None = None) -> Transition:
    """End a silence early: the alert is firing again."""

    def apply(alert: AlertRow, _at: datetime) -> dict[str, Any]:
        return {"silenced_until": alert.silenced_until}

    return _transition(session, alert_id, "unsilence", who, apply, context, now)


def comment(session: Session, alert_id: str, who: str, text: str, *, context: Mapping[str, Any] | None = None,
            now: datetime | None = None) -> AlertCommentRow:
    """Add a note to the alert's history (any state, resolved included)."""
    at = now or utcnow()
    _require_actor(who, "comment", alert_id)
    text = _text(text, "comment", "text", alert_id, required=True)
    alert = get(session, alert_id)
    row = AlertCommentRow(alert_id=alert_id, author=who, at=at, text=text)
    session.add(row)
    session.flush()
    audit.record(session, who, AUDIT_ACTIONS["comment"], "alert", alert_id,
                 {"comment_id": row.id, "text": text, "state": effective_state(alert, at), **(context or {})}, at=at)
    return row


def expire_silences(session: Session, actor: str = "vigil-scheduler", now: datetime | None = None) -> list[str]:
    """Write down that passed silences ended (state → firing, one audit entry each); returns the alert ids.

    Not needed for correctness (``effective_state`` already treats them as firing); for a scheduler that re-notifies.
    """
    at = now or utcnow()
    expired = session.scalars(select(AlertRow).where(AlertRow.state == SILENCED, state_clause(FIRING, at))
                              .order_by(AlertRow.id).with_for_update()).all()
    for alert in expired:
        alert.state = FIRING
        audit.record(session, actor, "alert.silence_expired", "alert", alert.id,
                     {"from": SILENCED, "to": FIRING, "silenced_until": alert.silenced_until}, at=at)
        _listeners.emit(session, Transition(alert, "silence_expired", SILENCED, FIRING, actor, at))
    session.flush()
    return [a.id for a in expired]


def _transition(session: Session, alert_id: str, action: str, who: str,
                apply: Callable[[AlertRow, datetime], dict[str, Any]],
                context: Mapping[str, Any] | None, now: datetime | None) -> Transition:
    at = now or utcnow()
    _require_actor(who, action, alert_id)
    alert = get(session, alert_id, for_update=True)
    previous = effective_state(alert, at)
    sources, target = TRANSITIONS[action]
    assert target is not None, f"{action} changes no state; it is not a transition"
    if previous not in sources:
        raise InvalidTransition(alert_id, previous, action)
    details = apply(alert, at)
    alert.state = target
    session.flush()
    audit.record(session, who, AUDIT_ACTIONS[action], "alert", alert_id,
                 {"from": previous, "to": target, **details, **(context or {})}, at=at)
    transition = Transition(alert, action, previous, target, who, at)
    _listeners.emit(session, transition)
    return transition


def _require_actor(who: str, action: str, alert_id: str) -> None:
    if not who or not who.strip():
        raise InvalidInput(f"{action} of alert {alert_id}: say who does it (it is recorded in the audit log)", "by")


def _text(value: str | None, what: str, field: str, alert_id: str, *, required: bool) -> str | None:
    value = value.strip() if value is not None else None
    if not value:
        if required:
            raise InvalidInput(f"{what} for alert {alert_id} is empty; write what was decided and why", field)
        return None
    if len(value) > MAX_TEXT:
        raise InvalidInput(f"{what} for alert {alert_id} is {len(value)} characters; the limit is {MAX_TEXT}", field)
    return value
