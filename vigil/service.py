"""`vigil run`: consume the configured sources, run the flow, and store results, offsets and state atomically.

The loop is the one DESIGN.md §Reliability asks for. Messages are polled from every source and processed by the
in-process pipeline; every ``commit_every`` seconds (and when the sources run dry) one database transaction stores the
new cases, stream state, dead letters, alerts and tickets, each source's resume point, and the pipeline checkpoint.
Only after that commit are the sources told (Kafka offsets committed upstream). A process killed at any point restarts
from the last transaction: the checkpoint holds exactly the state that produced the stored results, and the sources
resume exactly after the messages those results account for, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

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

log = logging.getLogger(__name__)


def store_and_checkpoint(session: Session, pipeline: Pipeline, settings: Settings, name: str,
                         window_metrics: bool) -> int:
    """In the caller's transaction: store the pipeline's new results, then its checkpoint — the state that produced
    exactly those results (the deltas are marked stored first, so a restore does not store them again; stored days
    and settled cases are forgotten first, so memory and checkpoint stay bounded). Returns the checkpoint's size."""
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


class Service:
    """One process running the whole flow over ``sources`` (the embedded default of DESIGN.md §The flow)."""

    def __init__(self, settings: Settings, sources: Sequence[Source], *, commit_every: float = 5.0,
                 max_batch: int = 5000, poll_timeout: float = 0.5, checkpoint_name: str = checkpoint.DEFAULT_NAME):
        self.settings = settings
        self.sources = list(sources)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (they key the stored offsets): {names}")
        self.commit_every, self.max_batch, self.poll_timeout = commit_every, max_batch, poll_timeout
        self.checkpoint_name = checkpoint_name
        self.report = ServiceReport()
        self.pipeline: Pipeline | None = None
        self._run: RunRow | None = None

    def run(self, once: bool = False, stop: threading.Event | None = None) -> ServiceReport:
        """Consume until ``stop`` is set, or with ``once`` until every source is exhausted."""
        stop = stop or threading.Event()
        upgrade(self.settings.store_url)
        engine = engine_for(self.settings.store_url)
        factory = sessionmaker(engine, expire_on_commit=False)
        try:
            self._start(factory)
            dirty, last_commit = False, time.monotonic()
            while not stop.is_set():
                got = self._poll_once()
                dirty = dirty or got > 0
                idle = got == 0
                if dirty and (idle or time.monotonic() - last_commit >= self.commit_every):
                    self._commit(factory, final=False)
                    dirty, last_commit = False, time.monotonic()
                if once and idle and all(s.exhausted for s in self.sources):
                    break
            self._commit(factory, final=True)
        finally:
            for source in self.sources:
                source.close()
            engine.dispose()
        return self.report

    def _start(self, factory: sessionmaker[Session]) -> None:
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
        self._run = RunRow(started_at=datetime.now(UTC), config_hash=self.settings.config_hash(),
                           code_version=__version__, inputs=[s.name for s in self.sources])

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
        return got

    def _commit(self, factory: sessionmaker[Session], final: bool) -> None:
        result = self.pipeline.result
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
        for source in self.sources:
            source.committed()
