"""The deep star list: one identity per star across frames, nights, fields and cameras.

A *registration* (:func:`register_stars`) takes the candidate stars of one field and
night (the stars of a reference stack, cross-identified with Gaia where possible) and
gives each its :class:`~autowisp.db.models.Star` and its index within the field. The
rules, in this order:

1. **Lock.** The registration's first statement is ``UPDATE star_registry SET version =
   version + 1 WHERE id = 1``. On PostgreSQL it takes the row's lock, on SQLite the
   database's write lock; either is held until the transaction ends, so registrations
   run one at a time (two workers registering overlapping fields of two nights at once
   never both create the same star), and each sees the stars of those before it. Commit
   soon after registering: other registrations wait meanwhile.
2. **Gaia id.** A candidate with the Gaia source id of a known star is that star,
   wherever it lies (a high proper motion star moves).
3. **Position.** Each other candidate is the nearest known star within
   ``match_radius_deg`` (great-circle distance), one to one: candidate–star pairs are
   taken nearest first (equal distances by star id, then by the candidate's position,
   so the result does not depend on the candidates' order), and a pair is skipped when
   its star or its candidate is taken already. A star matched by Gaia id is taken; a
   star and a candidate with two different Gaia ids are two stars. Positions are
   compared as given: no proper motion is applied between the candidates' epoch and the
   star's.
4. **New stars.** The candidates left are new stars, first seen in this night and field.
5. **Filling in.** A matched star gains the Gaia id, Gaia magnitudes and instrumental
   magnitudes (per channel) it lacked; its flags gain the candidate's bits, except
   ``CATALOGUE_ONLY``, which stays set only while no registration detected it; its
   first night becomes this night where this night began earlier (two nights of a field
   ingested together register in either order). Its id, position and epoch never
   change: a star keeps the position it was first registered with.
6. **Field indices.** The stars not yet in the field get its next indices (0, 1, 2...)
   in candidate order; the others keep theirs. Indices are append-only: the light-curve
   shards (:func:`autowisp.db.fields.define_shards`) split a field's stars by index.

Registering the same candidates again returns the same ids and indices and adds nothing
(only the registry's version counts the registration). Overlapping fields of several
cameras share the stars of their overlap, each with its own indices.

:func:`export_stars` writes a field's star list as a FITS binary table or CSV (the
format: :mod:`autowisp.io.star_export`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from autowisp.db._bulk import insert_columns, update_columns
from autowisp.db._sky_match import match_one_to_one, ra_window
from autowisp.db.models import Field, FieldStar, Night, Star, StarRegistry, utcnow
from autowisp.db.session import rowcount
from autowisp.errors import NotFoundError, TransientError
from autowisp.io.star_export import star_export_format, write_star_export
from autowisp.vocabulary import StarFlag

__all__ = [
    "MAX_MATCH_RADIUS",
    "Candidates",
    "Export",
    "FieldStars",
    "Registered",
    "export_stars",
    "field_stars",
    "register_stars",
    "registry_version",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Largest accepted match radius, deg: a larger one is almost surely arcsec passed as deg.
MAX_MATCH_RADIUS = 0.1

#: Bound parameters per IN list (fields.py's chunking).
_CHUNK = 2000

#: The arrays of :class:`Candidates` and their types.
_COLUMNS: tuple[tuple[str, type[np.generic]], ...] = (
    ("ra", np.float64), ("dec", np.float64), ("gaia_source_id", np.int64), ("g", np.float64),
    ("bp", np.float64), ("rp", np.float64), ("flags", np.int64),
)  # fmt: skip

#: Channels in export order; others follow alphabetically.
_CHANNEL_ORDER = ("R", "G1", "G2", "G", "B", "L")


def _frozen(values: Any, dtype: type[np.generic], name: str) -> Any:
    """A read-only 1-D copy of ``values`` as ``dtype``; ``name`` is the argument's."""
    try:
        array = np.array(values, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Candidates.{name} is not an array of {dtype.__name__}") from error
    if array.ndim != 1:
        raise ValueError(f"Candidates.{name} must be 1-D, got shape {array.shape}")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, kw_only=True)
