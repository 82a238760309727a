"""Ingest files into the database: one row per distinct file, accepted or rejected.

The same bytes ingested twice change nothing (the sha256 is unique). A file that cannot
be used is recorded as rejected with the reason, and the rest of the upload goes on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from autowisp.core.bayer import channels
from autowisp.db.models import (
    Camera,
    CameraType,
    Channel,
    Image,
    ImageState,
    Night,
    Observatory,
)
from autowisp.db.nights import close_nights, join_night
from autowisp.db.session import session_scope
from autowisp.errors import AutowispError, ConfigurationError, IngestError
from autowisp.ingest.classify import FrameFacts, classify
from autowisp.ingest.headers import FITS_SUFFIXES, read_raw_file, sha256_of
from autowisp.io.keywords import header_serial

__all__ = [
    "IngestReport",
    "find_files",
    "get_or_create_camera",
    "get_or_create_camera_type",
    "get_or_create_night",
    "get_or_create_observatory",
    "ingest_paths",
]


@dataclass
class IngestReport:
    """What an ingest did."""

    ingested: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    nights: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    hashes: dict[Path, str] = field(default_factory=dict, repr=False)
    unreadable: dict[Path, str] = field(default_factory=dict, repr=False)

    @property
    def seen(self) -> int:
        return self.ingested + self.duplicates + len(self.rejected)


def _is_fits_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(FITS_SUFFIXES) and not name.startswith(".")


def find_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named on the command line, and FITS files found under named directories."""
    for given in paths:
        path = Path(given).absolute()
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                if (
                    found.is_file()
                    and _is_fits_name(found)
                    and not any(part.startswith(".") for part in found.relative_to(path).parts)
                ):
                    yield found
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")


# Get-or-create of the rows frames share. Each runs in a short transaction of its own
# (committed at once), never in an ingest batch's: a batch then holds no lock on these
# unique keys while it reads its files, so two ingests never wait for each other's batch
# (or deadlock) over a camera or night. INSERT ... ON CONFLICT DO NOTHING then SELECT:
# when another ingest creates the same row at the same time, both get its id.


def _insert_unless_present(
    session: Session, model: type[Any], values: Mapping[str, Any], keys: Sequence[str]
) -> bool:
    """``INSERT ... ON CONFLICT (keys) DO NOTHING``; whether the row was inserted.

    Only a conflict on ``keys`` (a unique constraint of ``model``'s table) is ignored: any other
    IntegrityError is raised.
    """
    dialect = session.get_bind().dialect.name
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(model)
    elif dialect == "sqlite":
        statement = sqlite.insert(model)
    else:
        raise ConfigurationError(
            f"ingest supports PostgreSQL and SQLite databases, not {dialect!r}: "
            "set the database URL to a postgresql:// or sqlite:/// one"
        )
    result = session.connection().execute(
        statement.values(dict(values)).on_conflict_do_nothing(index_elements=list(keys))
    )
    return result.rowcount == 1


def _get_or_create(
    session: Session, model: type[Any], key: Mapping[str, Any], values: Mapping[str, Any]
) -> tuple[int, bool]:
    """Id of ``model``'s row whose unique columns equal ``key`` (made from ``key`` and
    ``values`` if there is none), and whether this call made it."""
    where = [getattr(model, column) == value for column, value in key.items()]
    found = session.scalar(select(model.id).where(*where))
    if found is not None:
        return found, False
    created = _insert_unless_present(session, model, {**key, **values}, list(key))
    found = session.scalar(select(model.id).where(*where))
    if found is None:
        raise AutowispError(
            f"the {model.__tablename__} row {dict(key)} was deleted while ingest was "
            "creating it: run the ingest again"
        )
    return found, created


def get_or_create_observatory(
    session: Session, *, name: str, latitude: float, longitude: float, height: float
) -> int:
    """Id of the observatory called ``name`` (lat, lon in deg, height in m if new)."""
    values = {"latitude": latitude, "longitude": longitude, "height": height}
    return _get_or_create(session, Observatory, {"name": name}, values)[0]


def get_or_create_camera_type(
    session: Session, *, make: str, model: str, layout: str, width: int, height: int
) -> int:
    """Id of the camera type ``model`` with Bayer ``layout`` (or MONO); a new type gets
    its channels in the same transaction, so they are made once, by whoever made it.
    ``width`` and ``height`` (px) are of the first frame seen."""
    type_id, created = _get_or_create(
        session,
        CameraType,
        {"model": model, "layout": layout},
        {"make": make, "width": width, "height": height},
    )
    if created:
        session.execute(
            insert(Channel),
            [
                {
                    "camera_type_id": type_id,
                    "name": c.name,
                    "colour": c.colour,
                    "y0": c.y0,
                    "x0": c.x0,
                }
                for c in channels(layout)
            ],
        )
    return type_id


