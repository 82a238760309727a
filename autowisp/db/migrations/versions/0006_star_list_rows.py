"""Which field star each row of a night's star list is.

- star_list_row: row ``list_row`` of field ``field_id`` in the product of star-list task
  ``task_id`` is the field's star ``star_index`` (recorded by the ``stars`` recorder in
  the transaction that marks the task done). The light-curve step finds each measured
  star's place in its field's shards through it: a star beyond the catalogue has no
  other identity than its row in the list its night was measured with.

Only a new table: nothing is altered, so no view has to be rebuilt on SQLite.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "star_list_row",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("field_id", sa.Integer(), nullable=False),
        sa.Column("list_row", sa.Integer(), nullable=False),
        sa.Column("star_index", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"], ["task.id"], name=op.f("fk_star_list_row_task_id_task")
        ),
        sa.ForeignKeyConstraint(
            ["field_id"], ["field.id"], name=op.f("fk_star_list_row_field_id_field")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_star_list_row")),
        sa.UniqueConstraint(
            "task_id", "field_id", "list_row", name="uq_star_list_row_task_id_field_id_list_row"
        ),
    )
    op.create_index(
        "ix_star_list_row_field_index", "star_list_row", ["field_id", "star_index"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_star_list_row_field_index", table_name="star_list_row")
    op.drop_table("star_list_row")
