"""The store: the Alembic migration is the schema, the models match it, every table round-trips, constraints hold."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, delete, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from vigil import store
from vigil.domain import Alert, AlertState, Case, DeadLetter, Label, Position, Prediction, Signal, StreamKey
from vigil.store import (
    AlertRow,
    AuditRow,
    CaseRow,
    DeadLetterRow,
    MetricPointRow,
    RunRow,
    SourceOffsetRow,
    StreamStateRow,
    TicketRow,
)

CET = timezone(timedelta(hours=2))
T0 = datetime(2025, 3, 1, 23, 30, 15, 123456, tzinfo=CET)  # 21:30:15.123456 UTC
Row = TypeVar("Row", bound=store.Base)
TABLES = {"cases", "stream_state", "metric_points", "alerts", "tickets", "dead_letters", "audit_log",
          "source_offsets", "runs", "source_cursors", "checkpoints", "outbox", "api_tokens", "alert_comments"}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'vigil.db'}"


@pytest.fixture(scope="module")
def postgres_engine(postgres_cluster) -> Iterator[Engine]:
    """One migrated PostgreSQL database for the module; each test's writes are rolled back (see ``session``)."""
    _, url = postgres_cluster.create_database()
    store.upgrade(url)
    engine = store.engine_for(url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A session on a migrated store: a fresh SQLite file, or PostgreSQL inside a transaction rolled back after."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'vigil.db'}"
        store.upgrade(url)
        factory = store.session_factory(url)
        with factory() as s:
            yield s
        factory.kw["bind"].dispose()
        return
    with request.getfixturevalue("postgres_engine").connect() as connection:
        outer = connection.begin()
        with Session(connection, join_transaction_mode="create_savepoint") as s:
            yield s
        outer.rollback()


def schema_diff(url: str) -> list:
    engine = store.engine_for(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, store.Base.metadata)
    finally:
        engine.dispose()


# --- migration -------------------------------------------------------------------------------------------------------


def test_upgrade_on_sqlite_creates_every_table_at_head_and_is_idempotent(sqlite_url: str) -> None:
    store.upgrade(sqlite_url)
    store.upgrade(sqlite_url)  # a second `vigil db upgrade` is a no-op
    engine = store.engine_for(sqlite_url)
    with engine.connect() as c:
        assert set(inspect(c).get_table_names()) == TABLES | {"alembic_version"}
        assert c.scalar(text("SELECT version_num FROM alembic_version")) == "0004"
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_migration_schema_equals_models_on_sqlite(sqlite_url: str) -> None:
    store.upgrade(sqlite_url)
    assert schema_diff(sqlite_url) == []


@pytest.mark.postgres
def test_migration_schema_equals_models_on_postgres(fresh_postgres_url: str) -> None:
    store.upgrade(fresh_postgres_url)
    assert schema_diff(fresh_postgres_url) == []


def test_schema_drift_is_detected(sqlite_url: str) -> None:
    """The comparison above can fail: a column the migration lacks shows up as a difference."""
    store.upgrade(sqlite_url)
    engine = store.engine_for(sqlite_url)
    with engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE runs DROP COLUMN counts")
    engine.dispose()
    diff = schema_diff(sqlite_url)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "runs", "counts")]


def test_downgrade_drops_everything_and_upgrade_restores_it(sqlite_url: str) -> None:
    store.upgrade(sqlite_url)
    engine = store.engine_for(sqlite_url)
    with engine.begin() as c:
        config = store.alembic_config()
        config.attributes.update(connection=c, configure_logger=False)
        command.downgrade(config, "base")
    with engine.connect() as c:
        assert set(inspect(c).get_table_names()) == {"alembic_version"}
    engine.dispose()
    store.upgrade(sqlite_url)
    assert schema_diff(sqlite_url) == []


def test_offline_sql_for_postgres_includes_the_append_only_trigger() -> None:
    out = io.StringIO()
    config = store.alembic_config()
    config.output_buffer = out
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://dba@db.example/vigil")
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head", sql=True)
    sql = out.getvalue()
    assert all(f"CREATE TABLE {table}" in sql for table in TABLES)
    assert "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log" in sql


# --- engines and datetimes -------------------------------------------------------------------------------------------


