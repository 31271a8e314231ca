"""Where each source resumes, stored in the caller's transaction together with the results it produced.

Storing source offsets in the same database transaction as the state they produced is what makes a stream count
every message exactly once across crashes and rebalances (DESIGN.md §Reliability; Apache Kafka consumer docs,
"Storing Offsets Outside Kafka").

Layout in the existing tables:
- Kafka offsets: one ``source_offsets`` row per partition, ``source = f"{source_name}|{topic}"``, ``partition``, and
  ``offset`` = the next offset to read (the Kafka convention for committed offsets). ``|`` cannot occur in a Kafka
  topic name (legal characters: ``[a-zA-Z0-9._-]``), so the split back into name and topic is unambiguous.
- Cursors (REST ``_lastUpdated``, ``$export`` ``_since``, subscription event number): one ``source_cursors`` row,
  ``source = source_name``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from ingest.sources import Checkpoint
from vigil.store import SourceCursorRow, SourceOffsetRow, utcnow

SEPARATOR = "|"

Partition = tuple[str, int]


class StaleOffsets(RuntimeError):
    """Another consumer stored offsets for a partition since this one read them: its results must not be stored."""


def offset_key(source_name: str, topic: str) -> str:
    """The ``source_offsets.source`` value of one topic of a source: ``"{source_name}|{topic}"``."""
    if SEPARATOR in topic:
        raise ValueError(f"topic {topic!r} of source {source_name!r} contains {SEPARATOR!r}, which Kafka topic names "
                         "cannot; check the source's topics")
    return f"{source_name}{SEPARATOR}{topic}"


def load_checkpoint(session: Session, source_name: str) -> Checkpoint:
    """Everything stored for ``source_name``: all its partitions' next offsets and its cursor (if any)."""
    prefix = f"{source_name}{SEPARATOR}"
    rows = session.execute(
        select(SourceOffsetRow.source, SourceOffsetRow.partition, SourceOffsetRow.offset)
        .where(SourceOffsetRow.source.startswith(prefix, autoescape=True))
    ).all()
    cursor = session.scalar(select(SourceCursorRow.cursor).where(SourceCursorRow.source == source_name))
    return Checkpoint(offsets={(key.removeprefix(prefix), partition): offset for key, partition, offset in rows},
                      cursor=cursor)


def stored_offsets(session: Session, source_name: str, partitions: list[Partition]) -> dict[Partition, int]:
    """The stored next offsets of ``partitions``; partitions with nothing stored are left out."""
    if not partitions:
        return {}
    wanted = {(offset_key(source_name, topic), partition): (topic, partition) for topic, partition in partitions}
    rows = session.execute(
        select(SourceOffsetRow.source, SourceOffsetRow.partition, SourceOffsetRow.offset).where(
            or_(*(and_(SourceOffsetRow.source == key, SourceOffsetRow.partition == p) for key, p in wanted))
        )
    ).all()
    return {wanted[(key, partition)]: offset for key, partition, offset in rows}


def save_checkpoint(session: Session, source_name: str, checkpoint: Checkpoint,
                    expected: Mapping[Partition, int | None] | None = None) -> None:
    """Store ``checkpoint`` in the caller's transaction (insert or update, on SQLite and PostgreSQL).

    With ``expected`` (``KafkaSource.stored_offsets()``), each partition is written only if the store still holds the
    expected offset (``None``: no row); otherwise ``StaleOffsets`` is raised and the caller must roll back, because
    the partition was meanwhile reassigned and its new owner already stored results past that point (fencing a
    consumer that was evicted from its group while it was still working).
    """
    now = utcnow()
    for (topic, partition), offset in sorted(checkpoint.offsets.items()):
        key = offset_key(source_name, topic)
        if expected is not None and (topic, partition) in expected:
            _compare_and_set(session, key, partition, offset, expected[(topic, partition)], now)
        else:
            _upsert(session, SourceOffsetRow, {"source": key, "partition": partition, "offset": offset,
                                               "updated_at": now}, ["source", "partition"], ["offset", "updated_at"])
    if checkpoint.cursor is not None:
        _upsert(session, SourceCursorRow, {"source": source_name, "cursor": checkpoint.cursor, "updated_at": now},
                ["source"], ["cursor", "updated_at"])


def lookup_offsets(factory: sessionmaker[Session], source_name: str) -> Callable[[list[Partition]], dict[Partition, int]]:
    """The ``offsets_lookup`` for ``KafkaSource``: reads the stored offsets in a short transaction of its own, at the
    moment a partition is assigned, so a partition taken over from another consumer resumes where that one stored."""

    def lookup(partitions: list[Partition]) -> dict[Partition, int]:
        with factory() as session:
            return stored_offsets(session, source_name, partitions)

    return lookup


def _compare_and_set(session: Session, key: str, partition: int, offset: int, expected: int | None, now) -> None:
    if expected is None:
        inserted = _insert_if_absent(session, key, partition, offset, now)
        if not inserted:
            raise StaleOffsets(f"offsets of {key}[{partition}] were stored by another consumer since this one was "
                               "assigned the partition; roll back (the new owner processes those messages)")
        return
    done = session.execute(
        update(SourceOffsetRow)
        .where(SourceOffsetRow.source == key, SourceOffsetRow.partition == partition, SourceOffsetRow.offset == expected)
        .values(offset=offset, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:
        raise StaleOffsets(f"offset of {key}[{partition}] is no longer {expected}: another consumer stored results for "
                           "it since this one read it; roll back (the new owner processes those messages)")


def _insert_if_absent(session: Session, key: str, partition: int, offset: int, now) -> bool:
    insert = _dialect_insert(session)(SourceOffsetRow).values(source=key, partition=partition, offset=offset,
                                                               updated_at=now)
    inserted = insert.on_conflict_do_nothing(index_elements=["source", "partition"]).returning(SourceOffsetRow.offset)
    return session.execute(inserted).first() is not None  # RETURNING: rowcount is not reliable here on every driver


def _upsert(session: Session, table, values: dict, keys: list[str], changed: list[str]) -> None:
    insert = _dialect_insert(session)(table).values(**values)
    session.execute(insert.on_conflict_do_update(index_elements=keys,
                                                 set_={c: insert.excluded[c] for c in changed}))


def _dialect_insert(session: Session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise ValueError(f"source offsets are stored on SQLite or PostgreSQL, not {dialect}; check the store URL")
