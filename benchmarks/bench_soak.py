"""The soak, long: tests/service/test_soak.py's run for longer, with more frames.

Three (or ``--nights``) simulated nights through a scheduler and two real Celery workers
on a PostgreSQL cluster and a redis-server of its own; a random worker is SIGKILLed every
``--kill-interval`` s and restarted, Redis and PostgreSQL restart once each, late frames
reopen the first night after its barriers ran. The run lasts at least ``--duration`` s;
then every invariant of :func:`tests.service.soak.check_soak` is checked and the figures
are printed.

Usage (from the repository root, as root: the cluster runs as the postgres user):
  python -m benchmarks.bench_soak [--duration 600] [--kill-interval 20] [--frames 40]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from tests.service.conftest import OwnPostgres, OwnRedis
from tests.service.soak import soak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="at least, s")
    parser.add_argument("--kill-interval", type=float, default=20.0, help="s")
    parser.add_argument("--nights", type=int, default=3)
    parser.add_argument("--frames", type=int, default=40, help="object frames a night")
    args = parser.parse_args()
    pg_directory = Path(tempfile.mkdtemp(prefix="autowisp-pg-"))
    pg_directory.chmod(0o755)  # the postgres user must enter it
    postgres = OwnPostgres(pg_directory)
    postgres.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            redis_server = OwnRedis(Path(scratch))
            redis_server.start()
            try:
                report = soak(
                    Path(scratch),
                    postgres=postgres,
                    redis_server=redis_server,
                    kill_interval=args.kill_interval,
                    min_seconds=args.duration,
                    timeout=args.duration + 1800.0,
                    nights=args.nights,
                    frames=args.frames,
                )
            finally:
                redis_server.stop()
    finally:
        try:
            postgres.stop()
        finally:
            shutil.rmtree(pg_directory, ignore_errors=True)
    print(report.line())


if __name__ == "__main__":
    main()
