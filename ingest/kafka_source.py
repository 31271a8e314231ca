"""Kafka source: a consumer group over FHIR topics (one resource or Bundle per record), effectively once.

Kafka's own offset commit cannot be atomic with vigil's database, so the database is the authority (the pattern of
"storing offsets outside Kafka", kafka-python / Apache Kafka ``KafkaConsumer`` docs): the service stores
``checkpoint()`` in the same transaction as the results, and whenever the group coordinator assigns a partition to
this consumer — at start or after a rebalance, possibly a partition another consumer had — the rebalance listener
reads that partition's stored offset *fresh from the store* and seeks to it. Kafka's committed offsets are then only a
courtesy for lag monitoring (``committed()``), never read back.

Records are passed on as bytes: a tombstone (value ``None``) becomes an empty payload, and it, non-UTF-8 bytes, and
any other bad value are dead-lettered by the decoder downstream (``ingest.reader.iter_message``) with this record's
topic/partition/offset, so a poison message never stops the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError, NoBrokersAvailable
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ingest.sources import Checkpoint, Message
from vigil.domain import Position

log = logging.getLogger(__name__)

Partition = tuple[str, int]  # (topic, partition)
OffsetsLookup = Callable[[list[Partition]], dict[Partition, int]]
"""Stored next offsets for the given partitions; partitions with nothing stored are left out."""

_SECURITY_KEYS = ("security_protocol",)
_SECURITY_PREFIXES = ("ssl_", "sasl_")


def _comma_list(value: Any) -> Any:
    return [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value


BootstrapServers = Annotated[list[str], BeforeValidator(_comma_list)]
"""Brokers as a list, or as Kafka's usual comma-separated string ("kafka-1:9092,kafka-2:9092")."""


class KafkaSourceConfig(BaseModel):
    """One Kafka source in the config file. ``security`` is passed to kafka-python's ``KafkaConsumer`` unchanged
    (``security_protocol``, ``ssl_*``, ``sasl_*`` keys only; e.g. ``{security_protocol: SASL_SSL, sasl_mechanism:
    SCRAM-SHA-512, sasl_plain_username: ..., sasl_plain_password: ...}``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["kafka"] = "kafka"
    name: str = Field(..., min_length=1, description="unique source name; the key of its stored offsets")
    bootstrap_servers: BootstrapServers = Field(..., min_length=1, description="host:port of one or more brokers")
    topics: list[str] = Field(..., min_length=1)
    group_id: str = Field(..., min_length=1, description="consumer group: consumers sharing it split the partitions")
    client_id: str = "vigil"
    max_poll_records: int = Field(500, gt=0)
    session_timeout_ms: int = Field(10_000, gt=0, description="no heartbeat for this long: the member is dropped")
    heartbeat_interval_ms: int = Field(3_000, gt=0, description="at most a third of session_timeout_ms")
    max_poll_interval_ms: int = Field(300_000, gt=0, description="longest processing of one batch before eviction")
    idle_timeout_s: float = Field(5.0, gt=0, description="`vigil run --once` stops after polls empty for this long")
    api_version: str | None = Field(None, pattern=r"^\d+\.\d+(\.\d+)?$", description=(
        "pin the broker protocol version, e.g. '2.3', instead of probing it; for brokers that advertise request "
        "versions they answer wrongly (librdkafka's mock cluster answers LeaveGroup v3 with a short response)"))
    security: dict[str, Any] = Field(default_factory=lambda: {"security_protocol": "PLAINTEXT"}, repr=False)

    @field_validator("security")
    @classmethod
    def _only_security_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(k for k in value if k not in _SECURITY_KEYS and not k.startswith(_SECURITY_PREFIXES))
        if unknown:
            raise ValueError(f"security accepts only security_protocol, ssl_* and sasl_* options of kafka-python's "
                             f"KafkaConsumer; remove {', '.join(unknown)} (offset handling is fixed by vigil)")
        not_consumer = sorted(k for k in value if k not in KafkaConsumer.DEFAULT_CONFIG)
        if not_consumer:
            raise ValueError(f"{', '.join(not_consumer)} is not a kafka-python KafkaConsumer option "
                             "(see https://kafka-python.readthedocs.io/en/master/apidoc/KafkaConsumer.html)")
        return value

    @model_validator(mode="after")
    def _heartbeat_fits_session(self) -> KafkaSourceConfig:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be at most a third of "
                             f"session_timeout_ms ({self.session_timeout_ms}), or members are dropped spuriously")
        return self

    def consumer_options(self) -> dict[str, Any]:
        """kafka-python ``KafkaConsumer`` keyword arguments; auto-commit off, because the store holds the offsets."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "group_id": self.group_id,
            "client_id": self.client_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": self.max_poll_records,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            **({"api_version": tuple(int(p) for p in self.api_version.split("."))} if self.api_version else {}),
            **self.security,
        }


class StoredOffsetsUnavailable(RuntimeError):
    """The store could not be asked where to resume a newly assigned partition; nothing was read from it."""


