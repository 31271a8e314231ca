"""`vigil serve`'s FHIR subscription endpoint: notifications in, resources forwarded to Kafka for `vigil run`.

The webhook and the pipeline live in different processes (the API may run several replicas; the pipeline's state is
one), so the endpoint does not process resources itself. It checks the shared secret, parses the notification,
detects event-number gaps (``ingest.subscription``), and produces the notified resources to the configured topic
with ``acks=all`` *before* answering 200: a notification is acknowledged only once it is durable, and a failure to
forward answers 500 so the FHIR server retries. Nothing is written to the database here: the payloads carry
identifiers until the pipeline's decoder strips them.

When events are missing (a gap in event numbers, or an empty payload) and ``catch_up_base_url`` is set, the lost
resources are re-read with an incremental ``_lastUpdated`` search from the last good event (``ingest.rest_poll``) in
a background thread and forwarded the same way; duplicates are harmless downstream (the pipeline keeps one version
per resource). Without it the catch-up query is logged for the operator.

An ``id-only`` notification names its resources without sending them: with ``catch_up_base_url`` set, each one is
read from that server (``ingest.id_only``, with ``catch_up_auth_env``) and forwarded before the answer, like a
full-resource payload. A resource that cannot be read is forwarded as a fetch-failure OperationOutcome instead,
which the pipeline's decoder stores as a dead letter with the reason; the notification is still acknowledged, so
the stream goes on.

Refused notifications (4xx) and acknowledged entries that go nowhere are logged and counted in this process's
``vigil_webhook_refused_total{reason}`` / ``vigil_webhook_dropped_total{reason}`` (``vigil.observability``), which
`vigil serve` exposes on ``/metrics``.
"""

from __future__ import annotations

import logging
import threading

from fastapi import APIRouter
from kafka import KafkaProducer

from ingest.id_only import IdOnlyFetcher
from ingest.rest_poll import FhirHttpConfig, RestPollSource, RestPollSourceConfig
from ingest.sources import Checkpoint, Message
from ingest.subscription import (
    CatchUpQuery,
    NotificationResult,
    SubscriptionConfig,
    SubscriptionSource,
    subscription_router,
)
from vigil.observability import IngestMetrics, ingest_metrics

log = logging.getLogger(__name__)

FORWARD_TIMEOUT_S = 10.0
FETCH = {"timeout_s": 10.0, "max_retries": 2, "backoff_s": 0.5, "max_backoff_s": 5.0}
"""id-only reads happen before the notification is answered: a few quick retries, so the FHIR server's own
notification timeout is not reached; what still fails is dead-lettered, not retried forever."""


