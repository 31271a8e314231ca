"""librdkafka's mock cluster — a real Kafka-protocol server on loopback — for tests (DESIGN.md §Real components).

No Kafka broker can run here (no JVM, no internet); librdkafka ships an in-process cluster that speaks the Kafka wire
protocol (groups, rebalances, offset commits), and kafka-python 2.3.x talks to it like to a broker. The cluster is
made with librdkafka's own mock API (``rdkafka_mock.h``: ``rd_kafka_mock_cluster_new``, ``..._bootstraps``,
``rd_kafka_mock_group_initial_rebalance_delay_ms``), called through ``ctypes`` on the very librdkafka that
confluent-kafka loaded, because confluent-kafka's Python API exposes only ``test.mock.num.brokers`` and not the
cluster's settings. It lives until ``close``. The mock has no CreateTopics: topics auto-create with ``partitions``
partitions on first use; records are produced with a confluent-kafka Producer, as by any client.

Like a broker's ``group.initial.rebalance.delay.ms``, the mock waits 3 s before it completes the first join of an
empty group (so members that start together land in one generation); ``group_initial_rebalance_delay_ms=0`` removes
that wait for a test whose claim does not depend on members joining together.

Use from a test module (tests/ has no ``__init__.py``; pytest puts tests/ on ``sys.path``)::

    from kafka_mock import MockCluster, mock_cluster  # noqa: F401  (mock_cluster is a fixture)

(or ``quick_mock_cluster``, the same without the broker's initial rebalance delay).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import confluent_kafka
import pytest
from confluent_kafka import Producer
from kafka.coordinator.assignors.range import RangePartitionAssignor

_RD_KAFKA_PRODUCER = 0


def _librdkafka() -> ctypes.CDLL:
    """The librdkafka that confluent-kafka's extension is linked against (the wheel bundles its own copy)."""
    assert confluent_kafka.libversion()  # the extension, and with it librdkafka, is loaded
    maps = Path("/proc/self/maps").read_text()
    found = re.search(r"(/\S*librdkafka[^/\s]*\.so[^/\s]*)$", maps, re.M)
    path = found.group(1) if found else ctypes.util.find_library("rdkafka")
    if path is None:
        raise RuntimeError("librdkafka not found: confluent-kafka is imported but no librdkafka*.so is mapped and "
                           "none is on the library path; reinstall confluent-kafka (pip install -e '.[test]')")
    lib = ctypes.CDLL(path)
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
    lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
    lib.rd_kafka_mock_topic_create.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms.restype = None
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    return lib


class MockCluster:
    """A running mock cluster: ``bootstrap`` for any client, ``produce`` to put records on a topic."""

    def __init__(self, brokers: int = 1, group_initial_rebalance_delay_ms: int | None = None):
        self._lib = _librdkafka()
        errstr = ctypes.create_string_buffer(512)
        # the handle that owns the cluster: librdkafka runs the mock brokers on this client's threads
        self._owner = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, self._lib.rd_kafka_conf_new(), errstr, len(errstr))
        if not self._owner:
            raise RuntimeError(f"librdkafka could not create the mock cluster's owner handle: {errstr.value.decode()}")
        self._cluster = self._lib.rd_kafka_mock_cluster_new(self._owner, brokers)
        if not self._cluster:
            self._lib.rd_kafka_destroy(self._owner)
            raise RuntimeError(f"librdkafka could not start a mock cluster of {brokers} broker(s)")
        if group_initial_rebalance_delay_ms is not None:
            self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._cluster, group_initial_rebalance_delay_ms)
        self.bootstrap: str = self._lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()
        self._producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})

    def create_topic(self, topic: str, partitions: int) -> None:
        """Create a topic with ``partitions`` partitions (auto-created topics get 4). The mock keeps about 5 MB per
        partition and drops the oldest records beyond that, so a long feed needs enough partitions to stay whole."""
        err = self._lib.rd_kafka_mock_topic_create(self._cluster, topic.encode(), partitions, 1)
        if err:
            raise RuntimeError(f"the mock cluster could not create topic {topic!r} (librdkafka error {err})")

    def produce(self, topic: str, records: Iterable[tuple[int, bytes | None]]) -> int:
        """Write ``(partition, value)`` records in order (``None`` is a tombstone); returns how many were acked."""
        errors: list[str] = []
        acked = 0

        def delivered(err, _msg) -> None:
            nonlocal acked
            if err is not None:
                errors.append(str(err))
            else:
                acked += 1

        for partition, value in records:
            while True:
                try:
                    self._producer.produce(topic, value=value, partition=partition, on_delivery=delivered)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self._producer.poll(0.05)
        left = self._producer.flush(30)
        if errors or left:
            raise RuntimeError(f"producing to {topic} failed: {left} undelivered, errors {errors[:3]}")
        return acked

    def close(self) -> None:
        self._producer.flush(5)
        del self._producer
        self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
        self._lib.rd_kafka_destroy(self._owner)


@pytest.fixture
def mock_cluster() -> Iterator[MockCluster]:
    """A fresh one-broker mock cluster per test (auto-created topics get librdkafka's mock default of 4 partitions),
    with a broker's default initial rebalance delay (3 s)."""
    cluster = MockCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def quick_mock_cluster() -> Iterator[MockCluster]:
    """Like ``mock_cluster``, but a new group's first join completes at once (initial rebalance delay 0, as brokers
    are set up for tests): for consumers that join one after another, where the 3 s wait only delays them. Keep
    ``mock_cluster`` where members start together and the test's claim is about the groups they form."""
    cluster = MockCluster(group_initial_rebalance_delay_ms=0)
    try:
        yield cluster
    finally:
        cluster.close()


class MockRangeAssignor(RangePartitionAssignor):
    """kafka-python's range assignment, handed to the broker 0.5 s late.

    librdkafka's mock completes a SyncGroup round as soon as the leader's assignment arrives and then answers the
    followers' SyncGroup with INVALID_REQUEST (a real broker hands them their assignment); waiting lets the followers'
    SyncGroup reach the mock first. A group of one has no followers, so nothing waits. Same protocol name, so it mixes
    with plain range members."""

    @classmethod
    def assign(cls, cluster, group_subscriptions):
        if len(group_subscriptions) > 1:
            time.sleep(0.5)
        return super().assign(cluster, group_subscriptions)
