"""The scheduler: finds tasks whose inputs are done and hands them to the queue.

One cycle, in order: expired leases go back for a retry (their worker died), tasks
whose backoff has passed become pending, tasks queued too long ago without starting
(a message lost with a broker restart) become pending, missing task rows are created,
pending tasks are classified, and the ready ones are claimed — ``SELECT ... FOR UPDATE
SKIP LOCKED`` on PostgreSQL, then ``pending → queued`` — and published in batches.
Two schedulers never queue the same task: a row is claimed by one transaction only, and
a message delivered twice finds its row no longer queued.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from autowisp.db.models import Task, TaskState, utcnow
from autowisp.db.session import session_scope
from autowisp.pipeline import state
from autowisp.pipeline.local import prepare
from autowisp.pipeline.planning import classify_pending
from autowisp.pipeline.runner import DEFAULT_POLICY, RunPolicy
from autowisp.steps.registry import Registry

__all__ = ["CycleReport", "claim_for_queue", "requeue_stale", "run_scheduler", "schedule_once"]

log = logging.getLogger(__name__)

#: ``publish([(task_id, queue), ...])`` sends the messages; raising means none were sent.
Publisher = Callable[[Sequence[tuple[int, str]]], None]


@dataclass
class CycleReport:
    """What one scheduling cycle did."""

    created: int = 0
    swept: int = 0
    retried: int = 0
    requeued: int = 0
    excluded: int = 0
    enqueued: int = 0
    pending_waiting: int = 0


def requeue_stale(session: Session, *, older_than: float) -> int:
    """queued → pending for tasks queued more than ``older_than`` seconds ago."""
    limit = utcnow() - dt.timedelta(seconds=older_than)
    result = session.execute(
        update(Task)
        .where(Task.state == TaskState.QUEUED, Task.queued_at < limit)
        .values(state=TaskState.PENDING, queued_at=None)
    )
    return result.rowcount or 0


def claim_for_queue(session: Session, task_ids: Sequence[int]) -> list[int]:
    """Atomically move these pending tasks to queued; return the ones this call got."""
    if not task_ids:
        return []
    locked = select(Task.id).where(Task.id.in_(task_ids), Task.state == TaskState.PENDING)
    if session.get_bind().dialect.name == "postgresql":
        locked = locked.with_for_update(skip_locked=True)
    ids = list(session.scalars(locked))
    if not ids:
        return []
    claimed = session.scalars(
        update(Task)
        .where(Task.id.in_(ids), Task.state == TaskState.PENDING)
        .values(state=TaskState.QUEUED, queued_at=utcnow())
        .returning(Task.id)
    ).all()
    return list(claimed)


def schedule_once(
    database_url: str,
    registry: Registry,
    publish: Publisher,
    *,
    step_parameters=None,
    policy: RunPolicy = DEFAULT_POLICY,
    queued_timeout: float = 3900.0,
    batch: int = 5000,
) -> CycleReport:
    """Run one scheduling cycle (see the module docstring)."""
    report = CycleReport()
    with session_scope(database_url) as session:
        report.swept = state.sweep_expired_leases(session, max_attempts=policy.max_attempts)
        report.retried = state.release_due_retries(session)
        report.requeued = requeue_stale(session, older_than=queued_timeout)
    configurations, report.created = prepare(database_url, registry, step_parameters or {})
    queue_of = {c.id: registry[name].queue for name, c in configurations.items()}
    with session_scope(database_url) as session:
        ready = []
        for decision in classify_pending(session, registry, configurations):
            if decision.verdict == "exclude":
                report.excluded += state.exclude(session, decision.task_id, reason=decision.reason)
            elif decision.verdict == "ready":
                ready.append(decision.task_id)
            else:
                report.pending_waiting += 1
                if decision.reason:
                    state.note_waiting(session, decision.task_id, reason=decision.reason)
    for start in range(0, len(ready), batch):
        with session_scope(database_url) as session:
            claimed = claim_for_queue(session, ready[start : start + batch])
            queues = {
                task_id: configuration_id
                for task_id, configuration_id in session.execute(
                    select(Task.id, Task.configuration_id).where(Task.id.in_(claimed))
                )
            }
        messages = [(task_id, queue_of[queues[task_id]]) for task_id in claimed]
        try:
            publish(messages)
        except Exception:
            # Nothing is lost: give the rows back so the next cycle publishes them again.
            with session_scope(database_url) as session:
                for task_id in claimed:
                    state.requeue(session, task_id)
            raise
        report.enqueued += len(messages)
    return report


def run_scheduler(
    database_url: str,
    registry: Registry,
    publish: Publisher,
    *,
    step_parameters=None,
    policy: RunPolicy = DEFAULT_POLICY,
    queued_timeout: float = 3900.0,
    interval: float = 5.0,
    once: bool = False,
    report: Callable[[CycleReport], None] | None = None,
) -> None:
    """Schedule every ``interval`` seconds (or once); survives database and broker outages."""
    while True:
        try:
            cycle = schedule_once(
                database_url,
                registry,
                publish,
                step_parameters=step_parameters,
                policy=policy,
                queued_timeout=queued_timeout,
            )
            if report is not None:
                report(cycle)
        except Exception as error:  # the loop's boundary: database or broker down, retry
            if once:
                raise
            log.warning("scheduling cycle failed, retrying in %.0f s: %r", interval, error)
        if once:
            return
        time.sleep(interval)
