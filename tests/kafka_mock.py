"""librdkafka's mock cluster — a real Kafka-protocol server on loopback — for tests (DESIGN.md §Real components).

No Kafka broker can run here (no JVM, no internet); librdkafka ships an in-process cluster that speaks the Kafka wire
protocol (groups, rebalances, offset commits), and kafka-python 2.3.x talks to it like to a broker. It lives as long
as the confluent-kafka Producer that created it; its bootstrap address is only announced in librdkafka's debug log
("Mock cluster ... replaced with 127.0.0.1:PORT,..."), so a Python logger captures that line. The mock has no
CreateTopics: topics auto-create with ``partitions`` partitions on first use.

Use from a test module (tests/ has no ``__init__.py``; pytest puts tests/ on ``sys.path``)::

    from kafka_mock import MockCluster, mock_cluster  # noqa: F401  (mock_cluster is a fixture)
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator

import pytest
from confluent_kafka import Producer

_clusters = itertools.count(1)
_BOOTSTRAP = re.compile(r"replaced with (127\.0\.0\.1:\d+(?:,127\.0\.0\.1:\d+)*)")


class _BootstrapCatcher(logging.Handler):
    """Keeps the first bootstrap address librdkafka logs for its mock cluster."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bootstrap: str | None = None
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.bootstrap is None and (m := _BOOTSTRAP.search(record.getMessage())):
            self.bootstrap = m.group(1)
            self.seen.set()


class MockCluster:
    """A running mock cluster: ``bootstrap`` for any client, ``produce`` to put records on a topic."""

    def __init__(self, brokers: int = 1, partitions: int = 4, timeout_s: float = 10.0):
        self._catcher = _BootstrapCatcher()
        # A logger of its own, outside logging's registry: no parent, so librdkafka's debug chatter never reaches
        # pytest's captured logs, and no state (like ``disabled``) is shared with an earlier cluster's logger.
        self._logger = logging.Logger(f"kafka_mock.{next(_clusters)}", logging.DEBUG)
        self._logger.addHandler(self._catcher)
        self._producer = Producer({
            "test.mock.num.brokers": brokers,
            "debug": "mock",
            "logger": self._logger,
            "linger.ms": 5,
        })
        deadline = time.monotonic() + timeout_s
        while not self._catcher.seen.is_set() and time.monotonic() < deadline:
            self._producer.poll(0.05)  # serves the log queue
        if self._catcher.bootstrap is None:
            raise RuntimeError(f"librdkafka's mock cluster did not announce its address within {timeout_s} s "
                               f"(confluent-kafka debug log had no 'replaced with 127.0.0.1:PORT' line)")
        self.bootstrap: str = self._catcher.bootstrap
        self._logger.disabled = True  # the rest of librdkafka's mock debug log is not needed (nor wanted in reports)

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
        self._logger.removeHandler(self._catcher)
        del self._producer  # the cluster stops with its Producer


@pytest.fixture
def mock_cluster() -> Iterator[MockCluster]:
    """A fresh one-broker mock cluster per test (auto-created topics get librdkafka's mock default of 4 partitions)."""
    cluster = MockCluster()
    try:
        yield cluster
    finally:
        cluster.close()
