"""Operational telemetry: Prometheus metrics with bounded label cardinality, and structured JSON logs.

Two kinds of metric (Prometheus naming and instrumentation guidelines, https://prometheus.io/docs/practices/):
- *process* metrics the consumers update as they work (records ingested by source and outcome, dead letters by reason
  category, consumer lag, last processed watermark), in ``IngestMetrics``;
- *store* metrics computed at scrape time by ``StoreCollector`` (open alerts by severity and state, tickets by PCCP
  category and status, last run), so any process serving ``/metrics`` (the API) reports the shared truth.

Every label has a fixed vocabulary or a capped set of values (``BoundedLabel``), so a misbehaving feed cannot explode
the series count. No metric or log line carries a patient identifier or a payload.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ingest.load import reason_category
from ingest.subscription import DROPS, REFUSALS
from vigil.store import (
    PCCP_CATEGORIES,
    SEVERITIES,
    TICKET_STATUSES,
    AlertRow,
    RunRow,
    SourceCursorRow,
    SourceOffsetRow,
    TicketRow,
    engine_for,
)

OUTCOMES = ("accepted", "rejected", "ignored", "duplicate")
OPEN_STATES = ("firing", "acknowledged", "silenced")

#: reason_category() output → the fixed dead-letter vocabulary; anything else counts as "other".
DEAD_LETTER_REASONS: dict[str, str] = {
    "invalid JSON": "invalid_json",
    "not a FHIR resource": "not_fhir",
    "missing element": "missing_element",
    "invalid value": "invalid_value",
    "FHIR validation": "fhir_validation",
    "unknown model": "unknown_model",
    "identifiers present": "identifiers_present",
    "file not found": "unreadable_input",
    "cannot read file": "unreadable_input",
    "Bundle entry without a resource": "empty_bundle_entry",
}
DEAD_LETTER_VOCABULARY = tuple(sorted(set(DEAD_LETTER_REASONS.values()))) + ("other",)


def dead_letter_reason(reason: str) -> str:
    """The fixed-vocabulary label for a dead letter's reason (raw reasons name resources: unbounded, and not for
    a metrics system)."""
    category = reason_category(reason)
    if category.startswith("identifiers present"):
        return "identifiers_present"
    return DEAD_LETTER_REASONS.get(category, "other")


class BoundedLabel:
    """Admit at most ``limit`` distinct values of a free-form label (e.g. source names); later ones become
    ``overflow``. Values are also truncated, so a label never carries a long string."""

    def __init__(self, limit: int = 32, overflow: str = "other", max_length: int = 64) -> None:
        self.limit, self.overflow, self.max_length = limit, overflow, max_length
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = str(value)[: self.max_length]
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return self.overflow


class IngestMetrics:
    """What the consumers count as they go. Pass a registry in tests; production uses one per process."""

    def __init__(self, registry: CollectorRegistry, max_sources: int = 32) -> None:
        self.source = BoundedLabel(max_sources)
        self.records = Counter("vigil_ingest_records", "FHIR resources read, by source and outcome "
                               "(accepted | rejected | ignored | duplicate).", ["source", "outcome"],
                               registry=registry)
        self.dead_letters = Counter("vigil_dead_letters", "Inputs rejected into the dead-letter table, by reason "
                                    f"category ({', '.join(DEAD_LETTER_VOCABULARY)}).", ["reason"],
                                    registry=registry)
        self.lag = Gauge("vigil_consumer_lag_records", "Records behind the source's end (Kafka: high watermark minus "
                         "committed offset, summed over partitions).", ["source"], registry=registry)
        self.watermark = Gauge("vigil_watermark_timestamp_seconds", "Feed time of the last processed event (the "
                               "label-join watermark), Unix seconds.", ["source"], registry=registry)
        self.store_outages = Counter("vigil_store_outages", "Times `vigil run` found the store unavailable and "
                                     "waited for it (each followed by a restart from the last stored batch).",
                                     registry=registry)
        self.store_outage_seconds = Counter("vigil_store_outage_seconds", "Seconds `vigil run` spent waiting for an "
                                            "unavailable store.", registry=registry)
        # the subscription webhook (ingest.subscription): refusals (4xx) and acknowledged entries that go nowhere
        self.webhook_refused = Counter("vigil_webhook_refused", "Subscription notifications refused with a 4xx, by "
                                       f"reason ({', '.join(REFUSALS)}).", ["reason"], registry=registry)
        self.webhook_dropped = Counter("vigil_webhook_dropped", "Entries of acknowledged subscription notifications "
                                       f"not forwarded (not dead letters: nothing was decoded), by reason "
                                       f"({', '.join(DROPS)}).", ["reason"], registry=registry)
        for reason in DEAD_LETTER_VOCABULARY:  # every series exists from the start, so rate() sees the first one
            self.dead_letters.labels(reason)
        for reason in REFUSALS:
            self.webhook_refused.labels(reason)
        for reason in DROPS:
            self.webhook_dropped.labels(reason)

    def observe(self, source: str, *, accepted: int = 0, rejected: int = 0, ignored: int = 0,
                duplicate: int = 0, dead_letter_reasons: Iterable[str] = ()) -> None:
        """Count one processed batch: resource counts by outcome and the raw reasons of its dead letters."""
        src = self.source(source)
        for outcome, n in (("accepted", accepted), ("rejected", rejected), ("ignored", ignored),
                           ("duplicate", duplicate)):
            if n:
                self.records.labels(src, outcome).inc(n)
        for reason in dead_letter_reasons:
            self.dead_letters.labels(dead_letter_reason(reason)).inc()

    def observe_counts(self, source: str, accepted: Mapping[str, int], rejected: Mapping[str, int],
                       ignored: Mapping[str, int], duplicates: Mapping[str, int],
                       dead_letter_reasons: Iterable[str] = ()) -> None:
        """Like ``observe`` from the per-type counters of a batch (``RunResult``/``IngestResult`` deltas)."""
        self.observe(source, accepted=sum(accepted.values()), rejected=sum(rejected.values()),
                     ignored=sum(ignored.values()), duplicate=sum(duplicates.values()),
                     dead_letter_reasons=dead_letter_reasons)

    def set_lag(self, source: str, records: int) -> None:
        self.lag.labels(self.source(source)).set(records)

    def set_watermark(self, source: str, at: datetime) -> None:
        self.watermark.labels(self.source(source)).set(at.timestamp())


class StoreCollector(Collector):
    """Gauges read from the store at scrape time. A store that cannot be read gives ``vigil_store_up 0`` and no
    other store series, instead of failing the scrape."""

    def __init__(self, store_url: str, max_sources: int = 32) -> None:
        self._engine = engine_for(store_url)
        self._source = BoundedLabel(max_sources)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily: registering must not touch the database

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("vigil_store_up", "1 if the store answered this scrape's queries.")
        try:
            with Session(self._engine) as session:
                families = list(self._families(session))
        except Exception:  # noqa: BLE001 - any database failure is reported as store_up 0
            logging.getLogger(__name__).exception("metrics scrape: the store could not be read")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self, session: Session) -> Iterator[Metric]:
        alerts = GaugeMetricFamily("vigil_open_alerts", "Alerts not yet resolved, by severity and state.",
                                   labels=["severity", "state"])
        counts = {(sev, st): n for sev, st, n in session.execute(
            select(AlertRow.severity, AlertRow.state, func.count()).where(AlertRow.state.in_(OPEN_STATES))
            .group_by(AlertRow.severity, AlertRow.state))}
        for sev in SEVERITIES:
            for st in OPEN_STATES:
                alerts.add_metric([sev, st], counts.get((sev, st), 0))
        yield alerts
        tickets = GaugeMetricFamily("vigil_tickets", "Retraining tickets by PCCP category and status.",
                                    labels=["category", "status"])
        counts = {(c, s): n for c, s, n in session.execute(
            select(TicketRow.category, TicketRow.status, func.count()).group_by(TicketRow.category,
                                                                                TicketRow.status))}
        for cat in PCCP_CATEGORIES:
            for status in TICKET_STATUSES:
                tickets.add_metric([cat, status], counts.get((cat, status), 0))
        yield tickets
        last_run = session.scalar(select(func.max(RunRow.finished_at)))
        if last_run is not None:
            yield _gauge("vigil_last_run_finished_timestamp_seconds", "When the last pipeline run was stored.",
                         last_run.timestamp())
        committed = GaugeMetricFamily("vigil_source_committed_timestamp_seconds",
                                      "When each source last committed its position with the state it produced.",
                                      labels=["source"])
        latest: dict[str, float] = {}
        for table in (SourceOffsetRow, SourceCursorRow):
            for source, at in session.execute(select(table.source, func.max(table.updated_at)).group_by(table.source)):
                if at is not None:
                    label = self._source(source)
                    latest[label] = max(latest.get(label, 0.0), _utc(at).timestamp())
        for label, ts in sorted(latest.items()):
            committed.add_metric([label], ts)
        yield committed


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


# --- the /metrics endpoint --------------------------------------------------------------------------------------------

_process_registry = CollectorRegistry()
_process_metrics = IngestMetrics(_process_registry)


def ingest_metrics() -> IngestMetrics:
    """This process's ingest metrics (what ``metrics_router`` exposes unless given another registry)."""
    return _process_metrics