def test_plain_postgresql_urls_use_psycopg3() -> None:
    assert store.engine_for("postgresql://u@h/db").dialect.driver == "psycopg"
    assert store.engine_for("postgres://u@h/db").dialect.driver == "psycopg"


def test_an_unparseable_store_url_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match=r"'vigil\.db' is not a database URL.*sqlite:///PATH.*VIGIL_STORE_URL"):
        store.engine_for("vigil.db")


def test_naive_datetimes_are_refused(session: Session) -> None:
    session.add(RunRow(started_at=datetime(2025, 1, 1), config_hash="c", code_version="v"))
    with pytest.raises(StatementError, match="naive datetime 2025-01-01T00:00:00 cannot be stored.*timezone-aware"):
        session.flush()


# --- round trips -----------------------------------------------------------------------------------------------------


def reread(session: Session, row: Row, key: Callable[[type[Row]], object]) -> Row:
    """Write ``row``, forget it, and load it back from the database."""
    session.add(row)
    session.commit()
    session.expunge_all()
    return session.scalars(select(type(row)).where(key(type(row)))).one()


def make_case() -> Case:
    prediction = Prediction(
        resource_id="ra-1", version_id="2", status="final", model_id="sepsis", model_version="1.4.0",
        subject="c0ffee" * 10 + "beef", encounter="enc-9", time=T0, score=0.8125, site="site-a",
        attributes={"sex": "female", "age_band": "65-79"},
    )
    return Case(prediction, Label.POSITIVE, decision=True, labeled_at=T0 + timedelta(days=3),
                outcome_definition="sepsis-3@2", evidence=("Condition/c1", "Observation/o7"))


def test_case_round_trips_with_utc_times(session: Session) -> None:
    got = reread(session, CaseRow.from_case(make_case()), lambda m: m.prediction_id == "ra-1")
    assert (got.model, got.model_version, got.prediction_id, got.prediction_version) == ("sepsis", "1.4.0", "ra-1", "2")
    assert (got.subject, got.encounter, got.site) == ("c0ffee" * 10 + "beef", "enc-9", "site-a")
    assert got.attributes == {"sex": "female", "age_band": "65-79"}
    assert got.predicted_at == datetime(2025, 3, 1, 21, 30, 15, 123456, tzinfo=UTC)
    assert got.predicted_at.tzinfo is UTC and got.labeled_at.tzinfo is UTC
    assert got.labeled_at - got.predicted_at == timedelta(days=3)
    assert (got.score, got.decision, got.label, got.outcome_definition) == (0.8125, True, "positive", "sepsis-3@2")
    assert got.evidence == ["Condition/c1", "Observation/o7"]


def test_stream_state_round_trips(session: Session) -> None:
    row = StreamStateRow(model="sepsis", model_version="1.4.0", metric="fnr", site="site-a", subgroup="sex=female",
                         detector="bernoulli_cusum", status="active", baseline=0.12, baseline_n=412, n=980,
                         threshold=4.31, arl0=36500.0, statistic=1.75, state={"s": 1.75, "t_last_zero": 17})
    got = reread(session, row, lambda m: m.detector == "bernoulli_cusum")
    assert (got.status, got.baseline, got.baseline_n, got.n) == ("active", 0.12, 412, 980)
    assert (got.threshold, got.arl0, got.statistic) == (4.31, 36500.0, 1.75)
    assert got.state == {"s": 1.75, "t_last_zero": 17}
    assert got.updated_at.tzinfo is UTC and abs(datetime.now(UTC) - got.updated_at) < timedelta(minutes=1)


def test_metric_point_round_trips(session: Session) -> None:
    day = datetime(2025, 3, 1, tzinfo=UTC)
    row = MetricPointRow(model="sepsis", model_version="1.4.0", metric="fnr", site="all", subgroup="all",
                         period_start=day, n=57, value=0.175, ci_low=0.09, ci_high=0.29, statistic=2.5, threshold=4.3)
    got = reread(session, row, lambda m: m.period_start == day)
    assert (got.n, got.value, got.ci_low, got.ci_high) == (57, 0.175, 0.09, 0.29)
    assert (got.statistic, got.threshold) == (2.5, 4.3)
    assert got.period_start == day


