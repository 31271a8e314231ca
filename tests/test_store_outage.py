"""Issue #9, "store outage": PostgreSQL stopped and restarted under a running `vigil run` loses and double-counts
nothing.

Everything is real: a PostgreSQL cluster of this module's own (Debian's server binaries, started with the helpers of
tests/conftest.py; the session cluster other tests use is never stopped), stopped with ``pg_ctl stop -m immediate`` —
a crash, no clean shutdown — and started again; the real service, pipeline and simulator feed (``FeedSource`` of
tests/test_service.py, a finite in-memory ``Source``); for Kafka, librdkafka's mock cluster (tests/kafka_mock.py).
The stored results after an outage are compared with an uninterrupted run of the same feed on the same cluster using
tests/test_service.py's comparison (alerts, tickets, case labels and counts, dead letters, metric points, stream
states, audit chain).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
from conftest import PostgresCluster, _as_postgres, _free_port, _postgres_bin
from kafka_mock import MockCluster, quick_mock_cluster  # noqa: F401  (fixture)
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from test_service import FeedSource, _outcome, feed_payloads

from ingest.kafka_source import KafkaSource, KafkaSourceConfig, StoredOffsetsUnavailable
from ingest.sources import Checkpoint
from vigil.observability import _process_registry
from vigil.offsets import load_checkpoint, lookup_offsets, save_checkpoint
from vigil.service import Service, ServiceReport
from vigil.settings import Settings, load_settings
from vigil.store import AuditRow, RunRow, engine_for, session_factory, upgrade
from vigil.store_outage import (SourceCannotRewind, StoreRetry, StoreUnavailable, describe, is_store_outage,
                                store_name, wait_until_answering)

QUICK = StoreRetry(initial_s=0.1, max_s=0.5)  # production waits 0.5 s → 30 s; tests need not
BATCH = 2000


class DedicatedPostgres:
    """A throwaway PostgreSQL cluster that tests may crash (``stop``) and bring back (``start``) at will."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="vigil-pg-outage-"))
        if os.geteuid() == 0:  # the server runs as the postgres user (see conftest._as_postgres)
            shutil.chown(self.root, user="postgres", group="postgres")
        self.data, self.log, self.port = self.root / "data", self.root / "server.log", _free_port()
        self._pg(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        self.cluster = PostgresCluster(self.port)
        self.start()

    def start(self) -> None:
        # synchronous_commit stays on: with it off, PostgreSQL acknowledges a commit before writing its WAL, and an
        # immediate stop loses it (the service then resumes from the transaction before; correct, but not the
        # durability production has). fsync=off only matters for an operating-system crash, which this is not.
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self._pg(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"])

    def stop(self) -> None:
        """Crash it: ``-m immediate`` aborts every backend without a checkpoint, as a power cut or kill -9 would."""
        self._pg(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop"])

    def ensure_running(self) -> None:
        """Start it unless it runs (after a failed test, so the next one finds a server)."""
        status = subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "status"]),
                                capture_output=True, timeout=60)
        if status.returncode == 3:  # pg_ctl: "no server running"
            self.start()

    def database(self, name: str, password: str = "") -> str:
        """A new empty database; its URL (``password`` goes into the URL only: the cluster trusts loopback)."""
        self.cluster.admin(f"CREATE DATABASE {name}")
        return self.cluster.url(name).replace("postgres@", f"postgres:{password}@" if password else "postgres@")

    def close(self) -> None:
        subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                     "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def _pg(self, args: list[str]) -> None:
        done = subprocess.run(_as_postgres([str(self.bin / args[0]), *args[1:]]), capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n"
                               f"server log {self.log}:\n{log[-2000:]}")


def settings_for(url: str) -> Settings:
    """The example config, with a 10-day detector baseline so a 30-day feed raises alerts."""
    base = load_settings()
    return load_settings(store_url=url, monitors={**base.monitors.model_dump(), "baseline_days": 10})


