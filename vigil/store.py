"""The database: typed SQLAlchemy 2 models, engines, sessions and the Alembic upgrade.

SQLite is the embedded default; PostgreSQL (psycopg 3) is production and what Grafana reads. The Alembic migration in
``vigil/migrations`` is the source of truth for the schema (``vigil db upgrade`` runs it); these models must match it,
and a test compares the two. Model classes end in ``Row`` so they never clash with the domain types they store.

Every datetime is timezone-aware UTC on the way in and on the way out, on both databases.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

from vigil.domain import Alert, AlertState, Case, DeadLetter, Label, PccpCategory

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

LABELS = tuple(label.value for label in Label)
ALERT_STATES = tuple(state.value for state in AlertState)
SEVERITIES = ("warning", "critical")
STREAM_STATUSES = ("baseline", "active", "insufficient_data", "alarmed")
TICKET_STATUSES = ("open", "in_progress", "acceptance_recorded", "closed")
ROLES = ("viewer", "safety_officer", "engineer", "admin")
PCCP_CATEGORIES = tuple(category.value for category in PccpCategory)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """SQL for a CHECK that keeps a text column inside its vocabulary."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and read back tz-aware UTC, also on SQLite (which keeps no offset).

    Naive datetimes are refused: their zone is unknowable, and guessing shifts events across day boundaries.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} cannot be stored: vigil keeps UTC; "
                "pass a timezone-aware datetime (e.g. datetime.now(UTC) or parse the offset from the feed)"
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Named constraints, so SQLite and PostgreSQL agree on every name a later migration may have to alter."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        list[Any]: JSON,
        list[str]: JSON,
    }


