"""Retention of intermediate products: nothing by default; consumed calibrated frames go
only once every reader is done; masters stay while a kept calibrated frame names them;
superseded generations go after N days; dry runs delete nothing; pruning is idempotent;
a task whose inputs were pruned is not reset by `autowisp retry`."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select, update

from autowisp.db.migrate import upgrade
from autowisp.db.models import Configuration, Task
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.errors import ConfigurationError
from autowisp.ingest.ingest import ingest_paths
from autowisp.io.products import read_calibrated_frame
from autowisp.pipeline.cycle import triage
from autowisp.pipeline.local import apply_configuration, run_local
from autowisp.pipeline.retention import RetentionPolicy, prunable, prune
from autowisp.steps.base import Step, StepContext, StepResult
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.night_qc import NightQC
from autowisp.steps.registry import Registry
from autowisp.vocabulary import ImageType, Scope, TaskState
from tests.conftest import run_cli


class Reader(Step):
    """A consumer of calibrated frames (stands in for astrometry): reads the image."""

    name = "reader"
    scope = Scope.IMAGE
    inputs = ("calibrate",)
    image_types = frozenset({ImageType.OBJECT})

    def run(self, context: StepContext) -> StepResult:
        [product] = context.inputs["calibrate"]
        frame = read_calibrated_frame(Path(str(product.output_path)), with_error=False)
        return StepResult(qc={"pixels": int(frame.image.size)})


CALIBRATION = Registry([FrameQC, NightQC, MasterBias, MasterDark, MasterFlat, Calibrate])
READING = Registry([FrameQC, NightQC, MasterBias, MasterDark, MasterFlat, Calibrate, Reader])
FEW = {"master_bias": {"min_frames": 4}, "master_dark": {"min_frames": 4},
       "master_flat": {"min_frames": 4}}  # fmt: skip
MASTERS = {"master_bias", "master_dark", "master_flat"}


def _camera(small_night: Path) -> Path:
    return sorted(p for p in small_night.iterdir() if p.is_dir())[0]


def _tasks(url: str, step: str, *, active: bool = True) -> list[Task]:
    with session_scope(url) as session:
        query = (
            select(Task)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(StepRow.name == step)
            .order_by(Task.id)
        )
        if active:
            query = query.where(Configuration.active.is_(True))
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows


def _plan(url: str, policy: RetentionPolicy, registry: Registry = READING) -> list:
    with session_scope(url) as session:
        return prunable(session, registry, policy)


def test_the_policy_refuses_what_it_cannot_delete_safely():
    assert not RetentionPolicy.from_table({}, registry=READING).enabled
    policy = RetentionPolicy.from_table(
        {"calibrate": "consumed", "superseded": 30}, registry=READING
    )
    assert policy.consumed == {"calibrate"} and policy.superseded_days == 30.0
    refused = {
        "master_bias": "master input",  # other nights' frames may read it later
        "frame_qc": "reopens",  # read again by the next generation's barriers
        "reader": "final product",
    }
    for step, reason in refused.items():
        with pytest.raises(ConfigurationError, match=reason):
            RetentionPolicy.from_table({step: "consumed"}, registry=READING)
    for table in ({"calibrate": "sometimes"}, {"superseded": -1}, {"nosuchstep": "consumed"}):
        with pytest.raises(ConfigurationError):
            RetentionPolicy.from_table(table, registry=READING)


def test_consumed_calibrated_frames_go_only_once_every_reader_is_done(
    db_url, small_night, tmp_path
):
    storage = tmp_path / "storage"
    ingest_paths(db_url, [_camera(small_night)], close=True)
    run_local(db_url, storage, CALIBRATION, jobs=2, step_parameters=FEW)
    calibrated = _tasks(db_url, "calibrate")
    assert len(calibrated) == 6 and all(t.state is TaskState.DONE for t in calibrated)
    files = {t.id: Path(str(t.output_path)) for t in calibrated}
    assert all(p.is_file() for p in files.values())
    # The default policy (an empty table) deletes nothing, ever.
    with session_scope(db_url) as session:
        report = prune(session, READING, RetentionPolicy(), dry_run=False)
    assert report.items == [] and all(p.is_file() for p in files.values())

    consumed = RetentionPolicy.from_table({"calibrate": "consumed"}, registry=READING)
    # No reader task exists yet: the frames stay.
    assert _plan(db_url, consumed) == []
    # Reader tasks planned but pending: the frames stay.
    configurations = apply_configuration(db_url, READING, FEW)
    with session_scope(db_url) as session:
        triage(session, READING, configurations)
    readers = _tasks(db_url, "reader")
    assert len(readers) == 6 and all(t.state is TaskState.PENDING for t in readers)
    assert _plan(db_url, consumed) == []
    # One reader done, the others still pending: only its frame goes.
    run_local(db_url, storage, READING, jobs=1, step_parameters=FEW)
    readers = _tasks(db_url, "reader")
    assert all(t.state is TaskState.DONE for t in readers)
    with session_scope(db_url) as session:
        session.execute(
            update(Task)
            .where(Task.id.in_([t.id for t in readers[1:]]))
            .values(state=TaskState.PENDING)
        )
    [only] = _plan(db_url, consumed)
    assert only.task_id == readers[0].inputs["calibrate"][0]
    with session_scope(db_url) as session:
        session.execute(
            update(Task)
            .where(Task.id.in_([t.id for t in readers[1:]]))
            .values(state=TaskState.DONE)
        )
    # Every reader done: every calibrated frame goes, nothing else (masters stay).
    plan = _plan(db_url, consumed)
    assert sorted(p.task_id for p in plan) == sorted(files)
    assert {p.step for p in plan} == {"calibrate"}
    assert sum(p.size_bytes for p in plan) == sum(p.stat().st_size for p in files.values())
    # A dry run deletes and records nothing.
    with session_scope(db_url) as session:
        report = prune(session, READING, consumed, dry_run=True)
    assert len(report.items) == 6 and report.bytes_freed > 0
    assert all(p.is_file() for p in files.values())
    assert all(t.output_pruned_at is None for t in _tasks(db_url, "calibrate"))
    with session_scope(db_url) as session:
        report = prune(session, READING, consumed)
    assert len(report.items) == 6 and report.missing == [] and report.failed == []
    assert report.bytes_freed == sum(p.size_bytes for p in plan)
    assert not any(p.exists() for p in files.values())
    after = _tasks(db_url, "calibrate")
    for before, row in zip(calibrated, after, strict=True):
        assert row.output_pruned_at is not None and row.state is TaskState.DONE
        assert (row.output_path, row.output_sha256) == (before.output_path, before.output_sha256)
    for step in MASTERS:
        assert all(Path(str(t.output_path)).is_file() for t in _tasks(db_url, step))
    # Idempotent: nothing is listed again.
    with session_scope(db_url) as session:
        assert prune(session, READING, consumed).items == []
    # A reader reset by hand fails on the runner, and `retry` refuses to reset it.
    with session_scope(db_url) as session:
        session.execute(update(Task).where(Task.id == readers[0].id).values(state=TaskState.DEAD))
    result = run_cli(
        "retry", "--task", str(readers[0].id), check=False,
        env={"AUTOWISP_DATABASE_URL": db_url, "AUTOWISP_HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not reset" in result.stdout and "retention policy" in result.stdout
    assert _tasks(db_url, "reader")[0].state is TaskState.DEAD


def test_masters_stay_while_a_kept_calibrated_frame_names_them(small_night, tmp_path):
    """Superseded products (an older generation) go N days after they finished, masters
    only with the calibrated frames that name them."""
    camera = _camera(small_night)
    frames = sorted(camera.rglob("*.fits"))
    part1, part2 = tmp_path / "part1", tmp_path / "part2"
    for index, frame in enumerate(frames):
        target = (part1 if index % 2 == 0 else part2) / frame.relative_to(camera)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(frame, target)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    storage = tmp_path / "storage"
    ingest_paths(url, [part1], close=True)
    run_local(url, storage, CALIBRATION, jobs=2, step_parameters=FEW)
    ingest_paths(url, [part2], close=True)
    run_local(url, storage, CALIBRATION, jobs=2, step_parameters=FEW)
    old = {
        step: [t for t in _tasks(url, step) if t.generation == 1]
        for step in (*MASTERS, "calibrate")
    }
    assert all(old.values()) and all(t.state is TaskState.DONE for t in old["calibrate"])
    policy = RetentionPolicy.from_table({"superseded": 30}, registry=CALIBRATION)
    assert _plan(url, policy, CALIBRATION) == []  # finished just now

    def age(tasks: list[Task], days: int) -> None:
        when = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
        with session_scope(url) as session:
            session.execute(
                update(Task).where(Task.id.in_([t.id for t in tasks])).values(finished_at=when)
            )

    masters = [t for step in MASTERS for t in old[step]]
    age(masters, 40)
    # The generation-1 calibrated frames are kept (finished recently) and name them.
    named = {i for t in old["calibrate"] for s in MASTERS for i in t.inputs[s]}
    assert {t.id for t in masters} >= named
    assert [p for p in _plan(url, policy, CALIBRATION) if p.task_id in named] == []
    age(old["calibrate"], 29)
    assert [p for p in _plan(url, policy, CALIBRATION) if p.task_id in named] == []
    age(old["calibrate"], 31)
    plan = _plan(url, policy, CALIBRATION)
    assert {p.task_id for p in plan} == {t.id for t in masters} | {t.id for t in old["calibrate"]}
    assert all(p.generation == 1 and "superseded" in p.reason for p in plan)
    with session_scope(url) as session:
        report = prune(session, CALIBRATION, policy)
    assert len(report.items) == len(plan) and not any(p.path.exists() for p in plan)
    current = [t for step in (*MASTERS, "calibrate") for t in _tasks(url, step)]
    kept = [t for t in current if t.generation == 2]
    assert kept and all(Path(str(t.output_path)).is_file() for t in kept)
    assert all(t.output_pruned_at is None for t in kept)
    with session_scope(url) as session:
        assert prune(session, CALIBRATION, policy).items == []


def test_prune_without_a_policy_deletes_nothing(tmp_path):
    env = {"AUTOWISP_HOME": str(tmp_path)}
    result = run_cli("prune", "--dry-run", env=env)
    assert "nothing is deleted" in result.stdout
