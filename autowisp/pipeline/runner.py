"""The one code path that runs a task, shared by the local executor and the Celery workers.

``run_task`` claims the task row (so a duplicate delivery does nothing), builds the
step's context from the database, runs the step while a heartbeat keeps the lease
alive, and records the outcome: done with output and QC, failed for a retry, or dead.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from autowisp.config import RunPolicy
from autowisp.db.fields import shard_nights
from autowisp.db.models import (
    Camera,
    CameraType,
    ErrorKind,
    Field,
    FieldStar,
    Image,
    ImageState,
    LightCurveShard,
    Night,
    Star,
    StarListRow,
    Task,
    TaskState,
)
from autowisp.db.session import session_scope
from autowisp.errors import PermanentError, TransientError
from autowisp.ingest.headers import sha256_of
from autowisp.io.provenance import shown_path
from autowisp.pipeline import state
from autowisp.pipeline.dependencies import input_products
from autowisp.pipeline.recorders import record
from autowisp.pipeline.retention import pruned_inputs
from autowisp.steps.base import (
    FieldInfo,
    ImageInfo,
    InputProduct,
    NightInfo,
    PlacedNight,
    ShardInfo,
    ShardStars,
    StepContext,
)
from autowisp.steps.registry import Registry

__all__ = [
    "DEFAULT_POLICY",
    "RunPolicy",
    "StepTimeout",
    "classify_error",
    "run_task",
    "time_limited",
    "with_db_retry",
]

log = logging.getLogger(__name__)


DEFAULT_POLICY = RunPolicy()


def _image_info(image: Image, layout: str, serial: str, field_name: str = "") -> ImageInfo:
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
        field_id=image.field_id,
        field_name=field_name,
    )


def _night_info(
    session: Session, night_id: int, *, image_id: int | None = None, generation: int | None = None
) -> NightInfo:
    """The night and its frames: those of generations up to ``generation`` (all without
    one), or only ``image_id`` (an image task needs only its own frame, and loading a
    2,000-frame night per task would be quadratic)."""
    night, serial, layout = session.execute(
        select(Night, Camera.serial, CameraType.layout)
        .join(Camera, Camera.id == Night.camera_id)
        .join(CameraType, CameraType.id == Camera.camera_type_id)
        .where(Night.id == night_id)
    ).one()
    query = select(Image).where(Image.night_id == night_id, Image.state == ImageState.INGESTED)
    if image_id is not None:
        query = query.where(Image.id == image_id)
    if generation is not None:
        query = query.where(Image.generation <= generation)
    images = session.scalars(query.order_by(Image.jd)).all()
    field_ids = sorted({i.field_id for i in images if i.field_id is not None})
    names: dict[int, str] = {}
    if field_ids:
        query_names = select(Field.id, Field.name).where(Field.id.in_(field_ids))
        names = {field_id: name for field_id, name in session.execute(query_names)}
    return NightInfo(
        night.id,
        night.local_date,
        serial,
        layout,
        tuple(
            _image_info(i, layout, serial, names.get(i.field_id, "") if i.field_id else "")
            for i in images
        ),
    )


def _field_info(session: Session, field_id: int, generation: int) -> FieldInfo:
    field, serial = session.execute(
        select(Field, Camera.serial)
        .join(Camera, Camera.id == Field.camera_id)
        .where(Field.id == field_id)
    ).one()
    return FieldInfo(field.id, field.name, serial, field.ra, field.dec, field.radius, generation)


def _shard_info(
    session: Session, shard_id: int, generation: int, previous: int, field_name: str
) -> ShardInfo:
    """The shard at ``generation``: its nights (each at its newest generation placed so
    far) and those placed after generation ``previous`` (the ones the task writes)."""
    shard = session.get(LightCurveShard, shard_id)
    if shard is None:
        raise PermanentError(f"light-curve shard {shard_id} is not in the database")
    dates = {}
    rows = shard_nights(session, [shard_id]).get(shard_id, [])
    night_ids = sorted({night for night, _, _, _ in rows})
    if night_ids:
        dates = {
            night_id: local_date
            for night_id, local_date in session.execute(
                select(Night.id, Night.local_date).where(Night.id.in_(night_ids))
            )
        }

    def newest(low: int) -> tuple[PlacedNight, ...]:
        chosen: dict[int, PlacedNight] = {}
        for night, night_gen, shard_gen, _ in rows:
            if low < shard_gen <= generation and (
                night not in chosen or chosen[night].night_generation < night_gen
            ):
                chosen[night] = PlacedNight(night, dates[night], night_gen, shard_gen)
        return tuple(sorted(chosen.values(), key=lambda n: (n.local_date, n.night_id)))

    field_generation = max(
        (field_gen for _, _, shard_gen, field_gen in rows if shard_gen <= generation), default=0
    )
    return ShardInfo(
        id=shard.id,
        name=shard.name,
        field_id=shard.field_id,
        field_name=field_name,
        index=shard.shard_index,
        star_lo=shard.star_lo,
        star_hi=shard.star_hi,
        generation=generation,
        field_generation=field_generation,
        nights=newest(0),
        appended=newest(previous),
        previous_generation=previous,
    )


def _shard_stars(session: Session, shard: ShardInfo, storage_root: Path) -> ShardStars:
    """The shard's stars, and the rows of the appended nights' star lists that are its
    stars (:class:`ShardStars`)."""
    rows = session.execute(
        select(FieldStar.star_index, FieldStar.star_id, Star.gaia_source_id, Star.ra, Star.dec,
               Star.g, Star.bp, Star.rp)
        .join(Star, Star.id == FieldStar.star_id)
        .where(
            FieldStar.field_id == shard.field_id,
            FieldStar.star_index >= shard.star_lo,
            FieldStar.star_index < shard.star_hi,
        )
        .order_by(FieldStar.star_index)
    ).all()  # fmt: skip
    columns = list(zip(*rows, strict=True)) if rows else [()] * 8

    def ints(values: tuple[object, ...]) -> np.ndarray:
        return np.array([-1 if v is None else v for v in values], np.int64)

    def floats(values: tuple[object, ...]) -> np.ndarray:
        return np.array(values, dtype=np.float64).reshape(len(rows))  # None becomes NaN

    nights = sorted({placed.night_id for placed in shard.appended})
    list_rows = (
        _star_list_rows(
            session, storage_root, Task.night_id.in_(nights),
            StarListRow.field_id == shard.field_id, StarListRow.star_index >= shard.star_lo,
            StarListRow.star_index < shard.star_hi,
        ).get(shard.field_id, {})
        if nights
        else {}
    )  # fmt: skip
    return ShardStars(
        star_index=ints(columns[0]), star_id=ints(columns[1]), gaia_source_id=ints(columns[2]),
        ra=floats(columns[3]), dec=floats(columns[4]), g=floats(columns[5]),
        bp=floats(columns[6]), rp=floats(columns[7]), list_rows=list_rows,
    )  # fmt: skip


def _star_list_rows(
    session: Session, storage_root: Path, *conditions: ColumnElement[bool]
) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per field, per star list (its product's path as a reference shows it), the
    recorded rows matching ``conditions`` and their field stars, ``(list_row, index)``."""
    found = session.execute(
        select(StarListRow.field_id, Task.output_path, StarListRow.list_row,
               StarListRow.star_index)
        .join(Task, Task.id == StarListRow.task_id)
        .where(Task.output_path.is_not(None), *conditions)
        .order_by(StarListRow.field_id, Task.id, StarListRow.list_row)
    ).all()  # fmt: skip
    gathered: dict[int, dict[str, tuple[list[int], list[int]]]] = {}
    for field_id, path, list_row, star_index in found:
        key = shown_path(Path(str(path)), storage_root)
        entry = gathered.setdefault(int(field_id), {}).setdefault(key, ([], []))
        entry[0].append(int(list_row))
        entry[1].append(int(star_index))
    return {
        field_id: {
            key: (np.array(rows, np.int64), np.array(indices, np.int64))
            for key, (rows, indices) in lists.items()
        }
        for field_id, lists in gathered.items()
    }


