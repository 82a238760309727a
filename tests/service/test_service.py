"""The distributed service end to end: scheduler + real Celery workers on Redis and PostgreSQL."""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
from sqlalchemy import select

from autowisp.db.models import Configuration, Image, Task, TaskState
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.pipeline.local import run_local
from autowisp.steps.registry import default_registry
from tests.service.conftest import wait_for
from tests.service.soak import same_datasets, same_hdus
from tests.service.steps import read_events

STEPS = "tests.service.steps:REGISTRY"


def _camera_dir(small_night: Path) -> Path:
    return sorted(p for p in small_night.iterdir() if p.is_dir())[0]


def _outputs(url: str) -> dict[tuple[str, str], tuple[str | None, dict]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Image.path, Task.output_path, Task.qc, Task.state)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .outerjoin(Image, Image.id == Task.image_id)
            .where(Configuration.active.is_(True))
        ).all()
    # Astrometry may fail on these small frames (few catalogue stars), and then the
    # frame's photometry cannot run; the rest may not fail.
    solved = {
        path for step, path, *_, state in rows if step == "astrometry" and state is TaskState.DONE
    }
    problems = [
        (step, path, state)
        for step, path, *_, state in rows
        if state is not TaskState.DONE
        and step != "astrometry"
        and not (step == "photometry" and path not in solved)
    ]
    assert not problems, problems
    return {
        (step, Path(path).name if path else "night"): (output, qc, state)
        for step, path, output, qc, state in rows
    }


def _slow_toml(log: Path, seconds: float) -> str:
    return f'[steps.slow]\nlog = "{log}"\nseconds = {seconds}\n[steps.gather]\nlog = "{log}"\n'


def _ends_once(log: Path, expected_targets: int) -> collections.Counter:
    ends = collections.Counter(e["target"] for e in read_events(log) if e["event"] == "end")
    assert len(ends) == expected_targets, ends
    assert set(ends.values()) == {1}, f"a task finished more than once: {ends}"
    return ends


def test_night_through_scheduler_and_two_workers_matches_local_executor(
    pg_url, broker_url, small_night, service_factory, tmp_path
):
    upload = _camera_dir(small_night)
    ingest_paths(pg_url, [upload], close=True)
    local_url = f"sqlite:///{tmp_path / 'local.sqlite'}"
    from autowisp.db.migrate import upgrade

    upgrade(local_url)
    ingest_paths(local_url, [upload], close=True)
    run_local(local_url, tmp_path / "local-storage", default_registry(), jobs=2)

    service = service_factory(
        pg_url, broker_url, registry="autowisp.steps.registry:default_registry"
    )
    service.worker("w1")
    service.worker("w2")
    service.scheduler()
    # frame_qc on 38 frames, night_qc, three masters, calibrate and astrometry on 6
    # frames, the night's star list, photometry on 6 frames, the night's magfit and the
    # light curves of the field's one shard (fewer stars than a shard holds) and the
    # field's statistics
    service.wait_finished(38 + 1 + 3 + 6 + 6 + 1 + 6 + 1 + 1 + 1, timeout=300)
    served, local = _outputs(pg_url), _outputs(local_url)
    assert served.keys() == local.keys() and len(served) == 64
    hosts = set()
    for key, (path, qc, state) in served.items():
        local_path, local_qc, local_state = local[key]
        assert state == local_state, key
        if path is None:
            continue
        if key[0] in ("photometry", "magfit", "lightcurves", "lc_statistics"):
            assert qc == local_qc
            with h5py.File(path) as a, h5py.File(local_path) as b:
                same_datasets(a, b, path)
        elif key[0] == "frame_qc":
            assert qc == local_qc
            with h5py.File(path) as a, h5py.File(local_path) as b:
                for name in ("median", "noise", "saturated_fraction"):
                    np.testing.assert_array_equal(a[name][()], b[name][()])
        elif path.endswith(".fits"):  # masters and calibrated frames
            assert qc == local_qc
            same_hdus(path, local_path)
        else:
            ours, theirs = (
                json.loads(Path(path).read_text()),
                json.loads(Path(local_path).read_text()),
            )
            assert ours == theirs
    with session_scope(pg_url) as session:
        hosts = {pid for (pid,) in session.execute(select(Task.worker_pid))}
    assert len(hosts) >= 2  # both workers took part


def test_sigkill_worker_mid_task_is_done_once_by_another(
    pg_url, broker_url, small_night, service_factory, tmp_path
):
    ingest_paths(pg_url, [_camera_dir(small_night)], close=True)
    log = tmp_path / "events.log"
    service = service_factory(
        pg_url, broker_url, registry=STEPS, steps_toml=_slow_toml(log, 2.0), lease=4.0
    )
    service.worker("w1")
    service.worker("w2")
    service.scheduler()

    def running():
        with session_scope(pg_url) as session:
            return session.execute(
                select(Task.id, Task.worker_pid, Task.target).where(
                    Task.state == TaskState.RUNNING
                )
            ).first()

    task_id, pid, target = wait_for(running, 60, "a running task")
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)  # the pool process running the step, mid-write or sleep
    killed_at = time.time()
    service.wait_finished(6 + 1, timeout=180)
    with session_scope(pg_url) as session:
        task = session.get(Task, task_id)
        assert task.state is TaskState.DONE and task.attempts >= 2
        assert task.worker_pid != pid
        path = Path(task.output_path)
        image_id = task.image_id
    assert path.read_bytes() == f"{image_id}\n".encode() * 100_000  # intact
    ends = _ends_once(log, 6 + 1)
    starts = [e for e in read_events(log) if e["target"] == target and e["event"] == "start"]
    assert len(starts) >= 2 and starts[-1]["t"] > killed_at
    assert ends[target] == 1


def test_redis_restart_during_a_run(pg_url, own_redis, small_night, service_factory, tmp_path):
    ingest_paths(pg_url, [_camera_dir(small_night)], close=True)
    log = tmp_path / "events.log"
    service = service_factory(
        pg_url, own_redis.url, registry=STEPS, steps_toml=_slow_toml(log, 1.0), queued_timeout=6.0
    )
    service.worker("w1")
    service.worker("w2")
    service.scheduler()
    wait_for(lambda: sum(e["event"] == "end" for e in read_events(log)) >= 2, 60, "two tasks done")
    own_redis.stop()  # queued messages are lost: Redis keeps nothing on disk here
    time.sleep(3)
    own_redis.start()
    service.wait_finished(6 + 1, timeout=180)
    _ends_once(log, 6 + 1)


def test_postgres_restart_during_a_run(
    own_postgres, broker_url, small_night, service_factory, tmp_path
):
    from autowisp.db.migrate import upgrade

    url = own_postgres.url
    upgrade(url)
    ingest_paths(url, [_camera_dir(small_night)], close=True)
    log = tmp_path / "events.log"
    service = service_factory(
        url, broker_url, registry=STEPS, steps_toml=_slow_toml(log, 1.5), lease=10.0
    )
    service.worker("w1")
    service.worker("w2")
    service.scheduler()
    wait_for(lambda: any(e["event"] == "start" for e in read_events(log)), 60, "a task start")
    own_postgres.stop()  # while steps are running: their results must not be lost
    time.sleep(3)
    own_postgres.start()
    service.wait_finished(6 + 1, timeout=180)
    _ends_once(log, 6 + 1)
