"""The local executor: every pending task to completion with a process pool, in order.

It applies the same transitions as the distributed service (pending → queued →
running → done/failed/dead, retries with backoff, leases) and calls the same
:func:`autowisp.pipeline.runner.run_task`; only where tasks run differs.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from autowisp.db.fields import DEFAULT_FIELD_RADIUS
from autowisp.db.models import Configuration, ErrorKind, Night, NightState, Task, TaskState
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.pipeline import state
from autowisp.pipeline.configuration import activate, resolve_versions
from autowisp.pipeline.cycle import housekeeping, triage
from autowisp.pipeline.runner import DEFAULT_POLICY, RunPolicy, run_task
from autowisp.steps.registry import Registry

__all__ = ["RunSummary", "Waiting", "apply_configuration", "run_local"]

_WORKER: dict[str, Any] = {}


@dataclass(frozen=True)
class Waiting:
    """A task left waiting when a run stopped, and why."""

    task_id: int
    step: str
    target: str
    reason: str


@dataclass
class RunSummary:
    """Outcome counts of one local run, and what was left waiting and why."""

    planned: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    seconds: float = 0.0
    waiting: list[Waiting] = field(default_factory=list)
    open_nights: list[tuple[int, str]] = field(default_factory=list)

    @property
    def executed(self) -> int:
        return sum(self.outcomes.values())


def apply_configuration(
    database_url: str, registry: Registry, step_parameters: Mapping[str, Any] | None
) -> dict[str, Configuration]:
    """Make ``step_parameters`` (defaults where absent) the active configuration."""
    versions = resolve_versions(registry, step_parameters or {})
    with session_scope(database_url) as session:
        return activate(session, registry, versions)


def _init_worker(
    registry: Registry, database_url: str, storage_root: Path, policy: RunPolicy
) -> None:
    _WORKER.update(registry=registry, url=database_url, storage=storage_root, policy=policy)


def _work(task_id: int) -> tuple[int, str | None]:
    outcome = run_task(
        task_id,
        database_url=_WORKER["url"],
        storage_root=_WORKER["storage"],
        registry=_WORKER["registry"],
        policy=_WORKER["policy"],
    )
    return task_id, outcome.value if outcome else None


def _worker_lost(url: str, task_id: int, error: Exception, policy: RunPolicy) -> str | None:
    """A pool process died: a task it had started counts an attempt (it may be the cause,
    like a frame that always runs out of memory); one still queued goes back to pending.
    The executor owned the dead process, so it presents the task's lease token itself."""
    with session_scope(url) as session:
        if state.requeue(session, task_id):
            return None
        token = state.lease_token(session, task_id)
        if token is None:
            return None
        outcome = state.fail(
            session,
            task_id,
            token,
            kind=ErrorKind.TRANSIENT,
            max_attempts=policy.max_attempts,
            backoff_seconds=policy.backoff_seconds,
            error=f"worker process died while running the task ({error}); out of memory?",
        )
    return outcome.value if outcome else None