class CommitHook(FeedSource):
    """``FeedSource`` that calls ``after_commit(n)`` once the service has stored its n-th transaction, and says that
    it can be resumed again in place (the service recovers from an outage without a restart only with such sources)."""

    rewinds_on_resume = True  # FeedSource.resume sets the read position back to the stored offset

    def __init__(self, payloads: list[bytes], after_commit=None):
        super().__init__(payloads)
        self.commits = 0
        self.after_commit = after_commit

    def committed(self) -> None:
        super().committed()
        self.commits += 1
        if self.after_commit is not None:
            self.after_commit(self.commits)


def service_for(url: str, source, retry: StoreRetry = QUICK, batch: int = BATCH) -> Service:
    return Service(settings_for(url), [source], commit_every=0.0, max_batch=batch, poll_timeout=0.0, retry=retry,
                   rng=random.Random(1))


def run_service(url: str, source: FeedSource, stop: threading.Event | None = None,
                retry: StoreRetry = QUICK) -> ServiceReport:
    return service_for(url, source, retry).run(once=True, stop=stop)


class Crasher:
    """Once the service has stored ``commit`` transactions, crash PostgreSQL from a thread of its own (the service
    waits in ``after_commit`` until it is down), keep it down until the service has noticed and ``down_s`` seconds
    more, then start it again. ``timeline`` records when (``time.monotonic()``)."""

    def __init__(self, pg: DedicatedPostgres, service: Service, commit: int, down_s: float, outages_before: int = 0):
        self.pg, self.service, self.commit, self.down_s = pg, service, commit, down_s
        self.outages_before = outages_before
        self.reached, self.crashed = threading.Event(), threading.Event()
        self.timeline: dict[str, float] = {}
        self.thread = threading.Thread(target=self._outage, daemon=True)

    def after_commit(self, n: int) -> None:
        if n == self.commit:
            self.reached.set()
            assert self.crashed.wait(60), "the outage thread did not stop PostgreSQL"

    def _outage(self) -> None:
        if not self.reached.wait(120):
            return
        self.pg.stop()
        self.timeline["stopped"] = time.monotonic()
        self.crashed.set()
        deadline = time.monotonic() + 60
        while self.service.report.outages == self.outages_before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(self.down_s)
        self.pg.start()
        self.timeline["restarted"] = time.monotonic()


def outage_counter(name: str) -> float:
    return _process_registry.get_sample_value(f"{name}_total") or 0.0


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[DedicatedPostgres]:
    cluster = DedicatedPostgres()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def feed() -> list[bytes]:
    return feed_payloads()


@pytest.fixture(scope="module")
def uninterrupted(pg, feed) -> dict:
    url = pg.database("reference")
    report = run_service(url, CommitHook(feed))
    assert report.outages == 0 and report.commits >= len(feed) // BATCH
    return _outcome(url)


# --- the service rides out an outage -----------------------------------------------------------------------------


