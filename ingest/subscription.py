"""FHIR topic-based subscription notifications (rest-hook): parsing, gap detection, and a webhook source.

Two notification shapes are read (FHIR R5 ``subscription-notification``, http://hl7.org/fhir/R5/subscriptions.html;
and the R4/R4B "Subscriptions R5 Backport" IG, https://hl7.org/fhir/uv/subscriptions-backport/ ``history`` Bundles):
the first entry is the status — an R4 ``Parameters`` (backport-subscription-status-r4) or an R4B/R5
``SubscriptionStatus`` — and any further entries are the focus resources (``full-resource`` payload).

Per subscription the receiver remembers the last ``event-number`` (``eventsSinceSubscriptionStart``). A jump is a
gap: events were lost in transit, and the result carries a ``CatchUpQuery`` — a ``_lastUpdated`` search from the
last good event — which the caller runs through ``ingest.rest_poll``. Handshakes and heartbeats are acknowledged
without data (a heartbeat whose count is ahead of ours is a gap too). A retried notification (an event number seen
before) is dropped. ``id-only`` payloads give the references to fetch; ``empty`` ones a catch-up query.

``SubscriptionSource`` is also the ``Source`` the service polls: the webhook queues the messages, and the checkpoint
stores the last event number *delivered*, so after a crash the next notification shows a gap and is caught up.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ingest.reader import MAX_MESSAGE_BYTES
from ingest.rest_poll import cursor_since
from ingest.sources import Checkpoint, Message
from vigil.domain import Position

log = logging.getLogger(__name__)

TYPES = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_MAX_TRACKED_MISSING = 10_000


class NotificationError(ValueError):
    """The body is not a notification we can read; the message says what was wrong (answered with HTTP 400)."""


class SubscriptionConfig(BaseModel):
    """The subscription webhook (``vigil serve`` route; ``vigil run`` source ``kind: fhir-subscription``)."""

    kind: Literal["fhir-subscription"] = "fhir-subscription"
    name: str
    path: str = Field("/fhir/subscription", description="the rest-hook endpoint (Subscription.channel.endpoint)")
    secret_env: str | None = Field(None, description="env var holding the value expected in `secret_header` "
                                                     "(what Subscription.channel.header sends)")
    secret_header: str = "Authorization"
    resource_types: list[str] = Field(default_factory=list, description="types a catch-up query re-reads")
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, gt=0)
    forward_bootstrap_servers: str | None = Field(
        None, description="`vigil serve` forwards the notified resources to this Kafka cluster ...")
    forward_topic: str | None = Field(None, description="... on this topic, which a `kafka` source of `vigil run` "
                                                        "consumes with the other feeds (one pipeline, one state)")
    catch_up_base_url: str | None = Field(None, description="FHIR base URL re-read (`_lastUpdated` search of "
                                                            "resource_types) when events are missing")
    catch_up_auth_env: str | None = Field(None, description="env var holding the Authorization header for it")


# --- parsing ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    number: int | None
    timestamp: str | None
    focus: str | None  # "Type/id" (or an absolute URL) of the resource the event is about


@dataclass(slots=True)
class Notification:
    """One notification, normalised over the R4 Parameters and R4B/R5 SubscriptionStatus shapes (IG §errors/
    channels: ``{subscription, topic, status, type, events_since_start, events, errors}``)."""

    subscription: str
    topic: str | None
    status: str | None
    type: str
    events_since_start: int | None
    events: list[NotificationEvent]
    resources: list[tuple[int, dict]]  # (entry index, resource) of the focus entries
    entry_urls: list[str]  # fullUrl of focus entries without a resource (id-only)
    errors: list[str] = field(default_factory=list)


def parse_notification(body: bytes, content_type: str | None, max_bytes: int = MAX_MESSAGE_BYTES) -> Notification:
    """Read a notification Bundle; raises ``NotificationError`` naming what is wrong."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES:
        raise NotificationError(f"unsupported Content-Type {content_type!r}: set the Subscription's channel.payload "
                                "to application/fhir+json")
    if len(body) > max_bytes:
        raise NotificationError(f"oversized notification: {len(body):,} bytes over the limit of {max_bytes:,}; "
                                "use id-only payloads or raise max_message_bytes")
    try:
        bundle = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise NotificationError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotificationError("not a notification: expected a Bundle of type history (R4/R4B backport) or "
                                "subscription-notification (R5)")
    if bundle.get("type") not in ("history", "subscription-notification"):
        raise NotificationError(f"not a notification: Bundle.type is {bundle.get('type')!r}, expected history "
                                "(R4/R4B backport) or subscription-notification (R5)")
    entries = [e for e in bundle.get("entry") or () if isinstance(e, dict)]
    status = entries[0].get("resource") if entries else None
    if not isinstance(status, dict) or status.get("resourceType") not in ("Parameters", "SubscriptionStatus"):
        raise NotificationError("not a notification: the first entry must be a Parameters (R4 backport) or "
                                "SubscriptionStatus (R4B/R5) resource")
    note = _from_parameters(status) if status["resourceType"] == "Parameters" else _from_status(status)
    for index, entry in enumerate(entries[1:], 2):
        resource = entry.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            note.resources.append((index, resource))
        elif isinstance(entry.get("fullUrl"), str):
            note.entry_urls.append(entry["fullUrl"])
    return note


