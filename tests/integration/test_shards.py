"""Fields and light-curve shards: nights placed in shard generations, each generation its
own file appended from the previous one, field steps over all shards, night steps over
the shards a night touched, late frames, superseded generations and reconfiguration.

The steps are test steps standing in for the science chain (magfit, light curves, EPD,
TFA templates, TFA, night report); they write real shard generations through
:mod:`autowisp.io.shards`, so the test checks what a reader of the products sees.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time, TimeDelta
from sqlalchemy import select

from autowisp.db.fields import current_generations, define_shards
from autowisp.db.migrate import upgrade
from autowisp.db.models import (
    Configuration,
    Field,
    Image,
    Night,
    ShardNight,
    Task,
)
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.errors import ConfigurationError, PermanentError
from autowisp.ingest.ingest import ingest_paths
from autowisp.io.provenance import Provenance
from autowisp.io.shards import NightBlock, read_shard_generation, write_shard_generation
from autowisp.pipeline.cycle import triage
from autowisp.pipeline.local import apply_configuration, run_local
from autowisp.pipeline.retention import RetentionPolicy, prunable
from autowisp.pipeline.status import collect_status
from autowisp.vocabulary import TaskState
from tests.service.shard_steps import REGISTRY, content

STARS = 250
PER_SHARD = 100


def _camera(small_night: Path) -> Path:
    return sorted(p for p in small_night.iterdir() if p.is_dir())[0]


def _objects(small_night: Path) -> list[Path]:
    return sorted(_camera(small_night).rglob("object_*.fits"))


def _copy(frames: list[Path], target: Path, *, days: int = 0, minutes: int = 0) -> list[Path]:
    """The frames as if taken ``days`` later and ``minutes`` later (new bytes)."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for frame in frames:
        with fits.open(frame) as hdus:
            header = hdus[0].header.copy()
            moment = Time(header["DATE-OBS"], scale="utc") + TimeDelta(
                days * 86400.0 + minutes * 60.0, format="sec"
            )
            header["DATE-OBS"] = moment.isot
            name = target / (frame.stem + (f"-late{minutes}" if minutes else "") + ".fits")
            fits.PrimaryHDU(hdus[0].data, header).writeto(name)
            written.append(name)
    return written


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tasks(url: str, step: str) -> list[Task]:
    with session_scope(url) as session:
        rows = session.scalars(
            select(Task)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(StepRow.name == step, Configuration.active.is_(True))
            .order_by(Task.target, Task.generation)
        ).all()
        session.expunge_all()
        return list(rows)


def _current(url: str, step: str) -> dict[str, Task]:
    """Per target, the latest done task of the step's active configuration: what the
    database names as the current generation."""
    current: dict[str, Task] = {}
    for task in _tasks(url, step):
        if task.state is TaskState.DONE:
            current[task.target] = task
    return current


def _field_and_shards(url: str) -> tuple[int, list[int]]:
    with session_scope(url) as session:
        [field_id] = session.scalars(select(Field.id)).all()
        created = define_shards(session, field_id, STARS, stars_per_shard=PER_SHARD)
        return field_id, created


def _night_ids(url: str) -> dict[str, int]:
    with session_scope(url) as session:
        return {d.isoformat(): i for i, d in session.execute(select(Night.id, Night.local_date))}


