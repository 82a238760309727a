"""Where a star's light curve is: its field, its shard and the shard's current file.

:func:`locate_light_curves` resolves the stars a user names (database star ids, or Gaia
DR3 source ids written ``gaia:<id>``; or every star of the fields) to the current
generation of their shard's ``lightcurves`` product — the latest done task's file
(:func:`autowisp.db.fields.current_generations`), never a path of our own making — with
the facts the exported file's header carries, and the field's current light-curve
statistics (their night offsets put the nights on one scale).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from autowisp.db.fields import current_generations
from autowisp.db.models import Camera, CameraType, Field, FieldStar, LightCurveShard, Star
from autowisp.db.stars import _field_row
from autowisp.io.lightcurves import StarIdentity

__all__ = ["LIGHT_CURVE_STEP", "Located", "ShardStarsToRead", "locate_light_curves"]

#: The step whose shard products hold the light curves.
LIGHT_CURVE_STEP = "lightcurves"
#: The field step whose product holds the night offsets.
STATISTICS_STEP = "lc_statistics"

#: Stars per query of an IN list.
_CHUNK = 2000


@dataclass(frozen=True)
class ShardStarsToRead:
    """Stars of one shard to read from its current file (``path``), with their
    positions in the shard (``star index − star_lo``), and the current file of its
    field's light-curve statistics (``statistics``; None before the first is done)."""

    shard: str
    path: str
    stars: tuple[tuple[StarIdentity, int], ...]
    statistics: str | None = None


@dataclass(frozen=True)
class Located:
    """What :func:`locate_light_curves` found: shards to read, and the stars it could
    not give a light curve, with why."""

    shards: tuple[ShardStarsToRead, ...]
    missing: tuple[str, ...] = field(default_factory=tuple)

    def __iter__(self) -> Iterator[ShardStarsToRead]:
        return iter(self.shards)


def _parse(token: str) -> tuple[str, int]:
    text = token.strip()
    kind = "star"
    if text.lower().startswith("gaia:"):
        kind, text = "gaia", text[5:]
    if not text.isdigit():
        raise ValueError(
            f"{token!r} is not a star: give a star id (digits) or gaia:<Gaia DR3 source_id>"
        )
    return kind, int(text)


def locate_light_curves(
    session: Session,
    stars: Sequence[str] = (),
    *,
    field_name: str | None = None,
    every_star: bool = False,
) -> Located:
    """The shards and positions of the named ``stars`` (or with ``every_star`` all
    stars of field ``field_name``, or of every field), in field ``field_name`` only
    when given.

    Raises
    ------
    ValueError
        A star is not given as digits or ``gaia:<digits>``, or neither stars nor
        ``every_star`` are given.
    autowisp.errors.NotFoundError
        The field is unknown.
    """
    if not stars and not every_star:
        raise ValueError("name stars (ids or gaia:<source_id>) or ask for --all")
    field_id = _field_row(session, field_name)[0] if field_name is not None else None
    query = (
        select(FieldStar.field_id, FieldStar.star_index, Star.id, Star.gaia_source_id, Star.ra,
               Star.dec, Star.epoch, Star.g, Star.bp, Star.rp)
        .join(Star, Star.id == FieldStar.star_id)
        .order_by(FieldStar.field_id, FieldStar.star_index)
    )  # fmt: skip
    if field_id is not None:
        query = query.where(FieldStar.field_id == field_id)
    missing: list[str] = []
    rows: list[Any] = []
    if every_star:
        rows = list(session.execute(query))
    else:
        parsed = [(token, *_parse(token)) for token in stars]
        by_id = [value for _, kind, value in parsed if kind == "star"]
        by_gaia = [value for _, kind, value in parsed if kind == "gaia"]
        for values, column in ((by_id, Star.id), (by_gaia, Star.gaia_source_id)):
            for start in range(0, len(values), _CHUNK):
                chunk = values[start : start + _CHUNK]
                rows.extend(session.execute(query.where(column.in_(chunk))))
        found_ids = {row[2] for row in rows}
        found_gaia = {row[3] for row in rows}
        for token, kind, value in parsed:
            if (kind == "star" and value not in found_ids) or (
                kind == "gaia" and value not in found_gaia
            ):
                where = f" in field {field_name}" if field_name is not None else ""
                missing.append(
                    f"{token}: no such star{where} (`autowisp stars export` lists them)"
                )
    if not rows:
        return Located((), tuple(missing))
    fields = {
        f.id: (f.name, serial, f"{make} {model}".strip())
        for f, serial, make, model in session.execute(
            select(Field, Camera.serial, CameraType.make, CameraType.model)
            .join(Camera, Camera.id == Field.camera_id)
            .join(CameraType, CameraType.id == Camera.camera_type_id)
            .where(Field.id.in_(sorted({row[0] for row in rows})))
        )
    }
    shards = list(
        session.scalars(
            select(LightCurveShard)
            .where(LightCurveShard.field_id.in_(sorted(fields)))
            .order_by(LightCurveShard.field_id, LightCurveShard.shard_index)
        )
    )
    current = current_generations(session, LIGHT_CURVE_STEP, shards=[s.id for s in shards])
    by_field: dict[int, list[LightCurveShard]] = defaultdict(list)
    for shard in shards:
        by_field[shard.field_id].append(shard)
    gathered: dict[int, list[tuple[StarIdentity, int]]] = defaultdict(list)
    for fid, index, star_id, gaia, ra, dec, epoch, g, bp, rp in rows:
        name, serial, model = fields[fid]
        holder = next((s for s in by_field.get(fid, []) if s.star_lo <= index < s.star_hi), None)
        label = f"star {star_id}" + (f" (Gaia DR3 {gaia})" if gaia is not None else "")
        if holder is None:
            missing.append(f"{label}: field {name} has no light-curve shard for it yet")
            continue
        generation = current.get(holder.id)
        if generation is None or generation.path is None:
            missing.append(
                f"{label}: shard {holder.name} has no light curves yet (no done "
                f"{LIGHT_CURVE_STEP} task; `autowisp status` shows why)"
            )
            continue
        identity = StarIdentity(
            star_id=int(star_id), star_index=int(index), field_id=int(fid), field_name=name,
            gaia_source_id=-1 if gaia is None else int(gaia), ra=float(ra), dec=float(dec),
            epoch=float(epoch), g=g, bp=bp, rp=rp, telescope=serial, instrument=model,
        )  # fmt: skip
        gathered[holder.id].append((identity, int(index - holder.star_lo)))
    names = {s.id: s.name for s in shards}
    field_of = {s.id: s.field_id for s in shards}
    statistics = current_generations(session, STATISTICS_STEP)
    located = tuple(
        ShardStarsToRead(
            names[shard_id],
            str(current[shard_id].path),
            tuple(items),
            _path(statistics.get(field_of[shard_id])),
        )
        for shard_id, items in sorted(gathered.items())
    )
    return Located(located, tuple(missing))


def _path(generation: Any) -> str | None:
    return None if generation is None or generation.path is None else str(generation.path)