class CaseRow(Base):
    """A prediction and, once known, its label. ``label`` is NULL while the label window is still open."""

    __tablename__ = "cases"
    __table_args__ = (
        UniqueConstraint("model", "prediction_id"),
        Index(None, "model", "model_version", "site", "predicted_at"),
        Index(None, "subject"),
        CheckConstraint(f"label IS NULL OR {_one_of('label', LABELS)}", name="label"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model: Mapped[str]
    model_version: Mapped[str]
    prediction_id: Mapped[str]
    prediction_version: Mapped[str]
    subject: Mapped[str] = mapped_column(String(64))
    encounter: Mapped[str | None]
    site: Mapped[str | None]
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    predicted_at: Mapped[datetime]
    score: Mapped[float]
    decision: Mapped[bool]
    label: Mapped[str | None]
    labeled_at: Mapped[datetime | None]
    outcome_definition: Mapped[str | None]
    evidence: Mapped[list[str]] = mapped_column(default=list)

    @classmethod
    def from_case(cls, case: Case) -> CaseRow:
        return cls(**cls.values_of(case))

    @staticmethod
    def values_of(case: Case) -> dict[str, Any]:
        """The row's column values, as a dict for bulk inserts (building ORM objects first costs half the insert)."""
        p = case.prediction
        return dict(
            model=p.model_id,
            model_version=p.model_version,
            prediction_id=p.resource_id,
            prediction_version=p.version_id,
            subject=p.subject,
            encounter=p.encounter,
            site=p.site,
            attributes=dict(p.attributes),
            predicted_at=p.time,
            score=p.score,
            decision=case.decision,
            label=case.label.value if case.label is not None else None,
            labeled_at=case.labeled_at,
            outcome_definition=case.outcome_definition,
            evidence=list(case.evidence),
        )


class StreamKeyColumns:
    """The columns that name a stream (model, version, metric, site, subgroup cell; DESIGN.md §Domain)."""

    model: Mapped[str]
    model_version: Mapped[str]
    metric: Mapped[str]
    site: Mapped[str]
    subgroup: Mapped[str]


class StreamStateRow(StreamKeyColumns, Base):
    """A detector's checkpoint on one stream, so a restart resumes where it stopped."""

    __tablename__ = "stream_state"
    __table_args__ = (
        UniqueConstraint(
            "model", "model_version", "metric", "site", "subgroup", "detector", name="uq_stream_state_key"
        ),
        Index(None, "status"),
        CheckConstraint(_one_of("status", STREAM_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    detector: Mapped[str]
    status: Mapped[str] = mapped_column(default="baseline")
    baseline: Mapped[float | None]
    baseline_n: Mapped[int] = mapped_column(default=0)
    n: Mapped[int] = mapped_column(default=0)
    threshold: Mapped[float | None]
    arl0: Mapped[float | None]
    statistic: Mapped[float | None]
    state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class MetricPointRow(StreamKeyColumns, Base):
    """One stream's value for one UTC day: what the Grafana panels plot."""

    __tablename__ = "metric_points"
    __table_args__ = (
        UniqueConstraint(
            "model", "model_version", "metric", "site", "subgroup", "period_start", name="uq_metric_points_key"
        ),
        Index(None, "period_start"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    period_start: Mapped[datetime]
    n: Mapped[int]
    value: Mapped[float | None]
    ci_low: Mapped[float | None]
    ci_high: Mapped[float | None]
    statistic: Mapped[float | None]
    threshold: Mapped[float | None]


class TicketRow(Base):
    """A retraining ticket with its PCCP category, rationale and lineage."""

    __tablename__ = "tickets"
    __table_args__ = (
        Index(None, "model", "model_version"),
        Index(None, "status"),
        CheckConstraint(_one_of("category", PCCP_CATEGORIES), name="category"),
        CheckConstraint(_one_of("status", TICKET_STATUSES), name="status"),
    )

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    model: Mapped[str]
    model_version: Mapped[str]
    category: Mapped[str]
    safety_overlay: Mapped[bool] = mapped_column(default=False)
    matched_mod: Mapped[str | None]
    cause: Mapped[str]
    cause_confidence: Mapped[float]
    remedy: Mapped[str]
    status: Mapped[str] = mapped_column(default="open")
    rationale: Mapped[list[Any]] = mapped_column(default=list)
    required_actions: Mapped[list[Any]] = mapped_column(default=list)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    acceptance: Mapped[dict[str, Any] | None]  # the recorded acceptance result (pass → C2, fail → C2-F)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    alerts: Mapped[list[AlertRow]] = relationship(back_populates="ticket", order_by="AlertRow.id")


class AlertRow(StreamKeyColumns, Base):
    """A detector signal with its lifecycle and the evidence an inspector asks for."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_identity", "model", "model_version", "metric", "site", "subgroup", "detector"),
        Index(None, "state"),
        Index(None, "detected_at"),
        Index(None, "ticket_id"),
        CheckConstraint(_one_of("state", ALERT_STATES), name="state"),
        CheckConstraint(_one_of("severity", SEVERITIES), name="severity"),
    )

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    detector: Mapped[str]
    state: Mapped[str] = mapped_column(default=AlertState.FIRING.value)
    severity: Mapped[str] = mapped_column(default="warning")
    detected_at: Mapped[datetime]
    change_estimate: Mapped[datetime]
    statistic: Mapped[float]
    threshold: Mapped[float]
    baseline: Mapped[float]
    current: Mapped[float]
    ci_low: Mapped[float]
    ci_high: Mapped[float]
    n_baseline: Mapped[int]
    n_current: Mapped[int]
    fire_count: Mapped[int] = mapped_column(default=1)
    last_fired_at: Mapped[datetime]
    acked_by: Mapped[str | None]
    acked_at: Mapped[datetime | None]
    ack_comment: Mapped[str | None] = mapped_column(Text)
    resolved_by: Mapped[str | None]
    resolved_at: Mapped[datetime | None]
    silenced_until: Mapped[datetime | None]
    silenced_by: Mapped[str | None]
    silence_reason: Mapped[str | None] = mapped_column(Text)
    escalated_at: Mapped[datetime | None]
    ticket_id: Mapped[str | None] = mapped_column(ForeignKey("tickets.id"))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("alerts.id"), index=True)  # grouped under this alert

    ticket: Mapped[TicketRow | None] = relationship(back_populates="alerts")

    @classmethod
    def from_alert(cls, alert: Alert) -> AlertRow:
        s = alert.signal
        return cls(
            id=alert.id,
            model=s.stream.model,
            model_version=s.stream.version,
            metric=s.stream.metric,
            site=s.stream.site,
            subgroup=s.stream.subgroup,
            detector=s.detector,
            state=alert.state.value,
            severity=alert.severity,
            detected_at=s.detected_at,
            change_estimate=s.change_estimate,
            statistic=s.statistic,
            threshold=s.threshold,
            baseline=s.baseline,
            current=s.current,
            ci_low=s.current_ci[0],
            ci_high=s.current_ci[1],
            n_baseline=s.n_baseline,
            n_current=s.n_current,
            fire_count=alert.fire_count,
            last_fired_at=alert.last_fired_at or s.detected_at,
        )


class AlertCommentRow(Base):
    """A safety officer's note on an alert (also recorded in the audit log)."""

    __tablename__ = "alert_comments"

    id: Mapped[int] = mapped_column(primary_key=True)
    alert_id: Mapped[str] = mapped_column(ForeignKey("alerts.id"), index=True)
    author: Mapped[str]
    at: Mapped[datetime] = mapped_column(default=utcnow)
    text: Mapped[str] = mapped_column(Text)


class DeadLetterRow(Base):
    """A rejected input and why; ``position`` is the NDJSON line or Kafka offset."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index(None, "source"), Index(None, "created_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str]
    partition: Mapped[int | None]
    position: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    resource_type: Mapped[str | None]
    resource_id: Mapped[str | None]
    payload: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @classmethod
    def from_dead_letter(cls, letter: DeadLetter) -> DeadLetterRow:
        return cls(
            source=letter.position.source,
            partition=letter.position.partition,
            position=letter.position.line,
            reason=letter.reason,
            resource_type=letter.resource_type,
            resource_id=letter.resource_id,
            payload=letter.payload,
        )


class AuditRow(Base):
    """One link of the hash chain; written only by ``vigil.audit.record``."""

    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "entity", "entity_id"), Index(None, "at"))

    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    actor: Mapped[str]
    action: Mapped[str]
    entity: Mapped[str]
    entity_id: Mapped[str]
    payload: Mapped[dict[str, Any]]
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class SourceOffsetRow(Base):
    """How far a source has been consumed; written in the same transaction as the state it produced."""

    __tablename__ = "source_offsets"

    source: Mapped[str] = mapped_column(primary_key=True)
    partition: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SourceCursorRow(Base):
    """Where a non-offset source resumes: a REST poll's ``_lastUpdated``, an ``$export``'s next ``_since``, a
    subscription's last event number. Written in the same transaction as the state it produced."""

    __tablename__ = "source_cursors"

    source: Mapped[str] = mapped_column(primary_key=True)
    cursor: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class CheckpointRow(Base):
    """The pipeline's in-memory state (pending predictions, joins, detectors, open alerts) after the last stored batch.

    Saved in the same transaction as the source offsets, so a restart resumes exactly where the stored results end.
    ``state`` is versioned by ``code_version`` and ``config_hash``: a checkpoint from other code or config is not
    restored (the run replays from the sources instead), and ``signature`` (HMAC with the subject key) refuses a blob
    that was not written by vigil.
    """

    __tablename__ = "checkpoints"

    name: Mapped[str] = mapped_column(primary_key=True)
    code_version: Mapped[str]
    config_hash: Mapped[str]
    state: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OutboxRow(Base):
    """One notification to deliver to one receiver: written with the alert transition, delivered with retries.

    ``dedupe_key`` makes enqueueing idempotent (one row per receiver × alert × event); ``delivered_at`` set means done.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("receiver", "dedupe_key"),
        Index(None, "delivered_at", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    receiver: Mapped[str]
    kind: Mapped[str]  # alertmanager | email | webhook | chat
    alert_id: Mapped[str | None] = mapped_column(String(16))
    event: Mapped[str]  # firing | resolved | acknowledged | escalation | ...
    dedupe_key: Mapped[str]
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiTokenRow(Base):
    """A bearer token for the REST API: only its SHA-256 is stored; the role decides what it may do."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_one_of("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class RunRow(Base):
    """One pipeline run: what went in (inputs, config hash, code version) and what came out (counts)."""

    __tablename__ = "runs"
    __table_args__ = (Index(None, "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    config_hash: Mapped[str]
    code_version: Mapped[str]
    inputs: Mapped[list[Any]] = mapped_column(default=list)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)


# --- engines, sessions, migrations -----------------------------------------------------


def engine_for(url: str) -> Engine:
    """A new engine (and connection pool) for a store URL; ``postgresql://`` means psycopg 3.

    Create it once per process or service and reuse it: each call opens its own pool.

    SQLite gets WAL, foreign keys, and ``BEGIN IMMEDIATE``: every transaction takes SQLite's single write lock when it
    starts (waiting up to 30 s), so concurrent writers queue instead of failing mid-transaction with "database is
    locked", and an audit append's read-the-head-then-insert is atomic. The price: vigil's readers queue too.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(
            f"store URL {url!r} is not a database URL; expected sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB (set --store or VIGIL_STORE_URL)"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # let the "begin" hook issue BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(url: str) -> sessionmaker[Session]:
    """Sessions on the store at ``url`` (a new engine: make one factory per process); objects stay readable after
    commit, since the CLI and API print them."""
    return sessionmaker(engine_for(url), expire_on_commit=False)


def alembic_config() -> Config:
    """The Alembic configuration that ships inside the package."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the store at ``url`` to ``revision`` by running the Alembic migrations (``vigil db upgrade``)."""
    engine = engine_for(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            config.attributes["configure_logger"] = False
            command.upgrade(config, revision)
    finally:
        engine.dispose()  # no connection left holding the database file or a server slot


def serialize(session: Session, name: str) -> None:
    """Hold a transaction-scoped lock named ``name`` until commit, so read-then-write allocations do not race.

    PostgreSQL: an advisory lock (a ``SELECT ... FOR UPDATE`` on the current head would not do: a waiting transaction
    re-reads the same, unchanged head row after the first commits). SQLite: the write lock already taken at BEGIN.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": name})


def next_id(session: Session, model_cls: type[AlertRow] | type[TicketRow], prefix: str) -> str:
    """The next human id for alerts or tickets: ``next_id(s, AlertRow, "A")`` → ``"A-000001"``, then ``"A-000002"``.

    Holds the allocation lock until the transaction ends; ids past 999999 keep counting (``"A-1000000"``).
    """
    serialize(session, f"{model_cls.__tablename__}.id")
    column = model_cls.id
    last = session.scalar(
        select(column)
        .where(column.like(f"{prefix}-%"))
        .order_by(func.length(column).desc(), column.desc())
        .limit(1)
    )
    number = int(last.removeprefix(f"{prefix}-")) + 1 if last else 1
    return f"{prefix}-{number:06d}"
