"""What operators ask: progress of each night by step, failures and why, throughput.

The same questions are plain SQL views for psql users: ``v_night_progress`` and
``v_failures`` (created by the migrations).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from autowisp.db.models import (
    Camera,
    Configuration,
    Field,
    Image,
    ImageState,
    LightCurveShard,
    Night,
    NightState,
    ShardNight,
    Step,
    Task,
    TaskState,
)

__all__ = ["StatusReport", "collect_status"]

STATES = [state.value for state in TaskState]


@dataclass(frozen=True)
class StatusReport:
    """Progress rows, failures, rejected files and throughput."""

    progress: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    images: dict[str, int]
    throughput: dict[str, float | None]
    waiting: list[dict[str, Any]]
    open_nights: list[dict[str, Any]]
    rejected_frames: list[dict[str, Any]]
    fields: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.isoformat() if isinstance(v, dt.date | dt.datetime) else v) for k, v in row.items()
    }


def collect_status(
    session: Session, *, night: int | None = None, failed_only: bool = False, limit: int = 50
) -> StatusReport:
    """Everything ``autowisp status`` shows, as plain data."""
    where = " WHERE night_id = :night" if night is not None else ""
    params = {"night": night} if night is not None else {}
    progress = [
        _plain(dict(row._mapping))
        for row in session.execute(
            text(
                f"SELECT * FROM v_night_progress{where} "
                "ORDER BY local_date, camera_serial, night_id, step"
            ),
            params,
        )
    ]
    failures = [
        _plain(dict(row._mapping))
        for row in session.execute(
            text(f"SELECT * FROM v_failures{where} ORDER BY task_id LIMIT :limit"),
            {**params, "limit": limit},
        )
    ]
    if failed_only:
        progress = [row for row in progress if row["failed"] or row["dead"]]
    images = dict(session.execute(select(Image.state, func.count()).group_by(Image.state)).all())
    rejected = [
        {"path": path, "reason": reason}
        for path, reason in session.execute(
            select(Image.path, Image.reject_reason)
            .where(Image.state == ImageState.REJECTED)
            .order_by(Image.id)
            .limit(limit)
        )
    ]
    done = (
        select(Task.started_at, Task.finished_at)
        .join(Configuration, Configuration.id == Task.configuration_id)
        .where(Configuration.active.is_(True), Task.state == TaskState.DONE)
    )
    if night is not None:
        done = done.where(Task.night_id == night)
    finished = done.subquery()
    count, first, last = session.execute(
        select(func.count(), func.min(finished.c.started_at), func.max(finished.c.finished_at))
    ).one()
    span = (last - first).total_seconds() if first and last else None
    throughput = {
        "tasks_done": float(count),
        "span_seconds": span,
        "tasks_per_minute": (60.0 * count / span) if span else None,
    }
    waiting = [
        _plain(dict(row._mapping))
        for row in session.execute(
            text(
                "SELECT step, reason, COUNT(*) AS tasks, MIN(target) AS target "
                f"FROM v_waiting{where} GROUP BY step, reason ORDER BY step, reason "
                "LIMIT :limit"
            ),
            {**params, "limit": limit},
        )
    ]
    open_query = (
        select(Night.id, Camera.serial, Night.local_date, Night.last_file_at, Night.generation)
        .join(Camera, Camera.id == Night.camera_id)
        .where(Night.state == NightState.OPEN)
        .order_by(Night.id)
        .limit(limit)
    )
    if night is not None:
        open_query = open_query.where(Night.id == night)
    open_nights = [
        _plain(
            {
                "night_id": i,
                "camera_serial": serial,
                "local_date": date,
                "last_file_at": last,
                "generation": generation,
            }
        )
        for i, serial, date, last, generation in session.execute(open_query)
    ]
    return StatusReport(
        progress,
        failures,
        rejected,
        {str(k.value if hasattr(k, "value") else k): v for k, v in images.items()},
        throughput,
        waiting,
        open_nights,
        _rejected_frames(session, night, limit),
        _fields(session, night, limit),
    )


def _fields(session: Session, night: int | None, limit: int) -> list[dict[str, Any]]:
    """Each field: its camera, frames, nights, shards, generation, and its shard and
    field tasks of the current generations by state."""
    query = (
        select(Field.id, Field.name, Camera.serial, Field.planned_generation)
        .join(Camera, Camera.id == Field.camera_id)
        .order_by(Field.id)
        .limit(limit)
    )
    if night is not None:
        query = query.where(Field.id.in_(select(Image.field_id).where(Image.night_id == night)))
    rows = []
    for field_id, name, serial, generation in session.execute(query):
        frames, nights = session.execute(
            select(func.count(), func.count(Image.night_id.distinct())).where(
                Image.field_id == field_id
            )
        ).one()
        shards = session.scalar(
            select(func.count())
            .select_from(LightCurveShard)
            .where(LightCurveShard.field_id == field_id)
        )
        placed = session.scalar(
            select(func.count(ShardNight.night_id.distinct()))
            .join(LightCurveShard, LightCurveShard.id == ShardNight.shard_id)
            .where(LightCurveShard.field_id == field_id)
        )
        current = (
            select(Task.state, func.count())
            .join(Configuration, Configuration.id == Task.configuration_id)
            .outerjoin(LightCurveShard, LightCurveShard.id == Task.shard_id)
            .where(
                Configuration.active.is_(True),
                Task.field_id == field_id,
                Task.generation == func.coalesce(LightCurveShard.planned_generation, generation),
            )
            .group_by(Task.state)
        )
        states = {str(getattr(k, "value", k)): int(n) for k, n in session.execute(current)}
        rows.append(
            {
                "field_id": field_id,
                "name": name,
                "camera_serial": serial,
                "frames": int(frames),
                "nights": int(nights),
                "nights_in_shards": int(placed or 0),
                "shards": int(shards or 0),
                "generation": int(generation),
                "tasks": states,
            }
        )
    return rows


def _rejected_frames(session: Session, night: int | None, limit: int) -> list[dict[str, Any]]:
    """Frames the current master tasks left out, with the reasons they recorded."""
    query = (
        select(Task.night_id, Step.name, Task.qc)
        .join(Step, Step.id == Task.step_id)
        .join(Configuration, Configuration.id == Task.configuration_id)
        .join(Night, Night.id == Task.night_id)
        .where(
            Configuration.active.is_(True),
            Task.state == TaskState.DONE,
            Task.image_id.is_(None),
            Task.generation == Night.closed_generation,
        )
        .order_by(Task.night_id, Step.name)
    )
    if night is not None:
        query = query.where(Task.night_id == night)
    rows = []
    for night_id, step, qc in session.execute(query):
        for path, reason in sorted(dict((qc or {}).get("rejected") or {}).items()):
            rows.append({"night_id": night_id, "step": step, "path": path, "reason": reason})
    return rows[:limit]
