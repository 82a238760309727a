"""The local executor: every pending task to completion with a process pool, in order.

It applies the same transitions as the distributed service (pending → queued →
running → done/failed/dead, retries with backoff, leases) and calls the same
:func:`autowisp.pipeline.runner.run_task`; only where tasks run differs.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from autowisp.db.models import Configuration, ErrorKind, Task, TaskState
from autowisp.db.session import session_scope
from autowisp.pipeline import state
from autowisp.pipeline.configuration import resolve_versions, sync_configurations
from autowisp.pipeline.planning import classify_pending, plan_tasks
from autowisp.pipeline.runner import DEFAULT_POLICY, RunPolicy, run_task
from autowisp.steps.registry import Registry

__all__ = ["RunSummary", "prepare", "run_local"]

_WORKER: dict = {}


@dataclass
class RunSummary:
    """Outcome counts of one local run."""

    planned: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    excluded: int = 0
    seconds: float = 0.0

    @property
    def executed(self) -> int:
        return sum(self.outcomes.values())


def prepare(
    database_url: str, registry: Registry, step_parameters, *, nights: Iterable[int] | None = None
) -> tuple[dict[str, Configuration], int]:
    """Sync configuration versions and create missing tasks; return configs and count."""
    versions = resolve_versions(registry, step_parameters)
    with session_scope(database_url) as session:
        configurations = sync_configurations(session, registry, versions)
        created = plan_tasks(session, registry, configurations, nights=nights)
    return configurations, created


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
    like a frame that always runs out of memory); one still queued goes back to pending."""
    with session_scope(url) as session:
        if state.requeue(session, task_id):
            return None
        outcome = state.fail(
            session,
            task_id,
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
    step_parameters=None,
    jobs: int = 2,
    policy: RunPolicy = DEFAULT_POLICY,
    nights: Iterable[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    poll_seconds: float = 0.2,
) -> RunSummary:
    """Run every pending task (of ``nights``, or all) until nothing is left to run.

    ``progress(finished, total)`` is called as tasks finish.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs!r}")
    started = time.monotonic()
    configurations, planned = prepare(database_url, registry, step_parameters or {}, nights=nights)
    summary = RunSummary(planned=planned)
    current = [c.id for c in configurations.values()]
    with session_scope(database_url) as session:
        # Tasks queued by an earlier, interrupted run are ours to run again.
        session.execute(
            Task.__table__.update()
            .where(Task.state == TaskState.QUEUED, Task.configuration_id.in_(current))
            .values(state=TaskState.PENDING)
        )
    context = multiprocessing.get_context("fork")
    in_flight: dict[Future, int] = {}
    finished = 0

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
            with session_scope(database_url) as session:
                state.sweep_expired_leases(session, max_attempts=policy.max_attempts)
                state.release_due_retries(session)
                ready = []
                for decision in classify_pending(session, registry, configurations):
                    if decision.verdict == "exclude":
                        summary.excluded += state.exclude(
                            session, decision.task_id, reason=decision.reason
                        )
                    elif decision.verdict == "ready":
                        ready.append(decision.task_id)
                    elif decision.reason:
                        state.note_waiting(session, decision.task_id, reason=decision.reason)
                room = max(2 * jobs - len(in_flight), 0)
                batch = [t for t in ready if t not in in_flight.values()][:room]
                state.mark_queued(session, batch)
                waiting = session.scalar(
                    select(func.count())
                    .select_from(Task)
                    .where(
                        Task.configuration_id.in_(current),
                        Task.state.in_([TaskState.PENDING, TaskState.FAILED]),
                    )
                )
                retry_due = session.scalar(
                    select(func.count())
                    .select_from(Task)
                    .where(Task.configuration_id.in_(current), Task.state == TaskState.FAILED)
                )
            for task_id in batch:
                in_flight[pool.submit(_work, task_id)] = task_id
            if not in_flight:
                if not waiting or (not retry_due and not ready):
                    break  # done, or pending tasks whose inputs will never be done
                time.sleep(poll_seconds)
                continue
            done, _ = wait(in_flight, timeout=poll_seconds, return_when=FIRST_COMPLETED)
            for future in done:
                if future not in in_flight:
                    continue  # dropped with a broken pool below
                task_id = in_flight.pop(future)
                try:
                    _, outcome = future.result()
                except BrokenProcessPool as error:
                    pool.shutdown(wait=False, cancel_futures=True)
                    lost = [task_id, *in_flight.values()]
                    in_flight.clear()
                    outcomes = [_worker_lost(database_url, t, error, policy) for t in lost]
                    for outcome in filter(None, outcomes):
                        summary.outcomes[outcome] = summary.outcomes.get(outcome, 0) + 1
                    pool = new_pool()
                    continue
                key = outcome or "skipped"
                summary.outcomes[key] = summary.outcomes.get(key, 0) + 1
                finished += 1
                if progress is not None:
                    progress(finished, finished + len(in_flight) + (waiting or 0))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.monotonic() - started
    return summary
