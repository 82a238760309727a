"""State transitions on both databases: claims are exclusive, leases expire, retries back off."""

import datetime as dt

from sqlalchemy import update

from autowisp.db.models import ErrorKind, Task, TaskState
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.pipeline import state
from autowisp.pipeline.local import prepare
from autowisp.steps.registry import default_registry


def _first_task(url, small_night):
    ingest_paths(url, [sorted(p for p in small_night.iterdir() if p.is_dir())[0]])
    prepare(url, default_registry(), {})
    with session_scope(url) as session:
        return session.query(Task).order_by(Task.id).first().id


def test_claims_leases_and_retries(db_url, small_night):
    task_id = _first_task(db_url, small_night)
    with session_scope(db_url) as session:
        assert state.mark_queued(session, [task_id]) == 1
        assert state.claim(session, task_id, lease_seconds=60)
        # A second delivery of the same task does nothing.
        assert not state.claim(session, task_id, lease_seconds=60)
    with session_scope(db_url) as session:
        # The worker died: its lease expires and the sweep sends it back for a retry.
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
        assert state.sweep_expired_leases(session, max_attempts=3) == 1
    with session_scope(db_url) as session:
        task = session.get(Task, task_id)
        assert task.state is TaskState.FAILED and "lease expired" in task.last_error
        assert state.release_due_retries(session) == 1
        assert state.claim(session, task_id, lease_seconds=60)
        outcome = state.fail(
            session,
            task_id,
            error="flaky",
            kind=ErrorKind.TRANSIENT,
            max_attempts=3,
            backoff_seconds=30,
        )
        assert outcome is TaskState.FAILED
    with session_scope(db_url) as session:
        task = session.get(Task, task_id)
        assert task.attempts == 2
        delay = (task.not_before - task.finished_at).total_seconds()
        assert abs(delay - 60) < 1  # 30 s doubled on the second attempt
        assert state.release_due_retries(session) == 0  # not yet
        session.execute(
            update(Task).where(Task.id == task_id).values(not_before=dt.datetime.now(dt.UTC))
        )
        assert state.release_due_retries(session) == 1
        assert state.claim(session, task_id, lease_seconds=60)
        assert (
            state.fail(
                session,
                task_id,
                error="bad data",
                kind=ErrorKind.PERMANENT,
                max_attempts=3,
                backoff_seconds=30,
            )
            is TaskState.DEAD
        )
        assert not state.finish(session, task_id, output_path=None, qc={})