def test_shards_grow_night_by_night_in_generation_files(db_url, small_night, tmp_path):
    url = db_url
    storage = tmp_path / "storage"
    first = tmp_path / "first"
    _copy(_objects(small_night), first)
    ingest_paths(url, [first], close=True)
    summary = run_local(url, storage, REGISTRY, jobs=2)
    # The frames have a field, with no shards yet: the report waits and says why.
    with session_scope(url) as session:
        fields = set(session.scalars(select(Image.field_id).where(Image.image_type == "object")))
        assert len(fields) == 1 and None not in fields
    [report] = _tasks(url, "report")
    assert report.state is TaskState.PENDING
    assert "placed in light-curve shards" in report.wait_reason
    assert any("placed in light-curve shards" in w.reason for w in summary.waiting)

    field_id, shards = _field_and_shards(url)
    assert len(shards) == 3  # 250 stars, 100 a shard
    run_local(url, storage, REGISTRY, jobs=2)
    nights = _night_ids(url)
    [night_a] = nights.values()
    lightcurves = _current(url, "lightcurves")
    assert sorted(lightcurves) == [f"shard:{s}" for s in shards]
    frames_a = sorted(t.image_id for t in _tasks(url, "measure"))
    g1 = {}
    for target, task in lightcurves.items():
        assert task.generation == 1
        path = Path(task.output_path)
        assert path.name.endswith("-g1.h5")
        assert content(path) == {str(night_a): frames_a}
        g1[target] = (path, _sha(path))
    [report] = _tasks(url, "report")
    assert report.state is TaskState.DONE
    assert report.qc["shards"] == sorted(lightcurves)
    assert all(v == frames_a for v in report.qc["frames"].values())

    # A second night of the same pointing: every shard gets generation 2, which writes
    # only that night and points to generation 1 for the first.
    second = tmp_path / "second"
    _copy(_objects(small_night), second, days=1)
    ingest_paths(url, [second], close=True)
    run_local(url, storage, REGISTRY, jobs=2)
    nights = _night_ids(url)
    night_b = next(i for i in nights.values() if i != night_a)
    frames_b = sorted(t.image_id for t in _tasks(url, "measure") if t.night_id == night_b)
    for target, task in _current(url, "lightcurves").items():
        assert task.generation == 2
        path = Path(task.output_path)
        generation = read_shard_generation(path)
        assert generation.previous == g1[target][0].name
        assert {n: b.stored_in for n, b in generation.nights.items()} == {
            night_a: g1[target][0].name,
            night_b: path.name,
        }
        assert content(path) == {str(night_a): frames_a, str(night_b): frames_b}
        # The earlier generation is untouched and still reads as it did.
        assert _sha(g1[target][0]) == g1[target][1]
        assert content(g1[target][0]) == {str(night_a): frames_a}
        # Appending cost the night: the new file holds one night's data only.
        with_data = [n for n, b in generation.nights.items() if b.stored_in == path.name]
        assert with_data == [night_b]
    templates = _current(url, "templates")
    assert [t.generation for t in templates.values()] == [2]
    assert templates[f"field:{field_id}"].qc["shards"] == 3
    reports = {t.night_id: t for t in _tasks(url, "report")}
    assert reports[night_b].state is TaskState.DONE
    assert all(v == frames_b for v in reports[night_b].qc["frames"].values())

    # A late frame for the first night: it reopens, closes as generation 2, and every
    # shard gets generation 3 holding night A's new generation (7 frames) and night B's.
    late = tmp_path / "late"
    _copy(_objects(small_night)[:1], late, minutes=2)
    ingest_paths(url, [late], close=True)
    run_local(url, storage, REGISTRY, jobs=2)
    with session_scope(url) as session:
        night = session.get(Night, night_a)
        assert night.closed_generation == 2
        placed = session.execute(
            select(ShardNight.night_id, ShardNight.night_generation, ShardNight.shard_generation)
            .where(ShardNight.shard_id == shards[0])
            .order_by(ShardNight.shard_generation)
        ).all()
    assert [tuple(r) for r in placed] == [(night_a, 1, 1), (night_b, 1, 2), (night_a, 2, 3)]
    frames_a2 = sorted(t.image_id for t in _tasks(url, "measure") if t.night_id == night_a)
    assert len(frames_a2) == len(frames_a) + 1
    with session_scope(url) as session:
        named = current_generations(session, "lightcurves")
    assert sorted(named) == shards
    for current in named.values():
        assert current.generation == 3 and current.sha256 == _sha(Path(current.path))
        assert content(Path(current.path)) == {
            str(night_a): frames_a2,
            str(night_b): frames_b,
        }
    reports = {(t.night_id, t.generation): t for t in _tasks(url, "report")}
    assert reports[(night_a, 2)].state is TaskState.DONE
    assert all(v == frames_a2 for v in reports[(night_a, 2)].qc["frames"].values())
    # TFA of each generation read the templates of its field generation.
    tfa = _current(url, "tfa")
    templates = {t.generation: t.id for t in _tasks(url, "templates")}
    assert {t.qc["templates_task"] for t in tfa.values()} == {templates[3]}
    # Every task of every step ended done (none left waiting, dead or excluded).
    for step in REGISTRY:
        states = {t.state for t in _tasks(url, step.name)}
        assert states == {TaskState.DONE}, (step.name, states)
    # Operators see the field, its shards and their current generation's tasks.
    with session_scope(url) as session:
        [row] = collect_status(session).fields
    assert (row["field_id"], row["shards"], row["nights"], row["generation"]) == (
        field_id,
        3,
        2,
        3,
    )
    assert row["nights_in_shards"] == 2 and row["frames"] == 2 * len(frames_b) + 1
    # Three shards of lightcurves, epd and tfa at generation 3, and the field's templates.
    assert row["tasks"] == {"done": 3 * 3 + 1}


@pytest.fixture
def sqlite_url(tmp_path):
    """One backend is enough where the growth test already runs on both."""
    url = f"sqlite:///{tmp_path / 'autowisp.sqlite'}"
    upgrade(url)
    return url


