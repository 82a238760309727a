"""What the runner records in the database from a step's output, beside the task's state.

A step never touches the database (:mod:`autowisp.steps.base`); a step whose output
gives the database facts names a *recorder* (``Step.recorder``). The runner calls it in
the transaction that marks the task done, so the task is done exactly when its facts are
recorded: a recorder that fails rolls the task's completion back with it, and the task
fails with the recorder's error (and is retried like any other).

``stars``
    the ``star_list`` step's candidates (:mod:`autowisp.io.night_star_list`), registered
    per field (:func:`autowisp.db.stars.register_stars`): known stars keep their ids, new
    ones get theirs; each row of the list is recorded as its field star
    (:class:`~autowisp.db.models.StarListRow`), and the field's light-curve shards are
    extended over its new stars (:func:`autowisp.db.fields.define_shards`, the step's
    ``stars_per_shard``). The task's QC gains, per field, how many stars were new.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from autowisp.db._bulk import insert_columns
from autowisp.db.fields import define_shards
from autowisp.db.models import FieldStar, StarListRow, Task
from autowisp.db.stars import Candidates, register_stars
from autowisp.errors import PermanentError
from autowisp.io.night_star_list import read_star_list

__all__ = ["RECORDERS", "record"]


def _record_stars(session: Session, task: Task, output: Path, qc: dict[str, Any]) -> None:
    star_list = read_star_list(output)
    figures = dict(qc)
    fields = dict(figures.get("fields") or {})
    per_shard = int(dict(task.configuration.parameters).get("stars_per_shard", 1000))
    # A task run again (reprocessing) records its rows anew.
    session.execute(delete(StarListRow).where(StarListRow.task_id == task.id))
    for candidates in star_list.fields:
        columns = candidates.columns
        registered = register_stars(
            session,
            field_id=candidates.field_id,
            night_id=task.night_id,
            candidates=Candidates(
                ra=columns["ra"],
                dec=columns["dec"],
                gaia_source_id=np.asarray(columns["gaia_source_id"], np.int64),
                g=columns["g"],
                bp=columns["bp"],
                rp=columns["rp"],
                flags=np.asarray(columns["flags"], np.int64),
                epoch=candidates.epoch,
                instrumental=dict(candidates.instrumental),
            ),
            match_radius_deg=candidates.match_radius_deg,
        )
        if len(candidates):
            insert_columns(
                session,
                StarListRow.__table__,
                {
                    "list_row": list(range(len(candidates))),
                    "star_index": registered.star_index.tolist(),
                },
                constants={"task_id": task.id, "field_id": candidates.field_id},
            )
        count = session.scalar(
            select(func.max(FieldStar.star_index)).where(FieldStar.field_id == candidates.field_id)
        )
        shards = define_shards(
            session,
            candidates.field_id,
            0 if count is None else int(count) + 1,
            stars_per_shard=per_shard,
        )
        entry = dict(fields.get(str(candidates.field_id)) or {})
        entry["new_stars"] = registered.new_stars
        entry["new_in_field"] = registered.new_in_field
        entry["new_shards"] = len(shards)
        fields[str(candidates.field_id)] = entry
    figures["fields"] = fields
    figures["new_stars"] = int(sum(int(f.get("new_stars", 0)) for f in fields.values()))
    session.execute(update(Task).where(Task.id == task.id).values(qc=figures))


#: Recorder name -> function(session, task row, output file, the step's QC).
RECORDERS: dict[str, Callable[[Session, Task, Path, dict[str, Any]], None]] = {
    "stars": _record_stars,
}


def record(
    session: Session, name: str, task_id: int, output: str | None, qc: dict[str, Any]
) -> None:
    """Run recorder ``name`` for task ``task_id``'s ``output`` (a no-op for "")."""
    if not name:
        return
    if name not in RECORDERS:
        raise PermanentError(f"no recorder named {name!r}; recorders: {', '.join(RECORDERS)}")
    if output is None:
        raise PermanentError(f"task {task_id} has no output for its {name!r} recorder")
    task = session.get(Task, task_id)
    if task is None:
        raise PermanentError(f"task {task_id} vanished from the database")
    RECORDERS[name](session, task, Path(output), qc)