@pytest.mark.postgres  # a cluster of this module's own, which it crashes
def test_postgres_down_at_start_up_then_crashed_mid_run_gives_exactly_the_uninterrupted_results(pg, feed,
                                                                                                uninterrupted,
                                                                                                caplog):
    """Two outages in one run: PostgreSQL is down when the service starts (it waits instead of dying), and after the
    service has stored ``crash_after`` transactions PostgreSQL is crashed from another thread, kept down, restarted."""
    assert uninterrupted["alerts"] and uninterrupted["tickets"] and uninterrupted["dead_letters"]
    assert len(uninterrupted["points"]) > 1000 and uninterrupted["cases"] > 1000
    url = pg.database("outages", password="s3cret-pw")
    start_down_s, down_s, crash_after = 1.5, 2.0, 3
    source = CommitHook(feed)
    service = service_for(url, source)
    crasher = Crasher(pg, service, crash_after, down_s, outages_before=1)  # the start-up outage comes first
    source.after_commit = crasher.after_commit
    outages_before = outage_counter("vigil_store_outages")
    seconds_before = outage_counter("vigil_store_outage_seconds")
    pg.stop()
    starter = threading.Timer(start_down_s, pg.start)
    starter.start()
    crasher.thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="vigil.service"):
            report = service.run(once=True)
    finally:
        starter.join(60)
        crasher.thread.join(60)
        pg.ensure_running()

    assert "restarted" in crasher.timeline, "the service finished before PostgreSQL was crashed"
    assert report.outages == 2 and report.commits > crash_after
    assert start_down_s + down_s <= report.outage_seconds < start_down_s + down_s + 10
    assert report.reread == BATCH  # the batch polled after the last stored transaction is read again, nothing else
    assert report.messages == len(feed) + report.reread
    assert report.restored.startswith("restored checkpoint")
    assert _outcome(url) == uninterrupted  # alerts, tickets, labels, cases, dead letters, points, streams, audit
    factory = session_factory(url)
    with factory() as s:
        runs = s.scalars(select(RunRow)).all()
        completed = s.scalars(select(AuditRow).where(AuditRow.action == "run.completed")).all()
    factory.kw["bind"].dispose()
    assert len(runs) == 1 and runs[0].finished_at is not None and len(completed) == 1  # one run across the outages
    assert outage_counter("vigil_store_outages") == outages_before + 2
    assert outage_counter("vigil_store_outage_seconds") - seconds_before == pytest.approx(report.outage_seconds)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "vigil.service"]
    assert len(warnings) == 2, warnings  # one warning per outage, not one per attempt
    assert warnings[0].endswith("then starting")
    assert warnings[1].endswith(f"({BATCH} message(s) read since then will be read again)")
    for message in warnings:
        assert f"postgresql+psycopg://postgres:***@127.0.0.1:{pg.port}/outages is unavailable (" in message
        assert "OperationalError" in message
    assert "s3cret-pw" not in caplog.text
    assert "[SQL:" not in caplog.text and "[parameters:" not in caplog.text  # no statement or case data in the log
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.postgres  # a cluster of this module's own, which it crashes
def test_a_source_that_cannot_rewind_in_place_stops_the_service_and_a_restart_resumes_it(pg, feed):
    """A source whose ``resume`` cannot be repeated (no ``rewinds_on_resume``) would skip what it handed out since the
    last commit if the service recovered in place; the service stops with a clear error instead, and a new process
    (which waits for the store at start-up) resumes from the stored offsets."""
    url, part = pg.database("norewind"), feed[:3 * BATCH]

    class Crashing(FeedSource):  # plain FeedSource: no rewinds_on_resume
        def committed(self) -> None:
            super().committed()
            if self.acked == BATCH:
                pg.stop()

    try:
        with pytest.raises(SourceCannotRewind, match=r"source\(s\) 'sim' \(Crashing\) cannot be sent back.*restart"):
            run_service(url, Crashing(part))
    finally:
        pg.ensure_running()
    report = run_service(url, CommitHook(part))
    assert report.restored.startswith("restored checkpoint") and report.messages == 2 * BATCH


def test_stop_ends_the_wait_for_an_unreachable_store_without_storing_anything():
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/nothing-listens-here"
    service = service_for(url, CommitHook([b"{}"]), retry=StoreRetry(initial_s=0.2, max_s=0.2, jitter=0))
    stop, stopped_at = threading.Event(), []
    timer = threading.Timer(1.0, lambda: (stopped_at.append(time.monotonic()), stop.set()))
    timer.start()
    report = service.run(once=True, stop=stop)
    timer.join()
    assert time.monotonic() - stopped_at[0] < 1.0  # a wait of at most 0.2 s, then the run ends
    assert report.outages == 1 and report.commits == 0 and report.messages == 0 and report.outage_seconds > 0


def test_a_configured_limit_turns_the_wait_into_an_error_that_names_the_store():
    port = _free_port()
    engine = engine_for(f"postgresql+psycopg://vigil:pw@127.0.0.1:{port}/vigil")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=rf"postgresql\+psycopg://vigil:\*\*\*@127.0.0.1:{port}/vigil did not "
                                               r"answer .* check that the database server is running"):
        wait_until_answering(engine, StoreRetry(initial_s=0.05, max_s=0.1, give_up_after_s=0.4), threading.Event())
    engine.dispose()
    assert 0.4 <= time.monotonic() - started < 2


# --- what counts as an outage -------------------------------------------------------------------------------------


