"""Fields and light-curve shards with generations.

- field: one camera pointing across nights (centre, radius, latest generation);
  image.field_id (object frames with a known pointing; assigned by the planner, so the
  frames ingested before this revision get theirs on the first cycle).
- light_curve_shard: field, index, star range, latest planned generation (the unused
  ``path``, ``stars`` and ``nights`` columns of revision 0001 go: the shard–night table
  and the tasks' output files replace them).
- shard_night: which closed generation of which night is in which shard generation.
- task.field_id, and indexes on task.shard_id and task.field_id; a partial index on the
  frames not planned yet (the planner looks for them every cycle: a scan of every frame
  before).
- v_failures: a shard or field task is current at its shard's or field's latest
  generation (before, only night generations counted, so their failures were hidden).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FAILURES_0002 = (
    "CREATE VIEW v_failures AS SELECT t.id AS task_id, s.name AS step, t.target AS target, "
    "t.generation AS generation, t.night_id AS night_id, i.path AS image_path, "
    "t.state AS state, t.attempts AS attempts, t.error_kind AS error_kind, "
    "t.last_error AS last_error, t.finished_at AS finished_at "
    "FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "LEFT JOIN night n ON n.id = t.night_id "
    "LEFT JOIN image i ON i.id = t.image_id "
    "WHERE cf.active AND (t.generation = 0 OR t.generation = COALESCE(n.closed_generation, 0)) "
    "AND t.state IN ('failed', 'dead')"
)

FAILURES = (
    "CREATE VIEW v_failures AS SELECT t.id AS task_id, s.name AS step, t.target AS target, "
    "t.generation AS generation, t.night_id AS night_id, i.path AS image_path, "
    "t.state AS state, t.attempts AS attempts, t.error_kind AS error_kind, "
    "t.last_error AS last_error, t.finished_at AS finished_at "
    "FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "LEFT JOIN night n ON n.id = t.night_id "
    "LEFT JOIN light_curve_shard sh ON sh.id = t.shard_id "
    "LEFT JOIN field f ON f.id = t.field_id "
    "LEFT JOIN image i ON i.id = t.image_id "
    "WHERE cf.active AND (t.generation = 0 OR t.generation = "
    "COALESCE(n.closed_generation, sh.planned_generation, f.planned_generation, 0)) "
    "AND t.state IN ('failed', 'dead')"
)


def _sqlite_views() -> list[tuple[str, str]]:
    """The views (SQLite rebuilds an altered table in batch mode, and a view must not
    reference it then): dropped here, re-created by the caller."""
    bind = op.get_bind()
    rows = bind.execute(
        sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'view'")
        if bind.dialect.name == "sqlite"
        else sa.text("SELECT 'v_failures', ''")
    )
    views = [(str(name), str(sql)) for name, sql in rows]
    for name, _ in views:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    return views


def upgrade() -> None:
    views = _sqlite_views()
    op.create_table(
        "field",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("camera_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ra", sa.Float(), nullable=False),
        sa.Column("dec", sa.Float(), nullable=False),
        sa.Column("radius", sa.Float(), nullable=False),
        sa.Column("planned_generation", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["camera_id"], ["camera.id"], name=op.f("fk_field_camera_id_camera")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_field")),
        sa.UniqueConstraint("name", name=op.f("uq_field_name")),
    )
    op.create_index("ix_field_camera", "field", ["camera_id"], unique=False)
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(sa.Column("field_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(op.f("fk_image_field_id_field"), "field", ["field_id"], ["id"])
        batch_op.create_index("ix_image_field", ["field_id"], unique=False)
        batch_op.create_index(
            "ix_image_unplanned",
            ["id"],
            unique=False,
            postgresql_where=sa.text("planned_at IS NULL"),
            sqlite_where=sa.text("planned_at IS NULL"),
        )
    with op.batch_alter_table("light_curve_shard", schema=None) as batch_op:
        for column in ("path", "stars", "nights"):
            batch_op.drop_column(column)
        batch_op.add_column(sa.Column("field_id", sa.Integer(), nullable=False))
        batch_op.add_column(sa.Column("shard_index", sa.Integer(), nullable=False))
        batch_op.add_column(sa.Column("star_lo", sa.Integer(), nullable=False))
        batch_op.add_column(sa.Column("star_hi", sa.Integer(), nullable=False))
        batch_op.add_column(
            sa.Column("planned_generation", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_foreign_key(
            op.f("fk_light_curve_shard_field_id_field"), "field", ["field_id"], ["id"]
        )
        batch_op.create_unique_constraint(
            "uq_light_curve_shard_field_id_shard_index", ["field_id", "shard_index"]
        )
    op.create_table(
        "shard_night",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("shard_id", sa.Integer(), nullable=False),
        sa.Column("night_id", sa.Integer(), nullable=False),
        sa.Column("night_generation", sa.Integer(), nullable=False),
        sa.Column("shard_generation", sa.Integer(), nullable=False),
        sa.Column("field_generation", sa.Integer(), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["shard_id"], ["light_curve_shard.id"],
            name=op.f("fk_shard_night_shard_id_light_curve_shard"),
        ),
        sa.ForeignKeyConstraint(
            ["night_id"], ["night.id"], name=op.f("fk_shard_night_night_id_night")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shard_night")),
        sa.UniqueConstraint(
            "shard_id", "night_id", "night_generation",
            name="uq_shard_night_shard_id_night_id_night_generation",
        ),
    )  # fmt: skip
    op.create_index(
        "ix_shard_night_night", "shard_night", ["night_id", "night_generation"], unique=False
    )
    op.create_index(
        "ix_shard_night_shard_generation",
        "shard_night",
        ["shard_id", "shard_generation"],
        unique=False,
    )
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.add_column(sa.Column("field_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(op.f("fk_task_field_id_field"), "field", ["field_id"], ["id"])
        batch_op.create_index("ix_task_shard", ["shard_id"], unique=False)
        batch_op.create_index("ix_task_field", ["field_id"], unique=False)
    for name, statement in views:
        op.execute(FAILURES if name == "v_failures" else statement)


def downgrade() -> None:
    views = _sqlite_views()
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_index("ix_task_field")
        batch_op.drop_index("ix_task_shard")
        batch_op.drop_constraint(op.f("fk_task_field_id_field"), type_="foreignkey")
        batch_op.drop_column("field_id")
    op.drop_index("ix_shard_night_shard_generation", table_name="shard_night")
    op.drop_index("ix_shard_night_night", table_name="shard_night")
    op.drop_table("shard_night")
    op.execute("UPDATE task SET shard_id = NULL")
    op.execute("DELETE FROM light_curve_shard")
    with op.batch_alter_table("light_curve_shard", schema=None) as batch_op:
        batch_op.drop_constraint("uq_light_curve_shard_field_id_shard_index", type_="unique")
        batch_op.drop_constraint(op.f("fk_light_curve_shard_field_id_field"), type_="foreignkey")
        for column in ("planned_generation", "star_hi", "star_lo", "shard_index", "field_id"):
            batch_op.drop_column(column)
        batch_op.add_column(sa.Column("path", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("stars", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("nights", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index("ix_image_unplanned")
        batch_op.drop_index("ix_image_field")
        batch_op.drop_constraint(op.f("fk_image_field_id_field"), type_="foreignkey")
        batch_op.drop_column("field_id")
    op.drop_index("ix_field_camera", table_name="field")
    op.drop_table("field")
    for name, statement in views:
        op.execute(FAILURES_0002 if name == "v_failures" else statement)
