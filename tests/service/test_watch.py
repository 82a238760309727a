"""Auto-ingest: a night copied in slowly is ingested once, complete, never half a file."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

from sqlalchemy import select

from autowisp.db.migrate import upgrade
from autowisp.db.models import Image
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.ingest.watch import UploadWatcher
from tests.service.conftest import wait_for


def _watch(tmp_path, upload: Path, quiet: float):
    url = f"sqlite:///{tmp_path / 'watch.sqlite'}"
    upgrade(url)
    calls: list[tuple[float, list[Path]]] = []

    def ingest(files):
        calls.append((time.time(), list(files)))
        return ingest_paths(url, files)

    watcher = UploadWatcher(upload, ingest, quiet_seconds=quiet)
    stop = threading.Event()
    thread = threading.Thread(
        target=watcher.run, kwargs={"rescan_seconds": 0.3, "stop": stop}, daemon=True
    )
    thread.start()
    return url, calls, stop, thread


def test_slow_copy_is_ingested_once_when_complete(tmp_path, small_night):
    source = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    frames = sorted(source.rglob("object_*.fits"))[:4] + sorted(source.rglob("bias_*.fits"))[:2]
    upload = tmp_path / "upload"
    night = upload / "cam" / "20240910"
    night.mkdir(parents=True)
    url, calls, stop, thread = _watch(tmp_path, upload, quiet=1.5)
    try:
        for frame in frames[:-1]:
            shutil.copy(frame, night / frame.name)
            time.sleep(0.5)  # slower than a rescan, faster than the quiet time
        # The last file arrives in two halves with a pause: it must not be read half-way.
        data = frames[-1].read_bytes()
        with open(night / frames[-1].name, "wb") as stream:
            stream.write(data[: len(data) // 2])
            stream.flush()
            time.sleep(0.9)
            stream.write(data[len(data) // 2 :])
        finished = time.time()
        wait_for(lambda: calls, 20, "the night to be ingested")
        time.sleep(2.0)  # nothing more happens afterwards
    finally:
        stop.set()
        thread.join(10)
    assert len(calls) == 1, calls
    called_at, files = calls[0]
    assert called_at >= finished + 1.5 - 0.1  # after the quiet time
    assert sorted(p.name for p in files) == sorted(f.name for f in frames)
    with session_scope(url) as session:
        stored = dict(session.execute(select(Image.path, Image.sha256)).all())
    assert len(stored) == len(frames)
    for frame in frames:
        assert stored[str(night / frame.name)] == hashlib.sha256(frame.read_bytes()).hexdigest()


def test_completion_marker_ingests_at_once(tmp_path, small_night):
    source = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    upload = tmp_path / "upload"
    night = upload / "n1"
    night.mkdir(parents=True)
    _, calls, stop, thread = _watch(tmp_path, upload, quiet=3600)
    try:
        for frame in sorted(source.rglob("object_*.fits"))[:3]:
            shutil.copy(frame, night / frame.name)
        time.sleep(0.8)
        assert not calls  # an hour of quiet time has not passed
        (night / "UPLOAD_COMPLETE").touch()
        wait_for(lambda: calls, 10, "ingest after the marker")
    finally:
        stop.set()
        thread.join(10)
    assert len(calls[0][1]) == 3


def test_a_marker_written_after_the_files_closes_their_night(tmp_path, small_night):
    """The observer writes UPLOAD_COMPLETE last: the watcher, which ingested the settled
    files already, ingests the directory again and the marker closes the night."""
    from autowisp.db.models import Night, NightState

    source = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    night_dir = tmp_path / "upload" / "cam" / "20240910"
    night_dir.mkdir(parents=True)
    for frame in sorted(source.rglob("object_*.fits"))[:2]:
        shutil.copy(frame, night_dir / frame.name)
    url = f"sqlite:///{tmp_path / 'watch.sqlite'}"
    upgrade(url)
    clock = [0.0]
    watcher = UploadWatcher(
        tmp_path / "upload", lambda files: ingest_paths(url, files), quiet_seconds=10.0,
        clock=lambda: clock[0],
    )  # fmt: skip
    watcher.scan()
    clock[0] = 11.0
    assert len(watcher.scan()) == 1  # settled: ingested, the night still open
    with session_scope(url) as session:
        assert session.scalar(select(Night.state)) is NightState.OPEN
    assert watcher.scan() == []  # nothing new
    (night_dir / "UPLOAD_COMPLETE").touch()
    [(_, report)] = watcher.scan()
    assert report.ingested == 0 and report.duplicates == 2 and report.closed
    with session_scope(url) as session:
        assert session.scalar(select(Night.state)) is NightState.CLOSED
    assert watcher.scan() == []  # and only once
