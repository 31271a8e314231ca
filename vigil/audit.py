"""The append-only, hash-chained audit log: who did what to which alert, ticket or config, provably unedited.

Each entry's hash covers the previous entry's hash and its own content, so editing, deleting or reordering any entry
breaks every link after it; ``verify`` names the first broken one. On PostgreSQL a trigger also refuses UPDATE, DELETE
and TRUNCATE. A chain cannot reveal that its newest entries were cut off: keep ``VerifyResult.head_hash`` somewhere
else (a report, a ticket) to anchor it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vigil.store import AuditRow, serialize, utcnow

GENESIS = "0" * 64
"""The ``prev_hash`` of the first entry."""


@dataclass(slots=True, frozen=True)
class VerifyResult:
    ok: bool
    checked: int  # entries that verified, in order, before the first bad one (all of them when ok)
    first_bad_seq: int | None = None
    reason: str | None = None
    head_hash: str | None = None  # hash of the last entry that verified


def canonical_json(value: Any) -> str:
    """One byte-exact JSON text per value: sorted keys, no spaces, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(
    prev_hash: str, seq: int, at: datetime, actor: str, action: str, entity: str, entity_id: str, payload: Any
) -> str:
    content = canonical_json(
        {
            "seq": seq,
            "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
            "actor": actor,
            "action": action,
            "entity": entity,
            "entity_id": entity_id,
            "payload": payload,
        }
    )
    return hashlib.sha256((prev_hash + content).encode()).hexdigest()


def record(
    session: Session,
    actor: str,
    action: str,
    entity: str,
    entity_id: str,
    payload: Mapping[str, Any] | None = None,
    *,
    at: datetime | None = None,
) -> AuditRow:
    """Append one entry in the caller's transaction (it lands or vanishes with the change it records).

    The chain head is read under a transaction-scoped lock, so concurrent writers queue rather than fork the chain.
    ``payload`` may hold datetimes and enums; they are stored as ISO strings and values, exactly as hashed.
    ``at`` defaults to now; replays pass the feed clock.
    """
    at = at or utcnow()
    if at.tzinfo is None:
        raise ValueError(f"audit entry {action} on {entity} {entity_id}: 'at' must be timezone-aware, got {at}")
    stored = _plain_json(payload or {}, f"{action} on {entity} {entity_id}")
    serialize(session, AuditRow.__tablename__)
    head = session.execute(select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)).first()
    seq, prev_hash = (head.seq + 1, head.hash) if head else (1, GENESIS)
    row = AuditRow(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        entity=entity,
        entity_id=entity_id,
        payload=stored,
        prev_hash=prev_hash,
        hash=entry_hash(prev_hash, seq, at, actor, action, entity, entity_id, stored),
    )
    session.add(row)
    session.flush()
    return row


def verify(session: Session) -> VerifyResult:
    """Walk the chain from the genesis and report the first entry that was edited, removed or moved."""
    columns = (AuditRow.seq, AuditRow.at, AuditRow.actor, AuditRow.action, AuditRow.entity, AuditRow.entity_id,
               AuditRow.payload, AuditRow.prev_hash, AuditRow.hash)
    rows = session.execute(select(*columns).order_by(AuditRow.seq).execution_options(yield_per=1000))
    checked, prev_hash = 0, GENESIS
    for row in rows:
        expected = checked + 1
        if row.seq != expected:
            reason = f"entry {expected} is missing (the next entry is {row.seq}): entries were deleted"
        elif row.prev_hash != prev_hash:
            reason = (f"entry {row.seq} does not link to entry {row.seq - 1} (prev_hash differs): "
                      "entries were deleted, inserted or reordered")
        elif row.hash != entry_hash(prev_hash, row.seq, row.at, row.actor, row.action, row.entity, row.entity_id,
                                    row.payload):
            reason = f"entry {row.seq} ({row.action} on {row.entity} {row.entity_id}) was edited after it was written"
        else:
            checked, prev_hash = expected, row.hash
            continue
        rows.close()
        return VerifyResult(False, checked, row.seq, reason, prev_hash if checked else None)
    return VerifyResult(True, checked, head_hash=prev_hash if checked else None)


def _plain_json(payload: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The payload as it will read back from the database, so the hash is computed over what is stored."""

    def encode(value: Any) -> Any:
        if isinstance(value, datetime | date):
            return value.isoformat()
        if isinstance(value, Enum):
            return value.value
        raise TypeError(f"audit payload for {what}: {type(value).__name__} {value!r} is not JSON; pass plain values")

    try:
        return json.loads(json.dumps(dict(payload), default=encode, allow_nan=False))
    except ValueError as exc:
        raise ValueError(f"audit payload for {what}: {exc}; record NaN/inf as null or a string") from None