def _from_status(status: dict) -> Notification:
    events = [NotificationEvent(_int(e.get("eventNumber")), e.get("timestamp"), _ref(e.get("focus")))
              for e in status.get("notificationEvent") or () if isinstance(e, dict)]
    errors = [_concept_text(c) for c in status.get("error") or ()]
    return _notification(_ref(status.get("subscription")), status.get("topic"), status.get("status"),
                         status.get("type"), _int(status.get("eventsSinceSubscriptionStart")), events, errors)


def _from_parameters(params: dict) -> Notification:
    values: dict[str, object] = {}
    events, errors = [], []
    for p in params.get("parameter") or ():
        if not isinstance(p, dict):
            continue
        name = p.get("name")
        if name == "notification-event":
            parts = {q.get("name"): q for q in p.get("part") or () if isinstance(q, dict)}
            events.append(NotificationEvent(_int(_value(parts.get("event-number"))),
                                            _value(parts.get("timestamp")), _ref(_value(parts.get("focus")))))
        elif name == "error":
            errors.append(_concept_text(_value(p)))
        elif isinstance(name, str):
            values[name] = _value(p)
    return _notification(_ref(values.get("subscription")), values.get("topic"), values.get("status"),
                         values.get("type"), _int(values.get("events-since-subscription-start")), events, errors)


def _notification(subscription: str | None, topic, status, kind, since: int | None, events, errors) -> Notification:
    if not subscription:
        raise NotificationError("notification without its subscription reference (status.subscription)")
    if kind not in TYPES:
        raise NotificationError(f"{subscription}: unknown notification type {kind!r} (expected one of {TYPES})")
    return Notification(subscription, topic if isinstance(topic, str) else None,
                        status if isinstance(status, str) else None, kind, since, events, [], [], errors)


def _value(part: dict | None) -> object:
    if not part:
        return None
    return next((v for k, v in part.items() if k.startswith("value")), None)


