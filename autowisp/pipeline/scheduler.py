"""The scheduler: finds tasks whose inputs are done and hands them to the queue.

One cycle (:mod:`autowisp.pipeline.cycle`): expired leases go back for a retry (their
worker died), due retries become pending, quiet nights close, tasks queued long ago whose
queue is empty in the broker (their message was lost, e.g. with a Redis restart) become
pending, missing task rows are created, pending tasks are triaged, and the ready ones are
claimed — ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, then ``pending → queued``
with their resolved inputs — and published in batches. The scheduler plans with the
configuration the database holds as active; it never changes it.
Two schedulers never queue the same task: a row is claimed by one transaction only, and
a message delivered twice finds its row no longer queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from autowisp.db.clock import db_time
from autowisp.db.fields import DEFAULT_FIELD_RADIUS
from autowisp.db.models import Task, TaskState
from autowisp.db.session import session_scope
from autowisp.pipeline import state
from autowisp.pipeline.configuration import active_configurations
from autowisp.pipeline.cycle import housekeeping, triage
from autowisp.pipeline.runner import DEFAULT_POLICY, RunPolicy
from autowisp.steps.registry import Registry

__all__ = ["CycleReport", "claim_for_queue", "requeue_stale", "run_scheduler", "schedule_once"]

log = logging.getLogger(__name__)

#: ``publish([(task_id, queue, time_limit_s), ...])`` sends the messages; raising means
#: none were sent. A publisher may have ``depth(queue) -> int | None``: messages waiting
#: in that queue.
Publisher = Callable[[Sequence[tuple[int, str, float]]], None]


@dataclass
class CycleReport:
    """What one scheduling cycle did."""

    created: int = 0
    swept: int = 0
    retried: int = 0
    requeued: int = 0
    closed: int = 0
    excluded: int = 0
    enqueued: int = 0
    pending_waiting: int = 0


def requeue_stale(
    session: Session, *, older_than: float, queues: Mapping[int, str], empty: set[str]
) -> int:
    """queued → pending for tasks queued more than ``older_than`` seconds ago whose queue
    (by configuration id in ``queues``) is empty in the broker: their message was lost.
    A queue still holding messages is a backlog, not a loss: nothing is republished."""
    configurations = [c for c, queue in queues.items() if queue in empty]
    if not configurations:
        return 0
    return state.transition(
        session,
        update(Task)
        .where(
            Task.state == TaskState.QUEUED,
            Task.configuration_id.in_(configurations),
            Task.queued_at < db_time(session, plus_seconds=-older_than),
        )
        .values(state=TaskState.PENDING, queued_at=None),
    )


def claim_for_queue(
    session: Session, task_ids: Sequence[int], inputs: Mapping[int, Mapping[str, Any]]
) -> list[int]:
    """Atomically move these pending tasks to queued with their inputs; return the ones
    this call got (another scheduler may hold some)."""
    if not task_ids:
        return []
    locked = select(Task.id).where(Task.id.in_(task_ids), Task.state == TaskState.PENDING)
    if session.get_bind().dialect.name == "postgresql":
        locked = locked.with_for_update(skip_locked=True)
    ids = list(session.scalars(locked))
    return state.mark_queued(session, ids, inputs)


def _empty_queues(publish: Publisher, queues: set[str]) -> set[str]:
    depth = getattr(publish, "depth", None)
    if depth is None:
        return set(queues)  # a publisher that cannot tell: treat old messages as lost
    return {queue for queue in queues if not depth(queue)}


def schedule_once(
    database_url: str,
    registry: Registry,
    publish: Publisher,
    *,
    policy: RunPolicy = DEFAULT_POLICY,
    queued_timeout: float = 600.0,
    night_quiet_seconds: float | None = 3600.0,
    batch: int = 5000,
    full: bool = False,
    field_radius: float = DEFAULT_FIELD_RADIUS,
) -> CycleReport:
    """Run one scheduling cycle (see the module docstring). Pending tasks are looked at
    again when something they may depend on changed (a wakeup), or all with ``full``."""
    report = CycleReport()
    with session_scope(database_url) as session:
        configurations = active_configurations(session, registry)
        queue_of = {c.id: registry[name].queue for name, c in configurations.items()}
        limit_of = {c.id: policy.time_limit(registry[name]) for name, c in configurations.items()}
        done = housekeeping(
            session, max_attempts=policy.max_attempts, night_quiet_seconds=night_quiet_seconds
        )
        report.swept, report.retried = done["swept"], done["retried"]
        report.closed = done["closed"]
        report.requeued = requeue_stale(
            session,
            older_than=queued_timeout,
            queues=queue_of,
            empty=_empty_queues(publish, set(queue_of.values())),
        )
    with session_scope(database_url) as session:
        result = triage(session, registry, configurations, full=full, field_radius=field_radius)
        report.created, report.excluded = result.created, result.excluded
        report.pending_waiting = len(result.waiting)
    ready = result.ready
    for start in range(0, len(ready), batch):
        chunk = ready[start : start + batch]
        with session_scope(database_url) as session:
            claimed = claim_for_queue(
                session, [d.task_id for d in chunk], {d.task_id: d.inputs for d in chunk}
            )
            queues = dict(
                session.execute(
                    select(Task.id, Task.configuration_id).where(Task.id.in_(claimed))
                ).all()
            )
        messages = [
            (task_id, queue_of[queues[task_id]], limit_of[queues[task_id]]) for task_id in claimed
        ]
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
    policy: RunPolicy = DEFAULT_POLICY,
    queued_timeout: float = 600.0,
    night_quiet_seconds: float | None = 3600.0,
    interval: float = 5.0,
    once: bool = False,
    report: Callable[[CycleReport], None] | None = None,
    full_every: float = 600.0,
    field_radius: float = DEFAULT_FIELD_RADIUS,
) -> None:
    """Schedule every ``interval`` seconds (or once); survives database and broker outages.

    The first cycle, and one every ``full_every`` seconds, look at every pending task (a
    safety net under the wakeups); the others only at those something woke."""
    last_full: float | None = None
    while True:
        full = last_full is None or time.monotonic() - last_full > full_every
        try:
            cycle = schedule_once(
                database_url,
                registry,
                publish,
                policy=policy,
                queued_timeout=queued_timeout,
                night_quiet_seconds=night_quiet_seconds,
                full=full,
                field_radius=field_radius,
            )
            if full:
                last_full = time.monotonic()
            if report is not None:
                report(cycle)
        except Exception as error:  # the loop's boundary: database or broker down, retry
            if once:
                raise
            log.warning("scheduling cycle failed, retrying in %.0f s: %r", interval, error)
        if once:
            return
        time.sleep(interval)