def make_alert(alert_id: str = "A-000001") -> Alert:
    signal = Signal(StreamKey("sepsis", "1.4.0", "fnr", "site-b", "all"), "bernoulli_cusum", detected_at=T0,
                    change_estimate=T0 - timedelta(days=6), statistic=4.9, threshold=4.31, baseline=0.12,
                    current=0.31, current_ci=(0.22, 0.41), n_baseline=412, n_current=88)
    return Alert(alert_id, signal, state=AlertState.FIRING, severity="critical", fire_count=2,
                 last_fired_at=T0 + timedelta(hours=5))


def test_alert_and_ticket_round_trip_and_link(session: Session) -> None:
    ticket = TicketRow(id="T-000001", model="sepsis", model_version="1.4.0", category="C1", safety_overlay=True,
                       matched_mod=None, cause="unmapped local code at site-b", cause_confidence=0.9,
                       remedy="fix the ConceptMap", rationale=["S4 §XI"], required_actions=["re-measure"],
                       evidence={"alerts": ["A-000001"], "unmapped_rate": 0.4})
    alert = AlertRow.from_alert(make_alert())
    alert.ticket = ticket
    session.add(ticket)
    got = reread(session, alert, lambda m: m.id == "A-000001")
    assert (got.model, got.metric, got.site, got.subgroup, got.detector) == ("sepsis", "fnr", "site-b", "all",
                                                                             "bernoulli_cusum")
    assert (got.state, got.severity, got.fire_count) == ("firing", "critical", 2)
    assert got.change_estimate == datetime(2025, 2, 23, 21, 30, 15, 123456, tzinfo=UTC)
    assert got.detected_at == T0 and got.last_fired_at == T0 + timedelta(hours=5)
    assert (got.statistic, got.threshold, got.baseline, got.current) == (4.9, 4.31, 0.12, 0.31)
    assert (got.ci_low, got.ci_high, got.n_baseline, got.n_current) == (0.22, 0.41, 412, 88)
    assert got.acked_by is None and got.resolved_at is None
    assert got.ticket.id == "T-000001" and [a.id for a in got.ticket.alerts] == ["A-000001"]
    assert (got.ticket.category, got.ticket.safety_overlay, got.ticket.status) == ("C1", True, "open")
    assert got.ticket.evidence == {"alerts": ["A-000001"], "unmapped_rate": 0.4}
    assert got.ticket.rationale == ["S4 §XI"] and got.ticket.required_actions == ["re-measure"]


def test_dead_letter_round_trips(session: Session) -> None:
    letter = DeadLetter(Position("feeds/site-a/RiskAssessment.000.ndjson", line=42), "missing occurrenceDateTime",
                        "RiskAssessment", "ra-77", payload='{"resourceType":"RiskAssessment","id":"ra-77"}')
    got = reread(session, DeadLetterRow.from_dead_letter(letter), lambda m: m.resource_id == "ra-77")
    assert (got.source, got.partition, got.position) == ("feeds/site-a/RiskAssessment.000.ndjson", None, 42)
    assert (got.reason, got.resource_type) == ("missing occurrenceDateTime", "RiskAssessment")
    assert got.payload == '{"resourceType":"RiskAssessment","id":"ra-77"}'
    assert got.created_at.tzinfo is UTC


def test_source_offset_and_run_round_trip(session: Session) -> None:
    got = reread(session, SourceOffsetRow(source="fhir.events", partition=3, offset=2**40), lambda m: m.partition == 3)
    assert (got.source, got.offset) == ("fhir.events", 2**40)
    run = RunRow(started_at=T0, finished_at=T0 + timedelta(seconds=9), config_hash="ab12", code_version="0.1.0",
                 inputs=["feeds/site-a"], counts={"accepted": 1000, "rejected": 3})
    got_run = reread(session, run, lambda m: m.config_hash == "ab12")
    assert got_run.finished_at - got_run.started_at == timedelta(seconds=9)
    assert (got_run.inputs, got_run.counts) == (["feeds/site-a"], {"accepted": 1000, "rejected": 3})


def test_audit_row_round_trips(session: Session) -> None:
    row = AuditRow(seq=1, at=T0, actor="dr.lee", action="alert.ack", entity="alert", entity_id="A-000001",
                   payload={"comment": "site-b scanner"}, prev_hash="0" * 64, hash="f" * 64)
    got = reread(session, row, lambda m: m.seq == 1)
    assert (got.at, got.actor, got.payload, got.hash) == (T0, "dr.lee", {"comment": "site-b scanner"}, "f" * 64)


