"""The one code path that runs a task, shared by the local executor and the Celery workers.

``run_task`` claims the task row (so a duplicate delivery does nothing), builds the
step's context from the database, runs the step while a heartbeat keeps the lease
alive, and records the outcome: done with output and QC, failed for a retry, or dead.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from autowisp.config import RunPolicy
from autowisp.db.models import (
    Camera,
    CameraType,
    Configuration,
    ErrorKind,
    Image,
    ImageState,
    Night,
    Task,
    TaskState,
)
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.errors import PermanentError
from autowisp.io.keywords import header_iso
from autowisp.pipeline import state
from autowisp.steps.base import ImageInfo, InputProduct, NightInfo, StepContext
from autowisp.steps.registry import Registry

__all__ = ["DEFAULT_POLICY", "RunPolicy", "run_task", "with_db_retry"]

log = logging.getLogger(__name__)


DEFAULT_POLICY = RunPolicy()


def _image_info(image: Image, layout: str, serial: str) -> ImageInfo:
    if image.image_type is None or image.date_obs is None:
        raise PermanentError(f"image {image.id} ({image.path}) has no type or DATE-OBS")
    return ImageInfo(
        id=image.id,
        path=Path(image.path),
        image_type=image.image_type,
        exptime=float(image.exptime or 0.0),
        date_obs=image.date_obs,
        jd=float(image.jd or 0.0),
        layout=layout,
        camera_serial=serial,
        header=image.header,
        sha256=image.sha256,
    )


def _night_info(session: Session, night_id: int, *, image_id: int | None = None) -> NightInfo:
    """The night and its frames: all of them, or only ``image_id`` (an image task needs
    only its own frame, and loading a 2,000-frame night per task would be quadratic)."""
    night, serial, layout = session.execute(
        select(Night, Camera.serial, CameraType.layout)
        .join(Camera, Camera.id == Night.camera_id)
        .join(CameraType, CameraType.id == Camera.camera_type_id)
        .where(Night.id == night_id)
    ).one()
    query = select(Image).where(Image.night_id == night_id, Image.state == ImageState.INGESTED)
    if image_id is not None:
        query = query.where(Image.id == image_id)
    images = session.scalars(query.order_by(Image.jd)).all()
    return NightInfo(
        night.id,
        night.local_date,
        serial,
        layout,
        tuple(_image_info(i, layout, serial) for i in images),
    )


def build_context(
    session: Session, task: Task, registry: Registry, storage_root: Path
) -> StepContext:
    """The step's view of a task: target, parameters and the outputs of its inputs."""
    step = registry[task.step.name]
    night = (
        _night_info(session, task.night_id, image_id=task.image_id)
        if task.night_id is not None
        else None
    )
    image = None
    if task.image_id is not None:
        found = [i for i in (night.images if night else ()) if i.id == task.image_id]
        if not found:
            raise PermanentError(f"image {task.image_id} of task {task.id} is not ingested")
        image = found[0]
    inputs: dict[str, tuple[InputProduct, ...]] = {}
    for upstream in step.inputs:
        query = _done_outputs(
            upstream,
            Task.target,
            Task.image_id,
            Task.output_path,
            Task.qc,
            Task.id,
            Configuration.version,
        )
        if registry[upstream].scope.value == "image" and step.scope.value == "image":
            query = query.where(Task.image_id == task.image_id)
        else:
            query = query.where(Task.night_id == task.night_id)
        local_date = night.local_date if night else None
        inputs[upstream] = tuple(
            InputProduct(
                target, image_id, Path(path) if path else None, qc or {}, task_id, version,
                local_date,
            )
            for target, image_id, path, qc, task_id, version in session.execute(
                query.order_by(Task.id)
            )
        )  # fmt: skip
    iso = _iso_of(step, image, night)
    for master in step.master_inputs:
        inputs[master] = _nearest_master(session, master, task.night_id, iso)
    return StepContext(
        task_id=task.id,
        step=step.name,
        target=task.target,
        config_version=task.configuration.version,
        parameters=dict(task.configuration.parameters),
        storage_root=storage_root,
        image=image,
        night=night,
        inputs=inputs,
    )


#: How long the runner keeps retrying a database that went away (restart, failover), s.
DB_PATIENCE = 300.0

T = TypeVar("T")