def _field_with_shards(session: Session, field_id: int, generation: int) -> FieldInfo:
    """The field at ``generation``, with each shard at its generation in it."""
    field = _field_info(session, field_id, generation)
    shard_ids = list(
        session.scalars(
            select(LightCurveShard.id)
            .where(LightCurveShard.field_id == field_id)
            .order_by(LightCurveShard.shard_index)
        )
    )
    placed = shard_nights(session, shard_ids)
    shards = []
    for shard_id in shard_ids:
        at = [s for _, _, s, f in placed.get(shard_id, []) if f <= generation]
        if at:
            shards.append(_shard_info(session, shard_id, max(at), 0, field.name))
    return replace(field, shards=tuple(shards))


def build_context(
    session: Session, task: Task, registry: Registry, storage_root: Path
) -> StepContext:
    """The step's view of a task: target, parameters and exactly the upstream outputs
    recorded as its inputs when it was queued."""
    step = registry[task.step.name]
    night = None
    if task.night_id is not None:
        night = _night_info(
            session, task.night_id, image_id=task.image_id, generation=task.generation or None
        )
    if night is not None and step.night_star_rows:
        night = replace(
            night, star_rows=_star_list_rows(session, storage_root, Task.night_id == night.id)
        )
    image = None
    if task.image_id is not None:
        found = [i for i in (night.images if night else ()) if i.id == task.image_id]
        if not found:
            raise PermanentError(f"image {task.image_id} of task {task.id} is not ingested")
        image = found[0]
    if task.inputs is None:
        if registry.edges(step.name):
            raise TransientError(
                f"task {task.id} was claimed before its inputs were resolved: it goes back "
                "to be evaluated"
            )
        inputs: dict[str, tuple[InputProduct, ...]] = {}
    else:
        pruned = pruned_inputs(session, task.inputs)
        if pruned:
            names = ", ".join(
                f"{name} task {i} (pruned {when:%Y-%m-%d})" for name, i, when in pruned
            )
            raise PermanentError(
                f"task {task.id} reads products the retention policy deleted: {names}; "
                "they must be made again before it can run"
            )
        inputs = input_products(session, task.inputs)
    shard = field = None
    if task.shard_id is not None:
        previous = 0
        own = (task.inputs or {}).get(step.name, ())
        if own:
            previous = int(
                session.scalar(select(Task.generation).where(Task.id == int(own[0]))) or 0
            )
        field = _field_info(session, task.field_id or -1, 0)
        shard = _shard_info(session, task.shard_id, task.generation, previous, field.name)
        if step.shard_stars:
            shard = replace(shard, stars=_shard_stars(session, shard, storage_root))
        field = replace(field, generation=shard.field_generation)
    elif task.field_id is not None:
        field = _field_with_shards(session, task.field_id, task.generation)
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
        generation=task.generation,
        shard=shard,
        field=field,
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


