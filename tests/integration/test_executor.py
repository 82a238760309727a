"""The local executor on a DAG of test steps: order, barriers, retries, dead tasks, reruns.

The steps are registered here, not in the package. Each appends what it did to a log
file so the test can check order and count executions across worker processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from autowisp.db.models import Configuration, ImageType, Scope, Task, TaskState
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.errors import PermanentError, TransientError
from autowisp.ingest.ingest import ingest_paths
from autowisp.io.atomic import write_bytes_atomic
from autowisp.pipeline.local import run_local
from autowisp.pipeline.runner import RunPolicy
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
from autowisp.steps.registry import Registry

POLICY = RunPolicy(max_attempts=3, backoff_seconds=0.05, lease_seconds=30)


def _log(context: StepContext, event: str) -> None:
    log = Path(context.parameters["log"])
    with open(log, "a") as stream:
        stream.write(
            json.dumps(
                {"step": context.step, "target": context.target, "event": event, "t": time.time()}
            )
            + "\n"
        )


class Produce(Step):
    """Image step: fails once (transient) on frame 2, always (permanent) on frame 3."""

    name = "produce"
    scope = Scope.IMAGE
    image_types = frozenset({ImageType.OBJECT})
    parameters = (Parameter("log", ""), Parameter("flaky", ""), Parameter("broken", ""))

    def run(self, context: StepContext) -> StepResult:
        _log(context, "start")
        name = context.image.path.name
        if name == context.parameters["broken"]:
            raise PermanentError(f"{name} is unusable")
        marker = Path(context.parameters["log"]).with_name(f"flaky-{name}")
        if name == context.parameters["flaky"] and not marker.exists():
            marker.write_text("failed once")
            raise TransientError(f"{name}: the disk hiccupped")
        path = context.output_path("txt")
        write_bytes_atomic(path, f"{context.image.id}\n".encode())
        _log(context, "end")
        return StepResult(path, {"value": context.image.id})


class Refine(Step):
    name = "refine"
    scope = Scope.IMAGE
    inputs = ("produce",)
    image_types = frozenset({ImageType.OBJECT})
    parameters = (Parameter("log", ""), Parameter("factor", 2))

    def run(self, context: StepContext) -> StepResult:
        _log(context, "start")
        [upstream] = context.inputs["produce"]
        value = int(upstream.output_path.read_text()) * context.parameters["factor"]
        path = context.output_path("txt")
        write_bytes_atomic(path, f"{value}\n".encode())
        _log(context, "end")
        return StepResult(path, {"value": value})


class Combine(Step):
    name = "combine"
    scope = Scope.NIGHT
    inputs = ("refine",)
    queue = "heavy"
    image_types = frozenset({ImageType.OBJECT})
    parameters = (Parameter("log", ""),)

    def run(self, context: StepContext) -> StepResult:
        _log(context, "start")
        values = [p.qc["value"] for p in context.inputs["refine"]]
        _log(context, "end")
        return StepResult(None, {"used": len(values), "sum": sum(values)})


REGISTRY = Registry([Produce, Refine, Combine])


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _tasks(url: str) -> dict[tuple[str, str], Task]:
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(Configuration.active.is_(True))
        ).all()
        return {(name, task.target): task for name, task in rows}


@pytest.fixture
def night(db_url, small_night, tmp_path):
    """One camera's night ingested: 6 object frames (and calibration frames)."""
    camera = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    ingest_paths(db_url, [camera], close=True)
    return db_url


