"""Fields (one camera pointing across nights) and their light-curve shards.

Three operations, all idempotent and safe to run while frames arrive:

* :func:`assign_fields` gives each ingested object frame with a known pointing its
  field: the camera's field whose centre is nearest and within the field's radius, else a
  new field centred on the frame. The radius is a quarter of the frame's smaller side
  on the sky when the header gives the pixel scale (dithers and the mount's pointing
  errors from night to night stay in the field; a pointing that shares less than three
  quarters of the frame along an axis is another field), else the configured default.
* :func:`define_shards` splits a field's stars (indices ``0 .. star_count``) into shards
  of ``stars_per_shard``; existing shards never change, new stars get new shards.
* :func:`place_nights` puts every closed night generation into the shards of the fields
  its object frames belong to, as the shard's next generation (one per pass and shard,
  one field generation per pass and field). Generation ``s`` of a shard holds the nights
  placed in its generations ``<= s``; a night that closed again after late frames is
  placed again, and its newer generation replaces the older one from there on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, exists, or_, select, update
from sqlalchemy.orm import Session

from autowisp.db.clock import db_time
from autowisp.db.models import (
    Camera,
    Configuration,
    Field,
    Image,
    ImageState,
    ImageType,
    LightCurveShard,
    Night,
    ShardNight,
    Task,
    TaskState,
    utcnow,
)
from autowisp.db.models import Step as StepRow
from autowisp.io.keywords import header_pixel_scale

__all__ = [
    "DEFAULT_FIELD_RADIUS",
    "FIELD_RADIUS_FRACTION",
    "CurrentGeneration",
    "Placement",
    "angular_distance",
    "assign_fields",
    "current_generations",
    "define_shards",
    "place_nights",
    "shard_nights",
]

#: A field's radius as a fraction of its first frame's smaller side on the sky.
FIELD_RADIUS_FRACTION = 0.25

#: Field radius when the header gives no pixel scale, deg (``[pipeline] field_radius_deg``).
DEFAULT_FIELD_RADIUS = 1.0


def angular_distance(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle distance between two positions, deg (haversine: exact for small ones)."""
    phi1, phi2 = math.radians(dec1), math.radians(dec2)
    half_dphi = (phi2 - phi1) / 2
    half_dlam = math.radians(ra2 - ra1) / 2
    a = math.sin(half_dphi) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlam) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(a))))


def _radius(
    header: dict[str, object], width: int | None, height: int | None, default: float
) -> float:
    scale = header_pixel_scale(header)
    if scale is None or not width or not height:
        return default
    return FIELD_RADIUS_FRACTION * min(width, height) * scale / 3600.0


def assign_fields(
    session: Session,
    *,
    images: Iterable[int] | None = None,
    default_radius: float = DEFAULT_FIELD_RADIUS,
) -> int:
    """Give ingested object frames without a field (only ``images`` when given) theirs;
    returns how many frames got one. Frames whose header has no pointing get none."""
    query = (
        select(Image.id, Image.camera_id, Image.ra, Image.dec, Image.width, Image.height,
               Image.header)
        .where(
            Image.field_id.is_(None),
            Image.state == ImageState.INGESTED,
            Image.image_type == ImageType.OBJECT,
            Image.ra.is_not(None),
            Image.dec.is_not(None),
            Image.camera_id.is_not(None),
        )
        .order_by(Image.camera_id, Image.jd, Image.id)
    )  # fmt: skip
    if images is not None:
        wanted = sorted(set(images))
        if not wanted:
            return 0
        rows = [
            row
            for start in range(0, len(wanted), 2000)
            for row in session.execute(query.where(Image.id.in_(wanted[start : start + 2000])))
        ]
    else:
        rows = list(session.execute(query))
    by_camera: dict[
        int, list[tuple[int, float, float, int | None, int | None, dict[str, Any]]]
    ] = defaultdict(list)
    for image_id, camera_id, ra, dec, width, height, header in rows:
        by_camera[camera_id].append((image_id, ra, dec, width, height, header or {}))
    assigned = 0
    for camera_id, frames in sorted(by_camera.items()):
        # One planner at a time creates a camera's fields (the row lock; SQLite serialises
        # writers anyway), so two frames of one new pointing never start two fields.
        serial = session.scalar(
            select(Camera.serial).where(Camera.id == camera_id).with_for_update()
        )
        fields = list(session.scalars(select(Field).where(Field.camera_id == camera_id)))
        updates = []
        for image_id, ra, dec, width, height, header in frames:
            distances = [(angular_distance(ra, dec, f.ra, f.dec), f.id, f) for f in fields]
            near = [item for item in distances if item[0] <= item[2].radius]
            if near:
                chosen = min(near, key=lambda item: (item[0], item[1]))[2]
            else:
                name = f"{serial}-{ra:07.3f}{dec:+07.3f}"
                if session.scalar(select(Field.id).where(Field.name == name)) is not None:
                    name = f"{name}-c{camera_id}"
                chosen = Field(
                    camera_id=camera_id,
                    name=name[:64],
                    ra=float(ra),
                    dec=float(dec),
                    radius=_radius(header, width, height, default_radius),
                )
                session.add(chosen)
                session.flush()
                fields.append(chosen)
            updates.append({"image": image_id, "field": chosen.id})
        if updates:  # one executemany (batched on PostgreSQL)
            table = Image.__table__
            session.execute(
                update(table)
                .where(table.c.id == bindparam("image"), table.c.field_id.is_(None))
                .values(field_id=bindparam("field")),
                updates,
            )
        assigned += len(updates)
    return assigned