def _int(value: object) -> int | None:
    """``events-since-subscription-start`` is a valueString in R4 (int64 as string), an integer64 in R5."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _ref(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("reference")
    return value if isinstance(value, str) and value else None


def _concept_text(concept: object) -> str:
    if not isinstance(concept, dict):
        return "error"
    codes = [c.get("code") for c in concept.get("coding") or () if isinstance(c, dict)]
    return ",".join(str(c) for c in codes if c) or "error"


# --- gap detection ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatchUpQuery:
    """Events ``first``–``last`` were lost: re-read the types from ``since`` (None: no good event known yet —
    the caller picks, e.g. the configured start or a bulk ``_since``)."""

    subscription: str
    first: int
    last: int
    since: str | None
    resource_types: tuple[str, ...]
    reason: str = "gap"

    def search_params(self) -> dict[str, str]:
        params = {"_sort": "_lastUpdated"}
        if self.since:
            params["_lastUpdated"] = f"ge{self.since}"
        return params

    def rest_cursor(self) -> str:
        """A ``Checkpoint.cursor`` for ``RestPollSource.resume`` that re-reads from ``since``."""
        return cursor_since(list(self.resource_types), self.since or "1970-01-01T00:00:00Z")


@dataclass(slots=True)
class NotificationResult:
    type: str
    subscription: str
    status: str | None
    messages: list[Message] = field(default_factory=list)
    fetch: list[str] = field(default_factory=list)  # id-only: references to GET
    catch_up: CatchUpQuery | None = None
    duplicate_events: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the server's own error codes for this subscription


@dataclass(slots=True)
class _State:
    last: int = 0
    timestamp: str | None = None  # of the last good event: where a catch-up starts
    missing: set[int] = field(default_factory=set)


class SubscriptionSource:
    """The webhook's state and queue: ``handle_notification`` (called by the route) and the ``Source`` methods
    (called by the service). Thread-safe: the route and the service loop run in different threads."""

    def __init__(self, config: SubscriptionConfig, now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.name = config.name
        self.config = config
        self.now = now
        self._received: dict[str, _State] = {}
        self._delivered: dict[str, tuple[int, str | None]] = {}
        self._queue: deque[Message | tuple[str, int, str | None]] = deque()
        self._lock = threading.Lock()

    # --- the webhook -------------------------------------------------------------------------------------------

    def handle_notification(self, body: bytes, content_type: str | None) -> NotificationResult:
        note = parse_notification(body, content_type, self.config.max_message_bytes)
        with self._lock:
            result = self._track(note)
            self._queue.extend(result.messages)
            state = self._received[note.subscription]
            self._queue.append((note.subscription, state.last, state.timestamp))
        if result.catch_up:
            log.warning("%s: %s events %d-%d missing; catch up from %s", self.name, note.subscription,
                        result.catch_up.first, result.catch_up.last, result.catch_up.since)
        return result

    def _track(self, note: Notification) -> NotificationResult:
        result = NotificationResult(note.type, note.subscription, note.status, errors=note.errors)
        state = self._received.get(note.subscription)
        received_at = self.now().isoformat().replace("+00:00", "Z")
        if state is None:  # a handshake, or first contact without stored state: events 1.. are unaccounted for
            state = self._received[note.subscription] = _State()
        if note.type != "event-notification":  # handshake, heartbeat, query-status: a count ahead of ours is a gap
            if note.events_since_start is not None and note.events_since_start > state.last:
                result.catch_up = self._gap(note.subscription, state, state.last + 1, note.events_since_start)
                state.last = note.events_since_start
            return result
        numbers = sorted({e.number for e in note.events if e.number is not None})
        if not numbers and note.events_since_start is not None:
            numbers = [note.events_since_start]
        fresh = []
        for number in numbers:
            if number in state.missing:
                state.missing.discard(number)  # a late event filling (part of) a gap
                fresh.append(number)
            elif number <= state.last:
                result.duplicate_events.append(number)
            else:
                if number > state.last + 1 and result.catch_up is None:
                    result.catch_up = self._gap(note.subscription, state, state.last + 1, number - 1)
                elif number > state.last + 1:
                    self._remember_missing(state, state.last + 1, number - 1)
                state.last = number
                fresh.append(number)
        if numbers and not fresh:  # a retried notification: everything in it was handled before
            return result
        first = fresh[0] if fresh else note.events_since_start
        source = f"{note.subscription}#event-{first}" if first is not None else note.subscription
        for index, resource in note.resources:
            result.messages.append(Message(Position(source, index), orjson.dumps(resource)))
        present = {f"{r.get('resourceType')}/{r.get('id')}" for _, r in note.resources}
        result.fetch = [e.focus for e in note.events if e.focus and not _same_resource(e.focus, present)]
        result.fetch += [url for url in note.entry_urls if url not in result.fetch]
        if not note.resources and not result.fetch and result.catch_up is None and fresh:  # empty payload: query
            self._remember_missing(state, fresh[0], fresh[-1])
            result.catch_up = CatchUpQuery(note.subscription, fresh[0], fresh[-1], state.timestamp,
                                           tuple(self.config.resource_types), "empty payload")
        times = [e.timestamp for e in note.events if e.timestamp]
        if not state.missing:  # the last good event moves on only while no event is outstanding
            state.timestamp = max(times) if times else received_at
        return result

    def _gap(self, subscription: str, state: _State, first: int, last: int) -> CatchUpQuery:
        self._remember_missing(state, first, last)
        return CatchUpQuery(subscription, first, last, state.timestamp, tuple(self.config.resource_types))

    @staticmethod
    def _remember_missing(state: _State, first: int, last: int) -> None:
        if last - first < _MAX_TRACKED_MISSING:  # a huge gap is caught up by the query; late events then dedupe
            state.missing.update(range(first, last + 1))

    def caught_up(self, query: CatchUpQuery) -> None:
        """The caller ran ``query``: its events count as received, and the last good event can move on again."""
        with self._lock:
            state = self._received.get(query.subscription)
            if state is not None:
                state.missing.difference_update(range(query.first, query.last + 1))

    def last_event(self, subscription: str) -> int | None:
        state = self._received.get(subscription)
        return state.last if state else None

    # --- Source ------------------------------------------------------------------------------------------------

    def resume(self, checkpoint: Checkpoint) -> None:
        if not checkpoint.cursor:
            return
        try:
            stored = orjson.loads(checkpoint.cursor)
            with self._lock:
                for sub, value in stored.items():
                    self._delivered[sub] = (int(value["last"]), value.get("timestamp"))
                    self._received[sub] = _State(int(value["last"]), value.get("timestamp"))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"stored subscription cursor is not valid ({exc}): {checkpoint.cursor[:200]!r}; "
                             "delete the source's cursor row (the next notification will then be caught up)") from None

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        out: list[Message] = []
        with self._lock:
            while self._queue and len(out) < max_records:
                item = self._queue.popleft()
                if isinstance(item, Message):
                    out.append(item)
                else:
                    self._delivered[item[0]] = (item[1], item[2])
            while self._queue and not isinstance(self._queue[0], Message):  # marks right after the last message
                sub, last, timestamp = self._queue.popleft()  # type: ignore[misc]
                self._delivered[sub] = (last, timestamp)
        return out

    @property
    def exhausted(self) -> bool:
        """A webhook never ends, but ``--once`` stops when nothing is queued."""
        return not self._queue

    def checkpoint(self) -> Checkpoint:
        with self._lock:
            return Checkpoint(cursor=orjson.dumps({s: {"last": n, "timestamp": t}
                                                   for s, (n, t) in sorted(self._delivered.items())}).decode())

    def committed(self) -> None:
        """Nothing to acknowledge: the notification was answered when it arrived."""

    def close(self) -> None:
        pass


def _same_resource(focus: str, present: set[str]) -> bool:
    """``focus`` may be relative (``Observation/1``), absolute or versioned; compare by ``Type/id``."""
    parts = focus.split("/_history/", 1)[0].rstrip("/").split("/")
    return len(parts) >= 2 and f"{parts[-2]}/{parts[-1]}" in present


# --- the route -------------------------------------------------------------------------------------------------


def subscription_router(receiver: SubscriptionSource,
                        on_result: Callable[[NotificationResult], None] | None = None) -> APIRouter:
    """A FastAPI router with the rest-hook endpoint: checks the shared secret, answers fast (the IG: acknowledge
    before work — the receiver only parses and queues), and hands the result (catch-up, fetch list) to ``on_result``.
    """
    config = receiver.config
    expected = os.environ.get(config.secret_env) if config.secret_env else None
    if config.secret_env and not expected:
        raise ValueError(f"subscription {config.name!r}: secret_env names {config.secret_env!r} but it is not set; "
                         "export the value the Subscription's channel.header sends")
    router = APIRouter()

    def outcome(status: int, code: str, text: str) -> JSONResponse:
        return JSONResponse({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": code, "diagnostics": text}]}, status, media_type="application/fhir+json")

    @router.post(config.path, summary="FHIR subscription notification (rest-hook)")
    async def notify(request: Request) -> Response:
        if expected is not None:
            sent = request.headers.get(config.secret_header, "")
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                return outcome(401, "security", f"missing or wrong {config.secret_header} header")
        try:
            result = receiver.handle_notification(await request.body(), request.headers.get("content-type"))
        except NotificationError as exc:
            return outcome(400, "invalid", str(exc))
        if on_result is not None:
            on_result(result)
        return Response(status_code=200)

    return router