def get_or_create_camera(
    session: Session,
    *,
    serial: str,
    camera_type_id: int,
    observatory: Callable[[Session], int | None],
) -> int:
    """Id of the camera ``serial`` of a type; ``observatory(session)`` gives the site's
    id for a new camera (and is not called for a known one)."""
    key = {"serial": serial, "camera_type_id": camera_type_id}
    found = session.scalar(
        select(Camera.id).where(Camera.serial == serial, Camera.camera_type_id == camera_type_id)
    )
    if found is not None:
        return found
    return _get_or_create(session, Camera, key, {"observatory_id": observatory(session)})[0]


def get_or_create_night(
    session: Session, *, camera_id: int, local_date: dt.date, upload_path: str
) -> int:
    """Id of a camera's night of ``local_date`` (uploaded to ``upload_path`` if new)."""
    return _get_or_create(
        session,
        Night,
        {"camera_id": camera_id, "local_date": local_date},
        {"upload_path": upload_path},
    )[0]


def _observatory_id(session: Session, facts: FrameFacts) -> int | None:
    if facts.latitude is None or facts.longitude is None:
        return None
    return get_or_create_observatory(
        session,
        name=f"{facts.latitude:.3f},{facts.longitude:.3f}",
        latitude=facts.latitude,
        longitude=facts.longitude,
        height=facts.height or 0.0,
    )


def _camera_id(database_url: str, facts: FrameFacts, width: int, height: int) -> int:
    with session_scope(database_url) as session:
        type_id = get_or_create_camera_type(
            session,
            make=facts.make,
            model=facts.model,
            layout=facts.layout,
            width=width,
            height=height,
        )
    with session_scope(database_url) as session:
        return get_or_create_camera(
            session,
            serial=facts.serial,
            camera_type_id=type_id,
            observatory=lambda short: _observatory_id(short, facts),
        )


def _night_id(database_url: str, camera_id: int, facts: FrameFacts, upload: Path) -> int:
    with session_scope(database_url) as session:
        return get_or_create_night(
            session, camera_id=camera_id, local_date=facts.night, upload_path=str(upload)
        )


def _known_layouts(session: Session) -> dict[str, str]:
    rows = session.execute(select(Camera.serial, CameraType.layout).join(CameraType))
    return {serial: layout for serial, layout in rows}


BATCH = 200  # files per transaction


def ingest_paths(
    database_url: str,
    paths: Iterable[str | Path],
    *,
    rules: Mapping[str, Any] | None = None,
    progress: Callable[[Path, int, int], None] | None = None,
    close: bool = False,
    marker: str | None = "UPLOAD_COMPLETE",
) -> IngestReport:
    """Ingest files and directories; ``progress(path, done, total)`` after each file.

    A new frame joins its night's current generation (a closed night reopens as the next
    one: :func:`autowisp.db.nights.join_night`). The nights of files in a directory
    holding the upload ``marker`` file are closed at the end (complete: their barriers may
    run); with ``close``, every night the files went to is (the operator says the upload
    is complete, as ``autowisp run PATH`` does).

    Files are read in batches of :data:`BATCH` and each batch's rows committed in one
    transaction, so an interrupted ingest loses at most a batch's work (which a rerun
    redoes: nothing is half-recorded). A bad file is recorded as rejected and never
    undoes another. Cameras, nights and the like are made in short transactions of
    their own as files need them, so concurrent ingests (an operator's and the upload
    watcher's) neither lose frames nor wait for each other's batches.
    """
    paths = [Path(p) for p in paths]
    files = list(dict.fromkeys(find_files(paths)))  # a file named twice is read once
    report = IngestReport()
    rules = rules or {}
    cache: dict[tuple, int] = {}  # camera and night ids found so far in this ingest
    marked_files: list[str] = []  # sha256 of the files under an upload marker
    roots = [Path(p).absolute() for p in paths if Path(p).is_dir()]
    markers: dict[Path, bool] = {}

    def beside_marker(path: Path) -> bool:
        """Whether the file's directory, or one above it within a given directory,
        holds the upload marker."""
        for directory in path.parents:
            if not any(directory.is_relative_to(root) for root in roots):
                return path.parent == directory and _has(directory)
            if _has(directory):
                return True
        return False

    def _has(directory: Path) -> bool:
        if directory not in markers:
            markers[directory] = (directory / str(marker)).exists()
        return markers[directory]

    with session_scope(database_url) as session:
        layouts = _known_layouts(session)
    for first in range(0, len(files), BATCH):
        batch = files[first : first + BATCH]
        with session_scope(database_url) as session:
            known = set(
                session.scalars(
                    select(Image.sha256).where(Image.sha256.in_(_hashes(batch, report)))
                )
            )
            rows = []
            for number, path in enumerate(batch, start=first + 1):
                if path in report.hashes and (close or (marker and beside_marker(path))):
                    marked_files.append(report.hashes[path])
                row = _image_row(database_url, session, path, rules, layouts, known, report, cache)
                if row is not None:
                    rows.append(row)
                if progress is not None:
                    progress(path, number, len(files))
            # This batch's writes, all in one go: in sha256 order, so two ingests storing
            # the same files lock them in the same order and never deadlock.
            joined: dict[int, list[str]] = {}
            for row in sorted(rows, key=lambda values: values["sha256"]):
                if _store(session, row, report) and row.get("night_id") is not None:
                    joined.setdefault(row["night_id"], []).append(row["sha256"])
            # Then the nights the new frames joined, in id order (no deadlock either).
            for night_id in sorted(joined):
                generation = join_night(session, night_id)
                session.execute(
                    update(Image)
                    .where(Image.sha256.in_(joined[night_id]))
                    .values(generation=generation)
                )
    with session_scope(database_url) as session:
        # A marker closes the nights of its directory's frames, new or known (the marker
        # usually arrives after the files, and the directory is ingested again).
        marked = {
            night
            for start in range(0, len(marked_files), 1000)
            for night in session.scalars(
                select(Image.night_id).where(
                    Image.sha256.in_(marked_files[start : start + 1000]),
                    Image.night_id.is_not(None),
                )
            )
        }
    complete = marked | report.nights if close else marked
    if complete:
        with session_scope(database_url) as session:
            reason = "upload complete (autowisp run / close)" if close else f"{marker} file"
            report.closed = set(close_nights(session, complete, reason=reason))
    return report


