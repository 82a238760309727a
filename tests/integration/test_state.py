"""State transitions on both databases: claims are exclusive and owned, leases expire on the
database clock, retries back off."""

import datetime as dt

from sqlalchemy import select, update

from autowisp.db.clock import db_time
from autowisp.db.models import ErrorKind, Task, TaskState
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.pipeline import state
from autowisp.pipeline.cycle import triage
from autowisp.pipeline.local import apply_configuration
from autowisp.steps.registry import default_registry


def _first_task(url, small_night):
    ingest_paths(url, [sorted(p for p in small_night.iterdir() if p.is_dir())[0]])
    registry = default_registry()
    configurations = apply_configuration(url, registry, {})
    with session_scope(url) as session:
        triage(session, registry, configurations)
    with session_scope(url) as session:
        return session.query(Task).order_by(Task.id).first().id


def _expire(session, task_id):
    session.execute(
        update(Task)
        .where(Task.id == task_id)
        .values(lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    )


def test_claims_leases_and_retries(db_url, small_night):
    task_id = _first_task(db_url, small_night)
    with session_scope(db_url) as session:
        assert state.mark_queued(session, [task_id], {}) == [task_id]
        token = state.claim(session, task_id, lease_seconds=60)
        assert token
        # A second delivery of the same task does nothing.
        assert state.claim(session, task_id, lease_seconds=60) is None
    with session_scope(db_url) as session:
        # The worker died: its lease expires and the sweep sends it back for a retry.
        _expire(session, task_id)
        assert state.sweep_expired_leases(session, max_attempts=3) == 1
    with session_scope(db_url) as session:
        task = session.get(Task, task_id)
        assert task.state is TaskState.FAILED and "lease expired" in task.last_error
        assert state.release_due_retries(session) == 1
        token = state.claim(session, task_id, lease_seconds=60)
        outcome = state.fail(
            session,
            task_id,
            token,
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
        session.execute(update(Task).where(Task.id == task_id).values(not_before=db_time(session)))
        assert state.release_due_retries(session) == 1
        token = state.claim(session, task_id, lease_seconds=60)
        assert (
            state.fail(
                session,
                task_id,
                token,
                error="bad data",
                kind=ErrorKind.PERMANENT,
                max_attempts=3,
                backoff_seconds=30,
            )
            is TaskState.DEAD
        )
        assert not state.finish(session, task_id, token, output_path=None, qc={})


def test_a_worker_whose_lease_expired_cannot_touch_the_task_again(db_url, small_night):
    """Bug 3: finish and fail checked only ``state == running``, heartbeat only the pid, so
    a worker whose lease had expired could finish a task another worker had claimed since."""
    task_id = _first_task(db_url, small_night)
    with session_scope(db_url) as session:
        state.mark_queued(session, [task_id], {})
        old = state.claim(session, task_id, lease_seconds=60)
    with session_scope(db_url) as session:
        _expire(session, task_id)  # worker A stalls past its lease
        state.sweep_expired_leases(session, max_attempts=3)
        state.release_due_retries(session)
        new = state.claim(session, task_id, lease_seconds=60)  # worker B takes it over
        assert new and new != old
    with session_scope(db_url) as session:
        # Worker A wakes up: its heartbeat, finish and fail all find the lease gone.
        assert not state.heartbeat(session, task_id, old, lease_seconds=60)
        assert not state.finish(session, task_id, old, output_path="/stale", qc={"by": "A"})
        assert (
            state.fail(
                session,
                task_id,
                old,
                error="A's error",
                kind=ErrorKind.PERMANENT,
                max_attempts=3,
                backoff_seconds=1,
            )
            is None
        )
    with session_scope(db_url) as session:
        task = session.get(Task, task_id)
        assert task.state is TaskState.RUNNING and task.lease_token == new
        assert task.output_path is None and task.last_error is not None  # A left no trace
        assert state.heartbeat(session, task_id, new, lease_seconds=60)
        assert state.finish(session, task_id, new, output_path="/fresh", qc={"by": "B"})
    with session_scope(db_url) as session:
        task = session.get(Task, task_id)
        assert task.state is TaskState.DONE and task.qc == {"by": "B"}


def test_leases_use_the_database_clock(db_url, small_night):
    task_id = _first_task(db_url, small_night)
    with session_scope(db_url) as session:
        state.mark_queued(session, [task_id], {})
        state.claim(session, task_id, lease_seconds=120)
    with session_scope(db_url) as session:
        expires, started = session.execute(
            select(Task.lease_expires_at, Task.started_at).where(Task.id == task_id)
        ).one()
        assert abs((expires - started).total_seconds() - 120) < 1
        # The database's now is the reference: this lease is not expired yet.
        assert state.sweep_expired_leases(session, max_attempts=3) == 0
        assert abs((started - dt.datetime.now(dt.UTC)).total_seconds()) < 30


def test_a_backlog_is_not_republished_but_lost_messages_are(db_url, small_night):
    """Bug 8: tasks queued longer than the timeout were republished even while their queue
    still held them (a long backlog); now only when their queue is empty in the broker."""
    from autowisp.pipeline.scheduler import requeue_stale

    task_id = _first_task(db_url, small_night)
    with session_scope(db_url) as session:
        state.mark_queued(session, [task_id], {})
        configuration = session.get(Task, task_id).configuration_id
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(queued_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
        )
    queues = {configuration: "light"}
    with session_scope(db_url) as session:
        assert requeue_stale(session, older_than=600, queues=queues, empty=set()) == 0
        assert session.get(Task, task_id).state is TaskState.QUEUED  # still in the backlog
    with session_scope(db_url) as session:  # the broker lost its messages: queue empty
        assert requeue_stale(session, older_than=600, queues=queues, empty={"light"}) == 1
        assert session.get(Task, task_id).state is TaskState.PENDING
