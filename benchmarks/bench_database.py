"""Benchmark ingest and the operators' queries.

- Ingest rate of 2,000 small FITS files (64×64 uint16) into the embedded SQLite and into
  PostgreSQL, against a baseline that only opens each header with astropy and hashes the
  file (the least any ingest must do), as a ratio.
- With 10⁶ task rows in PostgreSQL (200,000 frames × 5 steps, 20 nights): the
  pending-tasks query a scheduler runs (next 1,000 pending tasks of the current
  configurations), and the whole of ``autowisp status`` (collect_status).

Usage (from the repository root): python -m benchmarks.bench_database [--files N] [--tasks N]
  PostgreSQL from AUTOWISP_BENCH_POSTGRES (default the local server, database created
  and dropped here). Run from the repository root (python -m benchmarks.bench_database).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from sqlalchemy import create_engine, func, select, text

from benchmarks.scratch import scratch_database


def _files(directory: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        header = fits.Header()
        header["IMAGETYP"] = "object"
        header["EXPTIME"] = 120.0
        header["DATE-OBS"] = f"2024-09-11T{6 + i // 3600 % 12:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
        header["INSTRUME"] = "Canon EOS 100D"
        header["CAMSN"] = f"{i % 4:012d}"
        header["BAYERPAT"] = "RGGB"
        header["LONG-OBS"], header["LAT-OBS"] = -155.58, 19.54
        path = directory / f"frame_{i:05d}.fits"
        fits.PrimaryHDU(rng.integers(2000, 3000, (64, 64), dtype=np.uint16), header).writeto(path)
        paths.append(path)
    return paths


def _baseline(paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        hashlib.sha256(path.read_bytes()).hexdigest()
        fits.getheader(path)
    return time.perf_counter() - start


def _ingest(url: str, directory: Path) -> float:
    from autowisp.db.migrate import upgrade
    from autowisp.ingest.ingest import ingest_paths

    upgrade(url)
    start = time.perf_counter()
    report = ingest_paths(url, [directory])
    seconds = time.perf_counter() - start
    if report.ingested != len(list(directory.glob("*.fits"))):
        raise RuntimeError(f"ingest lost files: {report}")
    return seconds


def _fill_tasks(url: str, tasks: int) -> None:
    """Frames, nights and 5 steps' tasks written with set-based SQL."""
    from autowisp.db.migrate import upgrade

    upgrade(url)
    frames = tasks // 5
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO camera_type (make, model, width, height, layout) "
                "VALUES ('Canon', 'EOS 100D', 5184, 3456, 'RGGB')"
            )
        )
        c.execute(text("INSERT INTO camera (serial, camera_type_id) VALUES ('1', 1)"))
        c.execute(
            text(
                "INSERT INTO night (camera_id, local_date, created_at) "
                "SELECT 1, DATE '2024-01-01' + g, now() FROM generate_series(0, 19) g"
            )
        )
        c.execute(
            text(
                "INSERT INTO image (path, sha256, size_bytes, state, night_id, camera_id, image_type,"
                " exptime, header, ingested_at) SELECT '/data/f' || g, md5(g::text) || md5(g::text),"
                " 1000, 'ingested', 1 + g % 20, 1, 'object', 120, '{}', now()"
                f" FROM generate_series(1, {frames}) g"
            )
        )
        for number, name in enumerate(["a", "b", "c", "d", "e"], start=1):
            c.execute(
                text(
                    f"INSERT INTO step (name, scope, code_version) VALUES ('{name}', 'image', '1')"
                )
            )
            c.execute(
                text(
                    f"INSERT INTO configuration (step_id, version, parameters, active, created_at)"
                    f" VALUES ({number}, 'v{number}', '{{}}', true, now())"
                )
            )
            c.execute(
                text(
                    "INSERT INTO task (step_id, configuration_id, target, image_id, night_id, state,"
                    " attempts, created_at) SELECT :step, :step, 'image:' || g, g, 1 + g % 20,"
                    " (ARRAY['pending','done','done','done','failed','dead','running'])[1 + g % 7],"
                    f" 0, now() FROM generate_series(1, {frames}) g"
                ),
                {"step": number},
            )
        c.execute(text("UPDATE task SET last_error = 'boom' WHERE state IN ('failed', 'dead')"))
        c.execute(text("ANALYZE"))
    engine.dispose()


def _time(call, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    args = parser.parse_args()
    from autowisp.db.models import Configuration, Task, TaskState
    from autowisp.db.session import session_scope
    from autowisp.pipeline.status import collect_status

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "upload"
        directory.mkdir()
        paths = _files(directory, args.files)
        baseline = _baseline(paths)
        sqlite_s = _ingest(f"sqlite:///{scratch}/bench.sqlite", directory)
        with scratch_database() as url:
            postgres_s = _ingest(url, directory)
    print(
        f"ingest {args.files} files: sqlite {args.files / sqlite_s:.0f} files/s, "
        f"postgresql {args.files / postgres_s:.0f} files/s; header+sha256 baseline "
        f"{args.files / baseline:.0f} files/s (ingest/baseline time: sqlite "
        f"{sqlite_s / baseline:.1f}x, postgresql {postgres_s / baseline:.1f}x)"
    )

    with scratch_database() as url:
        start = time.perf_counter()
        _fill_tasks(url, args.tasks)
        fill = time.perf_counter() - start

        def pending() -> None:
            with session_scope(url) as session:
                rows = session.execute(
                    select(Task.id)
                    .join(Configuration, Configuration.id == Task.configuration_id)
                    .where(Configuration.active.is_(True), Task.state == TaskState.PENDING)
                    .order_by(Task.id)
                    .limit(1000)
                ).all()
                if not rows:
                    raise RuntimeError("the pending-tasks query returned nothing")

        def status() -> None:
            with session_scope(url) as session:
                collect_status(session)

        def count() -> None:
            with session_scope(url) as session:
                session.scalar(select(func.count()).select_from(Task))

        pending_s, status_s, count_s = _time(pending), _time(status, 3), _time(count, 3)
        print(
            f"{args.tasks} task rows (filled in {fill:.0f} s): pending-tasks query "
            f"{pending_s * 1000:.1f} ms, autowisp status {status_s * 1000:.0f} ms, "
            f"plain COUNT(*) of the table {count_s * 1000:.0f} ms "
            f"(status/COUNT {status_s / count_s:.1f}x)"
        )


if __name__ == "__main__":
    main()