class UnstoredWorkRevoked(RuntimeError):
    """Partitions were taken away while results of their polled messages were not stored: discard the in-memory
    results (restart from the store); the partitions' new owner processes those messages."""


class KafkaSource:
    """``ingest.sources.Source`` over a Kafka consumer group (kafka-python 2.3).

    A rebalance happens only inside ``poll``. If the service stores after every ``poll``, everything handed out
    before it is already stored. If it polls several times per transaction, it must set ``on_revoke``: called inside
    ``poll`` when partitions with polled-but-unstored messages are about to be taken away, it must store the results
    and ``checkpoint()`` (still covering those partitions) and call ``committed()`` — the Kafka consumer's documented
    ``onPartitionsRevoked`` duty. Without it, or if it fails, those messages' offsets are dropped from the checkpoint,
    the new owner replays them, and ``poll`` raises ``UnstoredWorkRevoked`` so the service restarts from the store
    instead of storing results the new owner also produces.
    """

    rewinds_on_resume = True  # ``resume`` may be called again (after a store outage); see its docstring

    def __init__(self, config: KafkaSourceConfig, offsets_lookup: OffsetsLookup | None = None,
                 on_revoke: Callable[[], None] | None = None, on_assign: OffsetsLookup | None = None):
        self.name = config.name
        self.config = config
        self.on_revoke = on_revoke
        self.on_assign = on_assign  # when set, asked instead of offsets_lookup where to seek newly assigned partitions
        self._lookup = offsets_lookup
        self._resumed: dict[Partition, int] = {}
        self._consumer: KafkaConsumer | None = None
        self._assigned: set[Partition] = set()
        self._next: dict[Partition, int] = {}  # next offset after the last message handed out, per partition
        self._first: dict[Partition, int] = {}  # first offset handed out since the partition was assigned
        self._stored: dict[Partition, int | None] = {}  # what the store holds for each assigned partition
        self._pending: dict[Partition, int] = {}  # the last checkpoint() handed out, awaiting committed()
        self._joined = False
        self._idle_since = time.monotonic()
        self._exhausted = False
        self._failure: Exception | None = None

    # --- Source ------------------------------------------------------------------------------------------------

    def resume(self, checkpoint: Checkpoint) -> None:
        """Remember the stored offsets; used for partitions the ``offsets_lookup`` (if any) knows nothing about.

        Called again on a consumer that already holds partitions (the service restarting from the store after a store
        outage), every held partition is treated as newly assigned: sought back to its stored offset, with what was
        handed out since forgotten, and resumed if it was paused because its stored offset could not be read."""
        self._resumed = dict(checkpoint.offsets)
        held = self._consumer.assignment() if self._consumer is not None else set()
        if not held:
            return
        self._pending.clear()
        self._exhausted = False
        self._failure = None
        self._on_assigned(set(held))
        if self._failure is None:  # the offsets were read and sought; else the partitions stay paused, poll() raises
            self._consumer.resume(*held)

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        consumer = self._open()
        batches = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        messages: list[Message] = []
        for tp, records in batches.items():
            key = (tp.topic, tp.partition)
            if key not in self._assigned:  # fetched before a revocation: the new owner reads it
                continue
            for record in records:
                payload = record.value if record.value is not None else b""  # tombstone: dead-lettered downstream
                messages.append(Message(Position(tp.topic, record.offset, tp.partition), payload))
                self._first.setdefault(key, record.offset)
                self._next[key] = record.offset + 1
        now = time.monotonic()
        if messages:
            self._idle_since = now
            self._exhausted = False
        elif self._joined and now - self._idle_since >= self.config.idle_timeout_s:
            self._idle_since = now  # check the broker at most once per idle period
            self._exhausted = self._everything_stored()
        return messages

    @property
    def exhausted(self) -> bool:
        """Polls have returned nothing for ``idle_timeout_s``, and every partition of the topics up to its end offset
        was handed out by this member or is in the store — the group's work, not only this member's: a member whose
        own partitions are done keeps polling while another member's may still be handed to it by a rebalance."""
        return self._exhausted

    def _everything_stored(self) -> bool:
        consumer = self._consumer
        assert consumer is not None
        partitions = [TopicPartition(topic, p) for topic in self.config.topics
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return False
        try:
            begins, ends = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        except KafkaError as exc:
            log.info("Kafka source %r: end offsets unavailable (%s); not exhausted yet", self.name, exc)
            return False
        keys = [(tp.topic, tp.partition) for tp in partitions]
        done = self._lookup(keys) if self._lookup is not None else {}
        for key, offset in self._next.items():  # handed out by this member (the service stores it before it stops)
            done[key] = max(done.get(key, offset), offset)
        return all(done.get((tp.topic, tp.partition), begins[tp]) >= ends[tp] for tp in partitions)

    def checkpoint(self) -> Checkpoint:
        self._pending = {key: offset for key, offset in self._next.items() if key in self._assigned}
        return Checkpoint(offsets=dict(self._pending))

    @property
    def assigned(self) -> set[Partition]:
        """The partitions this consumer holds now."""
        return set(self._assigned)

    def topic_partitions(self) -> list[Partition]:
        """Every partition of the subscribed topics (the whole group's input), as the brokers' metadata says."""
        consumer = self._open()
        return sorted((topic, p) for topic in self.config.topics for p in (consumer.partitions_for_topic(topic) or ()))

    def stored_offsets(self) -> dict[Partition, int | None]:
        """For each partition of the last ``checkpoint()``, the offset the store held when this consumer last read
        or wrote it (``None``: nothing stored). ``vigil.offsets.save_checkpoint(..., expected=...)`` refuses to
        store if the row moved meanwhile — a consumer evicted from the group must not overwrite its successor."""
        return {key: self._stored.get(key) for key in self._pending}

    def committed(self) -> None:
        """The last checkpoint is stored: remember it, and commit it to Kafka too (for lag monitoring only)."""
        offsets = {key: offset for key, offset in self._pending.items() if key in self._assigned}
        self._stored.update(offsets)
        if not offsets or self._consumer is None:
            return
        try:
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})
        except KafkaError as exc:  # a rebalance in between: harmless, the store has the offsets
            log.info("Kafka source %r: courtesy offset commit to the broker failed (%s); the store has them",
                     self.name, exc)

    def close(self) -> None:
        """Leave the group without committing anything (uncommitted work is simply replayed by the next owner)."""
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None

    # --- rebalances -------------------------------------------------------------------------------------------------

    def _open(self) -> KafkaConsumer:
        if self._consumer is None:
            try:
                self._consumer = KafkaConsumer(**self.config.consumer_options())
            except NoBrokersAvailable:
                raise ConnectionError(
                    f"Kafka source {self.name!r}: no broker reachable at {','.join(self.config.bootstrap_servers)} "
                    "(check bootstrap_servers, the network and the security settings)"
                ) from None
            self._consumer.subscribe(self.config.topics, listener=_Listener(self))
        return self._consumer

    def _unstored(self, keys: list[Partition]) -> dict[Partition, int]:
        """How many messages of each partition were handed out but not yet stored."""
        counts = {}
        for key in keys:
            if key in self._next:
                stored = self._stored.get(key)
                counts[key] = self._next[key] - (stored if stored is not None else self._first[key])
        return {key: n for key, n in counts.items() if n > 0}

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._joined = False  # rejoining: not exhausted until the new assignment has been read
        keys = sorted((tp.topic, tp.partition) for tp in revoked)
        failed: Exception | None = None
        if self._unstored(keys) and self.on_revoke is not None:
            try:
                self.on_revoke()  # stores results + checkpoint and calls committed(), while we still own them
            except Exception as exc:  # noqa: BLE001 - kafka-python would swallow it; poll() raises it instead
                failed = exc
                log.error("Kafka source %r: storing before a rebalance failed: %s", self.name, _first_line(exc))
        if unstored := self._unstored(keys):
            where = ", ".join(f"{t}[{p}]: {n}" for (t, p), n in unstored.items())
            self._failure = UnstoredWorkRevoked(
                f"Kafka source {self.name!r}: partitions were reassigned to another consumer while results of "
                f"polled messages were not stored ({where}); the new owner processes them. Restart from the store "
                "(set on_revoke to store before a rebalance, or store after every poll)")
            self._failure.__cause__ = failed  # e.g. the store was down: the service waits for it, then restarts
        for key in keys:
            self._assigned.discard(key)
            for state in (self._next, self._first, self._stored, self._pending):
                state.pop(key, None)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self._consumer is not None
        keys = sorted((tp.topic, tp.partition) for tp in assigned)
        try:
            lookup = self.on_assign or self._lookup
            stored = lookup(keys) if lookup is not None else {}
        except Exception as exc:  # noqa: BLE001 - kafka-python swallows listener errors: pause, and let poll() raise
            self._failure = StoredOffsetsUnavailable(
                f"Kafka source {self.name!r}: could not read the stored offsets of newly assigned partitions "
                f"({_first_line(exc)}); nothing was consumed from them. Check the store, then restart the source")
            self._failure.__cause__ = exc
            self._consumer.pause(*assigned)
            return
        for tp in sorted(assigned, key=lambda tp: (tp.topic, tp.partition)):
            key = (tp.topic, tp.partition)
            offset = stored.get(key, self._resumed.get(key))
            self._assigned.add(key)
            self._stored[key] = offset
            self._next.pop(key, None)
            self._first.pop(key, None)
            if offset is None:  # nothing stored: the store is the authority, so from the start of the partition
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)
        self._joined = True
        self._idle_since = time.monotonic()
        log.info("Kafka source %r: assigned %s", self.name,
                 ", ".join(f"{t}[{p}]@{self._stored[(t, p)] or 0}" for t, p in keys) or "nothing")


def _first_line(exc: BaseException) -> str:
    """An error's first line: SQLAlchemy appends the SQL statement and its parameters on the following lines, which
    must not reach a log."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class _Listener(ConsumerRebalanceListener):
    """Seeks every newly assigned partition to its stored offset; forgets revoked ones."""

    def __init__(self, source: KafkaSource):
        self._source = source

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._source._on_revoked(revoked)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._source._on_assigned(assigned)
