"""Ingest files into the database: one row per distinct file, accepted or rejected.

The same bytes ingested twice change nothing (the sha256 is unique). A file that cannot
be used is recorded as rejected with the reason, and the rest of the upload goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
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
from autowisp.errors import IngestError
from autowisp.ingest.classify import FrameFacts, classify
from autowisp.ingest.headers import FITS_SUFFIXES, read_raw_file, sha256_of
from autowisp.io.keywords import header_serial

__all__ = ["IngestReport", "find_files", "ingest_paths"]


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


def _observatory_id(session: Session, facts: FrameFacts) -> int | None:
    if facts.latitude is None or facts.longitude is None:
        return None
    name = f"{facts.latitude:.3f},{facts.longitude:.3f}"
    found = session.scalar(select(Observatory.id).where(Observatory.name == name))
    if found is None:
        observatory = Observatory(
            name=name,
            latitude=facts.latitude,
            longitude=facts.longitude,
            height=facts.height or 0.0,
        )
        session.add(observatory)
        session.flush()
        found = observatory.id
    return found


def _camera_id(session: Session, facts: FrameFacts, width: int, height: int) -> int:
    type_id = session.scalar(
        select(CameraType.id).where(
            CameraType.model == facts.model, CameraType.layout == facts.layout
        )
    )
    if type_id is None:
        camera_type = CameraType(
            make=facts.make, model=facts.model, width=width, height=height, layout=facts.layout
        )
        camera_type.channels = [
            Channel(name=ch.name, colour=ch.colour, y0=ch.y0, x0=ch.x0)
            for ch in channels(facts.layout)
        ]
        session.add(camera_type)
        session.flush()
        type_id = camera_type.id
    camera_id = session.scalar(
        select(Camera.id).where(Camera.serial == facts.serial, Camera.camera_type_id == type_id)
    )
    if camera_id is None:
        camera = Camera(
            serial=facts.serial,
            camera_type_id=type_id,
            observatory_id=_observatory_id(session, facts),
        )
        session.add(camera)
        session.flush()
        camera_id = camera.id
    return camera_id


def _night_id(session: Session, camera_id: int, facts: FrameFacts, upload: Path) -> int:
    night_id = session.scalar(
        select(Night.id).where(Night.camera_id == camera_id, Night.local_date == facts.night)
    )
    if night_id is None:
        night = Night(camera_id=camera_id, local_date=facts.night, upload_path=str(upload))
        session.add(night)
        session.flush()
        night_id = night.id
    return night_id


def _known_layouts(session: Session) -> dict[str, str]:
    rows = session.execute(select(Camera.serial, CameraType.layout).join(CameraType))
    return {serial: layout for serial, layout in rows}


BATCH = 200  # files per transaction; each file has its own savepoint


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

    The nights of files in a directory holding the upload ``marker`` file are closed
    afterwards (complete: their barriers may run); with ``close``, every night the files
    went to is (the operator says the upload is complete, as ``autowisp run PATH`` does).

    Files are committed in batches of :data:`BATCH`, each in its own savepoint, so one
    bad file never undoes another and an interrupted ingest loses at most a batch's
    work (which a rerun redoes: nothing is half-recorded).
    """
    files = list(find_files(paths))
    report = IngestReport()
    rules = rules or {}
    cache: dict[tuple, int] = {}  # camera and night ids found so far in this ingest
    marked: set[int] = set()  # nights of files beside an upload marker
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
            for number, path in enumerate(batch, start=first + 1):
                night = _ingest_one(session, path, rules, layouts, known, report, cache)
                if night is not None and marker and (path.parent / marker).exists():
                    marked.add(night)
                if progress is not None:
                    progress(path, number, len(files))
    complete = report.nights if close else marked
    if complete:
        with session_scope(database_url) as session:
            reason = "upload complete (autowisp run / --close)" if close else f"{marker} file"
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


def _ingest_one(
    session: Session,
    path: Path,
    rules,
    layouts,
    known: set[str],
    report: IngestReport,
    cache: dict[tuple, int],
) -> int | None:
    """Ingest one file; the night it joined (None if rejected or already known)."""
    if path in report.unreadable:
        report.rejected.append((str(path), f"cannot read the file: {report.unreadable[path]}"))
        return None
    sha = report.hashes.pop(path)
    if sha in known:
        report.duplicates += 1
        return None
    row = Image(
        path=str(path),
        sha256=sha,
        size_bytes=path.stat().st_size,
        state=ImageState.INGESTED,
        header={},
    )
    try:
        with session.begin_nested():
            try:
                raw = read_raw_file(path, sha)
                row.header, row.width, row.height = raw.header, raw.width, raw.height
                facts = classify(raw.header, path, rules, layouts)
                camera_key = ("camera", facts.model, facts.layout, facts.serial)
                camera_id = cache.get(camera_key) or _camera_id(
                    session, facts, raw.width, raw.height
                )
                night_key = ("night", camera_id, facts.night)
                night_id = cache.get(night_key) or _night_id(
                    session, camera_id, facts, path.parent
                )
                row.camera_id, row.night_id = camera_id, night_id
                row.generation = join_night(session, night_id)
                row.image_type, row.exptime = facts.image_type, facts.exptime
                row.date_obs, row.jd, row.ra, row.dec = (
                    facts.date_obs,
                    facts.jd_mid,
                    facts.ra,
                    facts.dec,
                )
                layouts[facts.serial] = facts.layout
            except IngestError as error:
                row.state, row.reject_reason = ImageState.REJECTED, str(error)
                row.night_id = row.image_type = None
                # Operators ask which frames of a camera were rejected: keep a known one.
                serial = header_serial(row.header)
                row.camera_id = (
                    session.scalar(select(Camera.id).where(Camera.serial == serial).limit(1))
                    if serial
                    else None
                )
            session.add(row)
            session.flush()
    except IntegrityError:
        report.duplicates += 1  # another ingest stored the same bytes meanwhile
        return None
    known.add(sha)
    if row.state is ImageState.INGESTED:
        cache[camera_key], cache[night_key] = camera_id, night_id
    if row.state is ImageState.REJECTED:
        report.rejected.append((str(path), row.reject_reason or ""))
        return None
    report.ingested += 1
    report.nights.add(row.night_id)  # type: ignore[arg-type]
    return row.night_id
