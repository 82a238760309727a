"""Task state transitions, each one conditional UPDATE in one transaction.

Every transition names the states it may start from, so two workers (or a re-delivered
Celery message) can never both run a task: the second ``claim`` changes no row. A claim
issues a lease token; heartbeat, finish and fail must present it, so a worker whose lease
expired (and whose task another worker has claimed since) can neither extend nor finish
nor fail what is no longer its task. Lease and retry times come from the database clock
(:func:`autowisp.db.clock.db_time`), never from a worker's.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import (
    JSON,
    Integer,
    Text,
    Update,
    and_,
    bindparam,
    cast,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from autowisp.db.clock import db_time
from autowisp.db.models import ErrorKind, Task, TaskState, Wakeup
from autowisp.db.session import rowcount

__all__ = [
    "claim",
    "exclude",
    "fail",
    "finish",
    "heartbeat",
    "lease_token",
    "mark_queued",
    "note_waiting",
    "release_due_retries",
    "requeue",
    "reset",
    "sweep_expired_leases",
    "transition",
]

#: How much of an error message a task row keeps (tracebacks of bugs included).
ERROR_LIMIT = 8000


def _update_pending(
    session: Session,
    rows: list[dict[str, Any]],
    columns: Mapping[str, TypeEngine[Any]],
    **fixed: Any,
) -> None:
    """Set ``columns`` (values per row, by column name; ``task`` is the row's id) and
    ``fixed`` on pending tasks. PostgreSQL takes one ``UPDATE ... FROM unnest(ids,
    values)`` with the rows as two array parameters (a statement compiled once, a fifth
    of the time of a batched executemany on a large task table); other databases an
    executemany. JSON columns travel as text and are cast."""
    table = Task.__table__
    if not rows:
        return
    names = list(columns)
    if session.get_bind().dialect.name == "postgresql":
        arrays: list[Any] = [bindparam("ids", type_=ARRAY(Integer))]
        arrays += [bindparam(f"new_{name}", type_=ARRAY(Text())) for name in names]
        changes = func.unnest(*arrays).table_valued("task", *names).render_derived(name="changes")
        statement = (
            update(table)
            .where(table.c.id == changes.c.task, table.c.state == TaskState.PENDING.value)
            .values(**fixed, **{name: cast(changes.c[name], columns[name]) for name in names})
        )

        def text_of(value: Any, type_: TypeEngine[Any]) -> Any:
            return json.dumps(value) if isinstance(type_, JSON) and value is not None else value

        for start in range(0, len(rows), 5000):
            chunk = rows[start : start + 5000]
            session.execute(
                statement,
                {
                    "ids": [int(row["task"]) for row in chunk],
                    **{
                        f"new_{name}": [text_of(row[name], columns[name]) for row in chunk]
                        for name in names
                    },
                },
            )
        return
    session.execute(
        update(table)
        .where(table.c.id == bindparam("task"), table.c.state == TaskState.PENDING.value)
        .values(**fixed, **{n: bindparam(f"new_{n}", type_=t) for n, t in columns.items()}),
        [{"task": row["task"], **{f"new_{n}": row[n] for n in columns}} for row in rows],
    )


def mark_queued(
    session: Session, task_ids: Iterable[int], inputs: Mapping[int, Mapping[str, Any]]
) -> list[int]:
    """pending → queued (handed to an executor), recording each task's resolved inputs;
    the ids that were pending (the others changed meanwhile)."""
    ids = list(task_ids)
    pending: list[int] = []
    for start in range(0, len(ids), 1000):
        pending += session.scalars(
            select(Task.id).where(
                Task.id.in_(ids[start : start + 1000]), Task.state == TaskState.PENDING
            )
        ).all()
    _update_pending(
        session,
        [{"task": i, "inputs": dict(inputs.get(i, {}))} for i in pending],
        {"inputs": JSON()},
        state=TaskState.QUEUED.value,
        queued_at=db_time(session),
        wait_reason=None,
    )
    return pending


def claim(session: Session, task_id: int, *, lease_seconds: float) -> str | None:
    """pending/queued → running with a lease; the lease token, or None if someone else
    has (or had) the task."""
    token = uuid.uuid4().hex
    result = session.execute(
        update(Task)
        .where(Task.id == task_id, Task.state.in_([TaskState.PENDING, TaskState.QUEUED]))
        .values(
            state=TaskState.RUNNING,
            attempts=Task.attempts + 1,
            started_at=db_time(session),
            finished_at=None,
            worker_host=socket.gethostname()[:128],
            worker_pid=os.getpid(),
            lease_token=token,
            lease_expires_at=db_time(session, plus_seconds=lease_seconds),
            wait_reason=None,
        )
    )
    return token if rowcount(result) == 1 else None


def transition(session: Session, statement: Update) -> int:
    """Execute a transition; the nights (and steps) of the rows it changed are noted in
    ``wakeup`` so the planner looks at their pending tasks again. The rows changed."""
    rows = session.execute(
        statement.returning(Task.night_id, Task.step_id).execution_options(
            synchronize_session=False
        )
    ).all()
    if rows:
        session.execute(insert(Wakeup), [{"night_id": n, "step_id": s} for n, s in set(rows)])
    return len(rows)


def _owned(task_id: int, token: str) -> Any:
    return and_(Task.id == task_id, Task.state == TaskState.RUNNING, Task.lease_token == token)


def requeue(session: Session, task_id: int) -> bool:
    """queued → pending (its executor went away before it started)."""
    statement = (
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.QUEUED)
        .values(state=TaskState.PENDING, queued_at=None)
    )
    return transition(session, statement) == 1


def heartbeat(session: Session, task_id: int, token: str, *, lease_seconds: float) -> bool:
    """Extend a running task's lease; False if the lease is no longer ours."""
    result = session.execute(
        update(Task)
        .where(_owned(task_id, token))
        .values(lease_expires_at=db_time(session, plus_seconds=lease_seconds))
    )
    return rowcount(result) == 1


def finish(
    session: Session,
    task_id: int,
    token: str,
    *,
    output_path: str | None,
    qc: Mapping[str, Any],
    output_sha256: str | None = None,
) -> bool:
    """running → done with its output and quality figures (a new output: no longer
    pruned); False if the lease is not ours (it expired and the task went back, or
    another worker holds it now)."""
    statement = (
        update(Task)
        .where(_owned(task_id, token))
        .values(
            state=TaskState.DONE,
            finished_at=db_time(session),
            lease_expires_at=None,
            lease_token=None,
            output_path=output_path,
            output_sha256=output_sha256,
            output_pruned_at=None,
            qc=dict(qc),
            last_error=None,
            error_kind=None,
            not_before=None,
        )
    )
    return transition(session, statement) == 1


def fail(
    session: Session,
    task_id: int,
    token: str,
    *,
    error: str,
    kind: ErrorKind,
    max_attempts: int,
    backoff_seconds: float,
) -> TaskState | None:
    """running → failed (transient: retry after backoff) or dead (permanent, a bug, or
    attempts used up); None if the lease is not ours."""
    attempts = session.scalar(select(Task.attempts).where(_owned(task_id, token)))
    if attempts is None:
        return None
    message = error
    if kind is not ErrorKind.TRANSIENT or attempts >= max_attempts:
        new_state = TaskState.DEAD
        if kind is ErrorKind.TRANSIENT:
            message = f"gave up after {attempts} attempts: {error}"
        retry_at = None
    else:
        new_state = TaskState.FAILED
        delay = min(backoff_seconds * 2 ** (attempts - 1), 3600.0)
        retry_at = db_time(session, plus_seconds=delay)
    statement = (
        update(Task)
        .where(_owned(task_id, token))
        .values(
            state=new_state,
            last_error=message[:ERROR_LIMIT],
            error_kind=kind,
            finished_at=db_time(session),
            lease_expires_at=None,
            lease_token=None,
            not_before=retry_at,
        )
    )
    return new_state if transition(session, statement) == 1 else None


def lease_token(session: Session, task_id: int) -> str | None:
    """The token of a running task (for the executor that owns the dead process running
    it, and only for it)."""
    return session.scalar(
        select(Task.lease_token).where(Task.id == task_id, Task.state == TaskState.RUNNING)
    )


def exclude(session: Session, task_id: int, *, reason: str) -> bool:
    """pending → excluded: it will not run (an input is unusable), with the reason."""
    statement = (
        update(Task)
        .where(Task.id == task_id, Task.state == TaskState.PENDING)
        .values(
            state=TaskState.EXCLUDED,
            last_error=reason,
            wait_reason=None,
            finished_at=db_time(session),
        )
    )
    return transition(session, statement) == 1


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
    return transition(
        session,
        query.values(
            state=TaskState.PENDING,
            attempts=0,
            not_before=None,
            queued_at=None,
            last_error=Task.last_error.concat(" [reset by operator]"),
        ),
    )


def note_waiting(session: Session, reasons: Mapping[int, str]) -> int:
    """Record why pending tasks cannot run yet (they stay pending); only changed reasons
    are written, in one statement. Returns how many rows changed."""
    if not reasons:
        return 0
    ids = list(reasons)
    changed = []
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        stored = dict(
            session.execute(select(Task.id, Task.wait_reason).where(Task.id.in_(chunk))).all()
        )
        changed += [i for i in chunk if i in stored and stored[i] != reasons[i]]
    _update_pending(
        session, [{"task": i, "wait_reason": reasons[i]} for i in changed], {"wait_reason": Text()}
    )
    return len(changed)


def release_due_retries(session: Session) -> int:
    """failed → pending for tasks whose backoff has passed."""
    return transition(
        session,
        update(Task)
        .where(
            Task.state == TaskState.FAILED,
            or_(Task.not_before.is_(None), Task.not_before <= db_time(session)),
        )
        .values(state=TaskState.PENDING),
    )


def sweep_expired_leases(session: Session, *, max_attempts: int) -> int:
    """running with an expired lease (its worker died) → failed, or dead past the bound."""
    now = db_time(session)
    expired = and_(Task.state == TaskState.RUNNING, Task.lease_expires_at < now)
    message = "lease expired: the worker running this task stopped (killed, out of memory?)"
    dead = transition(
        session,
        update(Task)
        .where(expired, Task.attempts >= max_attempts)
        .values(
            state=TaskState.DEAD,
            error_kind=ErrorKind.TRANSIENT,
            finished_at=now,
            lease_token=None,
            last_error=f"gave up after {max_attempts} attempts: {message}",
        ),
    )
    retried = (
        rowcount(
            session.execute(
                update(Task)
                .where(expired)
                .values(
                    state=TaskState.FAILED,
                    error_kind=ErrorKind.TRANSIENT,
                    finished_at=now,
                    lease_token=None,
                    last_error=message,
                    not_before=now,
                )
            )
        )
        or 0
    )
    return dead + retried
