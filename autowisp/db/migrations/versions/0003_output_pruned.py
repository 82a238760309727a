"""Retention: task.output_pruned_at, when the retention policy deleted the task's output.

The row keeps ``output_path`` and ``output_sha256`` as history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _sqlite_views() -> list[str]:
    """The CREATE statements of the views (SQLite rebuilds an altered table in batch mode,
    and a view must not reference the table then): dropped here, re-created by the caller."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return []
    rows = bind.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'view'"))
    views = [(str(name), str(sql)) for name, sql in rows]
    for name, _ in views:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    return [sql for _, sql in views]


def upgrade() -> None:
    views = _sqlite_views()
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("output_pruned_at", sa.DateTime(timezone=True), nullable=True)
        )
    for statement in views:
        op.execute(statement)


def downgrade() -> None:
    views = _sqlite_views()
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_column("output_pruned_at")
    for statement in views:
        op.execute(statement)
