"""`vigil serve`'s FHIR subscription endpoint: notifications in, resources forwarded to Kafka for `vigil run`.

The webhook and the pipeline live in different processes (the API may run several replicas; the pipeline's state is
one), so the endpoint does not process resources itself. It checks the shared secret, parses the notification,
detects event-number gaps (``ingest.subscription``), and produces the notified resources to the configured topic
with ``acks=all`` *before* answering 200: a notification is acknowledged only once it is durable, and a failure to
forward answers 500 so the FHIR server retries. Nothing is written to the database here: the payloads carry
identifiers until the pipeline's decoder strips them.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from kafka import KafkaProducer

from ingest.subscription import NotificationResult, SubscriptionConfig, SubscriptionSource, subscription_router

log = logging.getLogger(__name__)

FORWARD_TIMEOUT_S = 10.0


class SubscriptionForwarder:
    """One configured subscription endpoint; ``router()`` is mounted into the API."""

    def __init__(self, config: SubscriptionConfig, producer: KafkaProducer | None = None):
        if not (config.forward_topic and config.forward_bootstrap_servers):
            raise ValueError(f"subscription {config.name!r}: set forward_bootstrap_servers and forward_topic — "
                             "`vigil serve` forwards notified resources to Kafka for `vigil run` to consume")
        self.config = config
        self.source = SubscriptionSource(config)
        self.producer = producer or KafkaProducer(bootstrap_servers=config.forward_bootstrap_servers, acks="all",
                                                  retries=3, linger_ms=0)
        self.forwarded = 0
        self.catch_ups: list = []  # gaps seen; the catch-up query is logged for the operator (not yet run here)

    def router(self) -> APIRouter:
        return subscription_router(self.source, self._forward)

    def _forward(self, result: NotificationResult) -> None:
        messages = self.source.poll(1_000_000, 0.0)  # what this notification queued
        futures = [self.producer.send(self.config.forward_topic, key=result.subscription.encode(), value=m.payload)
                   for m in messages]
        self.producer.flush(timeout=FORWARD_TIMEOUT_S)
        for future in futures:
            future.get(timeout=FORWARD_TIMEOUT_S)  # raises: the route answers 500 and the server retries
        self.forwarded += len(futures)
        if result.catch_up is not None:
            self.catch_ups.append(result.catch_up)
        if result.fetch:
            log.warning("%s: id-only notification; %d resources must be fetched from the FHIR server",
                        self.config.name, len(result.fetch))

    def close(self) -> None:
        self.producer.close(timeout=FORWARD_TIMEOUT_S)
