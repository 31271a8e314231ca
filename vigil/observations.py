"""What stage 1 (cases) tells stage 2 (monitors): observations in a canonical order, and how stage 2 merges them.

DESIGN.md §The flow splits the flow into two keyed stages. Stage 1 (ingest, ontology, label join) is keyed by subject;
everything it learns that a stream must count is an ``Observation`` — a prediction's score, a labeled positive, a case
whose window closed, a fact's mapping coverage, a withdrawn label. Stage 2 (streams, detectors, alerts, tickets) must
count them in one order that does not depend on how the subjects were spread over processes, or the same feed would
give different alerts on one machine and on forty. So every observation carries a **canonical key**:

- ``at``: feed time. For what an event caused, the feed's high-water mark when it was processed (its arrival time,
  ``meta.lastUpdated``); for a case whose label window (and grace) closed with no event of its own, the close time;
- then a rank and a tiebreak that only uses the content (the event's identity and version, or the case's model,
  prediction time and id), and the position of the observation among those of the same cause.

One stage-1 partition emits keys that never go below its high-water mark, so its ``at`` values only grow. Stage 2
merges many partitions (``Sequencer``): it applies an observation once every upstream partition has reported a
watermark above its ``at`` — the low watermark of stream processing (Akidau et al., *The Dataflow Model*, VLDB 2015) —
and in key order, so the sequence each stream sees is the same whatever the partitioning, batching or restarts.
Records carry their partition's sequence number: one replayed after a crash of stage 1 is dropped as a duplicate.
The embedded default passes the same observations through the same ``Sequencer`` with one upstream.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

KINDS = ("prediction", "positive", "release", "fact", "correct")
RANK_CLOSED = 0  # a case closed at its window's end, before any event at that instant
RANK_EVENT = 1  # caused by an event (a prediction or fact arriving)
RANK_CLOSED_LATE = 2  # a prediction that arrived after its window's end, closed at the next event: after its own

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INFINITY = 1 << 62  # a watermark past any feed time: the upstream partition ended


def micros(t: datetime) -> int:
    """Feed time as integer microseconds since 1970 (UTC): exact, and orderable on the wire."""
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def feed_time(at: int) -> datetime:
    """The inverse of ``micros``."""
    return _EPOCH + timedelta(microseconds=at)


@dataclass(slots=True)
class Observation:
    """One thing a stream counts, from stage 1; ``key`` is its canonical place (``key[0]``: ``at`` in microseconds).

    ``kind`` says which fields matter: ``prediction`` (score, amended, scanner), ``positive`` (decision: a labeled
    positive counts for the false-negative rate at once), ``release`` (positive, decision, score, followed_up: a case
    whose label froze), ``fact`` (unmapped: mapping coverage; ``version`` is empty — every version's streams count it),
    ``correct`` (decision: a positive whose label was withdrawn)."""

    key: tuple
    kind: str
    model: str
    version: str
    site: str
    cells: list[str]
    time: datetime  # the event's clinical time (prediction or fact time): the stream's day
    score: float = 0.0
    decision: bool = False
    positive: bool = False
    followed_up: bool = False
    amended: bool = False
    unmapped: bool = False
    scanner: tuple[str, str, str] | None = None  # (device id, manufacturer, model) of the acquisition device

    @property
    def at(self) -> int:
        return self.key[0]

    def to_wire(self) -> list:
        return [list(self.key), self.kind, self.model, self.version, self.site, self.cells, micros(self.time),
                self.score, self.decision, self.positive, self.followed_up, self.amended, self.unmapped,
                list(self.scanner) if self.scanner else None]

    @classmethod
    def from_wire(cls, row: list) -> Observation:
        (key, kind, model, version, site, cells, time, score, decision, positive, followed_up, amended, unmapped,
         scanner) = row
        if kind not in KINDS:
            raise ValueError(f"unknown observation kind {kind!r} (expected one of {', '.join(KINDS)})")
        return cls(_tuple(key), kind, model, version, site, cells, feed_time(time), score,
                   decision, positive, followed_up, amended, unmapped, tuple(scanner) if scanner else None)


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def encode_batch(source: str, numbered: list[tuple[int, Observation]]) -> bytes:
    """One record of the cases topic: observations of one stage-1 partition (``source``) with their sequence numbers,
    ascending. Batched, because the per-record overhead of a broker is far above that of one observation."""
    return orjson.dumps({"source": source, "obs": [[seq, *o.to_wire()] for seq, o in numbered]})


def decode_record(payload: bytes) -> dict:
    """A cases-topic record as ``{"source", "obs": [(seq, Observation)]}`` or a progress record (``watermark``)."""
    record = orjson.loads(payload)
    if not isinstance(record, dict) or not isinstance(record.get("source"), str):
        raise ValueError("not a vigil cases-topic record (a JSON object with a 'source')")
    if "obs" in record:
        record["obs"] = [(row[0], Observation.from_wire(row[1:])) for row in record["obs"]]
    return record


def encode_watermark(source: str, seq: int, watermark: int | None, upstream: list[str], end: bool = False) -> bytes:
    """A progress record: ``source`` emitted everything up to ``seq`` and will emit nothing with ``at`` below
    ``watermark`` (``end``: nothing more at all). ``upstream`` lists every stage-1 partition, so stage 2 knows whom
    it must hear from before it may apply anything."""
    return orjson.dumps({"source": source, "seq": seq, "watermark": watermark, "upstream": upstream, "end": end})


@dataclass
class Sequencer:
    """Merge the observations of several upstream partitions into the canonical order (stage 2's input)."""

    upstream: set[str] = field(default_factory=set)  # every stage-1 partition; empty until one reports
    watermarks: dict[str, int] = field(default_factory=dict)  # source → nothing will come below this
    ended: set[str] = field(default_factory=set)
    last_at: dict[str, int] = field(default_factory=dict)  # source → the latest ``at`` of an observation taken
    keys_at_last: dict[str, set] = field(default_factory=dict)  # source → keys taken at that ``at``
    duplicates: int = 0
    _pending: list[tuple[tuple, str, int, Observation]] = field(default_factory=list)  # heap by key

    def push(self, source: str, numbered: list[tuple[int, Observation]]) -> None:
        """Take a batch of ``source``'s observations; ones already taken are duplicates.

        A stage-1 partition replayed after a crash emits again what it emitted since its last stored state, with the
        same keys (they depend on content only), but not necessarily in the same order or numbering (poll batches
        differ). A source never emits below its watermark, so an observation below it was taken before; at the
        latest instant taken, the keys taken there decide. The sequence numbers only name records in logs."""
        for i, obs in numbered:
            at = obs.at
            last = self.last_at.get(source)
            if last is not None and at <= last:
                if at < last or obs.key in self.keys_at_last[source]:
                    self.duplicates += 1
                    continue
                self.keys_at_last[source].add(obs.key)
            elif at < self.watermarks.get(source, at):
                self.duplicates += 1  # below what the source promised: sent before its last progress record
                continue
            else:
                self.last_at[source], self.keys_at_last[source] = at, {obs.key}
            heapq.heappush(self._pending, (obs.key, source, i, obs))  # keys are unique; source, seq: never compared
            self._raise(source, at)

    def progress(self, source: str, watermark: int | None, upstream: list[str], end: bool = False) -> None:
        """``source`` will send nothing below ``watermark`` (``end``: nothing more); ``upstream`` (from progress
        records) names every stage-1 partition — until one has been named, nothing is applied."""
        self.upstream.update(upstream)
        if watermark is not None:
            self._raise(source, watermark)
        if end:
            self.ended.add(source)

    def low_watermark(self) -> int | None:
        """Observations with ``at`` below this can be applied: no upstream partition will send one any more."""
        if not self.upstream:
            return None
        marks = [self.watermarks.get(s) for s in self.upstream if s not in self.ended]
        if not marks:
            return INFINITY
        return None if None in marks else min(marks)

    @property
    def finished(self) -> bool:
        return bool(self.upstream) and self.upstream <= self.ended

    @property
    def pending(self) -> int:
        return len(self._pending)

    def ready(self, flush: bool = False) -> list[Observation]:
        """Pop, in key order, every observation that can be applied now (``flush``: all of them — the input ended)."""
        bound = INFINITY if flush else self.low_watermark()
        out: list[Observation] = []
        if bound is None:
            return out
        pending = self._pending
        while pending and pending[0][0][0] < bound:
            out.append(heapq.heappop(pending)[3])
        return out

    def _raise(self, source: str, watermark: int) -> None:
        if watermark > self.watermarks.get(source, watermark - 1):
            self.watermarks[source] = watermark

