"""Which tasks exist: one row per (step, configuration, target, generation).

Frame steps that read nothing of their night (``generation`` 0) get a task for every
ingested frame of their types at once, while the night is still open. Night steps, and
frame steps downstream of one, work on a night's closed generation: their tasks are
created when the night closes (generation g covers the frames that arrived in
generations ≤ g), and a night that closes again after late frames gets a new generation
whose tasks run again; older generations' unfinished tasks are excluded as superseded,
so nothing ever reads a mix of generations. Creating a row twice is harmless (unique
key, insert-or-ignore).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, exists, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from autowisp.db.clock import db_time
from autowisp.db.models import Configuration, Image, ImageState, Night, Scope, Task, TaskState
from autowisp.db.session import rowcount
from autowisp.pipeline.state import transition
from autowisp.steps.registry import Registry

__all__ = ["Plan", "plan_tasks", "supersede_old_generations"]

KEY = ["step_id", "configuration_id", "target", "generation"]


def _insert_ignore(session: Session, rows: list[dict[str, Any]]) -> int:
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    created = 0
    for start in range(0, len(rows), 2000):
        statement = (
            insert(Task)
            .values(rows[start : start + 2000])
            .on_conflict_do_nothing(index_elements=KEY)
        )
        created += rowcount(session.execute(statement)) or 0
    return created


@dataclass
class Plan:
    """What a planning pass did: task rows created, the nights they belong to, whether
    some configuration was planned over every target (just activated)."""

    created: int = 0
    nights: set[int] = field(default_factory=set)
    full: bool = False


def _chunks(values: list[int], size: int = 2000) -> list[list[int]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


def plan_tasks(
    session: Session,
    registry: Registry,
    configurations: Mapping[str, Configuration],
    *,
    nights: Iterable[int] | None = None,
    batch: int = 20000,
) -> Plan:
    """Create the missing task rows, incrementally: for frames not planned yet (at most
    ``batch`` per call), nights whose latest closed generation is not planned yet, and
    every target of a configuration activated since it was last planned. Only ``nights``
    when given."""
    night_filter = None if nights is None else list(nights)
    plan = Plan()
    # From the database, not the objects given (they may be from an earlier session).
    planned = dict(
        session.execute(
            select(Configuration.id, Configuration.planned_at).where(
                Configuration.id.in_([c.id for c in configurations.values()])
            )
        ).all()
    )
    full = {name for name, c in configurations.items() if planned.get(c.id) is None}
    plan.full = bool(full)
    query_images = select(Image.id).where(Image.planned_at.is_(None)).order_by(Image.id)
    query_nights = select(Night.id, Night.closed_generation).where(
        Night.planned_generation < Night.closed_generation
    )
    if night_filter is not None:
        query_images = query_images.where(Image.night_id.in_(night_filter))
        query_nights = query_nights.where(Night.id.in_(night_filter))
    new_images = list(session.scalars(query_images.limit(batch)))
    new_nights = [tuple(row) for row in session.execute(query_nights)]
    closed_ids = [n for n, _ in new_nights]
    for step in registry:
        configuration = configurations[step.name]
        restrict = step.name not in full
        column: Any
        if step.scope is Scope.IMAGE and not registry.generational(step.name):
            scopes = _chunks(new_images) if restrict else [None]
            column = Image.id
        else:
            scopes = _chunks(closed_ids) if restrict else [None]
            column = Image.night_id if step.scope is Scope.IMAGE else Night.id
        for scope in scopes:
            rows = _missing(
                session, registry, step, configuration, night_filter,
                None if scope is None else column.in_(scope),
            )  # fmt: skip
            plan.created += _insert_ignore(session, rows)
            plan.nights.update(row["night_id"] for row in rows)
    for chunk in _chunks(new_images):
        session.execute(
            update(Image).where(Image.id.in_(chunk)).values(planned_at=db_time(session))
        )
    for night_id, generation in new_nights:
        session.execute(
            update(Night)
            .where(Night.id == night_id, Night.closed_generation == generation)
            .values(planned_generation=generation)
        )
    if full:
        session.execute(
            update(Configuration)
            .where(Configuration.id.in_([configurations[name].id for name in full]))
            .values(planned_at=db_time(session))
        )
    session.flush()
    return plan


def _missing(
    session: Session,
    registry: Registry,
    step: Any,
    configuration: Configuration,
    night_filter: list[int] | None,
    scope: Any = None,
) -> list[dict[str, Any]]:
    """Rows of the step's tasks that do not exist yet (within ``scope``, a condition)."""
    types = [t.value for t in step.image_types]
    own = and_(Task.step_id == configuration.step_id, Task.configuration_id == configuration.id)
    base = {
        "step_id": configuration.step_id,
        "configuration_id": configuration.id,
        "state": TaskState.PENDING.value,
    }
    query: Select[*tuple[Any, ...]]
    if step.scope is Scope.IMAGE and not registry.generational(step.name):
        # NOT IN over a subquery: PostgreSQL hashes it, linear in the number of frames.
        query = select(Image.id, Image.night_id).where(
            Image.state == ImageState.INGESTED,
            Image.image_type.in_(types),
            Image.id.not_in(select(Task.image_id).where(own, Task.image_id.is_not(None))),
        )
        if night_filter is not None:
            query = query.where(Image.night_id.in_(night_filter))
        if scope is not None:
            query = query.where(scope)
        return [
            {**base, "target": f"image:{i}", "image_id": i, "night_id": n, "generation": 0}
            for i, n in session.execute(query)
        ]
    if step.scope is Scope.IMAGE:
        # The closed generation's frames, for the night's current closed generation.
        query = (
            select(Image.id, Image.night_id, Night.closed_generation)
            .join(Night, Night.id == Image.night_id)
            .where(
                Night.closed_generation > 0,
                Image.generation <= Night.closed_generation,
                Image.state == ImageState.INGESTED,
                Image.image_type.in_(types),
                ~exists(
                    select(Task.id).where(
                        own,
                        Task.image_id == Image.id,
                        Task.generation == Night.closed_generation,
                    )
                ),
            )
        )
        if night_filter is not None:
            query = query.where(Image.night_id.in_(night_filter))
        if scope is not None:
            query = query.where(scope)
        return [
            {**base, "target": f"image:{i}", "image_id": i, "night_id": n, "generation": g}
            for i, n, g in session.execute(query)
        ]
    has_frames = exists(
        select(Image.id).where(
            Image.night_id == Night.id,
            Image.state == ImageState.INGESTED,
            Image.image_type.in_(types),
            Image.generation <= Night.closed_generation,
        )
    )
    query = select(Night.id, Night.closed_generation).where(
        Night.closed_generation > 0,
        has_frames,
        ~exists(
            select(Task.id).where(
                own,
                Task.night_id == Night.id,
                Task.image_id.is_(None),
                Task.generation == Night.closed_generation,
            )
        ),
    )
    if night_filter is not None:
        query = query.where(Night.id.in_(night_filter))
    if scope is not None:
        query = query.where(scope)
    return [
        {**base, "target": f"night:{n}", "night_id": n, "generation": g}
        for n, g in session.execute(query)
    ]


def supersede_old_generations(session: Session, *, nights: Iterable[int] | None = None) -> int:
    """Exclude the unfinished tasks of a night's older generations (a later generation
    of the night closed since): they would read frames the night no longer is."""
    older = and_(
        Task.generation > 0,
        Task.state.in_([TaskState.PENDING, TaskState.QUEUED, TaskState.FAILED]),
        Task.generation
        < select(Night.closed_generation).where(Night.id == Task.night_id).scalar_subquery(),
    )
    if nights is not None:
        older = and_(older, Task.night_id.in_(list(nights)))
    return transition(
        session,
        update(Task)
        .where(older)
        .values(
            state=TaskState.EXCLUDED,
            wait_reason=None,
            last_error="superseded: a later generation of its night closed (late frames)",
            finished_at=db_time(session),
        )
        .execution_options(synchronize_session=False),
    )
