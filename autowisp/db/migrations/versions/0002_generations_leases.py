"""Night lifecycle and generations, owned leases, pinned upstream configurations.

- night: state (open/closed), generation, closed_generation, closed_at, close_reason,
  last_file_at; image: generation.
- task: generation (part of the unique key), wait_reason, lease_token, inputs (the
  upstream task ids it reads), output_sha256.
- configuration: upstream (input step -> configuration id), planned_at.
- incremental planning: image.planned_at, night.planned_generation, and the wakeup table
  (state transitions append the nights whose pending tasks the planner must look at).
- views: v_night_progress and v_failures count current generations only; v_waiting lists
  pending tasks with their reasons.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATES = ("pending", "queued", "running", "done", "failed", "dead", "excluded")

#: A task is current when its configuration is active and it works on its target's
#: current generation (0: a frame's own work; else the night's latest closed generation).
CURRENT = "cf.active AND (t.generation = 0 OR t.generation = n.closed_generation)"

NIGHT_PROGRESS = (
    "CREATE VIEW v_night_progress AS SELECT n.id AS night_id, c.serial AS camera_serial, "
    "n.local_date AS local_date, n.state AS night_state, "
    "n.closed_generation AS generation, s.name AS step, COUNT(*) AS total, "
    + ", ".join(
        f"SUM(CASE WHEN t.state = '{state}' THEN 1 ELSE 0 END) AS {state}" for state in STATES
    )
    + " FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "JOIN night n ON n.id = t.night_id JOIN camera c ON c.id = n.camera_id "
    f"WHERE {CURRENT} "
    "GROUP BY n.id, c.serial, n.local_date, n.state, n.closed_generation, s.name"
)

FAILURES = (
    "CREATE VIEW v_failures AS SELECT t.id AS task_id, s.name AS step, t.target AS target, "
    "t.generation AS generation, t.night_id AS night_id, i.path AS image_path, "
    "t.state AS state, t.attempts AS attempts, t.error_kind AS error_kind, "
    "t.last_error AS last_error, t.finished_at AS finished_at "
    "FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "LEFT JOIN night n ON n.id = t.night_id "
    "LEFT JOIN image i ON i.id = t.image_id "
    f"WHERE {CURRENT.replace('n.closed_generation', 'COALESCE(n.closed_generation, 0)')} "
    "AND t.state IN ('failed', 'dead')"
)

WAITING = (
    "CREATE VIEW v_waiting AS SELECT t.id AS task_id, s.name AS step, t.target AS target, "
    "t.generation AS generation, t.night_id AS night_id, i.path AS image_path, "
    "t.wait_reason AS reason, t.created_at AS created_at "
    "FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "LEFT JOIN image i ON i.id = t.image_id "
    "WHERE cf.active AND t.state = 'pending' AND t.wait_reason IS NOT NULL"
)

OLD_NIGHT_PROGRESS = (
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

OLD_FAILURES = (
    "CREATE VIEW v_failures AS SELECT t.id AS task_id, s.name AS step, t.target AS target, "
    "t.night_id AS night_id, i.path AS image_path, t.state AS state, t.attempts AS attempts, "
    "t.error_kind AS error_kind, t.last_error AS last_error, t.finished_at AS finished_at "
    "FROM task t JOIN step s ON s.id = t.step_id "
    "JOIN configuration cf ON cf.id = t.configuration_id "
    "LEFT JOIN image i ON i.id = t.image_id "
    "WHERE cf.active AND t.state IN ('failed', 'dead')"
)


def _drop_views() -> None:
    for view in ("v_waiting", "v_failures", "v_night_progress"):
        op.execute(f"DROP VIEW IF EXISTS {view}")


def upgrade() -> None:
    # SQLite rebuilds altered tables in batch mode: the views must not reference them then.
    _drop_views()
    night_state = sa.Enum("open", "closed", name="nightstate", native_enum=False, length=16)
    with op.batch_alter_table("night", schema=None) as batch_op:
        batch_op.add_column(sa.Column("state", night_state, nullable=False, server_default="open"))
        batch_op.add_column(
            sa.Column("generation", sa.Integer(), nullable=False, server_default="1")
        )
        batch_op.add_column(
            sa.Column("closed_generation", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("close_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("last_file_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("planned_generation", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("generation", sa.Integer(), nullable=False, server_default="1")
        )
        batch_op.add_column(sa.Column("planned_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_image_planned_at", ["planned_at"], unique=False)
    with op.batch_alter_table("configuration", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("planned_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "wakeup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("night_id", sa.Integer(), nullable=True),
        sa.Column("step_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_wakeup")),
    )
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("generation", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("wait_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("lease_token", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("inputs", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("output_sha256", sa.String(length=64), nullable=True))
        batch_op.drop_constraint("uq_task_step_id_configuration_id_target", type_="unique")
        batch_op.create_unique_constraint(
            "uq_task_step_id_configuration_id_target_generation",
            ["step_id", "configuration_id", "target", "generation"],
        )
    # Nights that existed before had every frame: they count as closed, generation 1.
    op.execute(
        "UPDATE night SET state = 'closed', closed_generation = 1, close_reason = 'migration'"
    )
    # Their frames have their tasks (planned by the code of revision 0001); the first cycle
    # plans every configuration over every target anyway (configuration.planned_at NULL).
    op.execute("UPDATE image SET planned_at = CURRENT_TIMESTAMP")
    op.execute("UPDATE night SET planned_generation = 1")
    # Their night-level tasks worked on that generation.
    op.execute("UPDATE task SET generation = 1 WHERE image_id IS NULL AND night_id IS NOT NULL")
    # So did the frames' steps downstream of the masters (the pipeline of revision 0001).
    op.execute(
        "UPDATE task SET generation = 1 WHERE step_id IN "
        "(SELECT id FROM step WHERE name IN ('calibrate', 'astrometry'))"
    )
    op.execute(NIGHT_PROGRESS)
    op.execute(FAILURES)
    op.execute(WAITING)


def downgrade() -> None:
    _drop_views()
    op.drop_table("wakeup")
    op.execute("DELETE FROM task WHERE generation > 1")
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_constraint(
            "uq_task_step_id_configuration_id_target_generation", type_="unique"
        )
        batch_op.create_unique_constraint(
            "uq_task_step_id_configuration_id_target", ["step_id", "configuration_id", "target"]
        )
        for column in ("output_sha256", "inputs", "lease_token", "wait_reason", "generation"):
            batch_op.drop_column(column)
    with op.batch_alter_table("configuration", schema=None) as batch_op:
        batch_op.drop_column("planned_at")
        batch_op.drop_column("upstream")
    with op.batch_alter_table("image", schema=None) as batch_op:
        batch_op.drop_index("ix_image_planned_at")
        batch_op.drop_column("planned_at")
        batch_op.drop_column("generation")
    with op.batch_alter_table("night", schema=None) as batch_op:
        for column in (
            "planned_generation",
            "last_file_at",
            "close_reason",
            "closed_at",
            "closed_generation",
            "generation",
            "state",
        ):
            batch_op.drop_column(column)
    op.execute(OLD_NIGHT_PROGRESS)
    op.execute(OLD_FAILURES)
