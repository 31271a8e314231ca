"""Retraining-ticket events for the engineers' systems: a Kafka topic of retraining requests keyed by device, and a
signed JSON webhook (issue 7, Build §5; DESIGN.md "ML engineers consume retraining tickets").

Reliability is the outbox's (``vigil.notify``): ``enqueue`` writes one ``OutboxRow`` per configured sink in the
caller's transaction — the same transaction that opens, reclassifies, records acceptance for or closes the ticket —
so a request exists exactly when the change does (the transactional-outbox pattern). ``TicketFeed.deliver_due``
sends what is due through ``notify.deliver_due`` (claim lease, per-ticket order, exponential backoff with a cap,
``notification.delivered`` in the audit log). Delivery is at-least-once: a consumer drops the rare duplicate by
``event_id`` (in the JSON, the Kafka header ``vigil-event-id`` and, for the webhook, ``X-Vigil-Delivery``).

Kafka: kafka-python's ``KafkaProducer`` with ``acks="all"`` (the write is acknowledged by every in-sync replica);
the record key is the model (device) id, so one device's requests stay in one partition, in order. The webhook is
signed with the HMAC-SHA256 "timestamp.body" scheme of ``alerts.notifiers`` (RFC 2104), so a receiver verifies it
with ``alerts.notifiers.verify_signature``.

The message is built from an allow-list of ticket fields (``request_payload``): ids, model and version, category,
remedy, the rationale's rule lines, PCCP and data-window references, dataset-manifest hashes and a FHIR ``Task``
reference. Never the evidence bundle, cases, subjects or encounters — no patient identifier leaves this way.

``vigil.settings`` imports ``TicketFeedConfig`` from here, so this module imports only pydantic and the routing
models at import time; the database, outbox, Kafka and scheduler modules are imported where they are used, keeping
every `vigil` command's start-up fast.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

from alerts.routing import Delivery, RoutingConfig, WebhookReceiver
from ingest.kafka_source import BootstrapServers

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from alerts.notifiers import Notifier
    from vigil import ticket_actions
    from vigil.notify import DeliveryReport
    from vigil.store import TicketRow

SCHEMA = "vigil.retraining-request/1"
"""Names the message layout; a consumer checks it before reading the fields."""
FEED_EVENTS = ("opened", "reclassified", "acceptance_recorded", "closed")
"""Ticket events published; ``started`` and ``manifest`` are internal (a later event carries their result)."""
KAFKA_RECEIVER, WEBHOOK_RECEIVER = "ticket-feed:kafka", "ticket-feed:webhook"
KAFKA_KIND, WEBHOOK_KIND = "ticket-kafka", "ticket-webhook"
TICKET_KINDS = (KAFKA_KIND, WEBHOOK_KIND)
"""Outbox kinds of this feed; ``vigil.notify.deliver_due`` for alerts never claims them."""
EVENT_ID_HEADER = "vigil-event-id"
TASK_SYSTEM = "urn:vigil:ticket"
"""The ticket identifier system of the FHIR Task export (``retrain_trigger.fhir_task``: ``{SYSTEM}:ticket``)."""


class TicketFeedConfig(BaseModel):
    """The ``ticket_feed:`` section of vigil.yaml: where retraining requests go (Kafka, a webhook, or both)."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: BootstrapServers = Field(default_factory=list,
                                         description="host:port of Kafka brokers; empty = no Kafka topic")
    topic: str = Field("vigil.retraining-requests", min_length=1, pattern=r"^[A-Za-z0-9._-]{1,249}$",
                       description="Kafka topic of retraining requests (record key = model id)")
    client_id: str = "vigil-ticket-feed"
    api_version: str | None = Field(None, pattern=r"^\d+\.\d+(\.\d+)?$",
                                    description="pin the broker protocol version instead of probing it, e.g. '2.3'")
    security: dict[str, Any] = Field(default_factory=lambda: {"security_protocol": "PLAINTEXT"}, repr=False,
                                     description="kafka-python security options (security_protocol, sasl_*, ssl_*)")
    webhook_url: AnyHttpUrl | None = Field(None, description="HTTPS endpoint for the signed JSON webhook")
    secret_env: str | None = Field(None, description="environment variable holding the webhook's HMAC key")
    api_url: AnyHttpUrl | None = Field(None, description="vigil API base URL, for the FHIR Task link in messages")
    timeout_seconds: float = Field(10.0, gt=0, le=120, description="network timeout of one delivery attempt")
    delivery: Delivery = Delivery()

    @field_validator("security")
    @classmethod
    def _known_security_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        from kafka import KafkaProducer

        unknown = sorted(k for k in value if k not in KafkaProducer.DEFAULT_CONFIG)
        if unknown:
            raise ValueError(f"ticket_feed.security: {', '.join(unknown)} is not a kafka-python KafkaProducer "
                             "option (see https://kafka-python.readthedocs.io/en/master/apidoc/KafkaProducer.html)")
        return value

    @model_validator(mode="after")
    def _a_sink(self) -> TicketFeedConfig:
        if not self.bootstrap_servers and self.webhook_url is None:
            raise ValueError("ticket_feed: give bootstrap_servers (Kafka), webhook_url, or both")
        if self.webhook_url is not None and not self.secret_env:
            raise ValueError("ticket_feed.webhook_url needs secret_env: the environment variable holding the HMAC "
                             "key the receiver verifies the signature with")
        if self.delivery.max_backoff < self.delivery.backoff:
            raise ValueError("ticket_feed.delivery.max_backoff must be at least ticket_feed.delivery.backoff")
        if self.delivery.lease.total_seconds() <= 2 * self.timeout_seconds:
            raise ValueError(f"ticket_feed.delivery.lease ({self.delivery.lease}) must exceed twice timeout_seconds "
                             f"({self.timeout_seconds} s), or two workers could send the same request")
        return self

    def sinks(self) -> list[tuple[str, str]]:
        """(receiver, kind) of each configured sink, in outbox terms."""
        return ([(KAFKA_RECEIVER, KAFKA_KIND)] if self.bootstrap_servers else []) + (
            [(WEBHOOK_RECEIVER, WEBHOOK_KIND)] if self.webhook_url is not None else [])

    def webhook_receiver(self) -> WebhookReceiver:
        if self.webhook_url is None or self.secret_env is None:
            raise LookupError("ticket_feed has no webhook_url/secret_env configured")
        return WebhookReceiver(name=WEBHOOK_RECEIVER, kind="webhook", url=self.webhook_url,
                               secret_env=self.secret_env, timeout_seconds=self.timeout_seconds)