class Candidates:
    """The stars a registration offers (all arrays of one length, read-only copies).

    Attributes
    ----------
    ra, dec : (n,) float
        Position at ``epoch`` (ICRS), deg; RA is taken modulo 360.
    gaia_source_id : (n,) int64
        Gaia DR3 source id, -1 for none; no id may appear twice.
    g, bp, rp : (n,) float
        Gaia magnitudes, mag, NaN where unknown.
    flags : (n,) int
        :class:`~autowisp.vocabulary.StarFlag` bits.
    epoch : float
        Julian year of the positions.
    instrumental : mapping of str to (n,) float
        Channel name (R, G1, G2, B or L) -> instrumental magnitude on the reference
        stack, mag, NaN where unknown.
    """

    ra: FloatArray
    dec: FloatArray
    gaia_source_id: IntArray
    g: FloatArray
    bp: FloatArray
    rp: FloatArray
    flags: IntArray
    epoch: float
    instrumental: Mapping[str, FloatArray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {name: _frozen(getattr(self, name), dtype, name) for name, dtype in _COLUMNS}
        instrumental = {
            str(channel): _frozen(values, np.float64, f"instrumental[{channel!r}]")
            for channel, values in self.instrumental.items()
        }
        size = arrays["ra"].size
        lengths = {name: a.size for name, a in arrays.items()}
        lengths.update({f"instrumental[{c!r}]": a.size for c, a in instrumental.items()})
        wrong = {name: n for name, n in lengths.items() if n != size}
        if wrong:
            raise ValueError(
                f"Candidates arrays must all have the length of ra ({size}); these differ: "
                + ", ".join(f"{name} has {n}" for name, n in wrong.items())
            )
        ra, dec, gaia = arrays["ra"], arrays["dec"], arrays["gaia_source_id"]
        bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"Candidates: {int(bad.sum())} position(s) are not finite or have |dec| > "
                f"90 deg, the first at index {first}: ra={float(ra[first])!r}, "
                f"dec={float(dec[first])!r}"
            )
        known, counts = np.unique(gaia[gaia >= 0], return_counts=True)
        if (gaia < -1).any() or (counts > 1).any():
            raise ValueError(
                "Candidates.gaia_source_id: -1 (none) or a source id, each at most once "
                f"(one Gaia source is one star); negative: {gaia[gaia < -1][:5].tolist()}, "
                f"repeated: {known[counts > 1][:5].tolist()}"
            )
        if not math.isfinite(self.epoch):
            raise ValueError(f"Candidates.epoch must be a finite Julian year, got {self.epoch!r}")
        wrapped = np.mod(ra, 360.0)
        wrapped[wrapped >= 360.0] = 0.0  # a tiny negative RA rounds to 360.0
        wrapped.flags.writeable = False
        arrays["ra"] = wrapped
        for name, array in arrays.items():
            object.__setattr__(self, name, array)
        object.__setattr__(self, "instrumental", instrumental)
        object.__setattr__(self, "epoch", float(self.epoch))

    def __len__(self) -> int:
        return int(self.ra.size)


@dataclass(frozen=True)
class Registered:
    """What a registration gave each candidate, in candidate order.

    ``star_id``: the star's id; ``star_index``: its index within the field (both
    (n,) int64). ``new_stars``: stars created; ``new_in_field``: stars that joined the
    field (new or known elsewhere); ``registry_version``: this registration's number.
    """

    star_id: IntArray
    star_index: IntArray
    new_stars: int
    new_in_field: int
    registry_version: int


@dataclass(frozen=True)
class FieldStars:
    """A field's stars ordered by star index, as arrays of one length.

    ``gaia_source_id`` and ``first_night_id`` are -1 where none; magnitudes are NaN
    where unknown; ``instrumental`` maps each channel any of them has to its
    magnitudes (NaN where that star has none).
    """

    field_id: int
    star_id: IntArray
    star_index: IntArray
    ra: FloatArray
    dec: FloatArray
    epoch: FloatArray
    gaia_source_id: IntArray
    g: FloatArray
    bp: FloatArray
    rp: FloatArray
    flags: IntArray
    first_night_id: IntArray
    instrumental: dict[str, FloatArray]

    def __len__(self) -> int:
        return int(self.star_id.size)


@dataclass(frozen=True)
class _Known:
    """Known stars near the candidates (one row each)."""

    id: IntArray
    gaia: IntArray
    ra: FloatArray
    dec: FloatArray
    mags: FloatArray  # (n, 3): g, bp, rp
    flags: IntArray
    first_night: IntArray  # -1 where none
    channels: FloatArray  # (n, channels of the candidates): NaN where the star has none