class SubscriptionForwarder:
    """One configured subscription endpoint; ``router()`` is mounted into the API."""

    def __init__(self, config: SubscriptionConfig, producer: KafkaProducer | None = None,
                 fetcher: IdOnlyFetcher | None = None, metrics: IngestMetrics | None = None):
        if not (config.forward_topic and config.forward_bootstrap_servers):
            raise ValueError(f"subscription {config.name!r}: set forward_bootstrap_servers and forward_topic — "
                             "`vigil serve` forwards notified resources to Kafka for `vigil run` to consume")
        self.config = config
        self.metrics = metrics or ingest_metrics()
        self.source = SubscriptionSource(config, on_dropped=self._dropped)
        self.producer = producer or KafkaProducer(bootstrap_servers=config.forward_bootstrap_servers, acks="all",
                                                  retries=3, linger_ms=0)
        self.forwarded = 0
        self.catch_ups: list[CatchUpQuery] = []  # gaps seen
        self.recovered = 0  # resources re-read and forwarded by catch-up queries
        self.fetched = 0  # id-only resources read and forwarded
        self.fetch_failures = 0  # id-only resources that could not be read (forwarded as dead letters)
        self.fetcher = fetcher or (IdOnlyFetcher(FhirHttpConfig(base_url=config.catch_up_base_url,
                                                                auth_env=config.catch_up_auth_env, **FETCH))
                                   if config.catch_up_base_url else None)
        self._catching_up: list[threading.Thread] = []

    def router(self) -> APIRouter:
        return subscription_router(self.source, self._forward, self._refused)

    def _refused(self, code: str) -> None:
        self.metrics.webhook_refused.labels(code).inc()

    def _dropped(self, code: str, n: int) -> None:
        self.metrics.webhook_dropped.labels(code).inc(n)

    def _forward(self, result: NotificationResult) -> None:
        self._send(result.subscription, self.source.poll(1_000_000, 0.0))  # what this notification queued
        if result.catch_up is not None:
            self.catch_ups.append(result.catch_up)
            if self.config.catch_up_base_url:
                thread = threading.Thread(target=self._catch_up, args=(result.catch_up,), daemon=True,
                                          name=f"catch-up {result.catch_up.subscription}")
                self._catching_up.append(thread)
                thread.start()
            else:
                log.warning("%s: events %d-%d of %s are missing and no catch_up_base_url is set: re-read %s "
                            "from %s by hand", self.config.name, result.catch_up.first, result.catch_up.last,
                            result.catch_up.subscription, ", ".join(result.catch_up.resource_types),
                            result.catch_up.since)
        if result.fetch:
            self._fetch(result.subscription, result.fetch)

    def _fetch(self, subscription: str, references: list[str]) -> None:
        """Read the resources an id-only notification names, and forward them (or their fetch failures)."""
        if self.fetcher is None:
            log.warning("%s: id-only notification naming %d resources, but no catch_up_base_url is set to read "
                        "them from: set it (and catch_up_auth_env) or have the server send full-resource payloads",
                        self.config.name, len(references))
            self.source.count_dropped("id_only_unfetchable", len(references), "event-notification")
            return
        fetched = [self.fetcher.fetch(reference) for reference in references]
        self._send(subscription, [f.payload for f in fetched])
        ok = sum(f.ok for f in fetched)
        self.fetched += ok
        self.fetch_failures += len(fetched) - ok

    def _send(self, subscription: str, messages: list[Message] | list[bytes]) -> None:
        futures = [self.producer.send(self.config.forward_topic, key=subscription.encode(),
                                      value=m if isinstance(m, bytes) else m.payload)
                   for m in messages]
        self.producer.flush(timeout=FORWARD_TIMEOUT_S)
        for future in futures:
            future.get(timeout=FORWARD_TIMEOUT_S)  # raises: the route answers 500 and the server retries
        self.forwarded += len(futures)

    def _catch_up(self, query: CatchUpQuery) -> None:
        """Re-read the lost events' resource types from the last good event and forward them."""
        poller = RestPollSource(RestPollSourceConfig(
            name=f"{self.config.name}-catch-up", base_url=self.config.catch_up_base_url,
            resource_types=list(query.resource_types), auth_env=self.config.catch_up_auth_env))
        poller.resume(Checkpoint(cursor=query.rest_cursor()))
        try:
            while not poller.exhausted:
                messages = poller.poll(500, 0.0)
                self._send(query.subscription, messages)
                self.recovered += len(messages)
            self.source.caught_up(query)
            log.info("%s: caught up events %d-%d of %s (%d resources re-read)", self.config.name, query.first,
                     query.last, query.subscription, self.recovered)
        except Exception:  # the query stays outstanding; the next gap or a restart tries again
            log.exception("%s: catch-up of events %d-%d failed", self.config.name, query.first, query.last)
        finally:
            poller.close()

    def wait_for_catch_up(self, timeout: float = 30.0) -> None:
        for thread in list(self._catching_up):
            thread.join(timeout)

    def close(self) -> None:
        self.producer.close(timeout=FORWARD_TIMEOUT_S)
        if self.fetcher is not None:
            self.fetcher.close()
