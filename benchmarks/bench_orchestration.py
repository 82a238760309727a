"""Benchmark the orchestration at scale: a scheduler cycle over 10⁶ tasks, and claim → finish.

- Scheduler cycle time (target < 1 s) with about 10⁶ task rows over 1,000 closed nights
  of 10 cameras in PostgreSQL, the default pipeline's steps (frame_qc, night_qc, the
  three masters, calibrate, astrometry): 36 calibration and 320 object frames a night,
  990 nights finished (2 % of astrometry dead), 5 nights with their masters done and
  calibrate ready, 5 nights just ingested (frame_qc ready, the rest waiting): a few
  thousand ready tasks. ``schedule_once`` runs with a no-op publisher; the first cycle
  is timed on its own, then the median of further cycles, each after the claimed tasks
  were put back to pending (so every cycle plans, triages, claims and publishes the
  same work).
- Claim → finish throughput of real Celery workers on a no-op step, 1 and 2 workers
  (:func:`benchmarks.bench_service.noop_throughput`).

Rows are written with set-based SQL (INSERT ... SELECT over generate_series), then the
database is vacuumed (as autovacuum does after bulk updates). Prints a table; no
assertions on wall-clock time.

Usage (from the repository root): python -m benchmarks.bench_orchestration
  [--nights 1000] [--objects 320] [--cycles 5] [--noop 2000]
PostgreSQL: AUTOWISP_BENCH_POSTGRES (default the local server; a throwaway database is
created and dropped); Redis as for benchmarks.bench_service (db 14, flushed).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, select, text

from benchmarks.bench_service import exit_on_sigterm, noop_throughput
from benchmarks.scratch import scratch_database

CALIBRATION = 12  # each of bias, dark and flat, per night
CAMERAS = 10
READY_MASTERS = 5  # nights whose masters are done and calibrate is ready
JUST_INGESTED = 5  # nights whose frame_qc is ready and the rest waits


def fill(url: str, *, nights: int, objects: int) -> dict[str, int]:
    """Cameras, closed nights, frames and the default pipeline's task rows; the number of
    task rows by state."""
    from autowisp.db.migrate import upgrade
    from autowisp.db.models import Configuration, Step
    from autowisp.db.session import session_scope
    from autowisp.pipeline.local import apply_configuration
    from autowisp.steps.registry import default_registry

    upgrade(url)
    apply_configuration(url, default_registry(), {})
    with session_scope(url) as session:
        ids = {
            name: (step_id, configuration_id)
            for name, step_id, configuration_id in session.execute(
                select(Step.name, Step.id, Configuration.id)
                .join(Configuration, Configuration.step_id == Step.id)
                .where(Configuration.active.is_(True))
            )
        }
    per_night = 3 * CALIBRATION + objects
    finished = nights - READY_MASTERS - JUST_INGESTED
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO camera_type (make, model, width, height, layout) "
                "VALUES ('Canon', 'EOS 100D', 5184, 3456, 'RGGB')"
            )
        )
        c.execute(
            text(
                "INSERT INTO camera (serial, camera_type_id) "
                f"SELECT lpad(g::text, 12, '0'), 1 FROM generate_series(1, {CAMERAS}) g"
            )
        )
        c.execute(
            text(
                "INSERT INTO night (id, camera_id, local_date, created_at, state, generation,"
                " closed_generation, closed_at, close_reason)"
                f" SELECT n, 1 + (n - 1) % {CAMERAS}, DATE '2022-01-01' + (n - 1) / {CAMERAS},"
                " now(), 'closed', 1, 1, now(), 'bench'"
                f" FROM generate_series(1, {nights}) n"
            )
        )
        # Frame k of night n has id (n - 1) * per_night + k: bias, dark, flat, objects.
        c.execute(
            text(
                "INSERT INTO image (id, path, sha256, size_bytes, state, night_id, camera_id,"
                " image_type, exptime, jd, header, ingested_at, generation)"
                " SELECT (n - 1) * :per + k, '/data/' || n || '/' || k || '.fits',"
                " md5(n || ':' || k) || md5(k || ':' || n), 1000, 'ingested', n,"
                f" 1 + (n - 1) % {CAMERAS},"
                " CASE WHEN k <= :cal THEN 'bias' WHEN k <= 2 * :cal THEN 'dark'"
                " WHEN k <= 3 * :cal THEN 'flat' ELSE 'object' END,"
                " 120, 2459580.5 + n + k / 1000.0, '{}', now(), 1"
                " FROM generate_series(1, :nights) n CROSS JOIN generate_series(1, :per) k"
            ),
            {"per": per_night, "cal": CALIBRATION, "nights": nights},
        )
        for table in ("night", "image"):
            c.execute(text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))

        def tasks(step: str, *, generation: int, where: str, state: str) -> None:
            step_id, configuration_id = ids[step]
            if step in ("night_qc", "master_bias", "master_dark", "master_flat"):
                target, image, source = (
                    "'night:' || n",
                    "NULL",
                    f"generate_series(1, {nights}) n WHERE {where.format(n='n')}",
                )
            else:
                kinds = "'object'" if step in ("calibrate", "astrometry") else None
                target, image = "'image:' || i.id", "i.id"
                source = f"image i WHERE {where.format(n='i.night_id')}"
                if kinds:
                    source += f" AND i.image_type = {kinds}"
            c.execute(
                text(
                    "INSERT INTO task (step_id, configuration_id, target, generation, image_id,"
                    " night_id, state, attempts, created_at, finished_at)"
                    f" SELECT {step_id}, {configuration_id}, {target}, {generation}, {image},"
                    f" {'n' if image == 'NULL' else 'i.night_id'}, '{state}',"
                    f" {0 if state == 'pending' else 1}, now(),"
                    f" {'NULL' if state == 'pending' else 'now()'} FROM {source}"
                )
            )

        done_nights = "{n} <= " + str(finished)
        masters_done = "{n} <= " + str(finished + READY_MASTERS)
        fresh = "{n} > " + str(finished + READY_MASTERS)
        tasks("frame_qc", generation=0, where=masters_done, state="done")
        tasks("frame_qc", generation=0, where=fresh, state="pending")
        for step in ("night_qc", "master_bias", "master_dark", "master_flat"):
            tasks(step, generation=1, where=masters_done, state="done")
            tasks(step, generation=1, where=fresh, state="pending")
        tasks("calibrate", generation=1, where=done_nights, state="done")
        tasks("calibrate", generation=1, where="{n} > " + str(finished), state="pending")
        tasks("astrometry", generation=1, where=done_nights, state="done")
        tasks("astrometry", generation=1, where="{n} > " + str(finished), state="pending")
        # Steady state: every frame, night and configuration planned already (their tasks
        # exist), as a running deployment's are.
        c.execute(text("UPDATE image SET planned_at = now()"))
        c.execute(text("UPDATE night SET planned_generation = closed_generation"))
        c.execute(text("UPDATE configuration SET planned_at = now()"))
        c.execute(
            text(
                "UPDATE task SET state = 'dead', error_kind = 'permanent',"
                " last_error = 'too few catalogue stars matched (bench)'"
                " WHERE step_id = :step AND state = 'done' AND image_id % 50 = 0"
            ),
            {"step": ids["astrometry"][0]},
        )
        counts = dict(c.execute(text("SELECT state, count(*) FROM task GROUP BY state")).all())
    # The bulk updates above leave every row's old version behind; a running deployment's
    # autovacuum removes them, so the steady state is measured after VACUUM.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return counts


def cycle_times(url: str, *, cycles: int) -> tuple[float, list[float], object]:
    """The first cycle's time, the further cycles' times and the last cycle's report."""
    from autowisp.pipeline.scheduler import schedule_once
    from autowisp.steps.registry import default_registry

    registry = default_registry()

    def publish(messages) -> None:
        """No-op: the cycle's work without a broker."""

    def depth(queue: str) -> int:
        return 0

    publish.depth = depth  # type: ignore[attr-defined]
    engine = create_engine(url)
    times, report = [], None
    for cycle in range(cycles + 1):
        start = time.perf_counter()
        # The first cycle looks at every pending task (as a scheduler's first does); the
        # others at the nights their wakeups name, as in steady operation.
        report = schedule_once(url, registry, publish, night_quiet_seconds=None, full=cycle == 0)
        times.append(time.perf_counter() - start)
        with engine.begin() as c:  # untimed: workers finish what was queued, as the runner
            # does (done, and a wakeup for the task's night), so the next cycle has work
            finished = c.execute(
                text("UPDATE task SET state = 'done', qc = '{}' WHERE state = 'queued' "
                     "RETURNING night_id, step_id")
            ).all()  # fmt: skip
            if finished:
                c.execute(
                    text("INSERT INTO wakeup (night_id, step_id) VALUES (:n, :s)"),
                    [{"n": n, "s": s} for n, s in set(finished)],
                )
    engine.dispose()
    return times[0], times[1:], report


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=1000)
    parser.add_argument("--objects", type=int, default=320)
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--noop", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    with scratch_database() as url:
        start = time.perf_counter()
        counts = fill(url, nights=args.nights, objects=args.objects)
        built = time.perf_counter() - start
        total = sum(counts.values())
        states = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
        rows.append(("task rows", f"{total:,} ({states})"))
        rows.append(("nights / build time", f"{args.nights:,} / {built:.0f} s"))
        first, further, report = cycle_times(url, cycles=args.cycles)
        rows.append(("first scheduler cycle (all pending)", f"{first:.2f} s"))
        rows.append(
            (
                f"scheduler cycle, median of {len(further)}",
                f"{statistics.median(further):.2f} s (min {min(further):.2f}, max "
                f"{max(further):.2f}; target < 1 s)",
            )
        )
        rows.append(
            (
                "  each cycle",
                f"created {report.created}, enqueued {report.enqueued}, "
                f"waiting {report.pending_waiting}, excluded {report.excluded}",
            )
        )
    for name, value in rows:  # the cycle's figures, before the slower worker runs
        print(f"  {name}: {value}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        one = noop_throughput(args.noop, 1, Path(scratch))
        two = noop_throughput(args.noop, 2, Path(scratch))
    rows.append(("claim -> finish, 1 worker", f"{args.noop / one:.0f} tasks/s"))
    rows.append(("claim -> finish, 2 workers", f"{args.noop / two:.0f} tasks/s"))
    rows.append(("speed-up 2 vs 1 worker", f"{one / two:.2f}x"))
    width = max(len(name) for name, _ in rows)
    print("\norchestration benchmark")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
