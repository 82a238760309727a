"""Two schedulers at once never queue a task twice; publishing failures lose nothing."""

from __future__ import annotations

import multiprocessing
import time

import pytest
from sqlalchemy import func, select

from autowisp.db.models import Scope, Task, TaskState
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.pipeline.local import apply_configuration
from autowisp.pipeline.scheduler import schedule_once
from autowisp.steps.base import Step, StepResult
from autowisp.steps.registry import Registry


class _A(Step):
    name = "a"
    scope = Scope.IMAGE

    def run(self, context):
        return StepResult()


class _B(Step):
    name = "b"
    scope = Scope.IMAGE

    def run(self, context):
        return StepResult()


class _C(Step):
    name = "c"
    scope = Scope.IMAGE

    def run(self, context):
        return StepResult()


REGISTRY = Registry([_A, _B, _C])


def _schedule(url: str, out: str, cycles: int, barrier) -> None:
    def publish(messages):
        with open(out, "a") as stream:
            stream.writelines(f"{task_id}\n" for task_id, _, _ in messages)
        time.sleep(0.01)  # a broker round trip, so the two interleave

    barrier.wait(60)
    for _ in range(cycles):
        schedule_once(url, REGISTRY, publish, batch=7)


def test_two_schedulers_never_queue_a_task_twice(pg_url, small_night, tmp_path):
    ingest_paths(pg_url, [small_night], close=True)  # 76 frames x 3 independent steps = 228 tasks
    apply_configuration(pg_url, REGISTRY, {})
    context = multiprocessing.get_context("spawn")
    outputs = [tmp_path / "one.txt", tmp_path / "two.txt"]
    barrier = context.Barrier(2)
    processes = [
        context.Process(target=_schedule, args=(pg_url, str(out), 2, barrier)) for out in outputs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    published = [int(line) for out in outputs if out.exists() for line in out.read_text().split()]
    assert len(published) == 228
    assert len(set(published)) == len(published), "a task was queued twice"
    # Both schedulers did part of the work.
    assert all(out.exists() and out.read_text() for out in outputs)


def test_a_failed_publish_gives_the_tasks_back(pg_url, small_night):
    ingest_paths(pg_url, [sorted(p for p in small_night.iterdir() if p.is_dir())[0]])
    apply_configuration(pg_url, REGISTRY, {})

    def broken(messages):
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        schedule_once(pg_url, REGISTRY, broken)
    with session_scope(pg_url) as session:
        states = dict(session.execute(select(Task.state, func.count()).group_by(Task.state)).all())
    assert states == {TaskState.PENDING: 3 * 38}