def _heartbeat(
    url: str, task_id: int, token: str, lease: float, stop: threading.Event, lost: threading.Event
) -> None:
    while not stop.wait(lease / 3):
        try:
            with session_scope(url) as session:
                if not state.heartbeat(session, task_id, token, lease_seconds=lease):
                    log.warning("task %d: lease lost (expired and taken over?)", task_id)
                    lost.set()
                    return
        except (OperationalError, InterfaceError) as error:
            log.warning("heartbeat of task %d missed: %s", task_id, error)


class StepTimeout(TransientError):
    """A step ran past its time limit."""


@contextmanager
def time_limited(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`StepTimeout` in the main thread after ``seconds`` (no limit if 0, or
    outside the main thread, where signals cannot be delivered)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise StepTimeout(f"{what} ran longer than its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: Errors that may pass on a retry: I/O and storage, connections (the database's too),
#: memory, time limits. PermanentError is the data's fault; anything else is a bug.
TRANSIENT = (TransientError, OSError, MemoryError, OperationalError, InterfaceError)


def classify_error(error: BaseException) -> ErrorKind:
    """transient, permanent or bug (see :data:`TRANSIENT`)."""
    if isinstance(error, PermanentError):
        return ErrorKind.PERMANENT
    if isinstance(error, TRANSIENT):
        return ErrorKind.TRANSIENT
    return ErrorKind.BUG


def run_task(
    task_id: int,
    *,
    database_url: str,
    storage_root: Path,
    registry: Registry,
    policy: RunPolicy = DEFAULT_POLICY,
    time_limit: float | None = None,
) -> TaskState | None:
    """Run one task to an outcome; None if it was not ours to run (already claimed or
    done) or its lease was lost meanwhile (another worker owns it now). The step may run
    ``time_limit`` seconds (default: the policy's limit for it)."""
    token = _in_session(
        database_url, lambda s: state.claim(s, task_id, lease_seconds=policy.lease_seconds)
    )
    if token is None:
        return None

    def load(session: Session) -> StepContext:
        task = session.get(Task, task_id)
        if task is None:
            raise PermanentError(f"task {task_id} vanished from the database")
        return build_context(session, task, registry, storage_root)

    lost = threading.Event()
    try:
        context = _in_session(database_url, load)
        step_class = registry[context.step]
        step = step_class()
        stop = threading.Event()
        beat = threading.Thread(
            target=_heartbeat,
            args=(database_url, task_id, token, policy.lease_seconds, stop, lost),
            daemon=True,
        )
        beat.start()
        try:
            limit = time_limit if time_limit is not None else policy.time_limit(step_class)
            with time_limited(limit, f"{context.step} of {context.target}"):
                result = step.run(context)
        finally:
            stop.set()
            beat.join()
        output = str(result.output_path) if result.output_path is not None else None
        checksum = sha256_of(result.output_path) if result.output_path is not None else None
    except Exception as error:  # the task boundary: classified, recorded, never lost
        return _record_failure(database_url, task_id, token, error, policy)

    def finish(session: Session) -> bool:
        done = state.finish(
            session, task_id, token, output_path=output, qc=result.qc, output_sha256=checksum
        )
        if done:  # the step's facts, in the same transaction (recorders.py)
            record(session, step_class.recorder, task_id, output, dict(result.qc))
        return done

    try:
        finished = _in_session(database_url, finish)
    except Exception as error:  # the recorder's: the completion was rolled back with it
        return _record_failure(database_url, task_id, token, error, policy)
    if not finished:
        log.warning("task %d finished after its lease was lost: result not recorded", task_id)
        return None
    return TaskState.DONE


def _record_failure(
    url: str, task_id: int, token: str, error: Exception, policy: RunPolicy
) -> TaskState | None:
    kind = classify_error(error)
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    location = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    message = f"{type(error).__name__}: {error}{location}"
    if kind is ErrorKind.BUG:
        trace = "".join(traceback.format_exception(error))
        message = f"bug (not retried; report it with this traceback): {message}\n{trace}"
        log.error("task %d failed with a bug:\n%s", task_id, trace)
    outcome = _in_session(
        url,
        lambda session: state.fail(
            session,
            task_id,
            token,
            error=message,
            kind=kind,
            max_attempts=policy.max_attempts,
            backoff_seconds=policy.backoff_seconds,
        ),
    )
    if outcome is None:
        log.warning("task %d failed after its lease was lost: failure not recorded", task_id)
    return outcome