# --- what a message says -----------------------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def request_payload(ticket: TicketRow, event: str, event_id: str, at: datetime,
                    api_url: str | None = None) -> dict[str, Any]:
    """The retraining request: an allow-list of ticket fields, nothing from cases (no subject, no encounter)."""
    from retrain_trigger.lifecycle import deployable, summarize

    evidence = ticket.evidence or {}
    identity = evidence.get("identity") or {}
    device = identity.get("device") or {}
    manifests = (evidence.get("data_lineage") or {}).get("manifests") or []
    acceptance = ticket.acceptance or None
    task_url = f"{api_url.rstrip('/')}/tickets/{ticket.id}/fhir-task" if api_url else None
    return {
        "schema": SCHEMA,
        "event": event,
        "event_id": event_id,
        "occurred_at": _iso(at),
        "ticket_id": ticket.id,
        "status": ticket.status,
        "model": ticket.model,
        "model_version": ticket.model_version,
        "device": {"udi_di": device.get("udi_di"), "name": device.get("name"),
                   "product_code": device.get("product_code")},
        "category": ticket.category,
        "safety_overlay": ticket.safety_overlay,
        "matched_mod": ticket.matched_mod,
        "cause": ticket.cause,
        "cause_confidence": ticket.cause_confidence,
        "remedy": ticket.remedy,
        "deployable": deployable(ticket),
        "rationale": summarize(ticket.rationale or []),
        "required_actions": list(ticket.required_actions or []),
        "alert_ids": [a.id for a in ticket.alerts],
        "pccp": {"id": identity.get("pccp_id"), "version": identity.get("pccp_version")},
        "data_window": evidence.get("data_window"),
        "manifests": [{k: m.get(k) for k in ("sha256", "case_count", "data_window", "sites", "created_at")}
                      for m in manifests],
        "acceptance": None if acceptance is None else {
            k: acceptance.get(k) for k in ("passed", "mod_id", "failed_criteria", "evidence_ref", "recorded_at")},
        "fhir_task": {"reference": f"Task/{ticket.id}", "identifier": {"system": TASK_SYSTEM,
                                                                       "value": ticket.id}, "url": task_url},
    }


def _occurrence(session: Session, ticket_id: str, event: str) -> int:
    """How many ``ticket.{event}`` entries the audit log holds for the ticket: the n of the dedupe key, so the same
    change enqueued twice is one message and a second reclassification is another."""
    from sqlalchemy import func, select

    from vigil.store import AuditRow

    return session.scalar(select(func.count()).select_from(AuditRow).where(
        AuditRow.entity == "ticket", AuditRow.entity_id == ticket_id, AuditRow.action == f"ticket.{event}")) or 0


def enqueue(session: Session, ticket: TicketRow, event: str, config: TicketFeedConfig, *,
            now: datetime | None = None) -> list[str]:
    """Queue ``event`` about ``ticket`` for every configured sink, in the caller's transaction; returns the sinks
    that got a new row. Idempotent: the dedupe key is ``{ticket id}:{event}:{n}`` (n from the audit log)."""
    from vigil import notify
    from vigil.store import utcnow

    if event not in FEED_EVENTS:
        raise ValueError(f"ticket event {event!r} is not published; published events: {', '.join(FEED_EVENTS)}")
    now = now or utcnow()
    session.flush()
    dedupe_key = f"{ticket.id}:{event}:{_occurrence(session, ticket.id, event)}"
    payload = request_payload(ticket, event, dedupe_key, now, str(config.api_url) if config.api_url else None)
    queued = []
    for receiver, kind in config.sinks():
        body = {**payload, "delivery_id": f"{receiver}:{dedupe_key}"} if kind == WEBHOOK_KIND else payload
        if notify.queue(session, receiver=receiver, kind=kind, alert_id=None, event=event, dedupe_key=dedupe_key,
                        payload=body, now=now):
            queued.append(receiver)
    return queued