# --- constraints -----------------------------------------------------------------------------------------------------


def stream_state(detector: str = "cusum") -> StreamStateRow:
    return StreamStateRow(model="m", model_version="1", metric="fnr", site="all", subgroup="all", detector=detector)


def metric_point(metric: str = "fnr") -> MetricPointRow:
    return MetricPointRow(model="m", model_version="1", metric=metric, site="all", subgroup="all",
                          period_start=datetime(2025, 1, 1, tzinfo=UTC), n=1)


def case_row(model: str = "sepsis") -> CaseRow:
    row = CaseRow.from_case(make_case())
    row.model = model
    return row


@pytest.mark.parametrize(
    ("make", "twin", "distinct"),
    [
        (case_row, case_row, lambda: case_row(model="aki")),
        (stream_state, stream_state, lambda: stream_state("ewma")),
        (metric_point, metric_point, lambda: metric_point("fpr")),
        (lambda: SourceOffsetRow(source="s", partition=0, offset=1),
         lambda: SourceOffsetRow(source="s", partition=0, offset=2),
         lambda: SourceOffsetRow(source="s", partition=1, offset=2)),
    ],
    ids=["case per model+prediction", "stream_state per stream+detector", "metric point per stream+day",
         "offset per source+partition"],
)
def test_unique_keys_hold(session: Session, make, twin, distinct) -> None:
    session.add_all([make(), distinct()])
    session.commit()
    session.add(twin())
    with pytest.raises(IntegrityError):
        session.commit()


@pytest.mark.parametrize(
    ("make", "field", "value"),
    [
        (case_row, "label", "maybe"),
        (stream_state, "status", "sleeping"),
        (lambda: AlertRow.from_alert(make_alert()), "severity", "meh"),
        (lambda: AlertRow.from_alert(make_alert()), "ticket_id", "T-404404"),
    ],
    ids=["label vocabulary", "stream status vocabulary", "severity vocabulary", "an alert's ticket must exist"],
)
def test_vocabularies_and_foreign_keys_hold(session: Session, make, field: str, value: str) -> None:
    session.add(make())
    session.commit()  # the valid row is accepted ...
    session.execute(delete(type(make())))
    row = make()
    setattr(row, field, value)
    session.add(row)
    with pytest.raises(IntegrityError):  # ... the one with a bad field is not
        session.commit()


# --- human ids -------------------------------------------------------------------------------------------------------


def test_next_id_counts_per_table_and_past_six_digits(session: Session) -> None:
    assert store.next_id(session, AlertRow, "A") == "A-000001"
    session.add(AlertRow.from_alert(make_alert("A-000001")))
    assert store.next_id(session, AlertRow, "A") == "A-000002"
    assert store.next_id(session, TicketRow, "T") == "T-000001"
    session.add(AlertRow.from_alert(make_alert("A-999999")))
    assert store.next_id(session, AlertRow, "A") == "A-1000000"
    session.add(AlertRow.from_alert(make_alert("A-1000000")))
    assert store.next_id(session, AlertRow, "A") == "A-1000001"  # not "A-1000000" again (text order puts it first)
    session.commit()


@pytest.mark.postgres
def test_concurrent_id_allocation_on_postgres_never_collides(fresh_postgres_url: str) -> None:
    store.upgrade(fresh_postgres_url)
    factory = store.session_factory(fresh_postgres_url)
    start, errors = threading.Barrier(3), []

    def allocate() -> None:
        try:
            start.wait()
            for _ in range(8):
                with factory() as s, s.begin():
                    s.add(AlertRow.from_alert(make_alert(store.next_id(s, AlertRow, "A"))))
        except BaseException as exc:  # surfaced below, the thread cannot raise into the test
            errors.append(exc)

    threads = [threading.Thread(target=allocate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with factory() as s:
        ids = s.scalars(select(AlertRow.id).order_by(AlertRow.id)).all()
    factory.kw["bind"].dispose()
    assert errors == []
    assert ids == [f"A-{i:06d}" for i in range(1, 25)]