def _sky_box(ra: FloatArray, dec: FloatArray, radius: float) -> ColumnElement[bool]:
    """The stars within ``radius`` (deg) of the candidates lie in this RA/Dec box."""
    low, high = max(-90.0, float(dec.min()) - radius), min(90.0, float(dec.max()) + radius)
    in_dec = Star.dec.between(low, high)
    window = ra_window(ra, dec, radius)
    if window is None:
        return in_dec
    start, width = window
    if start + width < 360.0:
        return and_(in_dec, Star.ra.between(start, start + width))
    return and_(in_dec, or_(Star.ra >= start, Star.ra <= start + width - 360.0))


def _lock(session: Session) -> int:
    """Take the registry lock (rule 1) and return this registration's version."""
    registry = StarRegistry.__table__
    taken = session.execute(
        update(registry).where(registry.c.id == 1).values(version=registry.c.version + 1)
    )
    if rowcount(taken) != 1:
        raise NotFoundError(
            "the star registry row (star_registry id 1) is missing: the database was not "
            "migrated to revision 0005 with `autowisp init`, or the row was deleted "
            "(restore it with INSERT INTO star_registry (id, version) VALUES (1, <the "
            "largest version exported so far>))"
        )
    return int(
        session.execute(select(StarRegistry.version).where(StarRegistry.id == 1)).scalar_one()
    )


def _known_stars(session: Session, candidates: Candidates, radius: float) -> _Known:
    """Known stars in the candidates' box and those with their Gaia ids (rule 2 finds a
    star wherever it is), each once, with their magnitudes in the candidates' channels
    (not the whole JSON: decoding it for every star costs more than the rest)."""
    channels = [Star.instrumental[c].as_float() for c in candidates.instrumental]
    columns = (Star.id, Star.gaia_source_id, Star.ra, Star.dec, Star.g, Star.bp, Star.rp,
               Star.flags, Star.first_night_id, *channels)  # fmt: skip
    rows = {row[0]: row for row in session.execute(select(*columns).where(
        _sky_box(candidates.ra, candidates.dec, radius)))}  # fmt: skip
    wanted = sorted(set(candidates.gaia_source_id[candidates.gaia_source_id >= 0].tolist()))
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        for row in session.execute(select(*columns).where(Star.gaia_source_id.in_(chunk))):
            rows.setdefault(row[0], row)
    found = list(rows.values())
    count = len(found)
    return _Known(
        id=np.fromiter((r[0] for r in found), np.int64, count),
        gaia=np.fromiter((-1 if r[1] is None else r[1] for r in found), np.int64, count),
        ra=np.fromiter((r[2] for r in found), np.float64, count),
        dec=np.fromiter((r[3] for r in found), np.float64, count),
        mags=np.array([r[4:7] for r in found], dtype=np.float64).reshape(count, 3),
        flags=np.fromiter((r[7] for r in found), np.int64, count),
        first_night=np.fromiter((-1 if r[8] is None else r[8] for r in found), np.int64, count),
        channels=np.array([r[9:] for r in found], np.float64).reshape(count, len(channels)),
    )


def _nullable(values: FloatArray) -> list[float | None]:
    """Floats with None for NaN (JSON and SQL know no NaN)."""
    return [None if math.isnan(v) else v for v in values.tolist()]


def _instrumental(candidates: Candidates, rows: IntArray) -> list[dict[str, float]]:
    """The known instrumental magnitudes of candidates ``rows``, by channel."""
    found: list[dict[str, float]] = [{} for _ in range(rows.size)]
    for channel, magnitudes in candidates.instrumental.items():
        values = magnitudes[rows]
        for i in np.flatnonzero(np.isfinite(values)).tolist():
            found[i][channel] = float(values[i])
    return found


def _earlier_night(session: Session, stored: IntArray, night_id: int | None) -> IntArray:
    """``night_id`` where it began before the ``stored`` first night (-1: none), else the
    stored one (rule 5: nights may register out of order)."""
    if night_id is None:
        return stored
    others = np.unique(stored[(stored >= 0) & (stored != night_id)]).tolist()
    if not others:  # a night's stars registered again: nothing to compare
        return stored
    query = select(Night.id, Night.local_date).where(Night.id.in_([night_id, *others]))
    dates = dict(session.execute(query).all())
    later = [n for n in others if n in dates and dates[n] > dates[night_id]]
    return np.where(np.isin(stored, later), night_id, stored)