def publish_ticket_events(config: TicketFeedConfig) -> Callable[[], None]:
    """Queue the published events of every ticket change made through ``vigil.ticket_actions`` (API, CLI, and the
    pipeline's ``ticket_actions.opened``) in the change's own transaction. Returns the function that stops it."""
    from vigil import ticket_actions  # not at import time: vigil.settings imports this module's config

    def listener(session: Session, change: ticket_actions.TicketEvent) -> None:
        if change.event in FEED_EVENTS:
            enqueue(session, change.ticket, change.event, config, now=change.at)

    return ticket_actions.subscribe(listener)


# --- delivery ----------------------------------------------------------------------------------------------------


class KafkaNotifier:
    """Produce one retraining request to the topic and wait for the brokers' acknowledgement (``acks="all"``).

    The producer is created on first use and kept; a failed attempt raises ``NotificationError`` (the outbox retries).
    """

    name = KAFKA_RECEIVER

    def __init__(self, config: TicketFeedConfig) -> None:
        self.config = config
        self._producer: Any = None

    def _where(self) -> str:
        return f"Kafka ticket feed at {','.join(self.config.bootstrap_servers)} (topic {self.config.topic})"

    def _connect(self) -> Any:
        from kafka import KafkaProducer

        c = self.config
        timeout_ms = int(c.timeout_seconds * 1000)
        return KafkaProducer(
            bootstrap_servers=c.bootstrap_servers, client_id=c.client_id, acks="all",
            max_block_ms=timeout_ms, request_timeout_ms=timeout_ms, api_version_auto_timeout_ms=timeout_ms,
            **({"api_version": tuple(int(p) for p in c.api_version.split("."))} if c.api_version else {}),
            **c.security,
        )

    def send(self, payload: dict[str, Any]) -> None:
        from kafka.errors import KafkaError, NoBrokersAvailable

        from alerts.notifiers import NotificationError, canonical_body

        try:
            if self._producer is None:
                self._producer = self._connect()
            future = self._producer.send(
                self.config.topic, key=str(payload["model"]).encode(), value=canonical_body(payload),
                headers=[(EVENT_ID_HEADER, str(payload["event_id"]).encode())])
            future.get(timeout=self.config.timeout_seconds)
        except NoBrokersAvailable:
            raise NotificationError(f"{self._where()}: no broker reachable; check bootstrap_servers, the network and "
                                    "the security settings (the outbox will retry)") from None
        except KafkaError as exc:
            raise NotificationError(f"{self._where()}: {type(exc).__name__}: {exc}; check the brokers and the "
                                    "topic (the outbox will retry)") from exc

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.config.timeout_seconds)
            self._producer = None


class TicketFeed:
    """Delivers the feed's due outbox rows with the outbox's retry policy (``config.delivery``); keeps one Kafka
    producer between passes. ``close`` it when done."""

    def __init__(self, session_factory: sessionmaker[Session], config: TicketFeedConfig) -> None:
        from alerts.notifiers import WebhookNotifier

        self.sessions = session_factory
        self.config = config
        self._policy = RoutingConfig(delivery=config.delivery)
        self._kafka = KafkaNotifier(config) if config.bootstrap_servers else None
        self._webhook = WebhookNotifier(config.webhook_receiver()) if config.webhook_url is not None else None

    def _notifier(self, receiver: str) -> Notifier:
        found = {KAFKA_RECEIVER: self._kafka, WEBHOOK_RECEIVER: self._webhook}.get(receiver)
        if found is None:
            raise LookupError(f"outbox row for {receiver!r}, which ticket_feed no longer configures; configure it "
                              "again or delete the row")
        return found

    def deliver_due(self, now: datetime | None = None) -> DeliveryReport:
        """Send every due request once; record each success or failure (and its backoff)."""
        from vigil import notify

        return notify.deliver_due(self.sessions, self._policy, now, notifier=self._notifier, kinds=TICKET_KINDS)

    def close(self) -> None:
        if self._kafka is not None:
            self._kafka.close()


class FeedWorker:
    """``TicketFeed.deliver_due`` every few seconds in the background (APScheduler); ``shutdown`` stops it and
    closes the Kafka producer."""

    def __init__(self, session_factory: sessionmaker[Session], config: TicketFeedConfig, *,
                 interval_seconds: float = 5.0) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.feed = TicketFeed(session_factory, config)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.scheduler.add_job(self.feed.deliver_due, "interval", seconds=interval_seconds,
                               id="vigil.ticket_feed.deliver", name="vigil ticket feed", max_instances=1,
                               coalesce=True, next_run_time=datetime.now(UTC))
        self.scheduler.start()

    def shutdown(self) -> None:
        self.scheduler.shutdown()
        self.feed.close()
