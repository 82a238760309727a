"""Which tasks exist, and which pending ones may run now.

:func:`plan_tasks` creates the task rows (pending) for every target of every step under
its current configuration; creating a row twice is harmless (unique key, insert-or-ignore).
:func:`classify_pending` decides for each pending task whether its inputs let it run
(``ready``), must be waited for, or will never be usable (``excluded``, with the reason).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import and_, exists, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from autowisp.db.models import (
    Camera,
    Configuration,
    Image,
    ImageState,
    Night,
    Scope,
    Task,
    TaskState,
)
from autowisp.steps.registry import Registry

__all__ = ["Decision", "classify_pending", "plan_tasks"]

TERMINAL = frozenset({TaskState.DONE, TaskState.DEAD, TaskState.EXCLUDED})
UNUSABLE = frozenset({TaskState.DEAD, TaskState.EXCLUDED})


def _insert_ignore(session: Session, rows: list[dict]) -> int:
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    created = 0
    for start in range(0, len(rows), 2000):
        statement = (
            insert(Task)
            .values(rows[start : start + 2000])
            .on_conflict_do_nothing(index_elements=["step_id", "configuration_id", "target"])
        )
        created += session.execute(statement).rowcount or 0
    return created


def plan_tasks(
    session: Session,
    registry: Registry,
    configurations: Mapping[str, Configuration],
    *,
    nights: Iterable[int] | None = None,
) -> int:
    """Create the missing task rows (for all nights, or only ``nights``); return how many."""
    night_filter = None if nights is None else list(nights)
    created = 0
    for step in registry:
        configuration = configurations[step.name]
        types = [t.value for t in step.image_types]
        if step.scope is Scope.IMAGE:
            # NOT IN over a subquery: PostgreSQL hashes it, linear in the number of frames
            # even before the planner has statistics (a correlated NOT EXISTS was quadratic).
            query = select(Image.id, Image.night_id).where(
                Image.state == ImageState.INGESTED,
                Image.image_type.in_(types),
                Image.id.not_in(
                    select(Task.image_id).where(
                        Task.step_id == configuration.step_id,
                        Task.configuration_id == configuration.id,
                        Task.image_id.is_not(None),
                    )
                ),
            )
            if night_filter is not None:
                query = query.where(Image.night_id.in_(night_filter))
            rows = [
                {
                    "step_id": configuration.step_id,
                    "configuration_id": configuration.id,
                    "target": f"image:{image_id}",
                    "image_id": image_id,
                    "night_id": night_id,
                    "state": TaskState.PENDING.value,
                }
                for image_id, night_id in session.execute(query)
            ]
        elif step.scope is Scope.NIGHT:
            has_frames = exists(
                select(Image.id).where(
                    Image.night_id == Night.id,
                    Image.state == ImageState.INGESTED,
                    Image.image_type.in_(types),
                )
            )
            query = select(Night.id).where(
                has_frames,
                Night.id.not_in(
                    select(Task.night_id).where(
                        Task.step_id == configuration.step_id,
                        Task.configuration_id == configuration.id,
                        Task.night_id.is_not(None),
                    )
                ),
            )
            if night_filter is not None:
                query = query.where(Night.id.in_(night_filter))
            rows = [
                {
                    "step_id": configuration.step_id,
                    "configuration_id": configuration.id,
                    "target": f"night:{night_id}",
                    "night_id": night_id,
                    "state": TaskState.PENDING.value,
                }
                for (night_id,) in session.execute(query)
            ]
        else:
            rows = []  # shard tasks are planned by the light-curve steps
        created += _insert_ignore(session, rows)
    session.flush()
    return created


@dataclass(frozen=True)
class Decision:
    """What to do with a pending task."""

    task_id: int
    verdict: str  # "ready", "wait" or "exclude"
    reason: str = ""


def classify_pending(
    session: Session, registry: Registry, configurations: Mapping[str, Configuration]
) -> list[Decision]:
    """Decide, for every pending task of the current configurations, ready/wait/exclude."""
    step_of = {c.step_id: name for name, c in configurations.items()}
    current = [c.id for c in configurations.values()]
    pending = session.execute(
        select(Task.id, Task.step_id, Task.image_id, Task.night_id)
        .where(Task.state == TaskState.PENDING, Task.configuration_id.in_(current))
        .order_by(Task.id)
    ).all()
    if not pending:
        return []
    nights = {row.night_id for row in pending if row.night_id is not None}
    states: dict[tuple[str, str], TaskState] = {}
    by_night: dict[tuple[str, int], list[TaskState]] = defaultdict(list)
    rows = session.execute(
        select(Task.step_id, Task.target, Task.night_id, Task.state).where(
            and_(Task.configuration_id.in_(current), Task.night_id.in_(nights))
        )
    )
    for step_id, target, night_id, state in rows:
        name = step_of[step_id]
        states[(name, target)] = state
        if target.startswith("image:"):
            by_night[(name, night_id)].append(state)
    master_names = {name for step in registry for name in step.master_inputs}
    camera_of, masters = _master_states(session, registry, configurations, master_names)
    serial_of = (
        dict(session.execute(select(Camera.id, Camera.serial)).all()) if master_names else {}
    )
    decisions = []
    for task_id, step_id, image_id, night_id in pending:
        step = registry[step_of[step_id]]
        verdict, reason = "ready", ""
        for upstream_name in step.inputs:
            upstream = registry[upstream_name]
            if upstream.scope is Scope.IMAGE and step.scope is Scope.NIGHT:
                group = by_night.get((upstream_name, night_id), [])
                if any(s not in TERMINAL for s in group):
                    verdict = "wait"
                elif not any(s is TaskState.DONE for s in group):
                    verdict, reason = "exclude", f"no frame of the night has {upstream_name} done"
                    break
                continue
            key = f"image:{image_id}" if upstream.scope is Scope.IMAGE else f"night:{night_id}"
            state = states.get((upstream_name, key))
            if state in UNUSABLE:
                verdict, reason = "exclude", f"input {upstream_name} ({key}) is {state.value}"
                break
            if state is None:
                # Nothing to wait for: the input step has no task for this target.
                verdict, reason = "exclude", f"input {upstream_name} has no task for {key}"
                break
            if state is not TaskState.DONE:
                verdict = "wait"
        if verdict == "ready" and step.master_inputs:
            camera = camera_of.get(night_id)
            verdict, reason = _masters_verdict(step, camera, masters)
            allowed = configurations[step.name].parameters.get("uncalibrated_cameras", [])
            if verdict == "wait" and reason and serial_of.get(camera) in allowed:
                verdict, reason = "ready", ""  # configured to proceed without masters
        decisions.append(Decision(task_id, verdict, reason))
    return decisions


def _master_states(
    session: Session,
    registry: Registry,
    configurations: Mapping[str, Configuration],
    names: set[str],
) -> tuple[dict[int, int], dict[tuple[str, int], set[TaskState]]]:
    """Camera of every night, and the states of each master step's tasks per camera."""
    camera_of = dict(session.execute(select(Night.id, Night.camera_id)).all())
    masters: dict[tuple[str, int], set[TaskState]] = defaultdict(set)
    if names:
        ids = {configurations[name].id: name for name in names}
        rows = session.execute(
            select(Task.configuration_id, Task.night_id, Task.state).where(
                Task.configuration_id.in_(list(ids))
            )
        )
        for configuration_id, night_id, state in rows:
            masters[(ids[configuration_id], camera_of.get(night_id, -1))].add(state)
    return camera_of, masters


def _masters_verdict(step, camera: int | None, masters) -> tuple[str, str]:
    """Ready when the camera has each master done on some night; otherwise wait."""
    for name in step.master_inputs:
        found = masters.get((name, camera), set())
        if TaskState.DONE in found:
            continue
        if found - UNUSABLE:
            return "wait", ""
        return "wait", (
            f"waiting for a {name} of this camera: none is done or under way "
            "(upload calibration frames for any night of this camera)"
        )
    return "ready", ""
