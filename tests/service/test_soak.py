"""Soak (short): three nights through a scheduler and two workers while a random worker is
SIGKILLed every ~8 s, Redis and PostgreSQL restart once each, and late frames reopen a
night whose barriers ran. Nothing may be lost, duplicated or read from the wrong
generation, and the products must equal a quiet local run's (see tests/service/soak.py;
the long version is benchmarks/bench_soak.py)."""

from __future__ import annotations

from tests.service.soak import soak


def test_soak_kills_restarts_and_late_frames(own_postgres, own_redis, tmp_path):
    report = soak(
        tmp_path,
        postgres=own_postgres,
        redis_server=own_redis,
        kill_interval=8.0,
        min_seconds=60.0,
        timeout=400.0,
    )
    print(report.line())
    assert report.kills >= 3 and report.redis_restarts == 1 and report.postgres_restarts == 1
    assert report.duplicates == 0 and report.shared_outputs == 0
    assert report.compared > 0