def test_a_generation_planned_before_the_previous_ran_supersedes_it(
    sqlite_url, small_night, tmp_path
):
    """Two nights placed in consecutive passes before any shard task ran: generation 1 is
    superseded and generation 2 builds from nothing with both nights."""
    url = sqlite_url
    for name, days in (("a", 0), ("b", 1)):
        _copy(_objects(small_night), tmp_path / name, days=days)
    ingest_paths(url, [tmp_path / "a"], close=True)
    configurations = apply_configuration(url, REGISTRY, {})
    with session_scope(url) as session:
        triage(session, REGISTRY, configurations, full=True)  # fields for the frames
    _field_and_shards(url)
    with session_scope(url) as session:
        triage(session, REGISTRY, configurations, full=True)
    assert {t.generation for t in _tasks(url, "lightcurves")} == {1}
    ingest_paths(url, [tmp_path / "b"], close=True)
    with session_scope(url) as session:
        triage(session, REGISTRY, configurations)
    by_generation = {}
    for task in _tasks(url, "lightcurves"):
        by_generation.setdefault(task.generation, []).append(task)
    assert sorted(by_generation) == [1, 2]
    assert all(t.state is TaskState.EXCLUDED for t in by_generation[1])
    assert all("superseded" in t.last_error for t in by_generation[1])
    run_local(url, tmp_path / "storage", REGISTRY, jobs=2)
    nights = set(_night_ids(url).values())
    for task in _current(url, "lightcurves").values():
        assert task.generation == 2
        assert task.qc["appended"] and set(task.qc["appended"]) == nights
        generation = read_shard_generation(Path(task.output_path))
        assert generation.previous == ""
        assert set(generation.nights) == nights
    [report_a, report_b] = sorted(_tasks(url, "report"), key=lambda t: t.night_id)
    assert report_a.state is TaskState.DONE and report_b.state is TaskState.DONE


def test_a_new_configuration_builds_its_shards_from_every_night(sqlite_url, small_night, tmp_path):
    url = sqlite_url
    storage = tmp_path / "storage"
    for name, days in (("a", 0), ("b", 1)):
        _copy(_objects(small_night), tmp_path / name, days=days)
        ingest_paths(url, [tmp_path / name], close=True)
        run_local(url, storage, REGISTRY, jobs=2)
        if name == "a":
            _field_and_shards(url)
            run_local(url, storage, REGISTRY, jobs=2)
    old = _current(url, "lightcurves")
    assert {t.generation for t in old.values()} == {2}
    run_local(url, storage, REGISTRY, jobs=2, step_parameters={"lightcurves": {"label": "b"}})
    new = _current(url, "lightcurves")
    assert {t.configuration_id for t in new.values()}.isdisjoint(
        {t.configuration_id for t in old.values()}
    )
    nights = set(_night_ids(url).values())
    for target, task in new.items():
        # Only the latest generation, from nothing: both nights, in its own directory.
        assert task.generation == 2
        assert set(task.qc["appended"]) == nights
        assert Path(task.output_path).parent != Path(old[target].output_path).parent
        assert content(Path(task.output_path)) == content(Path(old[target].output_path))
    # Downstream of the changed step ran again; the report of each night too.
    assert {t.state for t in _tasks(url, "report")} == {TaskState.DONE}
    # The old configuration's shard generations are history that later generations of
    # that chain point to: a retention policy never deletes them.
    with session_scope(url) as session:
        doomed = prunable(session, REGISTRY, RetentionPolicy(superseded_days=0))
    assert doomed, "the old configuration's night products are superseded"
    assert not [p for p in doomed if p.target.startswith(("shard:", "field:"))]
    with pytest.raises(ConfigurationError, match="never deleted"):
        RetentionPolicy.from_table({"lightcurves": "consumed"}, registry=REGISTRY)


def test_a_reader_is_told_when_a_member_generation_is_missing(tmp_path):
    provenance = Provenance("lightcurves", "1", "cfg")
    first, second = tmp_path / "s-g1.h5", tmp_path / "s-g2.h5"
    block = NightBlock(1, "2024-09-10", 1, {"frames": np.arange(3)})
    write_shard_generation(
        first, shard="s", field_name="f", star_lo=0, star_hi=10, generation=1,
        provenance=provenance, previous=None, written=[block],
    )  # fmt: skip
    write_shard_generation(
        second, shard="s", field_name="f", star_lo=0, star_hi=10, generation=2,
        provenance=provenance, previous=first,
        written=[NightBlock(2, "2024-09-11", 1, {"frames": np.arange(2)})],
    )  # fmt: skip
    assert sorted(read_shard_generation(second).nights) == [1, 2]
    assert read_shard_generation(second).provenance.step == "lightcurves"
    # Dropping a night, and rewriting one at a newer generation.
    third = tmp_path / "s-g3.h5"
    write_shard_generation(
        third, shard="s", field_name="f", star_lo=0, star_hi=10, generation=3,
        provenance=provenance, previous=second, dropped=[2],
        written=[NightBlock(1, "2024-09-10", 2, {"frames": np.arange(4)})],
    )  # fmt: skip
    content = read_shard_generation(third)
    assert list(content.nights) == [1] and content.nights[1].night_generation == 2
    assert list(content.nights[1].columns["frames"]) == [0, 1, 2, 3]
    first.unlink()
    with pytest.raises(PermanentError, match="missing"):
        read_shard_generation(second)
    # A file of another shard is refused as a previous generation.
    other = tmp_path / "o-g1.h5"
    write_shard_generation(
        other, shard="o", field_name="f", star_lo=0, star_hi=10, generation=1,
        provenance=provenance, previous=None, written=[],
    )  # fmt: skip
    with pytest.raises(PermanentError, match="another shard"):
        write_shard_generation(
            tmp_path / "s-g4.h5", shard="s", field_name="f", star_lo=0, star_hi=10,
            generation=4, provenance=provenance, previous=other, written=[],
        )  # fmt: skip
    assert not (tmp_path / "s-g4.h5").exists()
