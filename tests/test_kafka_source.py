"""Kafka source against librdkafka's mock cluster, with offsets stored in a real SQLite store (and PostgreSQL).

The broker is librdkafka's mock cluster (tests/kafka_mock.py): no real Kafka broker can run here (no JVM), and the
mock is a real Kafka-protocol server on loopback, so kafka-python runs its real group protocol — joins, rebalances,
offset commits — against it. Its one quirk: it answers LeaveGroup v3 with a short response kafka-python cannot decode,
so a closing consumer would linger in the group for a session timeout; the tests pin ``api_version="2.3"``
(LeaveGroup v2), which the mock answers correctly. Everything else is real: the FHIR feed is the simulator's, decoded by
the real ``ingest`` Decoder, and results plus offsets are written in one transaction to a migrated SQLite store.
Tests whose consumers join one after another use ``quick_mock_cluster`` (no 3 s initial rebalance delay, which only
gathers members that start together); the group of three, whose members do start together, keeps the broker default.
"""

from __future__ import annotations

import threading
import time

import pytest
from kafka_mock import MockCluster, MockRangeAssignor, mock_cluster, quick_mock_cluster  # noqa: F401  (fixtures)
from pydantic import ValidationError
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

from ingest import Decoder, SubjectKeyer, load, load_messages
from ingest.kafka_source import KafkaSource, KafkaSourceConfig, UnstoredWorkRevoked
from ingest.sources import Checkpoint
from vigil.offsets import StaleOffsets, load_checkpoint, lookup_offsets, save_checkpoint
from vigil.simulator import simulate
from vigil.store import DeadLetterRow, SourceOffsetRow, engine_for, session_factory, upgrade

SOURCE = "emr-kafka"
TOPIC = "fhir.r4"
PARTITIONS = 4  # librdkafka's mock auto-creates topics with 4 partitions

