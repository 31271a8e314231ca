"""How a FHIR feed must be laid out on Kafka for stage 1 (``vigil run --stage cases``): keyed by patient.

A prediction and its outcomes must meet in one stage-1 partition, so every resource about a patient is keyed by
that patient (``Patient.id``, or the patient its ``subject``/``patient`` reference names) and lands, by Kafka's default
partitioner, in that patient's partition. Resources about no patient — the AI model and scanner ``Device``s, sites
(``Location``, ``Organization``) — are needed by every partition and go to all of them, ahead of the events that
refer to them. ``route`` does exactly that for a list of resources; an EMR integration engine does the same with its
own producer (key = the patient id, bytes hashed with murmur2, as every Kafka client's default partitioner does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

import orjson
from kafka.partitioner.default import murmur2


def subject_of(resource: dict) -> str | None:
    """The patient a resource is about (its id), or None for a resource about no patient."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for element in ("subject", "patient"):
        ref = resource.get(element)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            return ref["reference"].rsplit("/", 1)[-1]
    return None


def partition_for(key: str, partitions: int) -> int:
    """Kafka's default partitioner: murmur2 of the key's UTF-8 bytes, made positive, modulo the partitions."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def feed_clock(time: datetime | str) -> dict:
    """The feed's clock as a FHIR resource (``vigil.domain.FeedClock``): send it to every partition, e.g. every
    minute and at the end of a finite feed, so quiet partitions keep up with the feed's time."""
    instant = time if isinstance(time, str) else time.isoformat().replace("+00:00", "Z")
    return {"resourceType": "Parameters", "parameter": [{"name": "vigil-feed-clock", "valueInstant": instant}]}


def in_arrival_order(resources: Iterable[dict]) -> list[dict]:
    """Reference data about no patient first, then by ``meta.lastUpdated`` (outcomes before predictions of the same
    instant), and the feed clock of the last instant at the end: the order in which a feed is published."""
    found = sorted(resources, key=lambda r: (subject_of(r) is not None, r.get("meta", {}).get("lastUpdated", ""),
                                             r.get("resourceType") == "RiskAssessment"))
    last = max((r.get("meta", {}).get("lastUpdated", "") for r in found), default="")
    return [*found, feed_clock(last)] if last else found


def publish(resources: list[dict], bootstrap: list[str], topic: str, security: dict | None = None) -> int:
    """Send a feed to a Kafka topic laid out for stage 1 (``route``), each record acknowledged by all in-sync
    replicas; returns how many records were sent."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, **(security or {}))
    try:
        partitions = len(producer.partitions_for(topic))
        sent = 0
        for partition, payload in route(resources, partitions):
            producer.send(topic, payload, partition=partition)
            sent += 1
        producer.flush()
        return sent
    finally:
        producer.close()


def route(resources: Iterable[dict], partitions: int) -> Iterator[tuple[int, bytes]]:
    """``(partition, record)`` for every resource, in the given order: keyed by patient, or to every partition
    (reference data, and the feed clock)."""
    for resource in resources:
        payload = orjson.dumps(resource)
        subject = subject_of(resource)
        if subject is None:
            for p in range(partitions):
                yield p, payload
        else:
            yield partition_for(subject, partitions), payload
