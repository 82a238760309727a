"""Initial schema: observatories, cameras, nights, images, steps, configurations, tasks,
master frames, light-curve shards, and the operators' views v_night_progress, v_failures.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 14:09:41.032006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

STATES = ("pending", "queued", "running", "done", "failed", "dead", "excluded")

NIGHT_PROGRESS = (
    "CREATE VIEW v_night_progress AS SELECT n.id AS night_id, c.serial AS camera_serial, "
    "n.local_date AS local_date, s.name AS step, COUNT(*) AS total, "
    + ", ".join(
        f"SUM(CASE WHEN t.state = '{state}' THEN 1 ELSE 0 END) AS {state}" for state in STATES
    )
    + " FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "JOIN night n ON n.id = t.night_id JOIN camera c ON c.id = n.camera_id "
    "WHERE cf.active GROUP BY n.id, c.serial, n.local_date, s.name"
)

FAILURES = (
    "CREATE VIEW v_failures AS SELECT t.id AS task_id, s.name AS step, t.target AS target, "
    "t.night_id AS night_id, i.path AS image_path, t.state AS state, t.attempts AS attempts, "
    "t.error_kind AS error_kind, t.last_error AS last_error, t.finished_at AS finished_at "
    "FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "LEFT JOIN image i ON i.id = t.image_id "
    "WHERE cf.active AND t.state IN ('failed', 'dead')"
)

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "camera_type",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("make", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("layout", sa.String(length=8), nullable=False),
        sa.Column("pixel_size", sa.Float(), nullable=True),
        sa.Column("default_gain", sa.Float(), nullable=True),
        sa.Column("default_read_noise", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_camera_type")),
        sa.UniqueConstraint("model", "layout", name=op.f("uq_camera_type_model_layout")),
    )
    op.create_table(
        "light_curve_shard",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("stars", sa.Integer(), nullable=False),
        sa.Column("nights", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_light_curve_shard")),
        sa.UniqueConstraint("name", name=op.f("uq_light_curve_shard_name")),
    )
    op.create_table(
        "observatory",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("latitude", sa.Float(), nullable=False),
        sa.Column("longitude", sa.Float(), nullable=False),
        sa.Column("height", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_observatory")),
        sa.UniqueConstraint("name", name=op.f("uq_observatory_name")),
    )
    op.create_table(
        "step",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column(
            "scope",
            sa.Enum("image", "night", "shard", name="scope", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("code_version", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_step")),
        sa.UniqueConstraint("name", name=op.f("uq_step_name")),
    )
    op.create_table(
        "camera",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("camera_type_id", sa.Integer(), nullable=False),
        sa.Column("observatory_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["camera_type_id"],
            ["camera_type.id"],
            name=op.f("fk_camera_camera_type_id_camera_type"),
        ),
        sa.ForeignKeyConstraint(
            ["observatory_id"],
            ["observatory.id"],
            name=op.f("fk_camera_observatory_id_observatory"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_camera")),
        sa.UniqueConstraint(
            "serial", "camera_type_id", name=op.f("uq_camera_serial_camera_type_id")
        ),
    )
    op.create_table(
        "channel",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("camera_type_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=4), nullable=False),
        sa.Column("colour", sa.String(length=2), nullable=False),
        sa.Column("y0", sa.Integer(), nullable=False),
        sa.Column("x0", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["camera_type_id"],
            ["camera_type.id"],
            name=op.f("fk_channel_camera_type_id_camera_type"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel")),
        sa.UniqueConstraint("camera_type_id", "name", name=op.f("uq_channel_camera_type_id_name")),
    )
    op.create_table(
        "configuration",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=16), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["step_id"], ["step.id"], name=op.f("fk_configuration_step_id_step")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_configuration")),
        sa.UniqueConstraint("step_id", "version", name=op.f("uq_configuration_step_id_version")),
    )
    op.create_table(
        "night",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("camera_id", sa.Integer(), nullable=False),
        sa.Column("local_date", sa.Date(), nullable=False),
        sa.Column("upload_path", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["camera_id"], ["camera.id"], name=op.f("fk_night_camera_id_camera")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_night")),
        sa.UniqueConstraint("camera_id", "local_date", name=op.f("uq_night_camera_id_local_date")),
    )
    op.create_table(
        "image",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "state",
            sa.Enum("ingested", "rejected", name="imagestate", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("reject_reason", sa.Text(), nullable=True),
        sa.Column("night_id", sa.Integer(), nullable=True),
        sa.Column("camera_id", sa.Integer(), nullable=True),
        sa.Column(
            "image_type",
            sa.Enum(
                "bias", "dark", "flat", "object", name="imagetype", native_enum=False, length=16
            ),
            nullable=True,
        ),
        sa.Column("exptime", sa.Float(), nullable=True),
        sa.Column("date_obs", sa.DateTime(timezone=True), nullable=True),
        sa.Column("jd", sa.Float(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("ra", sa.Float(), nullable=True),
        sa.Column("dec", sa.Float(), nullable=True),
        sa.Column("header", sa.JSON(), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["camera_id"], ["camera.id"], name=op.f("fk_image_camera_id_camera")
        ),
        sa.ForeignKeyConstraint(["night_id"], ["night.id"], name=op.f("fk_image_night_id_night")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_image")),
        sa.UniqueConstraint("sha256", name=op.f("uq_image_sha256")),
    )
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.create_index("ix_image_camera_state", ["camera_id", "state"], unique=False)
        batch_op.create_index("ix_image_night_type", ["night_id", "image_type"], unique=False)

    op.create_table(
        "master_frame",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("camera_id", sa.Integer(), nullable=False),
        sa.Column(
            "frame_type",
            sa.Enum(
                "bias", "dark", "flat", "object", name="imagetype", native_enum=False, length=16
            ),
            nullable=False,
        ),
        sa.Column("channel", sa.String(length=4), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("source_night_id", sa.Integer(), nullable=True),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("frame_count", sa.Integer(), nullable=False),
        sa.Column("qc", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["camera_id"], ["camera.id"], name=op.f("fk_master_frame_camera_id_camera")
        ),
        sa.ForeignKeyConstraint(
            ["source_night_id"], ["night.id"], name=op.f("fk_master_frame_source_night_id_night")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_master_frame")),
    )
    with op.batch_alter_table("master_frame", schema=None) as batch_op:
        batch_op.create_index(
            "ix_master_frame_camera_type", ["camera_id", "frame_type"], unique=False
        )

    op.create_table(
        "task",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("configuration_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=32), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=True),
        sa.Column("night_id", sa.Integer(), nullable=True),
        sa.Column("shard_id", sa.Integer(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "queued",
                "running",
                "done",
                "failed",
                "dead",
                "excluded",
                name="taskstate",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "error_kind",
            sa.Enum("transient", "permanent", name="errorkind", native_enum=False, length=16),
            nullable=True,
        ),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker_host", sa.String(length=128), nullable=True),
        sa.Column("worker_pid", sa.Integer(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("output_path", sa.Text(), nullable=True),
        sa.Column("qc", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["configuration_id"],
            ["configuration.id"],
            name=op.f("fk_task_configuration_id_configuration"),
        ),
        sa.ForeignKeyConstraint(["image_id"], ["image.id"], name=op.f("fk_task_image_id_image")),
        sa.ForeignKeyConstraint(["night_id"], ["night.id"], name=op.f("fk_task_night_id_night")),
        sa.ForeignKeyConstraint(
            ["shard_id"], ["light_curve_shard.id"], name=op.f("fk_task_shard_id_light_curve_shard")
        ),
        sa.ForeignKeyConstraint(["step_id"], ["step.id"], name=op.f("fk_task_step_id_step")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task")),
        sa.UniqueConstraint(
            "step_id",
            "configuration_id",
            "target",
            name=op.f("uq_task_step_id_configuration_id_target"),
        ),
    )
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.create_index("ix_task_image", ["image_id"], unique=False)
        batch_op.create_index(
            "ix_task_night_step_state", ["night_id", "step_id", "state"], unique=False
        )
        batch_op.create_index("ix_task_state_not_before", ["state", "not_before"], unique=False)

    op.execute(NIGHT_PROGRESS)
    op.execute(FAILURES)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_failures")
    op.execute("DROP VIEW IF EXISTS v_night_progress")
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_index("ix_task_state_not_before")
        batch_op.drop_index("ix_task_night_step_state")
        batch_op.drop_index("ix_task_image")

    op.drop_table("task")
    with op.batch_alter_table("master_frame", schema=None) as batch_op:
        batch_op.drop_index("ix_master_frame_camera_type")

    op.drop_table("master_frame")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index("ix_image_night_type")
        batch_op.drop_index("ix_image_camera_state")

    op.drop_table("image")
    op.drop_table("night")
    op.drop_table("configuration")
    op.drop_table("channel")
    op.drop_table("camera")
    op.drop_table("step")
    op.drop_table("observatory")
    op.drop_table("light_curve_shard")
    op.drop_table("camera_type")