def with_db_retry(action: Callable[[], T], *, patience: float = DB_PATIENCE) -> T:
    """Run ``action`` (a whole transaction), retrying while the database is unreachable.

    A task's outcome must not be lost because PostgreSQL restarted while the step ran:
    the transaction is retried with backoff for up to ``patience`` seconds.
    """
    deadline = time.monotonic() + patience
    delay = 0.5
    while True:
        try:
            return action()
        except (OperationalError, InterfaceError) as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable, retrying in %.1f s: %s", delay, error)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _in_session(url: str, work: Callable[[Session], T]) -> T:
    def action() -> T:
        with session_scope(url) as session:
            return work(session)

    return with_db_retry(action)


def _done_outputs(step: str, *columns):
    """``columns`` of the done tasks of ``step``'s active configuration."""
    return (
        select(*columns)
        .join(StepRow, StepRow.id == Task.step_id)
        .join(Configuration, Configuration.id == Task.configuration_id)
        .where(
            StepRow.name == step,
            Configuration.active.is_(True),
            Task.state == TaskState.DONE,
        )
    )


def _iso_of(step, image: ImageInfo | None, night: NightInfo | None) -> int | None:
    """The ISO the masters must match: the frame's, or most of the night's frames'."""
    if image is not None:
        return header_iso(image.header)
    if night is None:
        return None
    isos = [header_iso(i.header) for i in night.images if i.image_type in step.image_types]
    known = [iso for iso in isos if iso is not None]
    return min(set(known), key=lambda iso: (-known.count(iso), iso)) if known else None


def _nearest_master(
    session: Session, step: str, night_id: int | None, iso: int | None = None
) -> tuple[InputProduct, ...]:
    """The done output of night step ``step`` from the camera's night nearest in date,
    among masters of the same ISO when both sides know theirs."""
    if night_id is None:
        return ()
    night = session.get(Night, night_id)
    if night is None:
        return ()
    rows = session.execute(
        _done_outputs(
            step,
            Task.target,
            Task.output_path,
            Task.qc,
            Night.local_date,
            Task.id,
            Configuration.version,
        )
        .join(Night, Night.id == Task.night_id)
        .where(Night.camera_id == night.camera_id)
    ).all()
    if iso is not None:
        rows = [r for r in rows if (r.qc or {}).get("iso") in (None, iso)]
    if not rows:
        return ()
    # Nearest night first; between two equally near, the earlier one.
    target, path, qc, local_date, task_id, version = min(
        rows, key=lambda r: (abs((r.local_date - night.local_date).days), r.local_date)
    )
    return (
        InputProduct(
            target, None, Path(path) if path else None, qc or {}, task_id, version, local_date
        ),
    )


def _heartbeat(url: str, task_id: int, lease: float, stop: threading.Event) -> None:
    while not stop.wait(lease / 3):
        try:
            with session_scope(url) as session:
                if not state.heartbeat(session, task_id, lease_seconds=lease):
                    return
        except (OperationalError, InterfaceError) as error:
            log.warning("heartbeat of task %d missed: %s", task_id, error)


def run_task(
    task_id: int,
    *,
    database_url: str,
    storage_root: Path,
    registry: Registry,
    policy: RunPolicy = DEFAULT_POLICY,
) -> TaskState | None:
    """Run one task to an outcome; None if it was not ours to run (already claimed/done)."""
    if not _in_session(
        database_url, lambda s: state.claim(s, task_id, lease_seconds=policy.lease_seconds)
    ):
        return None

    def load(session: Session) -> StepContext:
        task = session.get(Task, task_id)
        if task is None:
            raise PermanentError(f"task {task_id} vanished from the database")
        return build_context(session, task, registry, storage_root)

    try:
        context = _in_session(database_url, load)
        step = registry[context.step]()
        stop = threading.Event()
        beat = threading.Thread(
            target=_heartbeat,
            args=(database_url, task_id, policy.lease_seconds, stop),
            daemon=True,
        )
        beat.start()
        try:
            result = step.run(context)
        finally:
            stop.set()
            beat.join()
    except PermanentError as error:
        return _record_failure(database_url, task_id, error, ErrorKind.PERMANENT, policy)
    except Exception as error:  # the task boundary: anything else may pass on a retry
        return _record_failure(database_url, task_id, error, ErrorKind.TRANSIENT, policy)
    output = str(result.output_path) if result.output_path is not None else None
    _in_session(database_url, lambda s: state.finish(s, task_id, output_path=output, qc=result.qc))
    return TaskState.DONE


def _record_failure(
    url: str, task_id: int, error: Exception, kind: ErrorKind, policy: RunPolicy
) -> TaskState | None:
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    location = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    message = f"{type(error).__name__}: {error}{location}"
    return _in_session(
        url,
        lambda session: state.fail(
            session,
            task_id,
            error=message,
            kind=kind,
            max_attempts=policy.max_attempts,
            backoff_seconds=policy.backoff_seconds,
        ),
    )
