"""Notification delivery through a transactional outbox: enqueue with the alert change, deliver with retries.

Why an outbox: an alert transition and "tell the safety officer" must not come apart. ``enqueue`` writes one
``OutboxRow`` per receiver in the caller's transaction (the transactional-outbox pattern), so the notification exists
exactly when the transition does; ``deliver_due`` later sends what is due. Delivery is at-least-once against crashes
(a row is marked delivered only after the receiver accepted it) and exactly-once in the normal path:

- a worker *claims* rows before sending by moving ``next_attempt_at`` one lease ahead in a short transaction
  (PostgreSQL ``FOR UPDATE SKIP LOCKED``, so two workers take disjoint rows; SQLite's single write lock serialises
  the claim), and no database lock is held while talking to a receiver;
- only the oldest undelivered row per receiver and alert is claimable, so a receiver sees an alert's events in order
  (Alertmanager must not get "firing" after "resolved");
- ``dedupe_key`` (alert, event, fire count) makes enqueueing idempotent, so replays and retries add nothing.

A failed attempt is recorded (attempts, ``last_error``) and retried after an exponential backoff with a cap; a
success is recorded in the audit log (``notification.delivered``). ``escalate_due`` escalates firing alerts nobody
acknowledged in time; ``resend_due`` re-sends open alerts to Alertmanager, which expires alerts not re-sent
(reference/interop.md §6). ``start_scheduler`` runs all three every few seconds with APScheduler.

The same outbox carries other messages than alert notifications (``vigil.ticket_feed``: retraining-ticket events to
Kafka and a signed webhook). Those rows have their own ``kind`` values and no ``alert_id``; ``queue`` writes one row,
``deliver_due(kinds=...)`` delivers only the given kinds (alert delivery takes ``ALERT_KINDS``), and rows without an
alert are kept in order per ``payload["ticket_id"]`` instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased, sessionmaker

from alerts.content import AlertFacts, render
from alerts.notifiers import NotificationError, Notifier, notifier_for
from alerts.routing import RoutingConfig
from vigil import alert_actions, audit
from vigil.domain import AlertState
from vigil.store import AlertRow, OutboxRow, utcnow

log = logging.getLogger(__name__)

ACTOR = "vigil.notify"
ALERTMANAGER_TTL_INTERVALS = 3
"""An open alert sent to Alertmanager ends this many re-send intervals ahead, unless re-sent (interop.md §6)."""

_QUIET_WHEN_SILENCED = ("firing", "resend", "escalation")
_FOLLOW_UPS = ("acknowledged", "resolved")
_MAX_PASSES = 20
ALERT_KINDS = ("alertmanager", "email", "webhook", "chat")
"""Outbox kinds that are alert notifications (``alerts.routing`` receivers); other kinds belong to other feeds."""


def alert_facts(row: AlertRow) -> AlertFacts:
    """What a notification may say about a stored alert (stream, evidence, lifecycle; never an identifier)."""
    return AlertFacts(
        alert_id=row.id, model=row.model, model_version=row.model_version, metric=row.metric, site=row.site,
        subgroup=row.subgroup, detector=row.detector, severity=row.severity, state=row.state,
        detected_at=row.detected_at, change_estimate=row.change_estimate, baseline=row.baseline, current=row.current,
        ci_low=row.ci_low, ci_high=row.ci_high, n_baseline=row.n_baseline, n_current=row.n_current,
        statistic=row.statistic, threshold=row.threshold, fire_count=row.fire_count, acked_by=row.acked_by,
        acked_at=row.acked_at, resolved_at=row.resolved_at, ticket_id=row.ticket_id,
    )


def _silenced(row: AlertRow, now: datetime) -> bool:
    """Muted right now: state "silenced" with its time box still running (an expired silence counts as firing, and
    acknowledging or unsilencing ends a silence; the rules of ``vigil.alert_actions.effective_state``)."""
    return (row.state == AlertState.SILENCED.value and row.silenced_until is not None
            and row.silenced_until > now)


def _effectively(state: AlertState, now: datetime) -> Any:
    """SQL: the alert's effective state is ``state`` (firing includes silences whose time box has passed)."""
    if state is AlertState.FIRING:
        return or_(AlertRow.state == AlertState.FIRING.value,
                   and_(AlertRow.state == AlertState.SILENCED.value,
                        or_(AlertRow.silenced_until.is_(None), AlertRow.silenced_until <= now)))
    return AlertRow.state == state.value


