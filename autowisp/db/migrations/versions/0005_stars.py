"""The deep star list: stars with one identity across frames, nights, fields and cameras.

- star: a star of the sky (Gaia id when known, position and its epoch, Gaia and
  instrumental magnitudes, flags, the night and field that first registered it), with an
  index on (dec, ra) for the box queries of registration.
- field_star: a field's stars by index (0, 1, 2... append-only: the light-curve shards
  split a field's stars by these indices), unique per field both ways; overlapping
  fields of several cameras share star rows and each gives them its own indices.
- star_registry: one row (id 1, inserted here) whose ``version`` every registration
  increments first, so that its row lock (PostgreSQL) or the write lock (SQLite)
  serialises registrations: two workers registering overlapping fields at once never
  create the same star twice.

Only new tables: nothing is altered, so no view has to be rebuilt on SQLite.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "star",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("gaia_source_id", sa.BigInteger(), nullable=True),
        sa.Column("ra", sa.Float(), nullable=False),
        sa.Column("dec", sa.Float(), nullable=False),
        sa.Column("epoch", sa.Float(), nullable=False),
        sa.Column("g", sa.Float(), nullable=True),
        sa.Column("bp", sa.Float(), nullable=True),
        sa.Column("rp", sa.Float(), nullable=True),
        sa.Column("instrumental", sa.JSON(), nullable=True),
        sa.Column("first_night_id", sa.Integer(), nullable=True),
        sa.Column("first_field_id", sa.Integer(), nullable=False),
        sa.Column("flags", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["first_night_id"], ["night.id"], name=op.f("fk_star_first_night_id_night")
        ),
        sa.ForeignKeyConstraint(
            ["first_field_id"], ["field.id"], name=op.f("fk_star_first_field_id_field")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_star")),
        sa.UniqueConstraint("gaia_source_id", name=op.f("uq_star_gaia_source_id")),
    )
    op.create_index("ix_star_dec_ra", "star", ["dec", "ra"], unique=False)
    op.create_table(
        "field_star",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("field_id", sa.Integer(), nullable=False),
        sa.Column("star_index", sa.Integer(), nullable=False),
        sa.Column("star_id", sa.Integer(), nullable=False),
        sa.Column("added_night_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["field_id"], ["field.id"], name=op.f("fk_field_star_field_id_field")
        ),
        sa.ForeignKeyConstraint(["star_id"], ["star.id"], name=op.f("fk_field_star_star_id_star")),
        sa.ForeignKeyConstraint(
            ["added_night_id"], ["night.id"], name=op.f("fk_field_star_added_night_id_night")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_field_star")),
        sa.UniqueConstraint("field_id", "star_index", name="uq_field_star_field_id_star_index"),
        sa.UniqueConstraint("field_id", "star_id", name="uq_field_star_field_id_star_id"),
    )
    op.create_index("ix_field_star_star", "field_star", ["star_id"], unique=False)
    registry = op.create_table(
        "star_registry",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False, server_default="0"),
        sa.CheckConstraint("id = 1", name=op.f("ck_star_registry_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_star_registry")),
    )
    op.bulk_insert(registry, [{"id": 1, "version": 0}])


def downgrade() -> None:
    op.drop_table("star_registry")
    op.drop_index("ix_field_star_star", table_name="field_star")
    op.drop_table("field_star")
    op.drop_index("ix_star_dec_ra", table_name="star")
    op.drop_table("star")