def test_dag_order_barrier_retry_dead_and_reruns(night, tmp_path):
    url = night
    log = tmp_path / "events.log"
    params = {
        "produce": {"log": str(log), "flaky": "object_0002.fits", "broken": "object_0003.fits"},
        "refine": {"log": str(log)},
        "combine": {"log": str(log)},
    }
    storage = tmp_path / "storage"
    summary = run_local(url, storage, REGISTRY, step_parameters=params, jobs=2, policy=POLICY)
    tasks = _tasks(url)
    produce = {k[1]: t for k, t in tasks.items() if k[0] == "produce"}
    assert len(produce) == 6  # object frames only
    by_name = {}
    with session_scope(url) as session:
        from autowisp.db.models import Image

        for target, task in produce.items():
            by_name[Path(session.get(Image, task.image_id).path).name] = target
    flaky, broken = by_name["object_0002.fits"], by_name["object_0003.fits"]
    # The transient failure was retried and succeeded; the permanent one is dead.
    assert produce[flaky].state is TaskState.DONE and produce[flaky].attempts == 2
    assert produce[broken].state is TaskState.DEAD and produce[broken].attempts == 1
    assert "object_0003.fits is unusable" in produce[broken].last_error
    assert produce[broken].error_kind.value == "permanent"
    # Its downstream task is excluded, with the reason; the others ran.
    refine = {k[1]: t for k, t in tasks.items() if k[0] == "refine"}
    assert refine[broken].state is TaskState.EXCLUDED
    assert "produce" in refine[broken].last_error and "dead" in refine[broken].last_error
    assert sum(t.state is TaskState.DONE for t in refine.values()) == 5
    # The barrier ran once, on the 5 frames that were done, after all of them.
    [combine] = [t for k, t in tasks.items() if k[0] == "combine"]
    assert combine.state is TaskState.DONE and combine.qc["used"] == 5
    events = _events(log)
    refine_ends = [e["t"] for e in events if e["step"] == "refine" and e["event"] == "end"]
    combine_start = next(e["t"] for e in events if e["step"] == "combine")
    assert combine_start >= max(refine_ends)
    for target, task in refine.items():
        if task.state is TaskState.DONE:
            assert task.started_at >= produce[target].finished_at
            assert task.qc["value"] == 2 * produce[target].qc["value"]
    assert summary.outcomes == {"done": 5 + 5 + 1, "failed": 1, "dead": 1}
    assert summary.excluded == 1

    # Nothing changed: running again does nothing.
    again = run_local(url, storage, REGISTRY, step_parameters=params, jobs=2, policy=POLICY)
    assert again.executed == 0 and again.planned == 0
    assert len(_events(log)) == len(events)

    # A parameter of refine changes: refine and combine run again, produce does not.
    params["refine"]["factor"] = 3
    rerun = run_local(url, storage, REGISTRY, step_parameters=params, jobs=2, policy=POLICY)
    new_events = _events(log)[len(events) :]
    assert {e["step"] for e in new_events} == {"refine", "combine"}
    assert rerun.planned == 6 + 1  # new refine rows for 6 frames and a new combine row
    tasks = _tasks(url)
    combine = next(t for k, t in tasks.items() if k[0] == "combine")
    assert combine.state is TaskState.DONE and combine.qc["sum"] == 3 * sum(
        t.qc["value"] for k, t in tasks.items() if k[0] == "produce" and t.state is TaskState.DONE
    )
    # Going back to the old parameters reuses the old, finished tasks.
    params["refine"]["factor"] = 2
    back = run_local(url, storage, REGISTRY, step_parameters=params, jobs=2, policy=POLICY)
    assert back.executed == 0 and back.planned == 0


def test_transient_failures_end_dead_after_the_bound(night, tmp_path):
    class AlwaysFlaky(Step):
        name = "always_flaky"
        scope = Scope.IMAGE
        image_types = frozenset({ImageType.OBJECT})

        def run(self, context):
            raise OSError("storage unreachable")

    registry = Registry([AlwaysFlaky])
    summary = run_local(night, tmp_path, registry, jobs=2, policy=POLICY)
    tasks = _tasks(night)
    assert len(tasks) == 6
    for task in tasks.values():
        assert task.state is TaskState.DEAD and task.attempts == 3
        assert task.last_error.startswith("gave up after 3 attempts: OSError: storage unreachable")
    assert summary.outcomes == {"failed": 12, "dead": 6}


def test_worker_process_killed_is_retried_then_dead(night, tmp_path):
    class Crash(Step):
        name = "crash"
        scope = Scope.IMAGE
        image_types = frozenset({ImageType.OBJECT})

        def run(self, context):
            import os
            import signal

            if context.image.path.name == "object_0001.fits":
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
            return StepResult(None, {})

    summary = run_local(night, tmp_path, Registry([Crash]), jobs=1, policy=POLICY)
    tasks = _tasks(night)
    states = sorted(t.state.value for t in tasks.values())
    assert states == ["dead"] + ["done"] * 5, summary
    dead = next(t for t in tasks.values() if t.state is TaskState.DEAD)
    assert dead.attempts == 3 and "worker process died" in dead.last_error