def _targets(session: Session, row: AlertRow, facts: AlertFacts, event: str, routing: RoutingConfig) -> list[str]:
    if event == "escalation":
        return [routing.escalation.receiver] if routing.escalation is not None else []
    names = routing.receivers_for(facts.labels())
    if event == "resend":  # only Alertmanager needs to hear that an alert is still open
        names = [n for n in names if routing.receiver(n).kind == "alertmanager"]
    if event in _FOLLOW_UPS:  # whoever was told it fired hears how it ended, even if a route matches on state
        told = session.scalars(select(OutboxRow.receiver).where(
            OutboxRow.alert_id == row.id, OutboxRow.event == "firing").order_by(OutboxRow.id)).all()
        known = {r.name for r in routing.receivers}
        names += [n for n in dict.fromkeys(told) if n not in names and n in known]
    return names


def enqueue(session: Session, alert_row: AlertRow, event: str, routing: RoutingConfig, *,
            now: datetime | None = None, key_suffix: str | None = None) -> list[str]:
    """Queue ``event`` about ``alert_row`` for each receiver its labels route to, in the caller's transaction.

    Idempotent: the dedupe key ``{alert id}:{event}:{fire count}[:{key_suffix}]`` is unique per receiver, so calling
    this twice for the same transition queues nothing the second time. Firing, re-send and escalation messages are
    not queued while the alert is silenced. Returns the receivers that got a new row.
    """
    now = now or utcnow()
    if event in _QUIET_WHEN_SILENCED and _silenced(alert_row, now):
        return []
    facts = alert_facts(alert_row)
    dedupe_key = f"{alert_row.id}:{event}:{alert_row.fire_count}" + (f":{key_suffix}" if key_suffix else "")
    queued: list[str] = []
    for name in _targets(session, alert_row, facts, event, routing):
        kind = routing.receiver(name).kind
        payload = render(kind, facts, event, routing.links)
        if kind == "alertmanager" and event == "resolved" and "endsAt" not in payload["alerts"][0]:
            payload["alerts"][0]["endsAt"] = _rfc3339(now)
        if kind == "webhook":
            payload["delivery_id"] = f"{name}:{dedupe_key}"
        if queue(session, receiver=name, kind=kind, alert_id=alert_row.id, event=event, dedupe_key=dedupe_key,
                 payload=payload, now=now):
            queued.append(name)
    return queued


def queue(session: Session, *, receiver: str, kind: str, alert_id: str | None, event: str, dedupe_key: str,
          payload: dict[str, Any], now: datetime) -> bool:
    """Insert one outbox row in the caller's transaction unless (receiver, dedupe_key) is already queued; True if
    a row was added. ``INSERT ... ON CONFLICT DO NOTHING`` on PostgreSQL and SQLite, so concurrent enqueuers of the
    same message add one row."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(OutboxRow).values(
        receiver=receiver, kind=kind, alert_id=alert_id, event=event, dedupe_key=dedupe_key, payload=payload,
        attempts=0, next_attempt_at=now, created_at=now,
    ).on_conflict_do_nothing(index_elements=["receiver", "dedupe_key"]).returning(OutboxRow.id)
    return session.execute(statement).first() is not None  # no row back: this message was already queued


def notify_on_transitions(routing: RoutingConfig) -> Callable[[], None]:
    """Queue the acknowledged/resolved notifications of every alert transition made through the API or CLI, in the
    transition's own transaction. Returns the function that stops it."""
    def listener(session: Session, transition: alert_actions.Transition) -> None:
        if transition.to_state in (AlertState.ACKNOWLEDGED.value, AlertState.RESOLVED.value):
            enqueue(session, transition.alert, transition.to_state, routing)

    return alert_actions.subscribe(listener)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class DeliveryReport:
    """What one ``deliver_due`` pass did; ``errors`` are the receivers' messages (no content, no identifiers)."""

    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: int
    receiver: str
    kind: str
    alert_id: str | None
    event: str
    dedupe_key: str
    payload: dict[str, Any]
    attempts: int