def _fill_in(
    session: Session, candidates: Candidates, known: _Known, match: IntArray,
    night_id: int | None,
) -> int:  # fmt: skip
    """Give matched stars what they lacked (rule 5); returns how many changed."""
    rows = np.flatnonzero(match >= 0)
    k = match[rows]
    old_first = known.first_night[k]
    first = _earlier_night(session, old_first, night_id)
    old_gaia, old_flags, old_mags = known.gaia[k], known.flags[k], known.mags[k]
    gaia = np.where(old_gaia >= 0, old_gaia, candidates.gaia_source_id[rows])
    offered = np.column_stack([candidates.g[rows], candidates.bp[rows], candidates.rp[rows]])
    gained = np.isnan(old_mags) & ~np.isnan(offered)
    mags = np.where(gained, offered, old_mags)
    new_flags = candidates.flags[rows]
    only = int(StarFlag.CATALOGUE_ONLY)
    flags = ((old_flags | new_flags) & ~only) | (old_flags & new_flags & only)
    which = np.flatnonzero((gaia != old_gaia) | gained.any(axis=1) | (flags != old_flags)
                           | (first != old_first))  # fmt: skip
    update_columns(session, Star.__table__, {
        "id": known.id[k[which]].tolist(),
        "gaia_source_id": [None if g < 0 else g for g in gaia[which].tolist()],
        "g": _nullable(mags[which, 0]), "bp": _nullable(mags[which, 1]),
        "rp": _nullable(mags[which, 2]), "flags": flags[which].tolist(),
        "first_night_id": [None if f < 0 else f for f in first[which].tolist()],
    })  # fmt: skip
    offers = np.array([candidates.instrumental[c][rows] for c in candidates.instrumental])
    lacking = np.isnan(known.channels[k]) & ~np.isnan(offers.T.reshape(known.channels[k].shape))
    gaining = np.flatnonzero(lacking.any(axis=1))
    ids = known.id[k[gaining]].tolist()
    stored: dict[int, dict[str, Any] | None] = {}
    for start in range(0, len(ids), _CHUNK):  # the whole JSON only of those gaining a channel
        chunk = ids[start : start + _CHUNK]
        stored.update(session.execute(
            select(Star.id, Star.instrumental).where(Star.id.in_(chunk))).all())  # fmt: skip
    offer = _instrumental(candidates, rows[gaining])
    merged = [{**o, **(stored.get(i) or {})} for i, o in zip(ids, offer, strict=True)]
    update_columns(session, Star.__table__, {"id": ids, "instrumental": merged})
    return len(set(which.tolist()) | set(gaining.tolist()))


def _insert_stars(
    session: Session, candidates: Candidates, new: IntArray, *, field_id: int,
    night_id: int | None,
) -> IntArray:  # fmt: skip
    """Create the new stars (rule 4) in bulk; returns their ids in order."""
    ids = insert_columns(
        session, Star.__table__,
        {
            "gaia_source_id": [None if g < 0 else g for g in
                               candidates.gaia_source_id[new].tolist()],
            "ra": candidates.ra[new].tolist(), "dec": candidates.dec[new].tolist(),
            "g": _nullable(candidates.g[new]), "bp": _nullable(candidates.bp[new]),
            "rp": _nullable(candidates.rp[new]),
            "instrumental": [m or None for m in _instrumental(candidates, new)],
            "flags": candidates.flags[new].tolist(),
        },
        constants={"epoch": candidates.epoch, "first_night_id": night_id,
                   "first_field_id": field_id, "created_at": utcnow()},
        new_ids=True,
    )  # fmt: skip
    return np.array(ids, dtype=np.int64)


