"""Riding out a store outage: which errors mean "the database is unavailable", and how long to wait before asking again.

``vigil run`` must survive PostgreSQL being stopped, restarted or unreachable for a while (issue #9, DESIGN.md
§Reliability). The recovery is the one a restarted process performs, so it is correct by construction: once the store
answers again, the service throws away everything it holds in memory, restores the pipeline from the checkpoint stored
in the last committed transaction and resumes every source from the offsets stored in that same transaction
(``vigil.service.Service``). Whatever the failed transaction had half-done in memory (deltas marked stored, days
forgotten, alert ids assigned) is therefore never trusted, and a commit whose outcome is unknown (the connection died
during COMMIT) is settled by what the store actually holds.

Only *availability* errors are waited out: ``OperationalError`` (PEP 249: errors "related to the database's operation
and not necessarily under the control of the programmer": connection refused or lost, server shutting down, deadlock,
serialization failure, statement cancelled) and any driver error SQLAlchemy recognised as a disconnect
(``connection_invalidated``). Integrity, programming and data errors are bugs or bad data; they still fail loudly.

The wait is capped exponential backoff with jitter (M. Brooker, "Exponential Backoff And Jitter", AWS Architecture
Blog, 2015): consumers that lost the same database do not all reconnect in the same instant, and a store that keeps
failing right after it answers (e.g. a full disk) is asked less and less often instead of in a hot loop.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.exc import OperationalError as SAOperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger(__name__)


class StoreRetry(BaseModel):
    """How the service waits for an unavailable store (``Service(..., retry=StoreRetry(...))``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_s: float = Field(0.5, gt=0, description="first wait before asking the store again")
    factor: float = Field(2.0, ge=1, description="each further wait is this many times the previous one")
    max_s: float = Field(30.0, gt=0, description="longest single wait")
    jitter: float = Field(0.5, ge=0, le=1, description="fraction of each wait drawn at random (0.5: 'equal jitter')")
    give_up_after_s: float | None = Field(None, gt=0, description=(
        "stop waiting and fail after this long without an answer; None (the default) waits as long as it takes"))

    @model_validator(mode="after")
    def _cap_not_below_start(self) -> StoreRetry:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) must be at least initial_s ({self.initial_s})")
        return self

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait before the ``attempt``-th question (0-based): ``min(max_s, initial_s * factor**attempt)``, of
        which the ``jitter`` fraction is drawn uniformly at random."""
        ceiling = self.max_s if attempt > 64 else min(self.max_s, self.initial_s * self.factor ** attempt)
        return ceiling * (1.0 - self.jitter * rng.random())


class StoreUnavailable(RuntimeError):
    """The store did not answer within ``StoreRetry.give_up_after_s``."""


class SourceCannotRewind(RuntimeError):
    """After an outage a source must go back to its stored position in place, and this one cannot: restart."""


try:  # the PostgreSQL driver is an optional extra (pip install 'vigil[postgres]'); SQLite needs none
    import psycopg

    _DRIVER_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error, sqlite3.Error)
    _DRIVER_UNAVAILABLE: tuple[type[BaseException], ...] = (psycopg.OperationalError, sqlite3.OperationalError)
except ImportError:  # pragma: no cover - exercised only without the extra
    _DRIVER_ERRORS, _DRIVER_UNAVAILABLE = (sqlite3.Error,), (sqlite3.OperationalError,)

_LOUD = (SQLAlchemyError, *_DRIVER_ERRORS)
_UNAVAILABLE = (SAOperationalError, PoolTimeout, *_DRIVER_UNAVAILABLE)


def is_store_outage(exc: BaseException) -> bool:
    """True if ``exc`` means the store is unavailable (wait and restore), False if it is any other error (raise it).

    The first database error along the exception's cause chain decides, so a source error raised *because* the store
    could not be read (e.g. ``KafkaSource``'s ``StoredOffsetsUnavailable``) counts as an outage, while an integrity
    or programming error never does.
    """
    for current in _chain(exc):
        if isinstance(current, _UNAVAILABLE):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _LOUD):
            return False
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was explicitly raised from (``raise ... from``); an exception merely raised
    while handling another (``__context__``) is not caused by it, so it does not count."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def describe(exc: BaseException) -> str:
    """The error for a log line: the driver's exception type and the first line of its message, without the SQL
    statement and its bound parameters (which SQLAlchemy appends and which may hold case data)."""
    inner = next((e for e in _chain(exc) if isinstance(e, _LOUD)), exc)  # the database error behind a wrapper
    if isinstance(inner, DBAPIError) and inner.orig is not None:
        inner = inner.orig
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else '(no message)'}"


def store_name(url: str) -> str:
    """The store URL as it may be logged: the password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable store URL>"


def answers(engine: Engine) -> bool:
    """One cheap round trip (``SELECT 1`` on a fresh connection): does the store answer now?"""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception as exc:  # noqa: BLE001 - availability errors mean "not yet"; anything else is raised
        if is_store_outage(exc):
            log.debug("store still unavailable: %s", describe(exc))
            return False
        raise


def wait_until_answering(engine: Engine, retry: StoreRetry, stop: threading.Event, first_attempt: int = 0,
                         rng: random.Random | None = None) -> tuple[bool, int]:
    """Back off and ask the store until it answers; ``(answered, attempts made)``. Returns ``(False, n)`` as soon as
    ``stop`` is set. Raises ``StoreUnavailable`` after ``retry.give_up_after_s`` without an answer.

    ``first_attempt`` continues an earlier backoff (the service resets it only after a successful commit), so a store
    that answers the probe but keeps failing real work is asked less and less often.
    """
    rng = rng or random.Random()
    engine.dispose()  # pooled connections to the old server are dead; ask on fresh ones
    started = time.monotonic()
    for attempt in _count(first_attempt):
        if stop.wait(retry.delay(attempt, rng)):
            return False, attempt - first_attempt
        if answers(engine):
            return True, attempt - first_attempt + 1
        if retry.give_up_after_s is not None and time.monotonic() - started >= retry.give_up_after_s:
            raise StoreUnavailable(
                f"the store {store_name(str(engine.url))} did not answer for {time.monotonic() - started:.0f} s "
                f"({attempt - first_attempt + 1} attempts); check that the database server is running and reachable "
                "from this host, then restart `vigil run` (it resumes from the last stored batch)")
    raise AssertionError("unreachable")


def _count(start: int) -> Iterator[int]:
    n = start
    while True:
        yield n
        n += 1
