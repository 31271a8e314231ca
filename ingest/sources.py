"""The one interface every feed adapter implements (Kafka, ``$export``, REST polling, subscription webhook).

A source hands out raw messages — one FHIR resource or Bundle each, as JSON bytes — with the position they came
from. The service (``vigil run``) decodes them, processes them, and then stores the results together with the source's
``checkpoint()`` in one database transaction; only after that commit does it call ``committed()``. On restart it
calls ``resume()`` with what was stored, so a message is counted once whatever point the process was killed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vigil.domain import Position


@dataclass(frozen=True, slots=True)
class Message:
    position: Position  # topic/partition/offset, file:line, URL#n — what a dead letter names and a replay seeks to
    payload: bytes  # one FHIR resource or Bundle, JSON


@dataclass(slots=True)
class Checkpoint:
    """Where a source resumes: per-partition next offsets (Kafka) and/or an opaque cursor (REST, ``$export``)."""

    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) → next offset to read
    cursor: str | None = None


@runtime_checkable
class Source(Protocol):
    name: str  # unique per configured source; the key of its stored offsets/cursor

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue after what the store already holds (called once, before the first ``poll``)."""

    def poll(self, max_records: int, timeout_s: float) -> list[Message]:
        """The next messages, [] if none arrived within ``timeout_s``."""

    @property
    def exhausted(self) -> bool:
        """True when a finite source has nothing more (``vigil run --once`` stops when all are)."""

    def checkpoint(self) -> Checkpoint:
        """Where to resume after every message returned by ``poll`` so far (stored with their results)."""

    def committed(self) -> None:
        """The results up to ``checkpoint()`` are durable: acknowledge upstream (e.g. commit Kafka offsets)."""

    def close(self) -> None: ...
