"""Tables for running as a service: source cursors, pipeline checkpoints, the notification outbox, API tokens, alert
comments; alert silencing and escalation columns; the ticket's recorded acceptance result.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TIME = sa.DateTime(timezone=True)
ROLES = ("viewer", "safety_officer", "engineer", "admin")


def upgrade() -> None:
    op.create_table(
        "source_cursors",
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("cursor", sa.Text(), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("source", name="pk_source_cursors"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("code_version", sa.String(), nullable=False),
        sa.Column("config_hash", sa.String(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.String(64), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_checkpoints"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer()),
        sa.Column("receiver", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("alert_id", sa.String(16), nullable=True),
        sa.Column("event", sa.String(), nullable=False),
        sa.Column("dedupe_key", sa.String(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTC_TIME, nullable=False),
        sa.Column("delivered_at", UTC_TIME, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("receiver", "dedupe_key", name="uq_outbox_receiver_dedupe_key"),
    )
    op.create_index("ix_outbox_delivered_at_next_attempt_at", "outbox", ["delivered_at", "next_attempt_at"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer()),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("revoked_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("name", name="uq_api_tokens_name"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.CheckConstraint(f"role IN ({', '.join(repr(r) for r in ROLES)})", name="ck_api_tokens_role"),
    )
    op.create_table(
        "alert_comments",
        sa.Column("id", sa.Integer()),
        sa.Column("alert_id", sa.String(16), nullable=False),
        sa.Column("author", sa.String(), nullable=False),
        sa.Column("at", UTC_TIME, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_alert_comments"),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"], name="fk_alert_comments_alert_id_alerts"),
    )
    op.create_index("ix_alert_comments_alert_id", "alert_comments", ["alert_id"])
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("silenced_until", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("silenced_by", sa.String(), nullable=True))
        batch.add_column(sa.Column("silence_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("escalated_at", UTC_TIME, nullable=True))
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("acceptance", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("acceptance")
    with op.batch_alter_table("alerts") as batch:
        for column in ("escalated_at", "silence_reason", "silenced_by", "silenced_until"):
            batch.drop_column(column)
    for table in ("alert_comments", "api_tokens", "outbox", "checkpoints", "source_cursors"):
        op.drop_table(table)