def define_shards(
    session: Session, field_id: int, star_count: int, *, stars_per_shard: int
) -> list[int]:
    """Shards covering the field's star indices ``0 .. star_count``; returns the ids of
    the new ones (an existing shard's range never changes: its history stays true)."""
    if stars_per_shard < 1:
        raise ValueError(f"stars_per_shard must be at least 1, got {stars_per_shard}")
    field = session.execute(
        select(Field).where(Field.id == field_id).with_for_update()
    ).scalar_one()
    existing = list(
        session.scalars(
            select(LightCurveShard)
            .where(LightCurveShard.field_id == field_id)
            .order_by(LightCurveShard.shard_index)
        )
    )
    covered = max((s.star_hi for s in existing), default=0)
    index = len(existing)
    created = []
    while covered < star_count:
        high = min(star_count, covered + stars_per_shard)
        shard = LightCurveShard(
            name=f"{field.name}-s{index}"[:64],
            field_id=field_id,
            shard_index=index,
            star_lo=covered,
            star_hi=high,
        )
        session.add(shard)
        session.flush()
        created.append(shard.id)
        covered, index = high, index + 1
    return created


@dataclass(frozen=True)
class Placement:
    """A pass of :func:`place_nights`: the shards and fields whose generation advanced."""

    shards: dict[int, int]
    fields: dict[int, int]

    def __bool__(self) -> bool:
        return bool(self.shards)


def _candidates(
    session: Session, nights: Sequence[int] | None, new_shards: bool
) -> list[tuple[int, int, int, int]]:
    """(shard, field, night, closed generation) of closed nights not placed yet."""
    in_field = exists(
        select(Image.id).where(
            Image.night_id == Night.id,
            Image.field_id == LightCurveShard.field_id,
            Image.state == ImageState.INGESTED,
            Image.image_type == ImageType.OBJECT,
            Image.generation <= Night.closed_generation,
        )
    )
    placed = exists(
        select(ShardNight.id).where(
            ShardNight.shard_id == LightCurveShard.id,
            ShardNight.night_id == Night.id,
            ShardNight.night_generation == Night.closed_generation,
        )
    )
    query = (
        select(LightCurveShard.id, LightCurveShard.field_id, Night.id, Night.closed_generation)
        .join(Field, Field.id == LightCurveShard.field_id)
        .join(Night, Night.camera_id == Field.camera_id)
        .where(Night.closed_generation > 0, in_field, ~placed)
        .order_by(LightCurveShard.id, Night.id)
    )
    if nights is not None:
        scope = Night.id.in_(list(nights))
        query = query.where(
            or_(scope, LightCurveShard.planned_generation == 0) if new_shards else scope
        )
    return [tuple(row) for row in session.execute(query)]  # type: ignore[misc]


