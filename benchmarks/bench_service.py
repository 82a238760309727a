"""Benchmark the distributed service on this machine (real PostgreSQL, Redis, workers).

- Enqueue rate: one scheduler cycle over 100,000 pending no-op tasks (plan, classify,
  claim with SKIP LOCKED, publish to Redis).
- End-to-end no-op throughput with 1 and 2 worker processes (2,000 tasks).
- A simulated night of 100 object frames at 1024² (plus 30 calibration frames) through
  the default pipeline with 1 worker, 2 workers, and the local executor (--jobs 2).

Usage (from the repository root): python -m benchmarks.bench_service [--tasks N] [--frames N]
PostgreSQL: AUTOWISP_BENCH_POSTGRES (default the local server); Redis db 14 of
AUTOWISP_BENCH_REDIS (default redis://127.0.0.1:6379), flushed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import redis
from sqlalchemy import create_engine, func, select, text

REPO = Path(__file__).resolve().parents[1]
BROKER = os.environ.get("AUTOWISP_BENCH_REDIS", "redis://127.0.0.1:6379") + "/14"

from autowisp.steps.base import Step, StepResult  # noqa: E402
from autowisp.steps.registry import Registry  # noqa: E402
from autowisp.vocabulary import Scope  # noqa: E402
from benchmarks.scratch import scratch_database  # noqa: E402


class Noop(Step):
    name = "noop"
    scope = Scope.IMAGE

    def run(self, context):
        return StepResult()


NOOP = Registry([Noop])


def _fake_frames(url: str, count: int) -> None:
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO camera_type (make, model, width, height, layout) "
                "VALUES ('Canon', 'EOS', 64, 64, 'RGGB')"
            )
        )
        c.execute(text("INSERT INTO camera (serial, camera_type_id) VALUES ('1', 1)"))
        c.execute(
            text(
                "INSERT INTO night (camera_id, local_date, created_at) "
                "VALUES (1, DATE '2024-09-10', now())"
            )
        )
        c.execute(
            text(
                "INSERT INTO image (path, sha256, size_bytes, state, night_id, camera_id, image_type,"
                " exptime, date_obs, jd, header, ingested_at) SELECT '/none/' || g,"
                " md5(g::text) || md5(g::text), 1, 'ingested', 1, 1, 'object', 1, now(), 2460000,"
                f" '{{}}', now() FROM generate_series(1, {count}) g"
            )
        )
    engine.dispose()


def _env(url: str, storage: Path, registry: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOWISP_")}
    env.update(
        AUTOWISP_DATABASE_URL=url,
        AUTOWISP_BROKER_URL=BROKER,
        AUTOWISP_STORAGE_ROOT=str(storage),
        AUTOWISP_REGISTRY=registry,
        AUTOWISP_HOME=str(storage.parent / "home"),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def _workers(env: dict, count: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autowisp.cli.main",
                "worker",
                "--concurrency",
                "1",
                "--name",
                f"bench{i}@%h",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd=REPO,
        )
        for i in range(count)
    ]


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, ``timeout``) into SystemExit, so that the ``finally``
    blocks stop the worker processes this benchmark started: left running, they would
    take the next run's messages from the same Redis database."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _stop(processes):
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(10)


def _wait_done(url: str, total: int, timeout: float = 1800) -> float:
    from autowisp.db.models import Task, TaskState
    from autowisp.db.session import session_scope

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        with session_scope(url) as session:
            done = session.scalar(
                select(func.count())
                .select_from(Task)
                .where(Task.state.in_([TaskState.DONE, TaskState.DEAD, TaskState.EXCLUDED]))
            )
        if done >= total:
            return time.perf_counter() - start
        time.sleep(0.05)
    raise TimeoutError(f"{total} tasks not finished in {timeout} s")


def enqueue_rate(tasks: int) -> None:
    from autowisp.db.migrate import upgrade
    from autowisp.pipeline.broker import celery_publisher
    from autowisp.pipeline.local import apply_configuration
    from autowisp.pipeline.scheduler import schedule_once

    databases = ExitStack()

    url = databases.enter_context(scratch_database())
    try:
        upgrade(url)
        _fake_frames(url, tasks)
        apply_configuration(url, NOOP, {})  # the cycle plans the rows, then queues them
        redis.Redis.from_url(BROKER).flushdb()
        publish = celery_publisher(BROKER)
        start = time.perf_counter()
        report = schedule_once(url, NOOP, publish)
        seconds = time.perf_counter() - start
        queued = redis.Redis.from_url(BROKER).llen("light")
        print(
            f"enqueue: {report.enqueued} tasks in {seconds:.1f} s = "
            f"{report.enqueued / seconds:.0f} tasks/s ({queued} messages in Redis)"
        )
    finally:
        redis.Redis.from_url(BROKER).flushdb()
        databases.close()


def noop_throughput(tasks: int, workers: int, scratch: Path) -> float:
    from autowisp.db.migrate import upgrade
    from autowisp.pipeline.broker import celery_publisher
    from autowisp.pipeline.local import apply_configuration
    from autowisp.pipeline.scheduler import schedule_once

    databases = ExitStack()

    url = databases.enter_context(scratch_database())
    processes = []
    try:
        upgrade(url)
        _fake_frames(url, tasks)
        apply_configuration(url, NOOP, {})
        redis.Redis.from_url(BROKER).flushdb()
        processes = _workers(
            _env(url, scratch / f"s{workers}", "benchmarks.bench_service:NOOP"), workers
        )
        time.sleep(4)  # workers up
        schedule_once(url, NOOP, celery_publisher(BROKER))
        seconds = _wait_done(url, tasks)
        print(f"no-op throughput, {workers} worker(s): {tasks / seconds:.0f} tasks/s")
        return seconds
    finally:
        _stop(processes)
        redis.Redis.from_url(BROKER).flushdb()
        databases.close()


def night(frames: int, scratch: Path) -> None:
    from autowisp.db.migrate import upgrade
    from autowisp.ingest.ingest import ingest_paths
    from autowisp.pipeline.local import run_local
    from autowisp.simulate.night import NightConfig, simulate_night
    from autowisp.steps.registry import default_registry

    upload = scratch / "night"
    simulate_night(upload, NightConfig(frames=frames, width=1024, height=1024, seed=3))
    total = frames + 30 + 1
    timings = {}
    local = f"sqlite:///{scratch / 'local.sqlite'}"
    upgrade(local)
    ingest_paths(local, [upload], close=True)
    start = time.perf_counter()
    run_local(local, scratch / "local-storage", default_registry(), jobs=2)
    timings["local --jobs 2"] = time.perf_counter() - start
    for workers in (1, 2):
        databases = ExitStack()
        url = databases.enter_context(scratch_database())
        processes = []
        try:
            upgrade(url)
            ingest_paths(url, [upload], close=True)
            redis.Redis.from_url(BROKER).flushdb()
            env = _env(
                url, scratch / f"storage{workers}", "autowisp.steps.registry:default_registry"
            )
            processes = _workers(env, workers)
            time.sleep(4)
            scheduler = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "autowisp.cli.main",
                    "scheduler",
                    "--interval",
                    "0.5",
                    "--quiet",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                cwd=REPO,
            )
            processes.append(scheduler)
            timings[f"{workers} worker(s)"] = _wait_done(url, total)
        finally:
            _stop(processes)
            redis.Redis.from_url(BROKER).flushdb()
            databases.close()
    print(
        f"night of {frames} frames at 1024² ({total} tasks): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + f"; speed-up 2 vs 1 worker {timings['1 worker(s)'] / timings['2 worker(s)']:.2f}x, "
        f"2 workers vs local {timings['local --jobs 2'] / timings['2 worker(s)']:.2f}x"
    )


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--noop", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        enqueue_rate(args.tasks)
        one = noop_throughput(args.noop, 1, Path(scratch))
        two = noop_throughput(args.noop, 2, Path(scratch))
        print(f"no-op speed-up 2 vs 1 worker: {one / two:.2f}x")
        night(args.frames, Path(scratch))


if __name__ == "__main__":
    main()
