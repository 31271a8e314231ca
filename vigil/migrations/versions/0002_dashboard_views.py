"""Views the Grafana dashboards read (dashboards/views.sql), on PostgreSQL.

Grafana reads the PostgreSQL store only, so on SQLite this revision does nothing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("v_tickets", "v_dead_letters", "v_stream_cells", "v_open_alerts")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(files("dashboards").joinpath("views.sql").read_text())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for view in VIEWS:
            op.execute(f"DROP VIEW IF EXISTS {view}")