def place_nights(
    session: Session, *, nights: Iterable[int] | None = None, new_shards: bool = True
) -> Placement:
    """Place closed night generations in the shards they touch (only ``nights`` when
    given, and with ``new_shards`` every night of a shard never placed before)."""
    night_list = None if nights is None else sorted(set(nights))
    found = _candidates(session, night_list, new_shards)
    if not found:
        return Placement({}, {})
    # Lock the fields, then look again: a concurrent planner may have placed them.
    field_ids = sorted({f for _, f, _, _ in found})
    fields = {
        f.id: f
        for f in session.scalars(
            select(Field).where(Field.id.in_(field_ids)).order_by(Field.id).with_for_update()
        )
    }
    found = _candidates(session, night_list, new_shards)
    shard_ids = sorted({s for s, _, _, _ in found})
    shards = {
        s.id: s
        for s in session.scalars(select(LightCurveShard).where(LightCurveShard.id.in_(shard_ids)))
    }
    now, placed_at = db_time(session), utcnow()
    field_generation = {f: fields[f].planned_generation + 1 for f in {f for _, f, _, _ in found}}
    shard_generation = {s: shards[s].planned_generation + 1 for s in shard_ids}
    session.execute(
        ShardNight.__table__.insert(),
        [
            {
                "shard_id": shard_id,
                "night_id": night_id,
                "night_generation": generation,
                "shard_generation": shard_generation[shard_id],
                "field_generation": field_generation[field_id],
                "placed_at": placed_at,
            }
            for shard_id, field_id, night_id, generation in found
        ],
    )
    for shard_id, generation in shard_generation.items():
        session.execute(
            update(LightCurveShard)
            .where(LightCurveShard.id == shard_id)
            .values(planned_generation=generation, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    for field_id, generation in field_generation.items():
        session.execute(
            update(Field)
            .where(Field.id == field_id)
            .values(planned_generation=generation)
            .execution_options(synchronize_session=False)
        )
    session.expire_all()
    return Placement(shard_generation, field_generation)


def shard_nights(
    session: Session, shard_ids: Iterable[int]
) -> dict[int, list[tuple[int, int, int, int]]]:
    """Per shard, its (night, night generation, shard generation, field generation) rows
    in placement order."""
    ids = sorted(set(shard_ids))
    result: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for start in range(0, len(ids), 1000):
        rows = session.execute(
            select(ShardNight.shard_id, ShardNight.night_id, ShardNight.night_generation,
                   ShardNight.shard_generation, ShardNight.field_generation)
            .where(ShardNight.shard_id.in_(ids[start : start + 1000]))
            .order_by(ShardNight.shard_id, ShardNight.shard_generation, ShardNight.night_id)
        )  # fmt: skip
        for shard_id, night_id, night_gen, shard_gen, field_gen in rows:
            result[shard_id].append((night_id, night_gen, shard_gen, field_gen))
    return result


def current_generations(
    session: Session, step: str, *, shards: Iterable[int] | None = None
) -> dict[int, CurrentGeneration]:
    """Per shard (or field, for a field step), the current generation of ``step``'s
    active configuration: its latest done task, with the file it wrote. A reader opens
    this file, never a path of its own making: a generation being written is not done
    yet, so it is never named here."""
    query = (
        select(Task.shard_id, Task.field_id, Task.id, Task.generation, Task.output_path,
               Task.output_sha256)
        .join(StepRow, StepRow.id == Task.step_id)
        .join(Configuration, Configuration.id == Task.configuration_id)
        .where(
            StepRow.name == step,
            Configuration.active.is_(True),
            Task.state == TaskState.DONE,
            Task.field_id.is_not(None),
        )
        .order_by(Task.generation)
    )  # fmt: skip
    if shards is not None:
        query = query.where(Task.shard_id.in_(sorted(set(shards))))
    found: dict[int, CurrentGeneration] = {}
    for shard_id, field_id, task_id, generation, path, checksum in session.execute(query):
        key = shard_id if shard_id is not None else field_id
        if key is not None:
            found[key] = CurrentGeneration(task_id, generation, path, checksum)
    return found


@dataclass(frozen=True)
class CurrentGeneration:
    """The current generation of a shard's (or field's) product: task, generation, file
    and its sha256."""

    task_id: int
    generation: int
    path: str | None
    sha256: str | None