def _hashes(batch: list[Path], report: IngestReport) -> list[str]:
    hashes = []
    for path in batch:
        try:
            report.hashes[path] = sha256_of(path)
            hashes.append(report.hashes[path])
        except OSError as error:
            report.unreadable[path] = str(error)
    return hashes


def _image_row(
    database_url: str,
    session: Session,
    path: Path,
    rules: Mapping[str, Any],
    layouts: dict[str, str],
    known: set[str],
    report: IngestReport,
    cache: dict[tuple, int],
) -> dict[str, Any] | None:
    """The image row to store for ``path``: accepted or rejected with the reason; None
    for a file already known (counted as a duplicate) or unreadable (rejected here)."""
    if path in report.unreadable:
        report.rejected.append((str(path), f"cannot read the file: {report.unreadable[path]}"))
        return None
    sha = report.hashes.pop(path)
    if sha in known:
        report.duplicates += 1
        return None
    known.add(sha)  # the same bytes again in this batch are a duplicate of this file
    row: dict[str, Any] = {
        "path": str(path),
        "sha256": sha,
        "size_bytes": path.stat().st_size,
        "state": ImageState.INGESTED,
        "header": {},
    }
    try:
        raw = read_raw_file(path, sha)
        row.update(header=raw.header, width=raw.width, height=raw.height)
        facts = classify(raw.header, path, rules, layouts)
    except IngestError as error:
        row.update(state=ImageState.REJECTED, reject_reason=str(error))
        # Operators ask which frames of a camera were rejected: keep a known one.
        serial = header_serial(row["header"])
        if serial:
            row["camera_id"] = session.scalar(
                select(Camera.id).where(Camera.serial == serial).limit(1)
            )
        return row
    camera_key = ("camera", facts.model, facts.layout, facts.serial)
    if camera_key not in cache:
        cache[camera_key] = _camera_id(database_url, facts, raw.width, raw.height)
    camera_id = cache[camera_key]
    night_key = ("night", camera_id, facts.night)
    if night_key not in cache:
        cache[night_key] = _night_id(database_url, camera_id, facts, path.parent)
    layouts[facts.serial] = facts.layout
    row.update(
        camera_id=camera_id,
        night_id=cache[night_key],
        image_type=facts.image_type,
        exptime=facts.exptime,
        date_obs=facts.date_obs,
        jd=facts.jd_mid,
        ra=facts.ra,
        dec=facts.dec,
    )
    return row


def _store(session: Session, row: dict[str, Any], report: IngestReport) -> bool:
    """Insert an image row unless its bytes (sha256) are stored already; count it; whether
    it is a new accepted frame.

    Only the sha256 conflict makes a duplicate (another ingest stored the same bytes
    meanwhile); any other IntegrityError is raised, and the batch rolled back.
    """
    if not _insert_unless_present(session, Image, row, ["sha256"]):
        report.duplicates += 1
        return False
    if row["state"] is ImageState.REJECTED:
        report.rejected.append((row["path"], row.get("reject_reason") or ""))
        return False
    report.ingested += 1
    report.nights.add(row["night_id"])
    return True
