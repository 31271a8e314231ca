"""One-shot load: read containers, decode every resource, and count what was accepted, rejected, ignored, stripped."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ingest.decode import Decoder, Record
from ingest.reader import Item, iter_message, iter_resources
from ingest.sources import Message
from vigil.domain import DeadLetter, Position

_PROBLEM_CATEGORIES = {"missing": "missing element", "invalid": "invalid value", "fails": "FHIR validation",
                       "unknown": "unknown model", "too": "too late"}


@dataclass(slots=True)
class IngestResult:
    records: list[tuple[Position, Record]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    accepted: Counter[str] = field(default_factory=Counter)  # by resourceType
    rejected: Counter[str] = field(default_factory=Counter)  # by reason category
    ignored: Counter[str] = field(default_factory=Counter)  # by resourceType vigil does not use
    stripped: Counter[str] = field(default_factory=Counter)  # identifier elements not copied, by element


def load(paths: Iterable[Path | str] | Path | str, decoder: Decoder) -> IngestResult:
    """Read and decode everything under ``paths``; bad input lands in ``dead_letters``, never raises."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return decode_items(iter_resources(paths), decoder)


def load_messages(messages: Iterable[Message], decoder: Decoder) -> IngestResult:
    """Decode messages from a stream source (one resource or Bundle each); bad input lands in ``dead_letters``."""
    return decode_items((item for m in messages for item in iter_message(m.payload, m.position)), decoder)


def decode_items(items: Iterable[Item], decoder: Decoder) -> IngestResult:
    """Decode every item, in order, into ``records``: the hot loop of every load (counts kept in plain dicts)."""
    result = IngestResult()
    stripped_before = decoder.stripped.copy()
    records, decode, dead_letter = result.records, decoder.decode, DeadLetter
    accepted: dict[str, int] = {}
    ignored: dict[str, int] = {}
    for item in items:
        if item.__class__ is not tuple:  # the reader's DeadLetter
            _reject(result, item)  # type: ignore[arg-type]
            continue
        position, resource = item  # type: ignore[misc]
        outcome = decode(resource, position)
        if outcome is None:
            rtype = resource["resourceType"]
            ignored[rtype] = ignored.get(rtype, 0) + 1
        elif outcome.__class__ is dead_letter:  # DeadLetter has no subclasses (vigil/domain.py)
            _reject(result, outcome)  # type: ignore[arg-type]
        else:
            records.append((position, outcome))
            rtype = resource["resourceType"]
            accepted[rtype] = accepted.get(rtype, 0) + 1
    result.accepted.update(accepted)
    result.ignored.update(ignored)
    result.stripped = decoder.stripped - stripped_before
    return result


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cycle collector for one whole batch (load *and* processing); reference counting still frees.

    For the caller that runs a batch end to end (``Pipeline.run_paths``, a service batch): a batch keeps everything
    it decodes, so the collector re-scans a heap that only grows, for nothing (parsed JSON, records, cases hold no
    reference cycles). Measured (BENCHMARKS.md §Ingest fast path): about a fifth of the pipeline's CPU time when
    the pause covers the whole run. Deliberately *not* used inside ``load`` alone: records left in the young generation are
    then scanned by the next stage instead, and the pipeline as a whole got slower. If the collector is already off,
    it stays off. Not for strict mode, where fhir.resources and pydantic run per resource.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _reject(result: IngestResult, letter: DeadLetter) -> None:
    result.dead_letters.append(letter)
    result.rejected[reason_category(letter.reason)] += 1


def reason_category(reason: str) -> str:
    """A short class of a dead-letter reason, for counting: "invalid JSON", "missing element", "identifiers present"...

    Container-level reasons are "<category>: <detail>" or "<category> (<detail>)"; resource-level ones are
    "<Type>/<id>: <problem>" where the problem's first word gives the class.
    """
    head, sep, detail = reason.partition(": ")
    if sep and ("/" in head or head.endswith("(no id)")):
        return _PROBLEM_CATEGORIES.get(detail.split(" ", 1)[0], detail.split(" (", 1)[0])
    return head.split(" (", 1)[0]
