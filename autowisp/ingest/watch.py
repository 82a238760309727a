"""Auto-ingest: watch an upload directory and ingest each night once it is complete.

An upload unit is a directory holding FITS files. It is ingested when its files have
stopped changing (same names, sizes and modification times) for ``quiet_seconds``, or
at once when a completion marker file appears in it. Files still being written are
therefore never read half-way. Filesystem events (watchdog) trigger a rescan at once,
and the directory is rescanned every ``rescan_seconds`` anyway, since network mounts
miss events. A unit that changes again later (files added) is ingested again; files
already known are skipped by their checksum.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autowisp.ingest.ingest import IngestReport, _is_fits_name

__all__ = ["UploadWatcher", "snapshot"]

log = logging.getLogger(__name__)

Snapshot = dict[Path, tuple[int, int]]


def snapshot(root: Path) -> dict[Path, Snapshot]:
    """FITS files under ``root`` grouped by directory: path → (size, mtime ns)."""
    units: dict[Path, Snapshot] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not _is_fits_name(path):
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # moved away meanwhile
        units.setdefault(path.parent, {})[path] = (stat.st_size, stat.st_mtime_ns)
    return units


@dataclass
class _Unit:
    files: Snapshot
    changed_at: float
    ingested: Snapshot | None = None
    marked: bool = False


@dataclass
class UploadWatcher:
    """Decides when each upload unit is complete and hands it to ``ingest``."""

    root: Path
    ingest: Callable[[list[Path]], IngestReport]
    quiet_seconds: float = 60.0
    marker: str = "UPLOAD_COMPLETE"
    clock: Callable[[], float] = time.monotonic
    units: dict[Path, _Unit] = field(default_factory=dict)

    def scan(self) -> list[tuple[Path, IngestReport]]:
        """Look once; ingest the units that are complete. Returns what was ingested."""
        now = self.clock()
        done = []
        for directory, files in snapshot(self.root).items():
            unit = self.units.get(directory)
            if unit is None or unit.files != files:
                unit = self.units[directory] = _Unit(files, now, unit.ingested if unit else None)
            complete = (directory / self.marker).exists()
            # Ingested already, unless the upload marker appeared since (it closes the
            # directory's nights: ingest it again, its files are known and skipped).
            if unit.ingested == files and (unit.marked or not complete):
                continue
            if not complete and now - unit.changed_at < self.quiet_seconds:
                continue
            report = self.ingest(sorted(files))
            unit.ingested = dict(files)
            unit.marked = complete
            done.append((directory, report))
            log.info(
                "ingested %s: %d new, %d known, %d rejected",
                directory,
                report.ingested,
                report.duplicates,
                len(report.rejected),
            )
        return done

    def run(
        self,
        *,
        rescan_seconds: float = 30.0,
        stop: threading.Event | None = None,
        use_events: bool = True,
    ) -> None:
        """Scan until ``stop`` is set: on filesystem events and every ``rescan_seconds``."""
        stop = stop or threading.Event()
        wake = threading.Event()
        observer = None
        if use_events:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            class Handler(FileSystemEventHandler):
                def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
                    wake.set()

            observer = Observer()
            observer.schedule(Handler(), str(self.root), recursive=True)
            observer.start()
        try:
            next_scan = 0.0
            while not stop.is_set():
                now = self.clock()
                pending = any(u.ingested != u.files for u in self.units.values())
                if wake.is_set() or now >= next_scan or pending:
                    wake.clear()
                    self.scan()
                    next_scan = now + rescan_seconds
                # While a unit is settling, look again soon enough to honour the quiet time.
                wake.wait(min(rescan_seconds, max(self.quiet_seconds / 4, 0.05)))
        finally:
            if observer is not None:
                observer.stop()
                observer.join()
