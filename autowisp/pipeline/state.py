"""Task state transitions, each one conditional UPDATE in one transaction.

Every transition names the states it may start from, so two workers (or a re-delivered
Celery message) can never both run a task: the second ``claim`` changes no row.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from autowisp.db.models import ErrorKind, Task, TaskState, utcnow

__all__ = [
    "claim",
    "exclude",
    "fail",
    "finish",
    "heartbeat",
    "mark_queued",
    "note_waiting",
    "release_due_retries",
    "requeue",
    "reset",
    "sweep_expired_leases",
]


def mark_queued(session: Session, task_ids: Iterable[int]) -> int:
    """pending → queued (handed to an executor)."""
    ids = list(task_ids)
    if not ids:
        return 0
    result = session.execute(
        update(Task)
        .where(Task.id.in_(ids), Task.state == TaskState.PENDING)
        .values(state=TaskState.QUEUED, queued_at=utcnow())
    )
    return result.rowcount or 0


def claim(session: Session, task_id: int, *, lease_seconds: float) -> bool:
    """pending/queued → running with a lease; False if someone else has (or had) it."""
    now = utcnow()
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state.in_([TaskState.PENDING, TaskState.QUEUED]))
        .values(
            state=TaskState.RUNNING,
            attempts=Task.attempts + 1,
            started_at=now,
            finished_at=None,
            worker_host=socket.gethostname()[:128],
            worker_pid=os.getpid(),
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
        )
    )
    return result.rowcount == 1


def requeue(session: Session, task_id: int) -> bool:
    """queued → pending (its executor went away before it started)."""
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.QUEUED)
        .values(state=TaskState.PENDING, queued_at=None)
    )
    return result.rowcount == 1


def heartbeat(session: Session, task_id: int, *, lease_seconds: float) -> bool:
    """Extend a running task's lease; False if it is no longer running here."""
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.RUNNING, Task.worker_pid == os.getpid())
        .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
    )
    return result.rowcount == 1


def finish(
    session: Session, task_id: int, *, output_path: str | None, qc: Mapping[str, Any]
) -> bool:
    """running → done with its output and quality figures."""
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.RUNNING)
        .values(
            state=TaskState.DONE,
            finished_at=utcnow(),
            lease_expires_at=None,
            output_path=output_path,
            qc=dict(qc),
            last_error=None,
            error_kind=None,
            not_before=None,
        )
    )
    return result.rowcount == 1


def fail(
    session: Session,
    task_id: int,
    *,
    error: str,
    kind: ErrorKind,
    max_attempts: int,
    backoff_seconds: float,
) -> TaskState | None:
    """running → failed (retry after backoff) or dead (permanent, or attempts used up)."""
    task = session.get(Task, task_id, with_for_update=True, populate_existing=True)
    if task is None or task.state is not TaskState.RUNNING:
        return None
    now = utcnow()
    task.last_error = error[:4000]
    task.error_kind = kind
    task.finished_at = now
    task.lease_expires_at = None
    if kind is ErrorKind.PERMANENT or task.attempts >= max_attempts:
        task.state = TaskState.DEAD
        if kind is ErrorKind.TRANSIENT:
            task.last_error = f"gave up after {task.attempts} attempts: {task.last_error}"[:4000]
    else:
        task.state = TaskState.FAILED
        delay = min(backoff_seconds * 2 ** (task.attempts - 1), 3600.0)
        task.not_before = now + dt.timedelta(seconds=delay)
    return task.state


def exclude(session: Session, task_id: int, *, reason: str) -> bool:
    """pending → excluded: it will not run (an input is unusable), with the reason."""
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.PENDING)
        .values(state=TaskState.EXCLUDED, last_error=reason, finished_at=utcnow())
    )
    return result.rowcount == 1


def reset(
    session: Session,
    *,
    states: Iterable[TaskState] = (TaskState.DEAD, TaskState.EXCLUDED),
    task_ids: Iterable[int] | None = None,
    step_ids: Iterable[int] | None = None,
    night_id: int | None = None,
) -> int:
    """Give dead (or excluded) tasks a fresh start: pending, attempts 0, error kept as history.

    For the operator who fixed the cause (a bad file replaced, a bug deployed).
    """
    query = update(Task).where(Task.state.in_(list(states)))
    if task_ids is not None:
        query = query.where(Task.id.in_(list(task_ids)))
    if step_ids is not None:
        query = query.where(Task.step_id.in_(list(step_ids)))
    if night_id is not None:
        query = query.where(Task.night_id == night_id)
    result = session.execute(
        query.values(
            state=TaskState.PENDING,
            attempts=0,
            not_before=None,
            queued_at=None,
            last_error=Task.last_error.concat(" [reset by operator]"),
        )
    )
    return result.rowcount or 0


def note_waiting(session: Session, task_id: int, *, reason: str) -> None:
    """Record why a pending task cannot run yet (it stays pending)."""
    session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.PENDING)
        .values(last_error=reason)
    )


def release_due_retries(session: Session) -> int:
    """failed → pending for tasks whose backoff has passed."""
    result = session.execute(
        update(Task)
        .where(
            Task.state == TaskState.FAILED,
            or_(Task.not_before.is_(None), Task.not_before <= utcnow()),
        )
        .values(state=TaskState.PENDING)
    )
    return result.rowcount or 0


def sweep_expired_leases(session: Session, *, max_attempts: int) -> int:
    """running with an expired lease (its worker died) → failed, or dead past the bound."""
    now = utcnow()
    expired = and_(Task.state == TaskState.RUNNING, Task.lease_expires_at < now)
    message = "lease expired: the worker running this task stopped (killed, out of memory?)"
    dead = (
        session.execute(
            update(Task)
            .where(expired, Task.attempts >= max_attempts)
            .values(
                state=TaskState.DEAD,
                error_kind=ErrorKind.TRANSIENT,
                finished_at=now,
                last_error=f"gave up after {max_attempts} attempts: {message}",
            )
        ).rowcount
        or 0
    )
    retried = (
        session.execute(
            update(Task)
            .where(expired)
            .values(
                state=TaskState.FAILED,
                error_kind=ErrorKind.TRANSIENT,
                finished_at=now,
                last_error=message,
                not_before=now,
            )
        ).rowcount
        or 0
    )
    return dead + retried