def _claim(session_factory: sessionmaker[Session], routing: RoutingConfig, now: datetime,
           kinds: Collection[str] = ALERT_KINDS) -> list[_Claimed]:
    """Take up to ``delivery.batch`` due rows of ``kinds`` for this worker by pushing them one lease into the future.

    A row waits while an older undelivered row to the same receiver is about the same alert — or, for rows about
    no alert, the same ``payload["ticket_id"]`` — so each receiver gets one subject's messages in order."""
    older = aliased(OutboxRow)
    same_subject = or_(
        older.alert_id == OutboxRow.alert_id,
        and_(older.alert_id.is_(None), OutboxRow.alert_id.is_(None),
             older.payload["ticket_id"].as_string() == OutboxRow.payload["ticket_id"].as_string()),
    )
    earlier_pending = exists().where(
        older.receiver == OutboxRow.receiver, same_subject, older.delivered_at.is_(None), older.id < OutboxRow.id,
    )
    statement = (
        select(OutboxRow)
        .where(OutboxRow.delivered_at.is_(None), OutboxRow.next_attempt_at <= now, OutboxRow.kind.in_(kinds),
               ~earlier_pending)
        .order_by(OutboxRow.id)
        .limit(routing.delivery.batch)
    )
    with session_factory.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            statement = statement.with_for_update(skip_locked=True, of=OutboxRow)
        rows = session.scalars(statement).all()
        claimed = []
        for row in rows:
            row.next_attempt_at = now + routing.delivery.lease
            claimed.append(_Claimed(row.id, row.receiver, row.kind, row.alert_id, row.event, row.dedupe_key,
                                    dict(row.payload), row.attempts))
    return claimed


def _prepare(item: _Claimed, routing: RoutingConfig) -> dict[str, Any]:
    """Alertmanager: an open alert's ``endsAt`` is set now, by the wall clock Alertmanager compares it with."""
    payload = item.payload
    if item.kind == "alertmanager" and item.event != "resolved":
        ends = utcnow() + ALERTMANAGER_TTL_INTERVALS * routing.resend_interval
        payload = {"alerts": [{**a, "endsAt": _rfc3339(ends)} for a in payload["alerts"]]}
    return payload


def backoff(attempts: int, routing: RoutingConfig) -> timedelta:
    """Delay before the next attempt after ``attempts`` failures: base · 2^(attempts-1), capped."""
    delivery = routing.delivery
    return min(delivery.max_backoff, delivery.backoff * 2 ** min(max(attempts - 1, 0), 30))


def deliver_due(session_factory: sessionmaker[Session], routing: RoutingConfig,
                now: datetime | None = None, *,
                notifier: Callable[[str], Notifier] | None = None,
                kinds: Collection[str] = ALERT_KINDS) -> DeliveryReport:
    """Send every due outbox row of ``kinds`` once; record each success (and its audit entry) or failure (and its
    backoff, from ``routing.delivery``).

    ``notifier`` maps a receiver name to its notifier (default: built from ``routing``).
    """
    now = now or utcnow()
    report = DeliveryReport()
    make = notifier or (lambda name: notifier_for(routing.receiver(name)))
    for _ in range(_MAX_PASSES):  # a later event of an alert becomes claimable once the earlier one is delivered
        claimed = _claim(session_factory, routing, now, kinds)
        if not claimed:
            break
        for item in claimed:
            try:
                make(item.receiver).send(_prepare(item, routing))
            except (NotificationError, LookupError) as exc:
                # LookupError: a receiver removed from the config, or a secret missing from the environment
                _failed(session_factory, routing, item, now, str(exc))
                report.failed += 1
                report.errors.append(str(exc))
            except Exception as exc:  # a defect must not stall the other rows; the row is retried with backoff
                log.exception("notifier for receiver %r crashed on outbox row %s", item.receiver, item.id)
                message = f"receiver {item.receiver!r}: unexpected {type(exc).__name__}: {exc} (a vigil defect)"
                _failed(session_factory, routing, item, now, message)
                report.failed += 1
                report.errors.append(message)
            else:
                _delivered(session_factory, item, now)
                report.delivered += 1
    return report


def _locked(session: Session, row_id: int) -> OutboxRow | None:
    statement = select(OutboxRow).where(OutboxRow.id == row_id)
    if session.get_bind().dialect.name == "postgresql":
        statement = statement.with_for_update()
    return session.scalars(statement).one_or_none()


def _delivered(session_factory: sessionmaker[Session], item: _Claimed, now: datetime) -> None:
    with session_factory.begin() as session:
        row = _locked(session, item.id)
        if row is None or row.delivered_at is not None:
            log.warning("outbox row %s (%s to %s) was already marked delivered: the lease expired mid-send, so the "
                        "receiver may have it twice; raise routing.delivery.lease", item.id, item.event, item.receiver)
            return
        row.attempts += 1
        row.delivered_at = row.next_attempt_at = now  # next_attempt_at held the claim lease; release it
        row.last_error = None
        entity, entity_id = ("alert", item.alert_id) if item.alert_id else ("ticket", item.payload.get("ticket_id"))
        audit.record(session, ACTOR, "notification.delivered", entity, str(entity_id or "-"), {
            "receiver": item.receiver, "kind": item.kind, "event": item.event, "dedupe_key": item.dedupe_key,
            "attempts": row.attempts, "outbox_id": item.id,
        }, at=now)