counted_metadata = MetaData()
counted = Table(  # one row per accepted resource; deliberately no unique key, so a double count shows up
    "test_counted", counted_metadata,
    Column("id", Integer, primary_key=True),
    Column("topic", String, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", Integer, nullable=False),
    Column("record", String, nullable=False),
    Column("consumer", String, nullable=False),
)


class MockClusterConfig(KafkaSourceConfig):
    """The production config plus the work-around above; everything else as in production."""

    def consumer_options(self) -> dict:
        return {**super().consumer_options(), "partition_assignment_strategy": (MockRangeAssignor,)}


class Crash(Exception):
    """Stands for the process dying at a chosen point."""


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feed(tmp_path_factory) -> tuple[list[bytes], set[tuple[int, int]]]:
    """The simulator's FHIR feed as one record per resource, and the (partition, offset) of every record the real
    decoder accepts when it reads the same lines from a file — the exactly-once reference."""
    out = tmp_path_factory.mktemp("feed")
    simulate("stable", out, seed=3, days=4, change_day=2, volume=0.1)
    lines = [line for path in sorted(out.glob("*.ndjson")) for line in path.read_bytes().splitlines() if line]
    joined = out / "joined" / "all.ndjson"
    joined.parent.mkdir()
    joined.write_bytes(b"\n".join(lines) + b"\n")
    loaded = load(joined, decoder())
    assert not loaded.dead_letters and len(loaded.records) == len(lines) > 300
    accepted = {((p.line - 1) % PARTITIONS, (p.line - 1) // PARTITIONS) for p, _ in loaded.records}
    return lines, accepted


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    upgrade(url)
    engine = engine_for(url)
    counted_metadata.create_all(engine)
    engine.dispose()
    return session_factory(url)


def decoder() -> Decoder:
    return Decoder(SubjectKeyer("test-secret"))


def produce_feed(cluster: MockCluster, lines: list[bytes]) -> dict[tuple[str, int], int]:
    """Line i goes to partition i % 4 at offset i // 4; returns each partition's end offset."""
    assert cluster.produce(TOPIC, [(i % PARTITIONS, line) for i, line in enumerate(lines)]) == len(lines)
    return {(TOPIC, p): len(range(p, len(lines), PARTITIONS)) for p in range(PARTITIONS)}


def source(cluster: MockCluster, factory, group: str, topics=(TOPIC,)) -> KafkaSource:
    config = MockClusterConfig(name=SOURCE, bootstrap_servers=cluster.bootstrap, topics=list(topics), group_id=group,
                               idle_timeout_s=0.5, session_timeout_ms=3000, heartbeat_interval_ms=1000,
                               api_version="2.3")
    src = KafkaSource(config, offsets_lookup=lookup_offsets(factory, SOURCE))
    with factory() as s:
        src.resume(load_checkpoint(s, SOURCE))
    return src


def step(src: KafkaSource, factory, dec: Decoder, consumer: str, max_records: int = 50,
         crash: str | None = None) -> int:
    """What the service does per poll: decode, store results + dead letters + offsets in ONE transaction, then ack."""
    messages = src.poll(max_records, 0.2)
    if not messages:
        return 0
    result = load_messages(messages, dec)
    checkpoint, expected = src.checkpoint(), src.stored_offsets()
    with factory() as s, s.begin():
        if result.records:
            s.execute(insert(counted), [
                {"topic": p.source, "partition": p.partition, "offset": p.line, "record": type(r).__name__,
                 "consumer": consumer} for p, r in result.records])
        if result.dead_letters:
            s.add_all(DeadLetterRow.from_dead_letter(d) for d in result.dead_letters)
        save_checkpoint(s, SOURCE, checkpoint, expected=expected)
        if crash == "before-db-commit":
            raise Crash(crash)
    if crash == "after-db-commit":  # stored, but Kafka never hears of it: the broker's offsets lag the store
        raise Crash(crash)
    src.committed()
    return len(messages)


def next_batch(src: KafkaSource, factory, dec: Decoder, consumer: str, **kw) -> int:
    """Step until a batch with messages is processed (the first polls only join the group)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if n := step(src, factory, dec, consumer, **kw):
            return n
    raise AssertionError("no messages within 30 s")


def drain(src: KafkaSource, factory, consumer: str, max_records: int = 50) -> int:
    dec, total, deadline = decoder(), 0, time.monotonic() + 60
    while not src.exhausted:
        assert time.monotonic() < deadline, "source never became exhausted"
        total += step(src, factory, dec, consumer, max_records)
    return total


def counted_rows(factory) -> list[tuple[str, int, int, str]]:
    with factory() as s:
        return [tuple(r) for r in s.execute(select(counted.c.topic, counted.c.partition, counted.c.offset,
                                                   counted.c.consumer))]


def stored_offsets(factory) -> dict[tuple[str, int], int]:
    with factory() as s:
        return load_checkpoint(s, SOURCE).offsets


# --- (a) messages and positions ---------------------------------------------------------------------------------


def test_records_become_messages_with_topic_partition_offset_in_order(quick_mock_cluster, store, feed):
    lines, _ = feed
    ends = produce_feed(quick_mock_cluster, lines[:40])
    src = source(quick_mock_cluster, store, "g-a")
    got = []
    try:
        while not src.exhausted:
            got.extend(src.poll(100, 0.2))
        checkpoint = src.checkpoint()
    finally:
        src.close()
    assert len(got) == 40
    by_partition: dict[int, list[int]] = {}
    for m in got:
        assert m.position.source == TOPIC
        by_partition.setdefault(m.position.partition, []).append(m.position.line)
        i = m.position.line * PARTITIONS + m.position.partition  # the line this record was produced from
        assert m.payload == lines[i]
    assert by_partition == {p: list(range(10)) for p in range(PARTITIONS)}  # every offset once, in order
    assert checkpoint == Checkpoint(offsets=ends)


# --- (b) a consumer killed mid-batch, restarted -------------------------------------------------------------------


def test_consumer_killed_mid_batch_and_restarted_counts_every_resource_exactly_once(quick_mock_cluster, store, feed):
    lines, accepted = feed
    ends = produce_feed(quick_mock_cluster, lines)

    first = source(quick_mock_cluster, store, "g-b")  # two batches stored, then dies inside the third transaction
    dec = decoder()
    done = next_batch(first, store, dec, "first") + next_batch(first, store, dec, "first")
    with pytest.raises(Crash):
        next_batch(first, store, dec, "first", crash="before-db-commit")
    first.close()
    assert len(counted_rows(store)) == done > 0
    assert sum(stored_offsets(store).values()) == done  # next offsets: what was consumed from each partition

    second = source(quick_mock_cluster, store, "g-b")  # resumes at the stored offsets; stores a batch but dies before
    dec = decoder()                              # acking it to Kafka, so the broker's committed offsets lag the store
    with pytest.raises(Crash):
        next_batch(second, store, dec, "second", crash="after-db-commit")
    done = sum(stored_offsets(store).values())
    assert len(counted_rows(store)) == done
    assert second.poll(50, 5.0)  # polls another batch and is killed before storing anything of it
    second.close()
    assert len(counted_rows(store)) == done < len(lines)

    third = source(quick_mock_cluster, store, "g-b")
    drain(third, store, "third")
    third.close()

    rows = counted_rows(store)
    assert len(rows) == len(accepted) == len(lines)  # nothing counted twice ...
    assert {(p, o) for _, p, o, _ in rows} == accepted  # ... and nothing lost
    assert stored_offsets(store) == ends


# --- (c) several consumers in one group, one leaves ---------------------------------------------------------------


def test_a_group_of_three_with_a_rebalance_counts_every_resource_exactly_once(mock_cluster, store, feed):
    """Like ``vigil run`` (which stores every few seconds), the two consumers that stay store only at the end — and,
    through ``on_revoke``, when the departure's rebalance takes their partitions away with polled-but-unstored work.
    The one that leaves stores after its third poll, then leaves the group."""
    lines, accepted = feed
    ends = produce_feed(mock_cluster, lines)
    errors: list[BaseException] = []
    batches: dict[str, int] = {}
    flushed_on_revoke: list[str] = []

    def consume(name: str, leave_after: int | None, store_every: int) -> None:
        src = source(mock_cluster, store, "g-c")
        dec, n, pending = decoder(), 0, []

        def store_pending(why: str = "every third poll") -> None:
            checkpoint, expected = src.checkpoint(), src.stored_offsets()
            with store() as s, s.begin():
                rows = [{"topic": p.source, "partition": p.partition, "offset": p.line, "record": type(r).__name__,
                         "consumer": name} for result in pending for p, r in result.records]
                if rows:
                    s.execute(insert(counted), rows)
                save_checkpoint(s, SOURCE, checkpoint, expected=expected)
            src.committed()
            pending.clear()
            if why == "rebalance":
                flushed_on_revoke.append(name)

        src.on_revoke = lambda: store_pending("rebalance")
        try:
            deadline = time.monotonic() + 60
            while not src.exhausted and time.monotonic() < deadline:
                if messages := src.poll(10, 0.2):
                    pending.append(load_messages(messages, dec))
                    n += 1
                    if n % store_every == 0:
                        store_pending()
                    if n == leave_after:
                        return  # leaves the group: its partitions go to the others, from the stored offsets
            store_pending("end")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            batches[name] = n
            src.close()

    threads = [threading.Thread(target=consume, args=("leaver", 3, 3)),
               threading.Thread(target=consume, args=("stayer-1", None, 10_000)),
               threading.Thread(target=consume, args=("stayer-2", None, 10_000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert batches["leaver"] == 3

    rows = counted_rows(store)
    assert len(rows) == len(accepted)
    assert {(p, o) for _, p, o, _ in rows} == accepted
    assert stored_offsets(store) == ends
    owners: dict[int, set[str]] = {}
    for _, partition, _, consumer in rows:
        owners.setdefault(partition, set()).add(consumer)
    assert {c for cs in owners.values() for c in cs} == {"leaver", "stayer-1", "stayer-2"}
    handed_over = [p for p, cs in owners.items() if "leaver" in cs and len(cs) > 1]
    assert handed_over, f"no partition changed owner mid-stream: {owners}"  # the rebalance really happened
    assert sorted(flushed_on_revoke) == ["stayer-1", "stayer-2"]  # both held unstored work at the rebalance


def test_partitions_revoked_with_unstored_work_and_no_on_revoke_stop_the_consumer_not_double_count(
        quick_mock_cluster, store, feed):
    """A consumer that polled without storing and has no ``on_revoke`` must not go on to store results the new owner
    also produces: the rebalance makes its ``poll`` raise ``UnstoredWorkRevoked``; the new owner replays them."""
    lines, accepted = feed
    ends = produce_feed(quick_mock_cluster, lines)
    first = source(quick_mock_cluster, store, "g-r")
    deadline = time.monotonic() + 30
    while not (polled := first.poll(20, 0.2)):  # joins alone, gets all partitions, polls 20 it never stores
        assert time.monotonic() < deadline
    assert 0 < len(polled) <= 20
    second = source(quick_mock_cluster, store, "g-r")
    newcomer = threading.Thread(target=drain, args=(second, store, "second"))
    newcomer.start()  # its join makes the coordinator rebalance; the first learns of it inside poll
    with pytest.raises(UnstoredWorkRevoked, match=r"not stored \(fhir\.r4\[\d\]: \d+"):
        while time.monotonic() < deadline:
            first.poll(20, 0.2)
    first.close()  # the service dies and restarts from the store; what it polled was never stored
    newcomer.join(60)
    second.close()
    rows = counted_rows(store)
    assert len(rows) == len(accepted) and {(p, o) for _, p, o, _ in rows} == accepted
    assert stored_offsets(store) == ends


# --- (d) poison messages ------------------------------------------------------------------------------------------


def test_poison_messages_become_dead_letters_with_their_offset_and_the_stream_continues(quick_mock_cluster, store):
    records = [
        b'{"resourceType": "Organization", "id": "site-a"}',
        b'{"resourceType": "Organization", "id": ',  # truncated JSON
        b'{"hello": "not fhir"}',
        None,  # tombstone
        b'\xff\xfe{"resourceType": "Organization"}',  # not UTF-8
        b'{"resourceType": "Patient", "id": "p-1", "birthDate": "yesterday"}',  # FHIR that breaks the profile
        b'{"resourceType": "Organization", "id": "site-b"}',
    ]
    quick_mock_cluster.produce("poison", [(0, r) for r in records])
    src = source(quick_mock_cluster, store, "g-d", topics=["poison"])
    try:
        assert drain(src, store, "only") == len(records)
    finally:
        src.close()

    with store() as s:
        letters = s.execute(select(DeadLetterRow.source, DeadLetterRow.partition, DeadLetterRow.position,
                                   DeadLetterRow.reason, DeadLetterRow.payload).order_by(DeadLetterRow.position)).all()
    assert [(src_, part, pos) for src_, part, pos, _, _ in letters] == [("poison", 0, o) for o in (1, 2, 3, 4, 5)]
    reasons = [reason for *_, reason, _ in letters]
    assert reasons[0].startswith("invalid JSON")
    assert reasons[1] == "not a FHIR resource (no resourceType)"
    assert reasons[2] == "empty message (a Kafka tombstone or an empty body): nothing to ingest"  # tombstone
    assert reasons[3].startswith("invalid JSON: str is not valid UTF-8")
    assert "invalid birthDate" in reasons[4] and "p-1" not in reasons[4]  # a patient id is keyed, never stored
    assert letters[4].payload is not None and "p-1" not in letters[4].payload
    assert [(p, o) for _, p, o, _ in counted_rows(store)] == [(0, 0), (0, 6)]  # the good ones, on both sides
    assert stored_offsets(store)[("poison", 0)] == 7


# --- offsets in the store: SQLite and PostgreSQL ------------------------------------------------------------------


def _offsets_roundtrip(url: str) -> None:
    upgrade(url)
    factory = session_factory(url)
    with factory() as s, s.begin():
        save_checkpoint(s, SOURCE, Checkpoint({(TOPIC, 0): 5, (TOPIC, 1): 7, ("other", 0): 1}, cursor="2026-01-01"))
        save_checkpoint(s, "emr_kafka", Checkpoint({(TOPIC, 0): 99}))  # "_" is a LIKE wildcard: must not match
    with factory() as s, s.begin():
        save_checkpoint(s, SOURCE, Checkpoint({(TOPIC, 0): 9}), expected={(TOPIC, 0): 5})
        save_checkpoint(s, SOURCE, Checkpoint({(TOPIC, 2): 3}), expected={(TOPIC, 2): None})
    with factory() as s:
        assert load_checkpoint(s, SOURCE) == Checkpoint(
            {(TOPIC, 0): 9, (TOPIC, 1): 7, (TOPIC, 2): 3, ("other", 0): 1}, cursor="2026-01-01")
        keys = set(s.scalars(select(SourceOffsetRow.source)))
    assert keys == {f"{SOURCE}|{TOPIC}", f"{SOURCE}|other", f"emr_kafka|{TOPIC}"}
    lookup = lookup_offsets(factory, SOURCE)
    assert lookup([(TOPIC, 0), (TOPIC, 3), ("other", 0)]) == {(TOPIC, 0): 9, ("other", 0): 1}

    # a consumer evicted from its group still holding offset 5 / "no row" must not overwrite its successor's
    for stale in ({(TOPIC, 0): 5}, {(TOPIC, 2): None}):
        with pytest.raises(StaleOffsets, match=f"{SOURCE}\\|{TOPIC}"):
            with factory() as s, s.begin():
                save_checkpoint(s, SOURCE, Checkpoint({key: 11 for key in stale}), expected=stale)
    assert lookup([(TOPIC, 0), (TOPIC, 2)]) == {(TOPIC, 0): 9, (TOPIC, 2): 3}
    factory.kw["bind"].dispose()


def test_offsets_upsert_load_lookup_and_fencing_on_sqlite(tmp_path):
    _offsets_roundtrip(f"sqlite:///{tmp_path / 'o.db'}")


@pytest.mark.postgres
def test_offsets_upsert_load_lookup_and_fencing_on_postgresql(fresh_postgres_url):
    _offsets_roundtrip(fresh_postgres_url)


# --- configuration ------------------------------------------------------------------------------------------------


def test_config_refuses_options_that_would_break_the_offset_guarantees_and_says_why():
    base = {"name": "k", "bootstrap_servers": "b1:9092, b2:9092", "topics": ["t"], "group_id": "g"}
    config = KafkaSourceConfig(**base)
    assert config.bootstrap_servers == ["b1:9092", "b2:9092"]
    options = config.consumer_options()
    assert (options["enable_auto_commit"], options["auto_offset_reset"], options["security_protocol"]) == (
        False, "earliest", "PLAINTEXT")
    with pytest.raises(ValidationError, match="enable_auto_commit"):
        KafkaSourceConfig(**base, security={"enable_auto_commit": True})
    with pytest.raises(ValidationError, match="sasl_pasword is not a kafka-python KafkaConsumer option"):
        KafkaSourceConfig(**base, security={"sasl_pasword": "x"})
    with pytest.raises(ValidationError, match="at most a third of session_timeout_ms"):
        KafkaSourceConfig(**base, session_timeout_ms=6000, heartbeat_interval_ms=3000)
    secret = KafkaSourceConfig(**base, security={"security_protocol": "SASL_SSL", "sasl_plain_password": "hunter2"})
    assert "hunter2" not in repr(secret)
