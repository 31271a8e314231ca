"""The audit log: a hash chain that verifies, names the first tampered entry, and PostgreSQL refuses to edit."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from vigil import audit, store
from vigil.domain import AlertState
from vigil.store import AuditRow

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def sqlite_factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'vigil.db'}"
    store.upgrade(url)
    factory = store.session_factory(url)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def postgres_factory(fresh_postgres_url: str) -> Iterator[sessionmaker[Session]]:
    store.upgrade(fresh_postgres_url)
    factory = store.session_factory(fresh_postgres_url)
    yield factory
    factory.kw["bind"].dispose()


def write_chain(factory: sessionmaker[Session], n: int) -> None:
    with factory() as s:
        for i in range(1, n + 1):
            audit.record(s, "dr.lee", "alert.ack", "alert", f"A-{i:06d}", {"comment": f"seen {i}", "n": i},
                         at=T0 + timedelta(minutes=i))
        s.commit()


def tamper(factory: sessionmaker[Session], *statements: str) -> audit.VerifyResult:
    with factory() as s:
        for sql in statements:
            s.execute(text(sql))
        s.commit()
        return audit.verify(s)


def test_hash_is_sha256_of_prev_hash_and_canonical_json() -> None:
    """The documented recipe, computed independently, so another tool can verify an exported log."""
    content = ('{"action":"ticket.create","actor":"vigil","at":"2025-03-01T08:00:00.000000+00:00",'
               '"entity":"ticket","entity_id":"T-000001","payload":{"category":"C2","é":[1,2.5]},"seq":1}')
    expected = hashlib.sha256(("0" * 64 + content).encode()).hexdigest()
    at_in_cet = T0.astimezone(timezone(timedelta(hours=1)))
    got = audit.entry_hash(audit.GENESIS, 1, at_in_cet, "vigil", "ticket.create", "ticket", "T-000001",
                           {"é": [1, 2.5], "category": "C2"})
    assert got == expected


def test_a_fresh_chain_verifies(sqlite_factory: sessionmaker[Session]) -> None:
    with sqlite_factory() as s:
        assert audit.verify(s) == audit.VerifyResult(ok=True, checked=0)
    write_chain(sqlite_factory, 5)
    with sqlite_factory() as s:
        rows = s.scalars(select(AuditRow).order_by(AuditRow.seq)).all()
        result = audit.verify(s)
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].prev_hash == "0" * 64
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(rows, rows[1:]))
    assert result == audit.VerifyResult(ok=True, checked=5, head_hash=rows[-1].hash)


def test_payload_is_stored_exactly_as_hashed(sqlite_factory: sessionmaker[Session]) -> None:
    with sqlite_factory() as s:
        row = audit.record(s, "vigil", "alert.fire", "alert", "A-000001",
                           {"state": AlertState.FIRING, "change": datetime(2025, 2, 20, tzinfo=UTC), "ci": (0.1, 0.2)})
        s.commit()
    with sqlite_factory() as s:
        stored = s.get(AuditRow, row.seq)
        assert stored.payload == {"state": "firing", "change": "2025-02-20T00:00:00+00:00", "ci": [0.1, 0.2]}
        assert audit.verify(s).ok


def test_an_edited_payload_is_pinpointed(sqlite_factory: sessionmaker[Session]) -> None:
    write_chain(sqlite_factory, 6)
    forged = json.dumps({"comment": "never happened", "n": 4})
    result = tamper(sqlite_factory, f"UPDATE audit_log SET payload = '{forged}' WHERE seq = 4")
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 4, 3)
    assert result.reason == "entry 4 (alert.ack on alert A-000004) was edited after it was written"


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(sqlite_factory: sessionmaker[Session]) -> None:
    write_chain(sqlite_factory, 6)
    with sqlite_factory() as s:
        prev = s.get(AuditRow, 2).hash
    forged = audit.entry_hash(prev, 3, T0 + timedelta(minutes=3), "dr.lee", "alert.ack", "alert", "A-000003", {})
    result = tamper(sqlite_factory, f"UPDATE audit_log SET payload = '{{}}', hash = '{forged}' WHERE seq = 3")
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 4, 3)
    assert "entry 4 does not link to entry 3" in result.reason


def test_a_deleted_entry_is_pinpointed(sqlite_factory: sessionmaker[Session]) -> None:
    write_chain(sqlite_factory, 6)
    result = tamper(sqlite_factory, "DELETE FROM audit_log WHERE seq = 3")
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 4, 2)
    assert result.reason == "entry 3 is missing (the next entry is 4): entries were deleted"


def test_reordered_entries_are_pinpointed(sqlite_factory: sessionmaker[Session]) -> None:
    write_chain(sqlite_factory, 6)
    result = tamper(
        sqlite_factory,
        "UPDATE audit_log SET seq = -1 WHERE seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE seq = 5",
        "UPDATE audit_log SET seq = 5 WHERE seq = -1",
    )
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 2, 1)
    assert "entry 2 does not link to entry 1" in result.reason


def test_a_rolled_back_entry_leaves_no_trace(sqlite_factory: sessionmaker[Session]) -> None:
    with sqlite_factory() as s:
        audit.record(s, "vigil", "alert.fire", "alert", "A-000001", at=T0)
        s.rollback()
        assert audit.record(s, "vigil", "alert.fire", "alert", "A-000002", at=T0).seq == 1
        s.commit()
        assert audit.verify(s) == audit.VerifyResult(True, 1, head_hash=s.get(AuditRow, 1).hash)


def test_bad_input_is_refused_with_a_reason(sqlite_factory: sessionmaker[Session]) -> None:
    with sqlite_factory() as s:
        with pytest.raises(ValueError, match="alert.resolve on alert A-000001: 'at' must be timezone-aware"):
            audit.record(s, "vigil", "alert.resolve", "alert", "A-000001", at=datetime(2025, 1, 1))
        with pytest.raises(ValueError, match="audit payload for alert.fire on alert A-000001: .*NaN"):
            audit.record(s, "vigil", "alert.fire", "alert", "A-000001", {"current": float("nan")})
        with pytest.raises(TypeError, match="audit payload for alert.fire on alert A-000001: object"):
            audit.record(s, "vigil", "alert.fire", "alert", "A-000001", {"x": object()})
        assert s.scalar(select(func.count()).select_from(AuditRow)) == 0


def append_concurrently(factory: sessionmaker[Session], writers: int, each: int) -> None:
    start = threading.Barrier(writers)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            start.wait()
            for i in range(each):
                with factory() as s:
                    audit.record(s, f"writer-{w}", "config.change", "config", f"{w}-{i}", {"i": i})
                    s.commit()
        except BaseException as exc:  # surfaced below, the thread cannot raise into the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_concurrent_appends_on_sqlite_keep_one_chain(sqlite_factory: sessionmaker[Session]) -> None:
    append_concurrently(sqlite_factory, writers=4, each=15)
    with sqlite_factory() as s:
        result = audit.verify(s)
    assert (result.ok, result.checked) == (True, 60)


@pytest.mark.postgres
def test_concurrent_appends_on_postgres_keep_one_chain(postgres_factory: sessionmaker[Session]) -> None:
    append_concurrently(postgres_factory, writers=4, each=15)
    with postgres_factory() as s:
        result = audit.verify(s)
        actors = s.scalars(select(AuditRow.actor).distinct()).all()
    assert (result.ok, result.checked) == (True, 60)
    assert sorted(actors) == ["writer-0", "writer-1", "writer-2", "writer-3"]


@pytest.mark.postgres
@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET payload = '{}' WHERE seq = 2", "DELETE FROM audit_log WHERE seq = 2",
     "TRUNCATE audit_log"],
)
def test_postgres_refuses_to_change_the_audit_log(postgres_factory: sessionmaker[Session], statement: str) -> None:
    write_chain(postgres_factory, 3)
    with postgres_factory() as s:
        with pytest.raises(DBAPIError, match="audit_log is append-only"):
            s.execute(text(statement))
        s.rollback()
        result = audit.verify(s)
    assert (result.ok, result.checked) == (True, 3)


@pytest.mark.postgres
def test_postgres_chain_verifies_and_detects_an_edit_made_behind_the_trigger(
    postgres_factory: sessionmaker[Session],
) -> None:
    """Even a superuser who disables the trigger cannot edit an entry unnoticed."""
    write_chain(postgres_factory, 4)
    result = tamper(
        postgres_factory,
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete",
        """UPDATE audit_log SET actor = 'someone.else' WHERE seq = 2""",
    )
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 2, 1)