def _failed(session_factory: sessionmaker[Session], routing: RoutingConfig, item: _Claimed, now: datetime,
            error: str) -> None:
    with session_factory.begin() as session:
        row = _locked(session, item.id)
        if row is None or row.delivered_at is not None:
            return
        row.attempts += 1
        row.next_attempt_at = now + backoff(row.attempts, routing)
        row.last_error = error[:2000]
        log.warning("notification %s to %s failed (attempt %d, next at %s): %s", item.event, item.receiver,
                    row.attempts, row.next_attempt_at.isoformat(timespec="seconds"), error)


def escalate_due(session_factory: sessionmaker[Session], routing: RoutingConfig, now: datetime | None = None) -> int:
    """Escalate firing alerts not acknowledged within ``routing.escalation.after`` (once per alert)."""
    escalation = routing.escalation
    if escalation is None:
        return 0
    now = now or utcnow()
    statement = select(AlertRow).where(
        _effectively(AlertState.FIRING, now), AlertRow.acked_at.is_(None), AlertRow.escalated_at.is_(None),
        AlertRow.detected_at <= now - escalation.after,
    ).order_by(AlertRow.id)
    escalated = 0
    with session_factory.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            statement = statement.with_for_update(skip_locked=True)
        for row in session.scalars(statement).all():
            if not escalation.applies(alert_facts(row).labels()):
                continue
            row.escalated_at = now
            enqueue(session, row, "escalation", routing, now=now)
            audit.record(session, ACTOR, "alert.escalated", "alert", row.id, {
                "receiver": escalation.receiver, "unacknowledged_for": str(now - row.detected_at),
                "after": str(escalation.after),
            }, at=now)
            escalated += 1
    return escalated


def resend_due(session_factory: sessionmaker[Session], routing: RoutingConfig, now: datetime | None = None) -> int:
    """Queue a re-send to Alertmanager for every open alert, once per ``resend_interval`` since it last fired."""
    if not any(r.kind == "alertmanager" for r in routing.receivers):
        return 0
    now = now or utcnow()
    interval = routing.resend_interval
    still_open = or_(_effectively(AlertState.FIRING, now), _effectively(AlertState.ACKNOWLEDGED, now))
    queued = 0
    with session_factory.begin() as session:
        for row in session.scalars(select(AlertRow).where(still_open).order_by(AlertRow.id)).all():
            periods = (now - row.last_fired_at) // interval
            if periods >= 1 and enqueue(session, row, "resend", routing, now=now, key_suffix=str(periods)):
                queued += 1
    return queued


def prune_delivered(session_factory: sessionmaker[Session], older_than: timedelta = timedelta(days=1),
                    now: datetime | None = None) -> int:
    """Delete delivered Alertmanager re-sends older than ``older_than`` (each is also in the audit log); every other
    delivered row stays as the record of what was sent."""
    now = now or utcnow()
    with session_factory.begin() as session:
        result = session.execute(delete(OutboxRow).where(
            OutboxRow.event == "resend", OutboxRow.delivered_at.is_not(None),
            OutboxRow.delivered_at < now - older_than))
        return result.rowcount or 0


@dataclass
class TickReport:
    escalated: int
    resent: int
    delivery: DeliveryReport


def tick(session_factory: sessionmaker[Session], routing: RoutingConfig, now: datetime | None = None) -> TickReport:
    """One scheduler pass: escalate, queue re-sends, deliver what is due, prune old re-sends."""
    now = now or utcnow()
    escalated = escalate_due(session_factory, routing, now)
    resent = resend_due(session_factory, routing, now)
    delivery = deliver_due(session_factory, routing, now)
    prune_delivered(session_factory, now=now)
    return TickReport(escalated, resent, delivery)


def start_scheduler(session_factory: sessionmaker[Session], routing: RoutingConfig, *,
                    interval_seconds: float = 5.0) -> BackgroundScheduler:
    """Start a background scheduler that runs ``tick`` every ``interval_seconds`` (one run at a time; missed runs
    coalesce). Call ``.shutdown()`` on the result to stop it."""
    scheduler = BackgroundScheduler(timezone=UTC)
    scheduler.add_job(tick, "interval", seconds=interval_seconds, args=[session_factory, routing],
                      id="vigil.notify.tick", name="vigil notifications", max_instances=1, coalesce=True,
                      next_run_time=datetime.now(UTC))
    scheduler.start()
    return scheduler