def _field_indices(
    session: Session, field_id: int, night_id: int | None, star_ids: IntArray,
    known_ids: Iterable[int],
) -> tuple[IntArray, int]:  # fmt: skip
    """Rule 6: the field index of each star, adding the missing ones in order; returns
    the indices and how many were added."""
    wanted = sorted(set(known_ids))
    query = select(FieldStar.star_id, FieldStar.star_index).where(FieldStar.field_id == field_id)
    if len(wanted) <= _CHUNK:  # a few: an IN list; most of a field: all its stars
        query = query.where(FieldStar.star_id.in_(wanted))
    index_of: dict[int, int] = dict(session.execute(query).all()) if wanted else {}
    last = session.scalar(
        select(func.max(FieldStar.star_index)).where(FieldStar.field_id == field_id)
    )
    indices = np.fromiter(
        (index_of.get(s, -1) for s in star_ids.tolist()), np.int64, star_ids.size
    )
    missing = np.flatnonzero(indices < 0)
    indices[missing] = (-1 if last is None else last) + 1 + np.arange(missing.size)
    insert_columns(
        session, FieldStar.__table__,
        {"star_index": indices[missing].tolist(), "star_id": star_ids[missing].tolist()},
        constants={"field_id": field_id, "added_night_id": night_id},
    )  # fmt: skip
    return indices, int(missing.size)


def register_stars(
    session: Session,
    *,
    field_id: int,
    night_id: int | None,
    candidates: Candidates,
    match_radius_deg: float,
) -> Registered:
    """Give each candidate its star and its index in field ``field_id`` (the rules of
    this module's docstring), registered by night ``night_id`` (None: no night).

    Parameters
    ----------
    session
        The registration holds the registry lock from its first statement until this
        session's transaction ends: commit soon.
    field_id, night_id
        Ids of the field and the night whose stack the candidates come from.
    candidates
        The stars to register.
    match_radius_deg
        A candidate within this of a known star is that star, deg (a few arcsec, in
        (0, :data:`MAX_MATCH_RADIUS`]).

    Raises
    ------
    ValueError
        ``match_radius_deg`` is out of range.
    NotFoundError
        The field or the night does not exist, or the registry row is missing.
    """
    if not 0.0 < match_radius_deg <= MAX_MATCH_RADIUS:
        raise ValueError(
            f"match_radius_deg must be in (0, {MAX_MATCH_RADIUS}] deg, got "
            f"{match_radius_deg!r} (a few arcsec, e.g. 2/3600; was it given in arcsec?)"
        )
    version = _lock(session)
    if session.scalar(select(Field.id).where(Field.id == field_id)) is None:
        raise NotFoundError(f"no field with id {field_id!r}: register stars of a known field")
    if (
        night_id is not None
        and session.scalar(select(Night.id).where(Night.id == night_id)) is None
    ):
        raise NotFoundError(f"no night with id {night_id!r}")
    if len(candidates) == 0:
        return Registered(np.empty(0, np.int64), np.empty(0, np.int64), 0, 0, version)
    known = _known_stars(session, candidates, match_radius_deg)
    match = match_one_to_one(
        ra=candidates.ra, dec=candidates.dec, gaia=candidates.gaia_source_id,
        known_id=known.id, known_ra=known.ra, known_dec=known.dec, known_gaia=known.gaia,
        radius=match_radius_deg,
    )  # fmt: skip
    matched, new = np.flatnonzero(match >= 0), np.flatnonzero(match < 0)
    if _fill_in(session, candidates, known, match, night_id):
        session.expire_all()  # ORM objects of those stars are stale now
    star_ids = np.empty(len(candidates), dtype=np.int64)
    star_ids[matched] = known.id[match[matched]]
    star_ids[new] = _insert_stars(session, candidates, new, field_id=field_id, night_id=night_id)
    indices, added = _field_indices(
        session, field_id, night_id, star_ids, star_ids[matched].tolist()
    )
    star_ids.flags.writeable = indices.flags.writeable = False
    return Registered(star_ids, indices, int(new.size), added, version)


def registry_version(session: Session) -> int:
    """The number of registrations so far (the star registry's version)."""
    version = session.scalar(select(StarRegistry.version).where(StarRegistry.id == 1))
    return 0 if version is None else int(version)


def _field_row(session: Session, field: int | str) -> tuple[int, str]:
    """(id, name) of a field given by id or name (a name of digits only is tried as an id
    too, as the command line gives both as text)."""
    query = select(Field.id, Field.name)
    if isinstance(field, int):
        row = session.execute(query.where(Field.id == field)).first()
    else:
        row = session.execute(query.where(Field.name == field)).first()
        if row is None and field.isdigit():
            row = session.execute(query.where(Field.id == int(field))).first()
    if row is None:
        raise NotFoundError(
            f"no field named or numbered {field!r}: `autowisp stars list` lists the fields"
        )
    return int(row[0]), str(row[1])


