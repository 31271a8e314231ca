"""One-shot load: read containers, decode every resource, and count what was accepted, rejected, ignored, stripped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ingest.decode import Decoder, Record
from ingest.reader import Item, iter_message, iter_resources
from ingest.sources import Message
from vigil.domain import DeadLetter, Position

_PROBLEM_CATEGORIES = {"missing": "missing element", "invalid": "invalid value", "fails": "FHIR validation",
                       "unknown": "unknown model"}


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
    result = IngestResult()
    stripped_before = decoder.stripped.copy()
    for item in items:
        if isinstance(item, DeadLetter):
            outcome: Record | DeadLetter | None = item
        else:
            position, resource = item
            outcome = decoder.decode(resource, position)
        if outcome is None:
            result.ignored[resource["resourceType"]] += 1
        elif isinstance(outcome, DeadLetter):
            result.dead_letters.append(outcome)
            result.rejected[reason_category(outcome.reason)] += 1
        else:
            result.records.append((position, outcome))
            result.accepted[resource["resourceType"]] += 1
    result.stripped = decoder.stripped - stripped_before
    return result


def reason_category(reason: str) -> str:
    """A short class of a dead-letter reason, for counting: "invalid JSON", "missing element", "identifiers present"...

    Container-level reasons are "<category>: <detail>" or "<category> (<detail>)"; resource-level ones are
    "<Type>/<id>: <problem>" where the problem's first word gives the class.
    """
    head, sep, detail = reason.partition(": ")
    if sep and ("/" in head or head.endswith("(no id)")):
        return _PROBLEM_CATEGORIES.get(detail.split(" ", 1)[0], detail.split(" (", 1)[0])
    return head.split(" (", 1)[0]