@pytest.mark.postgres  # a cluster of this module's own, which it crashes
def test_only_availability_errors_are_outages_and_integrity_or_programming_errors_stay_loud(pg):
    refused = engine_for(f"postgresql+psycopg://postgres:pw@127.0.0.1:{_free_port()}/x")
    with pytest.raises(OperationalError) as down:
        refused.connect()
    refused.dispose()
    assert is_store_outage(down.value)
    assert describe(down.value).startswith("OperationalError: connection failed")

    url = pg.database("errors")
    upgrade(url)
    engine = engine_for(url)
    with engine.connect() as c:  # a server-side disconnect: the administrator terminates this session
        pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
        pg.cluster.admin(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(OperationalError) as cut:
            c.execute(text("SELECT 1"))
    assert is_store_outage(cut.value) and cut.value.connection_invalidated
    with engine.connect() as c, pytest.raises(ProgrammingError) as bad_sql:
        c.execute(text("SELECT * FROM no_such_table"))
    assert not is_store_outage(bad_sql.value)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE test_unique (id integer PRIMARY KEY)"))
        c.execute(text("INSERT INTO test_unique VALUES (:id)"), {"id": 1})
    with engine.begin() as c, pytest.raises(IntegrityError) as duplicate:
        c.execute(text("INSERT INTO test_unique VALUES (:id)"), {"id": 1})
    engine.dispose()
    assert not is_store_outage(duplicate.value)
    assert "[parameters:" in str(duplicate.value) and "[parameters:" not in describe(duplicate.value)

    wrapped = StoredOffsetsUnavailable("could not read offsets")
    wrapped.__cause__ = down.value
    assert is_store_outage(wrapped)  # a source that could not read the store is waiting for the store too
    assert not is_store_outage(ValueError("not a database error"))
    raw = psycopg.OperationalError("server closed the connection unexpectedly")
    assert is_store_outage(raw)
    assert store_name("postgresql+psycopg://vigil:hunter2@db:5432/vigil") == \
        "postgresql+psycopg://vigil:***@db:5432/vigil"


def test_backoff_doubles_from_the_first_wait_up_to_the_cap_with_bounded_jitter():
    retry = StoreRetry(initial_s=0.5, factor=2, max_s=30, jitter=0.5)
    rng = random.Random(3)
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    for attempt, ceiling in enumerate(ceilings):
        waits = [retry.delay(attempt, rng) for _ in range(200)]
        assert ceiling / 2 <= min(waits) and max(waits) <= ceiling
        assert max(waits) - min(waits) > ceiling / 4  # jittered: consumers do not reconnect in lockstep
    assert StoreRetry(jitter=0).delay(3, rng) == 4.0
    assert StoreRetry().delay(10_000, rng) <= 30.0
    with pytest.raises(ValidationError, match="max_s"):
        StoreRetry(initial_s=5, max_s=1)


# --- a Kafka consumer resumes from the store after the outage ----------------------------------------------------


@pytest.mark.postgres  # a cluster of this module's own, which it crashes
def test_kafka_partitions_held_through_an_outage_are_resumed_from_the_stored_offsets(pg, quick_mock_cluster):
    """The consumer keeps its partitions while PostgreSQL is down (the broker is not), so no rebalance re-seeks them:
    ``resume`` must. First the stored offsets cannot be read at assignment (the store is down): nothing is consumed
    and ``poll`` raises an outage; after the restart ``resume`` seeks every held partition to what the store holds,
    also dropping messages that were polled but never stored."""
    topic, name = "fhir.outage", "emr-kafka"
    records = [(i % 4, orjson.dumps({"resourceType": "Basic", "id": f"b{i}"})) for i in range(80)]
    assert quick_mock_cluster.produce(topic, records) == 80
    url = pg.database("kafka")
    upgrade(url)
    factory = session_factory(url)
    with factory() as s, s.begin():
        save_checkpoint(s, name, Checkpoint(offsets={(topic, 0): 5, (topic, 1): 7, (topic, 2): 0, (topic, 3): 20}))
    config = KafkaSourceConfig(name=name, bootstrap_servers=quick_mock_cluster.bootstrap, topics=[topic],
                               group_id="outage", idle_timeout_s=0.5, session_timeout_ms=3000,
                               heartbeat_interval_ms=1000, api_version="2.3")
    source = KafkaSource(config, offsets_lookup=lookup_offsets(factory, name))
    try:
        pg.stop()
        try:
            deadline, error = time.monotonic() + 30, None
            while error is None and time.monotonic() < deadline:
                try:
                    assert source.poll(100, 0.2) == []  # joining; nothing may be consumed without stored offsets
                except StoredOffsetsUnavailable as exc:
                    error = exc
            assert error is not None and is_store_outage(error)
            assert "[SQL:" not in str(error)
        finally:
            pg.start()
        with factory() as s:
            source.resume(load_checkpoint(s, name))
        first = _poll_until(source, 15 + 13 + 20)
        assert _starts(first) == {0: 5, 1: 7, 2: 0} and len(first) == 48  # partition 3 was stored at its end

        with factory() as s, s.begin():  # store a later point, poll past it without storing, then "recover"
            save_checkpoint(s, name, Checkpoint(offsets={(topic, p): 10 for p in range(4)}))
        with factory() as s:
            source.resume(load_checkpoint(s, name))
        again = _poll_until(source, 40)
        assert _starts(again) == {p: 10 for p in range(4)} and len(again) == 40
        assert source.checkpoint().offsets == {(topic, p): 20 for p in range(4)}
    finally:
        source.close()
        factory.kw["bind"].dispose()


def _poll_until(source: KafkaSource, n: int) -> list:
    got, deadline = [], time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        got.extend(source.poll(100, 0.2))
    return got


def _starts(messages) -> dict[int, int]:
    starts: dict[int, int] = {}
    for m in messages:
        starts.setdefault(m.position.partition, m.position.line)
    return starts


class HookedKafkaSource(KafkaSource):
    """The production Kafka source, telling a ``Crasher`` when the service has stored a transaction."""

    def __init__(self, *args, after_commit=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.commits, self.after_commit = 0, after_commit

    def committed(self) -> None:
        super().committed()
        self.commits += 1
        if self.after_commit is not None:
            self.after_commit(self.commits)


@pytest.mark.postgres  # a cluster of this module's own, which it crashes
def test_vigil_run_over_kafka_rides_out_a_postgres_crash_with_the_results_of_an_uninterrupted_run(
        pg, quick_mock_cluster):
    """The service path of `vigil run` with a Kafka source (stored offsets looked up on assignment, as
    ``vigil.feeds`` builds it): PostgreSQL crashes after a few commits while the consumer keeps its partition; after
    the restart the partition is sought back to the stored offset. One partition, so both runs see the same order."""
    topic, small = "fhir.run", 100
    lines = feed_payloads("stable", days=8, change_day=4, volume=0.15)
    assert quick_mock_cluster.produce(topic, [(0, line) for line in lines]) == len(lines)

    def run(database: str, crash_after: int | None) -> tuple[ServiceReport, dict]:
        url = pg.database(database)
        factory = session_factory(url)
        config = KafkaSourceConfig(name="emr", bootstrap_servers=quick_mock_cluster.bootstrap, topics=[topic],
                                   group_id=database, idle_timeout_s=0.5, session_timeout_ms=6000,
                                   heartbeat_interval_ms=2000, api_version="2.3")
        source = HookedKafkaSource(config, offsets_lookup=lookup_offsets(factory, "emr"))
        service = service_for(url, source, batch=small)
        crasher = Crasher(pg, service, crash_after, down_s=1.0) if crash_after else None
        if crasher:
            source.after_commit = crasher.after_commit
            crasher.thread.start()
        try:
            report = service.run(once=True)
        finally:
            if crasher:
                crasher.thread.join(60)
                pg.ensure_running()
            factory.kw["bind"].dispose()
        assert crasher is None or "restarted" in crasher.timeline
        return report, _outcome(url)

    reference, want = run("kafka_reference", None)
    report, got = run("kafka_outage", crash_after=3)
    assert reference.outages == 0 and report.outages == 1 and report.reread == small
    assert report.messages == reference.messages + small == len(lines) + small
    assert got["cases"] > 100 and got["dead_letters"] and got == want
