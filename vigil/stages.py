"""`vigil run --stage cases|monitor`: the flow split into two Kafka consumer groups (DESIGN.md §The flow).

- **cases** (stage 1, keyed by subject): consumes the configured FHIR topic(s) — clinical resources keyed by patient,
  so a prediction and its outcomes reach the same partition; resources about no patient (Device, Location,
  Organization) must be sent to every partition — and runs ingest, ontology and the label join. What the streams
  must count leaves as observations (``vigil.observations``) on the cases topic, keyed by model.
- **monitor** (stage 2, keyed by model): consumes the cases topic, merges the observations of all stage-1 partitions
  into their canonical order and runs streams, detectors, alerts and tickets (``vigil.stream_stage``).

Any number of processes per stage share one consumer group. State is kept **per partition** — one pipeline per
assigned partition, checkpointed in the store under ``<stage>:<topic>:<partition>`` in the same transaction as that
partition's offset and the results it produced — so a partition moves between processes with its state: whoever is
assigned it restores the checkpoint and seeks to the stored offset (the lookup below does both at once), and a
checkpoint that cannot be used (none, other code or config) restarts the partition from its beginning.

Exactly once across the two stages: stage 1 publishes a partition's observations, numbered, *before* its transaction
commits (``flush`` waits for the brokers' acknowledgement). Killed in between, it replays those messages from the
stored offset with the stored state and publishes the same observations under the same numbers again; stage 2 drops
numbers it has already taken (``Sequencer``). Stage 2 itself resumes from its own checkpoint and offset.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from kafka import KafkaProducer
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from ingest import Message, load_messages
from ingest.kafka_source import KafkaSource, KafkaSourceConfig, Partition
from ingest.load import cyclic_gc_paused
from vigil import checkpoint, offsets
from vigil.domain import DeadLetter
from vigil.keyed_feed import partition_for
from vigil.observations import INFINITY, decode_record, encode_batch, encode_watermark
from vigil.performance import compute_window_metrics
from vigil.pipeline import Pipeline
from vigil.service import store_and_checkpoint
from vigil.settings import Settings
from vigil.store import SourceOffsetRow, engine_for, upgrade
from vigil.store_outage import describe, is_store_outage, store_name, wait_until_answering

log = logging.getLogger(__name__)

STAGES = ("cases", "monitor")


def stage_source_config(settings: Settings, stage: str) -> KafkaSourceConfig:
    """The Kafka source a stage consumes: the configured one (cases), or the cases topic in the monitor group."""
    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(STAGES)}, not {stage!r}")
    kafka = [s for s in settings.sources if isinstance(s, KafkaSourceConfig)]
    if len(kafka) != 1:
        raise ValueError(f"`vigil run --stage` needs exactly one Kafka source in the config (sources with kind: "
                         f"kafka), found {len(kafka)}; stage 1 consumes it and both stages use its brokers")
    if stage == "cases":
        return kafka[0]
    return kafka[0].model_copy(update={"name": "stage-monitor", "topics": [settings.stages.cases_topic],
                                       "group_id": settings.stages.monitor_group_id})


def checkpoint_name(stage: str, partition: Partition) -> str:
    return f"{stage}:{partition[0]}:{partition[1]}"


def source_name(partition: Partition) -> str:
    """How stage 2 names a stage-1 partition (the ``source`` of its observations)."""
    return f"{partition[0]}:{partition[1]}"


@dataclass
class StageReport:
    stage: str
    messages: int = 0
    commits: int = 0
    outages: int = 0  # store outages waited out
    published: int = 0  # observations sent to the cases topic (stage 1)
    assigned: list[str] = field(default_factory=list)  # partitions held at the end
    restored: list[str] = field(default_factory=list)  # what each assignment found in the store


class StageWorker:
    """One process of one stage: a consumer-group member holding the state of the partitions it is assigned."""

    def __init__(self, settings: Settings, stage: str, *, commit_every: float = 5.0, max_batch: int = 5000,
                 poll_timeout: float = 0.5):
        self.settings, self.stage = settings, stage
        self.config = stage_source_config(settings, stage)
        self.commit_every, self.max_batch, self.poll_timeout = commit_every, max_batch, poll_timeout
        self.states: dict[Partition, Pipeline] = {}
        self.report = StageReport(stage)
        self._dirty: set[Partition] = set()
        self._producer: KafkaProducer | None = None
        self._cases_partitions: list[int] = []
        self._factory: sessionmaker[Session] | None = None
        self.source: KafkaSource | None = None

    # --- the loop --------------------------------------------------------------------------------------------------

    def run(self, once: bool = False, stop: threading.Event | None = None) -> StageReport:
        """Consume until ``stop`` is set, or with ``once`` until the group's input is exhausted (stage 2: and every
        stage-1 partition has said it ended).

        A store outage is waited out as the service does (``vigil.store_outage``), then the worker starts again as a
        restarted process would: it leaves the group with its in-memory state dropped (its partitions' last stored
        state and offsets are where it, or whoever is assigned them, resumes)."""
        stop = stop or threading.Event()
        upgrade(self.settings.store_url)
        engine = engine_for(self.settings.store_url)
        self._factory = sessionmaker(engine, expire_on_commit=False)
        rng, attempts = random.Random(), 0
        try:
            while True:
                try:
                    self._consume(once, stop)
                    break
                except Exception as exc:
                    if not is_store_outage(exc):
                        raise
                    log.warning("vigil run --stage %s: the store %s is unavailable (%s); waiting for it, then "
                                "resuming from its last stored state", self.stage,
                                store_name(self.settings.store_url), describe(exc))
                    self._close()
                    self.report.outages += 1
                    answered, tried = wait_until_answering(engine, self.settings.store_retry, stop, attempts, rng)
                    attempts += tried
                    if not answered:
                        break
        finally:
            self._close()
            engine.dispose()
        return self.report

    def _consume(self, once: bool, stop: threading.Event) -> None:
        self.states.clear()
        self._dirty.clear()
        self.source = KafkaSource(self.config, offsets_lookup=offsets.lookup_offsets(self._factory, self.config.name),
                                  on_revoke=self._commit, on_assign=self._assign)
        if self.stage == "cases":
            self._producer = _producer(self.config)
        dirty, last = False, time.monotonic()
        while not stop.is_set():
            got = self._poll_once()
            dirty = dirty or got > 0
            if dirty and (got == 0 or time.monotonic() - last >= self.commit_every):
                self._commit()
                dirty, last = False, time.monotonic()
            if once and got == 0 and self._finished():
                break
        self._commit(final=True)
        self.report.assigned = sorted(checkpoint_name(self.stage, p) for p in self.states)

    def _close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    def _finished(self) -> bool:
        if not self.source.exhausted:
            return False
        return self.stage == "cases" or all(p.streams.sequencer.finished for p in self.states.values())

    def _poll_once(self) -> int:
        messages = self.source.poll(self.max_batch, self.poll_timeout)
        by_partition: dict[Partition, list[Message]] = defaultdict(list)
        for message in messages:
            by_partition[(message.position.source, message.position.partition)].append(message)
        for partition, batch in sorted(by_partition.items()):
            state = self.states.get(partition)
            if state is None:  # the source hands out only assigned partitions, whose state _assign restored
                raise RuntimeError(f"vigil run --stage {self.stage}: {len(batch)} messages of {partition[0]}"
                                   f"[{partition[1]}] arrived without the partition's state; stopping before "
                                   "anything past them is stored (restart: the stored offsets are where it resumes)")
            with cyclic_gc_paused():
                if self.stage == "cases":
                    self._cases(partition, state, batch)
                else:
                    self._monitor(partition, state, batch)
            self._dirty.add(partition)
        self.report.messages += len(messages)
        return len(messages)

    def _cases(self, partition: Partition, state: Pipeline, batch: list[Message]) -> None:
        state.ingest(load_messages(batch, state.decoder))
        numbered = state.take_outbox()
        by_partition: dict[int, list] = defaultdict(list)  # in emission order: per destination, ``at`` never falls
        for seq, obs in numbered:
            by_partition[self._partition_of(obs.model)].append((seq, obs))
        source = source_name(partition)
        for destination, rows in sorted(by_partition.items()):
            self._producer.send(self.settings.stages.cases_topic, encode_batch(source, rows), partition=destination)
        self.report.published += len(numbered)

    def _monitor(self, partition: Partition, state: Pipeline, batch: list[Message]) -> None:
        for message in batch:
            try:
                record = decode_record(message.payload)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                state.result.dead_letters.append(DeadLetter(
                    message.position, f"cases topic record is not a vigil observation batch or progress record: "
                                      f"{exc}", "Observation", None))
                state.result.rejected["malformed observation record"] += 1
                continue
            if "obs" in record:
                state.receive(record["source"], record["obs"], None, [])
            else:
                state.receive(record["source"], [], record.get("watermark"), record.get("upstream") or [],
                              bool(record.get("end")))

    # --- commits ---------------------------------------------------------------------------------------------------

    def _commit(self, final: bool = False) -> None:
        """Publish (stage 1), then store every changed partition's results, checkpoint and offset in one
        transaction; then tell the source. Stage 1 says a partition ended only after that commit."""
        partitions = sorted(self._dirty)
        if self.stage == "cases":
            for partition in partitions:
                self._progress(partition, end=False)
            self._producer.flush()
        with self._factory() as session, session.begin():
            cp = self.source.checkpoint()
            for partition in partitions:
                store_and_checkpoint(session, self.states[partition], self.settings,
                                     checkpoint_name(self.stage, partition), window_metrics=False)
            offsets.save_checkpoint(session, self.config.name, cp, expected=self.source.stored_offsets())
            if final and self.stage == "monitor" and self.states:  # windowed AUROC, O/E: from all stored cases
                compute_window_metrics(session, self.settings)
        self.source.committed()
        self._dirty.clear()
        self.report.commits += 1
        if final and self.stage == "cases" and self.source.exhausted:
            for partition in sorted(self.states):
                self._progress(partition, end=True)
            self._producer.flush()

    def _progress(self, partition: Partition, end: bool) -> None:
        """Tell every stage-2 partition how far this stage-1 partition has come (and who else is upstream)."""
        state = self.states[partition]
        mark = INFINITY if end else state.watermark_micros
        record = encode_watermark(source_name(partition), state.out_seq - 1, mark, self._upstream(), end=end)
        for p in self._cases_partitions_now():
            self._producer.send(self.settings.stages.cases_topic, record, partition=p)

    # --- partitions ------------------------------------------------------------------------------------------------

    def _assign(self, partitions: list[Partition]) -> dict[Partition, int]:
        """Called by the Kafka source when partitions are assigned (``on_assign``): restore each partition's
        state and return the offset stored with it. A partition without a usable checkpoint starts afresh from its
        beginning (its stored offset, if any, is removed in the same transaction: offsets without their state would
        lose what came before them)."""
        found: dict[Partition, int] = {}
        mode = "cases" if self.stage == "cases" else "monitor"
        with self._factory() as session, session.begin():
            stored = offsets.stored_offsets(session, self.config.name, partitions)
            for partition in partitions:
                name = checkpoint_name(self.stage, partition)
                restored = checkpoint.restore(session, self.settings, name)
                self.report.restored.append(f"{name}: {restored.reason}")
                if restored.pipeline is not None and partition in stored:
                    self.states[partition] = restored.pipeline
                    found[partition] = stored[partition]
                    continue
                self.states[partition] = Pipeline(self.settings, mode=mode)
                if partition in stored:
                    log.warning("vigil run --stage %s: %s has a stored offset but no usable checkpoint (%s); "
                                "replaying it from the beginning", self.stage, name, restored.reason)
                    session.execute(delete(SourceOffsetRow).where(
                        SourceOffsetRow.source == offsets.offset_key(self.config.name, partition[0]),
                        SourceOffsetRow.partition == partition[1]))
        for partition in list(self.states):
            if partition not in partitions and partition not in self._held():
                del self.states[partition]  # revoked: its new owner restores it from the store
        log.info("vigil run --stage %s: assigned %s; resuming at %s", self.stage,
                 ", ".join(checkpoint_name(self.stage, p) for p in partitions), found)
        return found

    def _held(self) -> set[Partition]:
        return self.source.assigned if self.source is not None else set()

    def _upstream(self) -> list[str]:
        return [source_name(p) for p in self.source.topic_partitions()]

    def _cases_partitions_now(self) -> list[int]:
        if not self._cases_partitions:
            found = self._producer.partitions_for(self.settings.stages.cases_topic)
            self._cases_partitions = sorted(found)
        return self._cases_partitions

    def _partition_of(self, model: str) -> int:
        """Kafka's default partitioner (murmur2 of the key), so any producer keyed by model agrees."""
        partitions = self._cases_partitions_now()
        return partitions[partition_for(model, len(partitions))]


def _producer(config: KafkaSourceConfig) -> KafkaProducer:
    """Acknowledged by all in-sync replicas, one request in flight: a partition's records stay in order."""
    options = {"bootstrap_servers": config.bootstrap_servers, "client_id": f"{config.client_id}-cases",
               "acks": "all", "retries": 5, "max_in_flight_requests_per_connection": 1, "linger_ms": 5,
               "compression_type": "gzip",  # observations are repetitive JSON: a fraction of the bytes on the wire
               **config.security}
    if config.api_version:
        options["api_version"] = tuple(int(x) for x in config.api_version.split("."))
    return KafkaProducer(**options)