def _channel_key(channel: str) -> tuple[int, str]:
    order = _CHANNEL_ORDER.index(channel) if channel in _CHANNEL_ORDER else len(_CHANNEL_ORDER)
    return order, channel


def field_stars(session: Session, field_id: int) -> FieldStars:
    """The stars of field ``field_id`` ordered by star index, in one query (no ORM object
    per row); raises :class:`NotFoundError` for an unknown field."""
    _field_row(session, int(field_id))
    rows = session.execute(
        select(FieldStar.star_id, FieldStar.star_index, Star.ra, Star.dec, Star.epoch,
               Star.gaia_source_id, Star.g, Star.bp, Star.rp, Star.flags, Star.first_night_id,
               Star.instrumental)
        .join(Star, Star.id == FieldStar.star_id)
        .where(FieldStar.field_id == field_id)
        .order_by(FieldStar.star_index)
    ).all()  # fmt: skip
    count = len(rows)
    columns = list(zip(*rows, strict=True)) if rows else [()] * 12

    def ints(values: tuple[Any, ...]) -> IntArray:
        return np.fromiter((-1 if v is None else v for v in values), np.int64, count)

    def floats(values: tuple[Any, ...]) -> FloatArray:
        return np.array(values, dtype=np.float64).reshape(count)  # None becomes NaN

    channels = sorted({c for m in columns[11] if m for c in m}, key=_channel_key)
    instrumental = {
        channel: floats(tuple(None if m is None else m.get(channel) for m in columns[11]))
        for channel in channels
    }
    return FieldStars(
        field_id=int(field_id),
        star_id=ints(columns[0]), star_index=ints(columns[1]), ra=floats(columns[2]),
        dec=floats(columns[3]), epoch=floats(columns[4]), gaia_source_id=ints(columns[5]),
        g=floats(columns[6]), bp=floats(columns[7]), rp=floats(columns[8]),
        flags=ints(columns[9]), first_night_id=ints(columns[10]), instrumental=instrumental,
    )  # fmt: skip


@dataclass(frozen=True)
class Export:
    """An exported star list: its file, field, number of stars and registry version."""

    path: Path
    field_id: int
    field_name: str
    stars: int
    registry_version: int


def _night_dates(session: Session, night_ids: IntArray) -> npt.NDArray[np.str_]:
    """ISO local date of each night id ('' for -1)."""
    wanted = sorted(set(night_ids[night_ids >= 0].tolist()))
    dates: dict[int, str] = {}
    for start in range(0, len(wanted), _CHUNK):
        rows = session.execute(
            select(Night.id, Night.local_date).where(Night.id.in_(wanted[start : start + _CHUNK]))
        )
        dates.update((int(i), d.isoformat()) for i, d in rows)
    return np.array([dates.get(i, "") for i in night_ids.tolist()], dtype="U10")


def export_stars(session: Session, field: int | str, path: str | os.PathLike[str]) -> Export:
    """Write the star list of ``field`` (id or name) to ``path`` atomically: a FITS binary
    table for ``.fits``, CSV for ``.csv`` (the format is :mod:`autowisp.io.star_export`'s).

    Raises
    ------
    ValueError
        ``path`` has another suffix.
    NotFoundError
        There is no such field.
    """
    star_export_format(path)  # a bad suffix fails before any query
    field_id, name = _field_row(session, field)
    for _attempt in range(5):  # the version must label exactly the stars read
        version = registry_version(session)
        stars = field_stars(session, field_id)
        if registry_version(session) == version:
            break
    else:
        raise TransientError(
            f"registrations kept committing while the stars of field {name} were read: "
            "export again"
        )
    columns: dict[str, np.ndarray] = {
        column: getattr(stars, column)
        for column in ("star_index", "star_id", "gaia_source_id", "ra", "dec", "epoch", "g",
                     "bp", "rp")
    }  # fmt: skip
    columns.update({f"mag_{c}": values for c, values in stars.instrumental.items()})
    columns["flags"] = stars.flags
    columns["first_night"] = _night_dates(session, stars.first_night_id)
    write_star_export(path, columns, field_name=name, field_id=field_id,
                    registry_version=version, exported=utcnow())  # fmt: skip
    return Export(Path(path), field_id, name, len(stars), version)
