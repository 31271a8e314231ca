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

Hostile or broken input (issue #9): whatever the body, the route answers 200 or a 4xx ``OperationOutcome`` with a
reason — never a 5xx, which a FHIR server would retry forever (IG "Handling errors"). Each refusal is logged at
WARNING and counted with a code from ``REFUSALS`` (the log holds the code and its fixed description only: the sender's
text may carry identifiers). Resources acknowledged but not queued (``DROPS``) are logged and counted too; they are not
dead letters, because nothing was decoded — the pipeline's dead-letter table is for resources it read.

The route fails closed: without ``secret_env`` it refuses every request with 401 unless ``allow_unauthenticated`` is
set, which is for local testing only (an open endpoint lets anyone who reaches the port inject data).
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


#: Refusal codes (the ``reason`` label of ``vigil_webhook_refused_total``) → what a log line may say about them.
REFUSALS: dict[str, str] = {
    "unauthorized": "missing or wrong secret header",
    "no_secret_configured": "the endpoint has no secret_env and allow_unauthenticated is not set",
    "content_type": "unsupported Content-Type",
    "oversized": "body over max_message_bytes",
    "invalid_json": "the body is not valid JSON",
    "not_a_notification": "not a subscription-notification or history Bundle",
    "malformed": "an element that must be a list or object is not",
    "too_deep": "a resource nested deeper than can be re-encoded",
    "no_subscription": "no subscription reference",
    "unknown_type": "unknown notification type",
}
#: Why acknowledged entries were not queued (the ``reason`` label of ``vigil_webhook_dropped_total``).
DROPS: dict[str, str] = {
    "not_an_event": "resources inside a handshake, heartbeat, query-status or query-event notification (only "
                    "event-notification is forwarded; query-event answers $events, not a rest-hook)",
    "retried_notification": "resources of a notification whose events were all handled before (a retry)",
    "unreadable_entry": "entries that are neither a resource nor an id-only fullUrl",
    "id_only_unfetchable": "id-only entries with no catch_up_base_url to read them from",
}


class NotificationError(ValueError):
    """The body is not a notification we can read; the message says what was wrong (answered with HTTP 400).
    ``code`` is one of ``REFUSALS``: what logs and metrics may carry (the message may quote the sender's data)."""

    def __init__(self, message: str, code: str = "malformed"):
        super().__init__(message)
        self.code = code


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
    allow_unauthenticated: bool = Field(False, description="FOR LOCAL TESTING ONLY: accept notifications without a "
                                                           "secret when secret_env is not set (otherwise every "
                                                           "request is refused with 401 and `vigil serve` will not "
                                                           "start)")


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
    resources: list[tuple[int, dict, bytes]]  # (entry index, resource, its JSON) of the focus entries
    entry_urls: list[str]  # fullUrl of focus entries without a resource (id-only)
    errors: list[str] = field(default_factory=list)
    unreadable_entries: int = 0  # focus entries that are neither a resource nor an id-only fullUrl


def parse_notification(body: bytes, content_type: str | None, max_bytes: int = MAX_MESSAGE_BYTES) -> Notification:
    """Read a notification Bundle; raises ``NotificationError`` naming what is wrong."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES:
        raise NotificationError(f"unsupported Content-Type {content_type!r}: set the Subscription's channel.payload "
                                "to application/fhir+json", "content_type")
    if len(body) > max_bytes:
        raise NotificationError(f"oversized notification: {len(body):,} bytes over the limit of {max_bytes:,}; "
                                "use id-only payloads or raise max_message_bytes", "oversized")
    try:
        bundle = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise NotificationError(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                                "invalid_json") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise NotificationError("not a notification: expected a Bundle of type history (R4/R4B backport) or "
                                "subscription-notification (R5)", "not_a_notification")
    if bundle.get("type") not in ("history", "subscription-notification"):
        raise NotificationError(f"not a notification: Bundle.type is {str(bundle.get('type'))[:80]!r}, expected "
                                "history (R4/R4B backport) or subscription-notification (R5)", "not_a_notification")
    all_entries = _list(bundle, "entry", "Bundle")
    entries = [e for e in all_entries if isinstance(e, dict)]
    status = entries[0].get("resource") if entries else None
    if not isinstance(status, dict) or status.get("resourceType") not in ("Parameters", "SubscriptionStatus"):
        raise NotificationError("not a notification: the first entry must be a Parameters (R4 backport) or "
                                "SubscriptionStatus (R4B/R5) resource", "not_a_notification")
    note = _from_parameters(status) if status["resourceType"] == "Parameters" else _from_status(status)
    note.unreadable_entries = len(all_entries) - len(entries)
    for index, entry in enumerate(entries[1:], 2):
        resource = entry.get("resource")
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            note.resources.append((index, resource, _encode(resource, index)))
        elif isinstance(entry.get("fullUrl"), str):
            note.entry_urls.append(entry["fullUrl"])
        else:
            note.unreadable_entries += 1
    return note


def _list(element: dict, key: str, where: str) -> list:
    """``element[key]`` as a list (absent/null: empty); anything else is a malformed notification, refused with 400
    rather than guessed at (FHIR JSON: repeating elements are arrays, http://hl7.org/fhir/R5/json.html#arrays)."""
    value = element.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise NotificationError(f"malformed notification: {where}.{key} is a JSON {_json_kind(value)}, expected an "
                                "array (FHIR JSON repeating element)", "malformed")
    return value


def _json_kind(value: object) -> str:
    return {dict: "object", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "value")


def _encode(resource: dict, index: int) -> bytes:
    """The resource's bytes for the queue. orjson refuses nesting deeper than 254 levels (its recursion limit): such
    a resource is refused with the notification (400) — no real FHIR resource nests that deep."""
    try:
        return orjson.dumps(resource)
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise NotificationError(f"entry {index}: the {str(resource.get('resourceType'))[:64]} resource cannot be "
                                f"re-encoded ({exc}); nesting is limited to 254 levels", "too_deep") from None


def _from_status(status: dict) -> Notification:
    events = [NotificationEvent(_int(e.get("eventNumber")), _str(e.get("timestamp")), _ref(e.get("focus")))
              for e in _list(status, "notificationEvent", "SubscriptionStatus") if isinstance(e, dict)]
    errors = [_concept_text(c) for c in _list(status, "error", "SubscriptionStatus")]
    return _notification(_ref(status.get("subscription")), status.get("topic"), status.get("status"),
                         status.get("type"), _int(status.get("eventsSinceSubscriptionStart")), events, errors)


def _from_parameters(params: dict) -> Notification:
    values: dict[str, object] = {}
    events, errors = [], []
    for p in _list(params, "parameter", "Parameters"):
        if not isinstance(p, dict):
            continue
        name = p.get("name")
        if name == "notification-event":
            parts = {q["name"]: q for q in _list(p, "part", "Parameters.parameter")
                     if isinstance(q, dict) and isinstance(q.get("name"), str)}
            events.append(NotificationEvent(_int(_value(parts.get("event-number"))),
                                            _str(_value(parts.get("timestamp"))), _ref(_value(parts.get("focus")))))
        elif name == "error":
            errors.append(_concept_text(_value(p)))
        elif isinstance(name, str):
            values[name] = _value(p)
    return _notification(_ref(values.get("subscription")), values.get("topic"), values.get("status"),
                         values.get("type"), _int(values.get("events-since-subscription-start")), events, errors)


def _notification(subscription: str | None, topic, status, kind, since: int | None, events, errors) -> Notification:
    if not subscription:
        raise NotificationError("notification without its subscription reference (status.subscription)",
                                "no_subscription")
    if not isinstance(kind, str) or kind not in TYPES:
        raise NotificationError(f"{subscription}: unknown notification type {str(kind)[:80]!r} (expected one of "
                                f"{TYPES})", "unknown_type")
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
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdecimal():  # "²" passes isdigit()
        try:
            return int(value)
        except ValueError:  # over Python's int-string limit (4,300 digits): not an event number
            return None
    return None


def _str(value: object) -> str | None:
    """Timestamps are compared (``max``) and sent on: a non-string one is treated as absent."""
    return value if isinstance(value, str) and value else None


def _ref(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("reference")
    return value if isinstance(value, str) and value else None


def _concept_text(concept: object) -> str:
    if not isinstance(concept, dict):
        return "error"
    coding = concept.get("coding")
    codes = [c.get("code") for c in coding if isinstance(c, dict)] if isinstance(coding, list) else []
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
    dropped: dict[str, int] = field(default_factory=dict)  # DROPS code → entries acknowledged but not queued


@dataclass(slots=True)
class _State:
    last: int = 0
    timestamp: str | None = None  # of the last good event: where a catch-up starts
    missing: set[int] = field(default_factory=set)


class SubscriptionSource:
    """The webhook's state and queue: ``handle_notification`` (called by the route) and the ``Source`` methods
    (called by the service). Thread-safe: the route and the service loop run in different threads."""

    def __init__(self, config: SubscriptionConfig, now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_dropped: Callable[[str, int], None] | None = None):
        """``on_dropped(code, n)`` counts entries acknowledged but not queued (``DROPS``), e.g. into a metric."""
        self.name = config.name
        self.config = config
        self.now = now
        self.on_dropped = on_dropped
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
        if note.unreadable_entries:
            result.dropped["unreadable_entry"] = note.unreadable_entries
        for code, n in result.dropped.items():
            self.count_dropped(code, n, note.type)
        if result.catch_up:
            log.warning("%s: %s events %d-%d missing; catch up from %s", self.name, note.subscription,
                        result.catch_up.first, result.catch_up.last, result.catch_up.since)
        return result

    def count_dropped(self, code: str, n: int, kind: str) -> None:
        """Log and count ``n`` acknowledged entries that go nowhere (code and count only: no content, no ids)."""
        log.warning("%s: %d entries of a notification of type %s acknowledged but not forwarded (%s: %s)", self.name, n,
                    kind if kind in TYPES else "malformed", code, DROPS[code])
        if self.on_dropped is not None:
            self.on_dropped(code, n)

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
            if note.resources or note.entry_urls:
                result.dropped["not_an_event"] = len(note.resources) + len(note.entry_urls)
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
            if note.resources or note.entry_urls:
                result.dropped["retried_notification"] = len(note.resources) + len(note.entry_urls)
            return result
        first = fresh[0] if fresh else note.events_since_start
        source = f"{note.subscription}#event-{first}" if first is not None else note.subscription
        for index, _, payload in note.resources:
            result.messages.append(Message(Position(source, index), payload))
        present = {f"{r.get('resourceType')}/{r.get('id')}" for _, r, _ in note.resources}
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
            if state is not None:  # filter, not range(): a hostile event number can make first..last huge
                state.missing = {n for n in state.missing if not query.first <= n <= query.last}

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


def check_authentication(config: SubscriptionConfig) -> str | None:
    """Why ``config`` must not be mounted (None: it may). A rest-hook endpoint is reachable by whoever reaches the
    port; without a shared secret anyone could inject resources into the monitored feed (HIPAA Security Rule
    §164.312(d), person or entity authentication), so `vigil serve` refuses to start with such a source."""
    if config.secret_env or config.allow_unauthenticated:
        return None
    return (f"source {config.name!r} (kind fhir-subscription, path {config.path}) has no secret_env: set secret_env "
            f"to the name of an environment variable holding the value the FHIR server sends in the "
            f"{config.secret_header} header (Subscription.channel.header), or — for local testing only — set "
            "allow_unauthenticated: true on that source")


_OUTCOME_SCHEMA = {"type": "object", "required": ["resourceType", "issue"], "properties": {
    "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
    "issue": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["severity", "code"], "properties": {
            "severity": {"type": "string"}, "code": {"type": "string"}, "diagnostics": {"type": "string"}}}}}}
_BUNDLE_SCHEMA = {"type": "object", "description": "a FHIR Bundle of type history (R4/R4B backport) or "
                  "subscription-notification (R5); the first entry is the Parameters/SubscriptionStatus",
                  "properties": {"resourceType": {"type": "string", "enum": ["Bundle"]}, "type": {"type": "string"},
                                 "entry": {"type": "array", "items": {"type": "object"}}}}
OPENAPI_RESPONSES: dict[int | str, dict] = {
    200: {"description": "acknowledged (the resources are queued or forwarded); no body"},
    400: {"description": "not a notification this endpoint can read: the OperationOutcome says what was wrong",
          "content": {"application/fhir+json": {"schema": _OUTCOME_SCHEMA}}},
    401: {"description": "missing or wrong secret header (Subscription.channel.header), or no secret configured",
          "content": {"application/fhir+json": {"schema": _OUTCOME_SCHEMA}}},
}
"""What the route answers, for the OpenAPI document (a 5xx only when forwarding fails, so the server retries)."""


def subscription_router(receiver: SubscriptionSource,
                        on_result: Callable[[NotificationResult], None] | None = None,
                        on_refused: Callable[[str], None] | None = None) -> APIRouter:
    """A FastAPI router with the rest-hook endpoint: checks the shared secret, answers fast (the IG: acknowledge
    before work — the receiver only parses and queues), and hands the result (catch-up, fetch list) to ``on_result``.

    Every refusal is logged at WARNING with its ``REFUSALS`` code and handed to ``on_refused(code)`` (a metric).
    Without ``secret_env`` the route refuses everything (401) unless ``allow_unauthenticated`` is set.
    """
    config = receiver.config
    expected = os.environ.get(config.secret_env) if config.secret_env else None
    if config.secret_env and not expected:
        raise ValueError(f"subscription {config.name!r}: secret_env names {config.secret_env!r} but it is not set; "
                         "export the value the Subscription's channel.header sends")
    closed = expected is None and not config.allow_unauthenticated
    if closed:
        log.error("%s: no secret_env configured: the endpoint %s refuses every notification (401); set secret_env "
                  "(or allow_unauthenticated: true for local testing only)", config.name, config.path)
    router = APIRouter()

    def refuse(status: int, code: str, issue: str, text: str) -> JSONResponse:
        log.warning("%s: refused a notification with HTTP %d (%s: %s)", config.name, status, code, REFUSALS[code])
        if on_refused is not None:
            on_refused(code)
        return JSONResponse({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": issue, "diagnostics": text}]}, status, media_type="application/fhir+json")

    @router.post(config.path, summary="FHIR subscription notification (rest-hook)", tags=["fhir"],
                 responses=OPENAPI_RESPONSES, response_class=Response, openapi_extra={"requestBody": {
                     "required": True, "content": {media: {"schema": _BUNDLE_SCHEMA} for media in _JSON_TYPES}}})
    async def notify(request: Request) -> Response:
        if closed:
            return refuse(401, "no_secret_configured", "security",
                          f"this endpoint ({config.name}) has no secret configured and accepts no notifications; "
                          "the operator must set secret_env")
        if expected is not None:
            sent = request.headers.get(config.secret_header, "")
            if not hmac.compare_digest(sent.encode(), expected.encode()):
                return refuse(401, "unauthorized", "security", f"missing or wrong {config.secret_header} header")
        try:
            result = receiver.handle_notification(await request.body(), request.headers.get("content-type"))
        except NotificationError as exc:
            return refuse(400, exc.code, "invalid", str(exc))
        if on_result is not None:
            on_result(result)
        return Response(status_code=200)

    return router