class _Forward(Collector):
    """Expose another registry's metrics through this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        return self._source.collect()


_PROBLEM = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the Prometheus text exposition format", "content": {CONTENT_TYPE_LATEST: {}}},
    401: {"description": "no valid bearer token (when mounted with the API's auth dependency)", "content": _PROBLEM},
    403: {"description": "the token's role may not read alerts (alerts:read)", "content": _PROBLEM},
}
"""What ``GET /metrics`` answers under `vigil serve` (guarded by ``require(alerts:read)``), for the OpenAPI document."""


def metrics_router(store_url: str | None = None, registry: CollectorRegistry | None = None,
                   dependencies: Sequence[Any] = ()) -> Any:
    """A FastAPI router serving ``GET /metrics`` in the Prometheus text format.

    ``store_url`` adds the scrape-time store gauges; ``registry`` defaults to this process's ingest metrics;
    ``dependencies`` (e.g. the API's auth dependency) guard the route like any other.
    """
    from fastapi import APIRouter, Response

    reg = CollectorRegistry()  # per router, so two routers never expose the same series twice
    reg.register(_Forward(registry or _process_registry))
    if store_url is not None:
        reg.register(StoreCollector(store_url))
    router = APIRouter(dependencies=list(dependencies))

    @router.get("/metrics", include_in_schema=True, summary="Prometheus metrics", tags=["observability"],
                response_class=Response, responses=METRICS_RESPONSES)
    def metrics():
        return Response(generate_latest(reg), media_type=CONTENT_TYPE_LATEST)

    return router


# --- structured logs ----------------------------------------------------------------------------------------------

#: LogRecord attributes that are not "extra" fields.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
#: Extra fields that could hold a resource or a patient's data: never written, only marked as withheld.
REDACTED_FIELDS = frozenset({"payload", "body", "resource", "raw", "record", "data", "content", "subject", "patient",
                             "bundle", "message_value", "value"})


RECORD_CONTENT_LOGGERS = {"kafka": logging.INFO}
"""Third-party loggers that write message contents at DEBUG, pinned to a level above it whatever the root level.

kafka-python (2.3.x) logs every record it sends at DEBUG (``kafka.producer.kafka``: "Sending (key=... value=...)")
and the bytes of each request (``kafka.conn``); the subscription webhook (vigil/webhook.py) forwards raw notified
resources, so ``--log-level-root debug`` would write whole Patients to the log. No identifier reaches the logs
(DESIGN.md §Reliability and security; HIPAA Safe Harbor, 45 CFR 164.514(b)(2)). Found by
scripts/reliability/identifiers.py (issue #9). Connection state and errors stay visible at INFO and above."""


def pin_record_content_loggers() -> None:
    """Set each ``RECORD_CONTENT_LOGGERS`` logger to its level; its child loggers (NOTSET) inherit it."""
    for name, level in RECORD_CONTENT_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


# at import: vigil.service, vigil.webhook and vigil.stages import this module before any Kafka client is built, and a
# program that sets the root level itself (a test harness, an embedding service) never calls configure_json_logging
pin_record_content_loggers()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``message``, then the record's extra
    fields (``logger.info("...", extra={"source": s, "n": 3})``). Fields in ``REDACTED_FIELDS`` are replaced by
    ``"[withheld]"``; values that are not JSON become their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            out[key] = "[withheld]" if key.lower() in REDACTED_FIELDS else value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def configure_json_logging(level: int | str = logging.INFO, stream: Any = None) -> logging.Handler:
    """Send every log record to ``stream`` (default stderr) as JSON lines; replaces the root logger's handlers and
    routes uvicorn's loggers through it (start uvicorn with ``log_config=None`` so it does not re-install its own)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    pin_record_content_loggers()  # again: something since may have lowered them
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # uvicorn installs its own text handlers
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True
    return handler
