"""Initial schema: cases, stream state, daily metric points, alerts, tickets, dead letters, audit log, offsets, runs.

On PostgreSQL a trigger makes audit_log append-only: UPDATE, DELETE and TRUNCATE raise 'audit_log is append-only'.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TIME = sa.DateTime(timezone=True)


def one_of(column: str, *values: str) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer()),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("prediction_id", sa.String(), nullable=False),
        sa.Column("prediction_version", sa.String(), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("encounter", sa.String(), nullable=True),
        sa.Column("site", sa.String(), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("predicted_at", UTC_TIME, nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("decision", sa.Boolean(), nullable=False),
        sa.Column("label", sa.String(), nullable=True),
        sa.Column("labeled_at", UTC_TIME, nullable=True),
        sa.Column("outcome_definition", sa.String(), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cases"),
        sa.UniqueConstraint("model", "prediction_id", name="uq_cases_model_prediction_id"),
        sa.CheckConstraint(
            "label IS NULL OR " + one_of("label", "positive", "negative", "censored"), name="ck_cases_label"
        ),
    )
    op.create_index("ix_cases_model_model_version_site_predicted_at", "cases",
                    ["model", "model_version", "site", "predicted_at"])
    op.create_index("ix_cases_subject", "cases", ["subject"])

    op.create_table(
        "stream_state",
        sa.Column("id", sa.Integer()),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("metric", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("subgroup", sa.String(), nullable=False),
        sa.Column("detector", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("baseline", sa.Double(), nullable=True),
        sa.Column("baseline_n", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.Column("arl0", sa.Double(), nullable=True),
        sa.Column("statistic", sa.Double(), nullable=True),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stream_state"),
        sa.UniqueConstraint("model", "model_version", "metric", "site", "subgroup", "detector",
                            name="uq_stream_state_key"),
        sa.CheckConstraint(one_of("status", "baseline", "active", "insufficient_data", "alarmed"),
                           name="ck_stream_state_status"),
    )
    op.create_index("ix_stream_state_status", "stream_state", ["status"])

    op.create_table(
        "metric_points",
        sa.Column("id", sa.Integer()),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("metric", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("subgroup", sa.String(), nullable=False),
        sa.Column("period_start", UTC_TIME, nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("ci_low", sa.Double(), nullable=True),
        sa.Column("ci_high", sa.Double(), nullable=True),
        sa.Column("statistic", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_metric_points"),
        sa.UniqueConstraint("model", "model_version", "metric", "site", "subgroup", "period_start",
                            name="uq_metric_points_key"),
    )
    op.create_index("ix_metric_points_period_start", "metric_points", ["period_start"])

    op.create_table(
        "tickets",
        sa.Column("id", sa.String(16)),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("category", sa.String(), nullable=False),
        sa.Column("safety_overlay", sa.Boolean(), nullable=False),
        sa.Column("matched_mod", sa.String(), nullable=True),
        sa.Column("cause", sa.String(), nullable=False),
        sa.Column("cause_confidence", sa.Double(), nullable=False),
        sa.Column("remedy", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("rationale", sa.JSON(), nullable=False),
        sa.Column("required_actions", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tickets"),
        sa.CheckConstraint(one_of("category", "C0", "C1", "C2", "C2-F", "C3", "C4", "C5"), name="ck_tickets_category"),
        sa.CheckConstraint(one_of("status", "open", "in_progress", "acceptance_recorded", "closed"),
                           name="ck_tickets_status"),
    )
    op.create_index("ix_tickets_model_model_version", "tickets", ["model", "model_version"])
    op.create_index("ix_tickets_status", "tickets", ["status"])

    op.create_table(
        "alerts",
        sa.Column("id", sa.String(16)),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("metric", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("subgroup", sa.String(), nullable=False),
        sa.Column("detector", sa.String(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("severity", sa.String(), nullable=False),
        sa.Column("detected_at", UTC_TIME, nullable=False),
        sa.Column("change_estimate", UTC_TIME, nullable=False),
        sa.Column("statistic", sa.Double(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("baseline", sa.Double(), nullable=False),
        sa.Column("current", sa.Double(), nullable=False),
        sa.Column("ci_low", sa.Double(), nullable=False),
        sa.Column("ci_high", sa.Double(), nullable=False),
        sa.Column("n_baseline", sa.Integer(), nullable=False),
        sa.Column("n_current", sa.Integer(), nullable=False),
        sa.Column("fire_count", sa.Integer(), nullable=False),
        sa.Column("last_fired_at", UTC_TIME, nullable=False),
        sa.Column("acked_by", sa.String(), nullable=True),
        sa.Column("acked_at", UTC_TIME, nullable=True),
        sa.Column("ack_comment", sa.Text(), nullable=True),
        sa.Column("resolved_by", sa.String(), nullable=True),
        sa.Column("resolved_at", UTC_TIME, nullable=True),
        sa.Column("ticket_id", sa.String(16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
        sa.ForeignKeyConstraint(["ticket_id"], ["tickets.id"], name="fk_alerts_ticket_id_tickets"),
        sa.CheckConstraint(one_of("state", "firing", "acknowledged", "resolved", "silenced"), name="ck_alerts_state"),
        sa.CheckConstraint(one_of("severity", "warning", "critical"), name="ck_alerts_severity"),
    )
    op.create_index("ix_alerts_identity", "alerts",
                    ["model", "model_version", "metric", "site", "subgroup", "detector"])
    op.create_index("ix_alerts_state", "alerts", ["state"])
    op.create_index("ix_alerts_detected_at", "alerts", ["detected_at"])
    op.create_index("ix_alerts_ticket_id", "alerts", ["ticket_id"])

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer()),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=True),
        sa.Column("position", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("resource_type", sa.String(), nullable=True),
        sa.Column("resource_id", sa.String(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index("ix_dead_letters_source", "dead_letters", ["source"])
    op.create_index("ix_dead_letters_created_at", "dead_letters", ["created_at"])

    op.create_table(
        "audit_log",
        sa.Column("seq", sa.Integer(), autoincrement=False),
        sa.Column("at", UTC_TIME, nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("entity", sa.String(), nullable=False),
        sa.Column("entity_id", sa.String(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_log"),
        sa.UniqueConstraint("hash", name="uq_audit_log_hash"),
    )
    op.create_index("ix_audit_log_entity_entity_id", "audit_log", ["entity", "entity_id"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()"
        )

    op.create_table(
        "source_offsets",
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("source", "partition", name="pk_source_offsets"),
    )

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer()),
        sa.Column("started_at", UTC_TIME, nullable=False),
        sa.Column("finished_at", UTC_TIME, nullable=True),
        sa.Column("config_hash", sa.String(), nullable=False),
        sa.Column("code_version", sa.String(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_started_at", "runs", ["started_at"])


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER audit_log_no_update_delete ON audit_log")
        op.execute("DROP FUNCTION audit_log_append_only()")
    for table in ("runs", "source_offsets", "audit_log", "dead_letters", "alerts", "tickets", "metric_points",
                  "stream_state", "cases"):
        op.drop_table(table)
