"""`vigil run`: consume the configured sources, run the flow, and store results, offsets and state atomically.

The loop is the one DESIGN.md §Reliability asks for. Messages are polled from every source and processed by the
in-process pipeline; every ``commit_every`` seconds (and when the sources run dry) one database transaction stores the
new cases, stream state, dead letters, alerts and tickets, each source's resume point, and the pipeline checkpoint.
Only after that commit are the sources told (Kafka offsets committed upstream). A process killed at any point restarts
from the last transaction: the checkpoint holds exactly the state that produced the stored results, and the sources
resume exactly after the messages those results account for, so nothing is lost and nothing is counted twice.

The same argument makes a store outage harmless (``vigil.store_outage``). When the store is unavailable — at start-up,
or when a commit or an offset lookup fails because PostgreSQL was stopped, restarted or cut off — the service logs one
warning, waits with capped exponential backoff until the store answers a cheap query, and then does what a restarted
process does: it drops its in-memory state (a failed transaction may have half-updated it), restores the pipeline from
the stored checkpoint and resumes every source from its stored offsets. Messages read since the last commit are read
again; nothing else changes. Integrity and programming errors are not outages and still stop the service.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from ingest import Checkpoint, Source, load_messages
from ingest.kafka_source import KafkaSource
from ingest.load import cyclic_gc_paused
from vigil import __version__, checkpoint, offsets
from vigil.observability import ingest_metrics
from vigil.performance import compute_window_metrics
from vigil.persist import record_config, record_run, store_results
from vigil.pipeline import Pipeline
from vigil.settings import Settings
from vigil.store import RunRow, engine_for, upgrade
from vigil.store_outage import (SourceCannotRewind, StoreRetry, describe, is_store_outage, store_name,
                                wait_until_answering)

log = logging.getLogger(__name__)


def store_and_checkpoint(session: Session, pipeline: Pipeline, settings: Settings, name: str,
                         window_metrics: bool) -> int:
    """In the caller's transaction: store the pipeline's new results, then its checkpoint — the state that produced
    exactly those results (the deltas are marked stored first, so a restore does not store them again; stored days
    and settled cases are forgotten first, so memory and checkpoint stay bounded). Returns the checkpoint's size.

    The pipeline is changed before the transaction commits, so it is only valid if the commit succeeds: after a failed
    commit the caller must not retry with it, but restore the pipeline and the sources from the store (``Service``
    does, on a store outage) — a retry would skip the deltas this call already marked stored."""
    store_results(session, pipeline.result, settings.routing)
    if window_metrics:
        compute_window_metrics(session, settings)
    pipeline.result.mark_stored()
    pipeline.forget_stored()
    return checkpoint.save(session, pipeline, settings, name)


@dataclass
class ServiceReport:
    restored: str = ""
    messages: int = 0
    commits: int = 0
    checkpoint_bytes: int = 0
    run_id: int | None = None
    outages: int = 0  # times the store became unavailable (at start-up or while running) and was waited for
    outage_seconds: float = 0.0  # time from noticing each outage until the store answered again
    reread: int = 0  # messages polled since the last confirmed commit when an outage struck: read again (unless the
    #                  commit in flight took effect after all, which the restore from the store then accounts for)


class Service:
    """One process running the whole flow over ``sources`` (the embedded default of DESIGN.md §The flow)."""

    def __init__(self, settings: Settings, sources: Sequence[Source], *, commit_every: float = 5.0,
                 max_batch: int = 5000, poll_timeout: float = 0.5, checkpoint_name: str = checkpoint.DEFAULT_NAME,
                 retry: StoreRetry | None = None, rng: random.Random | None = None):
        self.settings = settings
        self.sources = list(sources)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (they key the stored offsets): {names}")
        self.commit_every, self.max_batch, self.poll_timeout = commit_every, max_batch, poll_timeout
        self.checkpoint_name = checkpoint_name
        self.report = ServiceReport()
        self.retry = retry or StoreRetry()
        self._rng = rng or random.Random()  # backoff jitter
        self.pipeline: Pipeline | None = None
        self._run: RunRow | None = None
        self._run_started: datetime | None = None
        self._run_config = ""
        self._failed_attempts = 0  # store questions without an answer since the last successful commit (backoff)
        self._unstored = 0  # messages polled since the last successful commit

    def run(self, once: bool = False, stop: threading.Event | None = None) -> ServiceReport:
        """Consume until ``stop`` is set, or with ``once`` until every source is exhausted. A store outage is waited
        out (see the module docstring); ``stop`` also ends the wait, leaving the last stored batch as the resume
        point."""
        stop = stop or threading.Event()
        engine = engine_for(self.settings.store_url)
        factory = sessionmaker(engine, expire_on_commit=False)
        try:
            if self._connect(engine, factory, stop, outage=None):
                self._loop(engine, factory, once, stop)
        finally:
            for source in self.sources:
                source.close()
            engine.dispose()
        return self.report

    def _loop(self, engine: Engine, factory: sessionmaker[Session], once: bool, stop: threading.Event) -> None:
        dirty, last_commit = False, time.monotonic()
        while True:
            try:
                if stop.is_set():
                    self._commit(factory, final=True)
                    return
                got = self._poll_once()
                dirty = dirty or got > 0
                idle = got == 0
                if dirty and (idle or time.monotonic() - last_commit >= self.commit_every):
                    self._commit(factory, final=False)
                    dirty, last_commit = False, time.monotonic()
                if once and idle and all(s.exhausted for s in self.sources):
                    self._commit(factory, final=True)
                    return
            except Exception as exc:
                if not is_store_outage(exc):
                    raise
                self._require_rewindable(exc)
                if not self._connect(engine, factory, stop, outage=exc):
                    return
                dirty, last_commit = False, time.monotonic()

    def _connect(self, engine: Engine, factory: sessionmaker[Session], stop: threading.Event,
                 outage: BaseException | None) -> bool:
        """Migrate the store and start from what it holds (``_start``). If ``outage`` is given (the error that showed
        the store unavailable), or the start fails for want of a store, wait until the store answers first, and again
        whenever it fails before the start completes (the same outage). False if ``stop`` was set while waiting."""
        began: float | None = None
        while True:
            if outage is not None:
                if began is None:
                    began = time.monotonic()
                    self._outage_began(outage)
                answered, attempts = wait_until_answering(engine, self.retry, stop, self._failed_attempts, self._rng)
                self._failed_attempts += attempts - int(answered)
                if not answered:
                    self._outage_ended(time.monotonic() - began, resumed=False)
                    return False
            try:
                upgrade(self.settings.store_url)
                self._start(factory)
            except Exception as exc:
                if not is_store_outage(exc):
                    raise
                if began is not None:
                    self._failed_attempts += 1  # answered the probe, then failed again: wait longer next time
                outage = exc
                continue
            if began is not None:
                self._outage_ended(time.monotonic() - began, resumed=True)
            return True

    def _require_rewindable(self, error: BaseException) -> None:
        """Recovering in place needs every source to go back to its stored position when ``resume`` is called again
        (``rewinds_on_resume``); a source that cannot would skip what it handed out since. Then stop instead: a new
        process waits for the store at start-up and resumes every source correctly."""
        stuck = [f"{s.name!r} ({type(s).__name__})" for s in self.sources
                 if not getattr(s, "rewinds_on_resume", False)]
        if stuck:
            raise SourceCannotRewind(
                f"vigil run: the store {store_name(self.settings.store_url)} is unavailable ({describe(error)}), and "
                f"source(s) {', '.join(stuck)} cannot be sent back to their stored position within this process. "
                "Stopping without storing anything more: restart `vigil run` (it waits for the store at start-up and "
                "resumes after the last stored batch)") from error

    def _outage_began(self, error: BaseException) -> None:
        self.report.outages += 1
        self.report.reread += self._unstored
        ingest_metrics().store_outages.inc()
        r = self.retry
        then = ("then starting" if self.pipeline is None else
                f"then resuming from the last stored batch ({self._unstored} message(s) read since then will be read "
                "again)")
        log.warning("vigil run: the store %s is unavailable (%s); asking again with backoff from %.3g s up to "
                    "%.3g s%s, %s", store_name(self.settings.store_url), describe(error), r.initial_s, r.max_s,
                    f" (giving up after {r.give_up_after_s:.3g} s)" if r.give_up_after_s else "", then)
        self._unstored = 0

    def _outage_ended(self, seconds: float, resumed: bool) -> None:
        self.report.outage_seconds += seconds
        ingest_metrics().store_outage_seconds.inc(seconds)
        if resumed:
            log.info("vigil run: the store %s answers again after %.1f s; resumed from the stored checkpoint and "
                     "source offsets (%s)", store_name(self.settings.store_url), seconds, self.report.restored)
        else:
            log.warning("vigil run: stopped after waiting %.1f s for the store %s; a restart resumes after the last "
                        "stored batch", seconds, store_name(self.settings.store_url))

    def _start(self, factory: sessionmaker[Session]) -> None:
        """Start from what the store holds: the pipeline from the stored checkpoint, every source from its stored
        offsets. Also how the service recovers from a store outage (anything held in memory is replaced)."""
        with factory() as session:
            restored = checkpoint.restore(session, self.settings, self.checkpoint_name)
            resume = {s.name: offsets.load_checkpoint(session, s.name) for s in self.sources}
        self.report.restored = restored.reason
        log.info("vigil run: %s", restored.reason)
        if restored.pipeline is None and any(cp.offsets or cp.cursor for cp in resume.values()):
            # offsets without the state they were stored with: replay everything, or results would be partial
            log.warning("vigil run: stored source offsets are discarded with the checkpoint; replaying from the start")
            resume = {name: Checkpoint() for name in resume}
        self.pipeline = restored.pipeline or Pipeline(self.settings)
        for source in self.sources:
            source.resume(resume[source.name])
            if isinstance(source, KafkaSource):  # store what was read before a rebalance hands partitions away
                source.on_revoke = lambda: self._commit(factory, final=False)
        self._unstored = 0
        if self._run is None:
            self._run = RunRow(started_at=datetime.now(UTC), config_hash=self.settings.config_hash(),
                               code_version=__version__, inputs=[s.name for s in self.sources])
        else:  # after an outage: the same run, as stored by the last commit (or not stored at all yet)
            self._run = RunRow(id=self.report.run_id, started_at=self._run_started, config_hash=self._run_config,
                               code_version=__version__, inputs=[s.name for s in self.sources])
        self._run_started, self._run_config = self._run.started_at, self._run.config_hash

    def _poll_once(self) -> int:
        got = 0
        for source in self.sources:
            messages = source.poll(self.max_batch, self.poll_timeout)
            if messages:
                got += len(messages)
                with cyclic_gc_paused():
                    loaded = load_messages(messages, self.pipeline.decoder)
                    self.pipeline.ingest(loaded)
                ingest_metrics().observe_counts(source.name, loaded.accepted, loaded.rejected, loaded.ignored, {},
                                                [d.reason for d in loaded.dead_letters])
                if self.pipeline.result.watermark is not None:
                    ingest_metrics().set_watermark(source.name, self.pipeline.result.watermark)
        self.report.messages += got
        self._unstored += got
        return got

    def _commit(self, factory: sessionmaker[Session], final: bool) -> None:
        result = self.pipeline.result
        if final and all(s.exhausted for s in self.sources):  # the input ended: stage 2 applies what waited
            self.pipeline.finish()
        with factory() as session, session.begin():
            if self._run.id is None:
                record_config(session, self.settings)
            for source in self.sources:
                offsets.save_checkpoint(session, source.name, source.checkpoint())
            self._run = record_run(session, self._run, result, final=final)
            # windowed AUROC, O/E, calibration are re-read from all stored cases, so once per run
            self.report.checkpoint_bytes = store_and_checkpoint(session, self.pipeline, self.settings,
                                                                self.checkpoint_name, window_metrics=final)
        self.report.commits += 1
        self.report.run_id = self._run.id
        self._unstored = self._failed_attempts = 0
        for source in self.sources:
            source.committed()
