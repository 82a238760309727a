"""Shards through the distributed service: the scheduler places nights in shard
generations and two real Celery workers append them, on PostgreSQL and Redis, with a
late frame; the shard generations read the same as the local executor's."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from autowisp.db.fields import define_shards
from autowisp.db.migrate import upgrade
from autowisp.db.models import Configuration, Field, Image, Night, Task, TaskState
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.pipeline.local import run_local
from tests.integration.test_shards import _copy, _objects
from tests.service.conftest import wait_for
from tests.service.shard_steps import REGISTRY, content

STEPS = "tests.service.shard_steps:REGISTRY"


def _define_shards_once_fields_exist(url: str, timeout: float) -> None:
    def field_ids():
        with session_scope(url) as session:
            return list(session.scalars(select(Field.id)))

    [field_id] = wait_for(field_ids, timeout, "the frames' field")
    with session_scope(url) as session:
        define_shards(session, field_id, 250, stars_per_shard=100)


def _shards(url: str) -> dict[tuple[str, int], dict[str, list[int]]]:
    """(shard name, generation) -> what a reader of the current generation sees, with
    night ids replaced by dates and image ids by file names (they differ between runs)."""
    with session_scope(url) as session:
        dates = {
            str(i): d.isoformat() for i, d in session.execute(select(Night.id, Night.local_date))
        }
        names = {i: Path(p).name for i, p in session.execute(select(Image.id, Image.path))}
        rows = session.execute(
            select(Task.output_path, Task.generation, Task.state)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(StepRow.name == "lightcurves", Configuration.active.is_(True))
        ).all()
    current: dict[str, tuple[int, str]] = {}
    for path, generation, state in rows:
        if state is TaskState.DONE:
            name = Path(path).name.rsplit("-g", 1)[0].split("-s")[-1]
            if name not in current or current[name][0] < generation:
                current[name] = (generation, path)
    return {
        (shard, generation): {
            dates[night]: sorted(names[i] for i in frames)
            for night, frames in content(Path(path)).items()
        }
        for shard, (generation, path) in current.items()
    }


def _all_done(url: str) -> None:
    with session_scope(url) as session:
        states = session.execute(
            select(StepRow.name, Task.state, Task.last_error)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(Configuration.active.is_(True))
        ).all()
    left = [
        (s, st.value, e)
        for s, st, e in states
        if st is not TaskState.DONE
        and not (st is TaskState.EXCLUDED and e and e.startswith("superseded"))
    ]
    assert not left, left


def test_shards_through_the_scheduler_and_two_workers(
    pg_url, broker_url, small_night, service_factory, tmp_path
):
    first, second, late = tmp_path / "a", tmp_path / "b", tmp_path / "late"
    _copy(_objects(small_night), first)
    _copy(_objects(small_night), second, days=1)
    _copy(_objects(small_night)[:1], late, minutes=2)

    local_url = f"sqlite:///{tmp_path / 'local.sqlite'}"
    upgrade(local_url)
    storage = tmp_path / "local-storage"
    ingest_paths(local_url, [first], close=True)
    run_local(local_url, storage, REGISTRY, jobs=2)
    _define_shards_once_fields_exist(local_url, 5)
    run_local(local_url, storage, REGISTRY, jobs=2)
    for upload in (second, late):
        ingest_paths(local_url, [upload], close=True)
        run_local(local_url, storage, REGISTRY, jobs=2)
    _all_done(local_url)

    service = service_factory(pg_url, broker_url, registry=STEPS)
    service.worker("w1")
    service.worker("w2")
    service.scheduler()
    ingest_paths(pg_url, [first], close=True)
    _define_shards_once_fields_exist(pg_url, 120)
    # measure 6, nightly, 3 lightcurves, 3 epd, templates, 3 tfa, report
    service.wait_finished(6 + 1 + 3 + 3 + 1 + 3 + 1, timeout=240)
    ingest_paths(pg_url, [second], close=True)
    service.wait_finished(2 * (6 + 1 + 1) + 2 * (3 + 3 + 1 + 3), timeout=240)
    ingest_paths(pg_url, [late], close=True)
    # The late frame: measure, night A's second generation (nightly, report), and every
    # shard's third generation (lightcurves, epd, tfa; the field's templates).
    service.wait_finished(2 * (6 + 1 + 1) + 2 * (3 + 3 + 1 + 3) + 1 + 2 + 10, timeout=240)
    _all_done(pg_url)
    served, local = _shards(pg_url), _shards(local_url)
    assert len(served) == 3 and {g for _, g in served} == {3}
    assert served == local
    assert all(len(nights) == 2 for nights in served.values())
