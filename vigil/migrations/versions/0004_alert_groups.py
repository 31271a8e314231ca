"""Alert hierarchy: an alert on a subgroup (or site) stream whose parent stream — the same metric at the site, or
across all sites — already has an open alert is grouped under it (``parent_id``), so one change is one signal.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(16), nullable=True))
        batch.create_foreign_key("fk_alerts_parent_id_alerts", "alerts", ["parent_id"], ["id"])
        batch.create_index("ix_alerts_parent_id", ["parent_id"])


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.drop_index("ix_alerts_parent_id")
        batch.drop_constraint("fk_alerts_parent_id_alerts", type_="foreignkey")
        batch.drop_column("parent_id")
