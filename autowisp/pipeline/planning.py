"""Which tasks exist: one row per (step, configuration, target, generation).

Frame steps that read nothing of their night (``generation`` 0) get a task for every
ingested frame of their types at once, while the night is still open. Night steps, and
frame steps downstream of one, work on a night's closed generation: their tasks are
created when the night closes (generation g covers the frames that arrived in
generations ≤ g), and a night that closes again after late frames gets a new generation
whose tasks run again; older generations' unfinished tasks are excluded as superseded,
so nothing ever reads a mix of generations. Creating a row twice is harmless (unique
key, insert-or-ignore).

Before that, each pass gives new object frames their field and places newly closed night
generations in the light-curve shards of their fields (:mod:`autowisp.db.fields`): a
shard or field step gets a task for its target's latest generation, and the unfinished
tasks of earlier generations are superseded (the latest holds their nights too).
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
from autowisp.db.fields import DEFAULT_FIELD_RADIUS, assign_fields, place_nights
from autowisp.db.models import (
    Configuration,
    Field,
    Image,
    ImageState,
    LightCurveShard,
    Night,
    Scope,
    ShardNight,
    Task,
    TaskState,
)
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
    placed: int = 0


def _chunks(values: list[int], size: int = 2000) -> list[list[int]]:
    return [values[start : start + size] for start in range(0, len(values), size)]


def plan_tasks(
    session: Session,
    registry: Registry,
    configurations: Mapping[str, Configuration],
    *,
    nights: Iterable[int] | None = None,
    batch: int = 20000,
    everything: bool = False,
    field_radius: float = DEFAULT_FIELD_RADIUS,
) -> Plan:
    """Create the missing task rows, incrementally: for frames not planned yet (at most
    ``batch`` per call), nights whose latest closed generation is not planned yet, and
    every target of a configuration activated since it was last planned; shard and field
    tasks for their targets' latest generations. Only ``nights`` when given. With
    ``everything``, fields and shard placements are looked for over every frame and
    night (else over the new ones)."""
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
    look_everywhere = (everything or plan.full) and night_filter is None
    assign_fields(
        session, images=None if look_everywhere else new_images, default_radius=field_radius
    )
    placement = place_nights(
        session, nights=None if look_everywhere else (night_filter or closed_ids)
    )
    plan.placed = len(placement.shards)
    for step in registry:
        configuration = configurations[step.name]
        restrict = step.name not in full
        column: Any
        if step.scope in (Scope.SHARD, Scope.FIELD):
            rows = _missing_generations(session, step.scope, configuration, night_filter)
            plan.created += _insert_ignore(session, rows)
            continue
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


def _missing_generations(
    session: Session, scope: Scope, configuration: Configuration, night_filter: list[int] | None
) -> list[dict[str, Any]]:
    """Rows of a shard or field step's tasks for its targets' latest generations (only
    the shards and fields the nights in ``night_filter`` were placed in, when given)."""
    own = and_(Task.step_id == configuration.step_id, Task.configuration_id == configuration.id)
    base = {
        "step_id": configuration.step_id,
        "configuration_id": configuration.id,
        "state": TaskState.PENDING.value,
    }
    if scope is Scope.SHARD:
        query = select(
            LightCurveShard.id, LightCurveShard.field_id, LightCurveShard.planned_generation
        ).where(
            LightCurveShard.planned_generation > 0,
            ~exists(
                select(Task.id).where(
                    own,
                    Task.shard_id == LightCurveShard.id,
                    Task.generation == LightCurveShard.planned_generation,
                )
            ),
        )
        if night_filter is not None:
            query = query.where(
                LightCurveShard.id.in_(
                    select(ShardNight.shard_id).where(ShardNight.night_id.in_(night_filter))
                )
            )
        return [
            {**base, "target": f"shard:{s}", "shard_id": s, "field_id": f, "generation": g}
            for s, f, g in session.execute(query)
        ]
    fields = select(Field.id, Field.planned_generation).where(
        Field.planned_generation > 0,
        ~exists(
            select(Task.id).where(
                own,
                Task.field_id == Field.id,
                Task.shard_id.is_(None),
                Task.generation == Field.planned_generation,
            )
        ),
    )
    if night_filter is not None:
        fields = fields.where(
            Field.id.in_(
                select(LightCurveShard.field_id)
                .join(ShardNight, ShardNight.shard_id == LightCurveShard.id)
                .where(ShardNight.night_id.in_(night_filter))
            )
        )
    return [
        {**base, "target": f"field:{f}", "field_id": f, "generation": g}
        for f, g in session.execute(fields)
    ]


def supersede_old_generations(session: Session, *, nights: Iterable[int] | None = None) -> int:
    """Exclude the unfinished tasks of a night's older generations (a later generation
    of the night closed since): they would read frames the night no longer is. So are
    a shard's or field's older generations' (the latest holds their nights too)."""
    unfinished = Task.state.in_([TaskState.PENDING, TaskState.QUEUED, TaskState.FAILED])
    superseded = 0
    for condition, reason in (
        (
            and_(
                Task.shard_id.is_not(None),
                Task.generation
                < select(LightCurveShard.planned_generation)
                .where(LightCurveShard.id == Task.shard_id)
                .scalar_subquery(),
            ),
            "superseded: a later generation of its shard holds its nights too",
        ),
        (
            and_(
                Task.shard_id.is_(None),
                Task.field_id.is_not(None),
                Task.generation
                < select(Field.planned_generation)
                .where(Field.id == Task.field_id)
                .scalar_subquery(),
            ),
            "superseded: a later generation of its field holds its shards' nights too",
        ),
    ):
        superseded += transition(
            session,
            update(Task)
            .where(unfinished, condition)
            .values(
                state=TaskState.EXCLUDED,
                wait_reason=None,
                last_error=reason,
                finished_at=db_time(session),
            )
            .execution_options(synchronize_session=False),
        )
    return superseded + _supersede_nights(session, nights=nights)


def _supersede_nights(session: Session, *, nights: Iterable[int] | None = None) -> int:
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