def run_local(
    database_url: str,
    storage_root: Path,
    registry: Registry,
    *,
    step_parameters: Mapping[str, Any] | None = None,
    jobs: int = 2,
    policy: RunPolicy = DEFAULT_POLICY,
    nights: Iterable[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    poll_seconds: float = 0.2,
    night_quiet_seconds: float | None = None,
    field_radius: float = DEFAULT_FIELD_RADIUS,
) -> RunSummary:
    """Run every pending task (of ``nights``, or all) with ``step_parameters`` as the
    active configuration, until nothing is left that can run.

    ``progress(finished, total)`` is called as tasks finish. What is left waiting (and
    why), and the nights still open, are in the summary.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs!r}")
    started = time.monotonic()
    configurations = apply_configuration(database_url, registry, step_parameters)
    night_list = None if nights is None else sorted(set(nights))
    summary = RunSummary()
    current = [c.id for c in configurations.values()]
    with session_scope(database_url) as session:
        # Tasks queued by an earlier, interrupted run are ours to run again.
        session.execute(
            Task.__table__.update()
            .where(Task.state == TaskState.QUEUED, Task.configuration_id.in_(current))
            .values(state=TaskState.PENDING)
        )
    context = multiprocessing.get_context("fork")
    in_flight: dict[Future[tuple[int, str | None]], int] = {}
    backlog: deque[int] = deque()  # queued for this run, not yet handed to the pool
    finished = 0
    last_triage = -1.0
    changed = True
    first = True
    retry_due: int | None = 0

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            jobs,
            mp_context=context,
            initializer=_init_worker,
            initargs=(registry, database_url, storage_root, policy),
        )

    pool = new_pool()
    try:
        while True:
            now = time.monotonic()
            triaged = changed or now - last_triage > 2.0 or not (in_flight or backlog)
            if triaged:
                with session_scope(database_url) as session:
                    housekeeping(
                        session,
                        max_attempts=policy.max_attempts,
                        night_quiet_seconds=night_quiet_seconds,
                    )
                    result = triage(
                        session, registry, configurations, nights=night_list, full=first,
                        field_radius=field_radius,
                    )  # fmt: skip
                    summary.planned += result.created
                    summary.excluded += result.excluded
                    backlog.extend(
                        state.mark_queued(
                            session,
                            [d.task_id for d in result.ready],
                            {d.task_id: d.inputs for d in result.ready},
                        )
                    )
                    retry_due = session.scalar(
                        select(func.count())
                        .select_from(Task)
                        .where(Task.configuration_id.in_(current), Task.state == TaskState.FAILED)
                    )
                last_triage, changed, first = now, False, False
            while backlog and len(in_flight) < 2 * jobs:
                task_id = backlog.popleft()
                try:
                    in_flight[pool.submit(_work, task_id)] = task_id
                except BrokenProcessPool as error:  # a child died since the last wait
                    pool = _replace_pool(
                        pool, new_pool, [*in_flight.values(), task_id, *backlog], error,
                        database_url, policy, summary,
                    )  # fmt: skip
                    in_flight.clear()
                    backlog.clear()
                    changed = True
                    break
            if not in_flight:
                if triaged and not changed and not retry_due and not backlog:
                    break  # done, or what is left waits for something this run cannot do
                time.sleep(poll_seconds)
                continue
            done, _ = wait(in_flight, timeout=poll_seconds, return_when=FIRST_COMPLETED)
            for future in done:
                if future not in in_flight:
                    continue  # dropped with a broken pool below
                task_id = in_flight.pop(future)
                changed = True
                try:
                    _, outcome = future.result()
                except BrokenProcessPool as error:
                    pool = _replace_pool(
                        pool, new_pool, [task_id, *in_flight.values()], error, database_url,
                        policy, summary,
                    )  # fmt: skip
                    in_flight.clear()
                    continue
                key = outcome or "skipped"
                summary.outcomes[key] = summary.outcomes.get(key, 0) + 1
                finished += 1
                if progress is not None:
                    progress(finished, finished + len(in_flight) + len(backlog))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    _left_over(database_url, summary, current, night_list)
    summary.seconds = time.monotonic() - started
    return summary


def _replace_pool(
    pool: ProcessPoolExecutor,
    new_pool: Callable[[], ProcessPoolExecutor],
    lost: list[int],
    error: Exception,
    url: str,
    policy: RunPolicy,
    summary: RunSummary,
) -> ProcessPoolExecutor:
    """A pool process died: record what its tasks' fate is and start a new pool."""
    pool.shutdown(wait=False, cancel_futures=True)
    for outcome in filter(None, (_worker_lost(url, t, error, policy) for t in lost)):
        summary.outcomes[outcome] = summary.outcomes.get(outcome, 0) + 1
    return new_pool()


def _left_over(
    url: str, summary: RunSummary, current: list[int], nights: list[int] | None
) -> None:
    """What the run leaves waiting, with the reasons, and the nights still open."""
    with session_scope(url) as session:
        query = (
            select(Task.id, StepRow.name, Task.target, Task.wait_reason)
            .join(StepRow, StepRow.id == Task.step_id)
            .where(Task.state == TaskState.PENDING, Task.configuration_id.in_(current))
            .order_by(Task.id)
        )
        open_nights = select(Night.id, Night.local_date).where(Night.state == NightState.OPEN)
        if nights is not None:
            query = query.where(Task.night_id.in_(nights))
            open_nights = open_nights.where(Night.id.in_(nights))
        summary.waiting = [
            Waiting(task_id, step, target, reason or "waiting for its inputs")
            for task_id, step, target, reason in session.execute(query)
        ]
        summary.open_nights = [(i, d.isoformat()) for i, d in session.execute(open_nights)]
