"""Orchestration that never mixes or drops data: own-night masters, night generations,
pinned configurations, error classes and time limits (each a bug reproduced on the code
before these changes)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from astropy.io import fits
from sqlalchemy import select, text

from autowisp.config import RunPolicy
from autowisp.db.migrate import upgrade
from autowisp.db.models import Configuration, Image, Night, Task
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.errors import PermanentError, TransientError
from autowisp.ingest.ingest import ingest_paths
from autowisp.io.products import read_calibrated_frame
from autowisp.pipeline import state
from autowisp.pipeline.cycle import triage
from autowisp.pipeline.local import apply_configuration, run_local
from autowisp.pipeline.runner import classify_error, run_task
from autowisp.steps.base import Input, Kind, Parameter, Step, StepResult
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.night_qc import NightQC
from autowisp.steps.registry import Registry
from autowisp.vocabulary import ErrorKind, ImageType, Scope, TaskState
from tests.integration.test_executor import REGISTRY as TOY

CALIBRATION = Registry([FrameQC, NightQC, MasterBias, MasterDark, MasterFlat, Calibrate])
FEW = {"master_bias": {"min_frames": 4}, "master_dark": {"min_frames": 4},
       "master_flat": {"min_frames": 4}}  # fmt: skip


def _camera(small_night: Path) -> Path:
    return sorted(p for p in small_night.iterdir() if p.is_dir())[0]


def _shifted_copy(frames: list[Path], target: Path, days: int) -> None:
    """The frames as if taken ``days`` later (new bytes, same pixels)."""
    target.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        with fits.open(frame) as hdus:
            header = hdus[0].header.copy()
            moment = header["DATE-OBS"]
            day = int(moment[8:10]) + days
            header["DATE-OBS"] = f"{moment[:8]}{day:02d}{moment[10:]}"
            fits.PrimaryHDU(hdus[0].data, header).writeto(target / frame.name)


def _rows(url: str, step: str) -> list:
    with session_scope(url) as session:
        return session.execute(
            select(Task, Night.local_date)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .join(Night, Night.id == Task.night_id)
            .where(StepRow.name == step, Configuration.active.is_(True))
            .order_by(Task.id)
        ).all()


def _night_of_task(url: str, task_id: int):
    with session_scope(url) as session:
        return session.scalar(
            select(Night.local_date)
            .join(Task, Task.night_id == Night.id)
            .where(Task.id == task_id)
        )


def test_a_night_with_its_own_calibration_frames_uses_its_own_masters(small_night, tmp_path):
    """Bug 1: calibrate was ready once the camera had *any* master, so a night with its
    own frames was calibrated with another night's masters while its own were pending."""
    first = _camera(small_night)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [first], close=True)
    run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    # A second night of the same camera, three days later, with its own calibration frames:
    # the first night's masters are done, the second's are not yet when it arrives.
    second = tmp_path / "second"
    _shifted_copy(sorted(first.rglob("*.fits")), second, days=3)
    ingest_paths(url, [second], close=True)
    run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    calibrated = _rows(url, "calibrate")
    assert len(calibrated) == 12 and all(t.state is TaskState.DONE for t, _ in calibrated)
    later = [(t, d) for t, d in calibrated if d.isoformat() == "2024-09-13"]
    assert len(later) == 6
    for task, local_date in later:
        for master in ("master_bias", "master_dark", "master_flat"):
            [used] = task.inputs[master]
            assert _night_of_task(url, used) == local_date, (master, task.target)
        # The calibrated frame says so too (MBIAS, MDARK, MFLAT: night, config, file).
        product = read_calibrated_frame(Path(task.output_path), with_error=False)
        for keyword in ("MBIAS", "MDARK", "MFLAT"):
            reference = product.provenance.references[keyword]
            assert reference.startswith("2024-09-13 cfg=") and "/2024-09-13/" in reference
    # The masters of the second night were made from its own frames.
    for master in ("master_bias", "master_dark", "master_flat"):
        tasks = [t for t, d in _rows(url, master) if d.isoformat() == "2024-09-13"]
        assert len(tasks) == 1 and tasks[0].state is TaskState.DONE


def test_a_night_whose_masters_come_last_is_calibrated_with_them(small_night, tmp_path):
    """Bug 1 with the second night's masters finishing last: its object frames arrive
    (and are processed) before its calibration frames. The code before these changes
    calibrated all 6 with the first night's masters and never again."""
    first = _camera(small_night)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [first], close=True)
    run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    second = tmp_path / "second"
    _shifted_copy(sorted(first.rglob("*.fits")), second, days=3)
    objects, calibration = tmp_path / "objects", tmp_path / "calibration"
    for frame in sorted(second.iterdir()):
        target = objects if frame.name.startswith("object") else calibration
        target.mkdir(exist_ok=True)
        shutil.move(frame, target / frame.name)
    ingest_paths(url, [objects])  # the upload is still going on
    run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    ingest_paths(url, [calibration], close=True)
    run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    later = [t for t, d in _rows(url, "calibrate") if d.isoformat() == "2024-09-13"]
    current = [t for t in later if t.state is TaskState.DONE]
    assert len(current) == 6
    for task in current:
        product = read_calibrated_frame(Path(task.output_path), with_error=False)
        for keyword in ("MBIAS", "MDARK", "MFLAT"):
            assert product.provenance.references[keyword].startswith("2024-09-13 "), keyword


def test_a_night_uploaded_in_two_parts_runs_its_barriers_again_on_every_frame(
    small_night, tmp_path
):
    """Bug 2: a barrier ran once the frames that existed were terminal and never reopened
    when more arrived, so masters and night QC missed the second part of an upload."""
    camera = _camera(small_night)
    frames = sorted(camera.rglob("*.fits"))
    part1, part2 = tmp_path / "part1", tmp_path / "part2"
    for index, frame in enumerate(frames):
        target = (part1 if index % 2 == 0 else part2) / frame.relative_to(camera)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(frame, target)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [part1], close=True)
    run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    [(first_qc, _)] = _rows(url, "night_qc")
    assert first_qc.generation == 1 and first_qc.qc["frames_used"] < len(frames)
    # The rest of the upload arrives: the night reopens, and closes again.
    report = ingest_paths(url, [part2], close=True)
    assert report.ingested == len(frames) - (len(frames) + 1) // 2
    with session_scope(url) as session:
        night = session.scalar(select(Night))
        assert night.closed_generation == 2
    run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    current = {}
    for step in ("night_qc", "master_bias", "master_dark", "master_flat", "calibrate"):
        rows = [t for t, _ in _rows(url, step) if t.generation == 2]
        assert rows and all(t.state is TaskState.DONE for t in rows), step
        current[step] = rows
    assert current["night_qc"][0].qc["frames_used"] == len(frames)
    with session_scope(url) as session:
        frame_qc_of = dict(
            session.execute(
                select(Image.image_type, Task.id)
                .join(Task, Task.image_id == Image.id)
                .join(StepRow, StepRow.id == Task.step_id)
                .where(StepRow.name == "frame_qc")
            ).all()
        )
        biases = session.scalars(
            select(Task.id)
            .join(Image, Image.id == Task.image_id)
            .join(StepRow, StepRow.id == Task.step_id)
            .where(StepRow.name == "frame_qc", Image.image_type == ImageType.BIAS)
        ).all()
    assert frame_qc_of  # sanity
    [bias_master] = current["master_bias"]
    assert sorted(bias_master.inputs["frame_qc"]) == sorted(biases)  # every bias, both parts
    assert bias_master.qc["frames"] == 10
    # Every frame is calibrated in generation 2 with generation 2's masters.
    assert len(current["calibrate"]) == 6
    masters = {m: current[m][0].id for m in ("master_bias", "master_dark", "master_flat")}
    for task in current["calibrate"]:
        assert {m: task.inputs[m][0] for m in masters} == masters
    # Generation 1's products are no longer current: the operators' view shows generation 2.
    with session_scope(url) as session:
        rows = session.execute(
            text("SELECT step, generation, total FROM v_night_progress WHERE step = 'night_qc'")
        ).all()
    assert [(r.generation, r.total) for r in rows] == [(2, 1)]
    old = [t for t, _ in _rows(url, "night_qc") if t.generation == 1]
    assert len(old) == 1 and old[0].output_path != current["night_qc"][0].output_path


def test_an_open_night_runs_frame_work_but_no_barrier(small_night, tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [_camera(small_night)])  # no marker, not closed
    summary = run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    assert summary.outcomes == {"done": 38}  # frame_qc of every frame, nothing else
    assert summary.open_nights and not _rows(url, "night_qc") and not _rows(url, "calibrate")
    # The upload marker closes it: the barriers run.
    (_camera(small_night) / "UPLOAD_COMPLETE").touch()
    try:
        report = ingest_paths(url, [_camera(small_night)])
    finally:
        (_camera(small_night) / "UPLOAD_COMPLETE").unlink()
    assert report.ingested == 0  # nothing new, yet the marker closes the night
    with session_scope(url) as session:
        from autowisp.db.nights import close_nights

        # Re-ingesting known files neither reopens it nor counts as new frames.
        assert close_nights(session, report.nights, reason="test") == []
    summary = run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    assert not summary.open_nights and not summary.waiting
    assert [t.state for t, _ in _rows(url, "night_qc")] == [TaskState.DONE]


def test_a_task_reads_the_outputs_its_configuration_pins(db_url, small_night, tmp_path):
    """Bug 4: the runner took upstream outputs from whichever configuration was globally
    active, and every prepare rewrote that flag: a task queued under one configuration
    read another's outputs when someone activated another configuration meanwhile."""
    url = db_url
    ingest_paths(url, [_camera(small_night)], close=True)
    log = tmp_path / "events.log"
    params = {
        "produce": {"log": str(log)},
        "refine": {"log": str(log), "factor": 2},
        "combine": {"log": str(log)},
    }
    storage = tmp_path / "storage"
    run_local(url, storage, TOY, step_parameters=params, jobs=2)
    params_b = {**params, "refine": {"log": str(log), "factor": 3}}
    configurations_b = apply_configuration(url, TOY, params_b)

    def queue_ready() -> list[int]:
        with session_scope(url) as session:
            ready = triage(session, TOY, configurations_b).ready
            return state.mark_queued(
                session, [d.task_id for d in ready], {d.task_id: d.inputs for d in ready}
            )

    for task_id in queue_ready():  # the factor-3 refine tasks, run by a worker
        assert run_task(task_id, database_url=url, storage_root=storage, registry=TOY)
    [combine_b] = queue_ready()  # queued: its message is on its way to a worker
    # Meanwhile someone activates the first configuration again (another TOML).
    apply_configuration(url, TOY, params)
    outcome = run_task(combine_b, database_url=url, storage_root=storage, registry=TOY)
    assert outcome is TaskState.DONE
    with session_scope(url) as session:
        combine = session.get(Task, combine_b)
        produced = [
            t.qc["value"]
            for t in session.scalars(
                select(Task)
                .join(StepRow, StepRow.id == Task.step_id)
                .where(StepRow.name == "produce", Task.state == TaskState.DONE)
            )
        ]
        assert combine.configuration_id == configurations_b["combine"].id
    assert combine.qc["used"] == 6 and combine.qc["sum"] == 3 * sum(produced)


class _Broken(Step):
    """A step with a bug (a KeyError), a data problem, or a full disk, by frame."""

    name = "broken"
    scope = Scope.IMAGE
    image_types = frozenset({ImageType.OBJECT})
    parameters = (Parameter("sleep", 0.0, "s"),)

    def run(self, context):
        frame = context.require_image().path.name
        if frame == "object_0001.fits":
            return StepResult(None, {})["missing"]  # a bug: TypeError
        if frame == "object_0002.fits":
            raise PermanentError("object_0002.fits has no stars")
        if frame == "object_0003.fits":
            raise OSError(28, "No space left on device")
        if frame == "object_0004.fits":
            time.sleep(float(context.parameters["sleep"]))
        return StepResult(None, {"ok": True})


def test_errors_are_transient_permanent_or_a_bug(small_night, tmp_path):
    """Bug 7: every error that was not a PermanentError was retried, code bugs included.
    A step past its time limit fails (transient) instead of holding its worker."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [_camera(small_night)], close=True)
    policy = RunPolicy(max_attempts=2, backoff_seconds=0.05, time_limits={"broken": 0.5})
    run_local(
        url, tmp_path, Registry([_Broken]), jobs=2, policy=policy,
        step_parameters={"broken": {"sleep": 5.0}},
    )  # fmt: skip
    with session_scope(url) as session:
        rows = {
            Path(path).name: task
            for task, path in session.execute(
                select(Task, Image.path).join(Image, Image.id == Task.image_id)
            )
        }
    bug = rows["object_0001.fits"]
    assert bug.state is TaskState.DEAD and bug.attempts == 1 and bug.error_kind is ErrorKind.BUG
    assert "Traceback" in bug.last_error and "test_orchestration.py" in bug.last_error
    data = rows["object_0002.fits"]
    assert data.state is TaskState.DEAD and data.attempts == 1
    assert data.error_kind is ErrorKind.PERMANENT and "no stars" in data.last_error
    disk = rows["object_0003.fits"]
    assert disk.state is TaskState.DEAD and disk.attempts == 2
    assert disk.error_kind is ErrorKind.TRANSIENT and "No space left" in disk.last_error
    slow = rows["object_0004.fits"]
    assert slow.state is TaskState.DEAD and slow.attempts == 2
    assert "time limit of 0.5 s" in slow.last_error
    assert all(rows[f"object_000{n}.fits"].state is TaskState.DONE for n in (5, 6))


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (PermanentError("bad data"), ErrorKind.PERMANENT),
        (TransientError("busy"), ErrorKind.TRANSIENT),
        (OSError("disk"), ErrorKind.TRANSIENT),
        (FileNotFoundError("gone"), ErrorKind.TRANSIENT),
        (ConnectionError("refused"), ErrorKind.TRANSIENT),
        (MemoryError(), ErrorKind.TRANSIENT),
        (KeyError("x"), ErrorKind.BUG),
        (ValueError("x"), ErrorKind.BUG),
        (ZeroDivisionError(), ErrorKind.BUG),
    ],
)
def test_error_classes(error, kind):
    assert classify_error(error) is kind


def test_a_master_finishing_wakes_the_nights_of_its_camera(small_night, tmp_path):
    """A night without calibration frames waits for a master under way in another night of
    its camera; when that master is done, the wakeup of its camera lets the waiting night
    run in the same executor run (cycles after the first look only at woken nights)."""
    first = _camera(small_night)
    objects_only = tmp_path / "objects"
    _shifted_copy(sorted(first.rglob("object_*.fits"))[:2], objects_only, days=3)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [objects_only, first], close=True)
    summary = run_local(url, tmp_path / "storage", CALIBRATION, jobs=2, step_parameters=FEW)
    assert not summary.waiting, summary.waiting
    later = [t for t, d in _rows(url, "calibrate") if d.isoformat() == "2024-09-13"]
    assert len(later) == 2 and all(t.state is TaskState.DONE for t in later)
    for task in later:
        [bias] = task.inputs["master_bias"]
        assert _night_of_task(url, bias).isoformat() == "2024-09-10"


class _Each(Step):
    name = "each"
    scope = Scope.IMAGE
    image_types = frozenset({ImageType.OBJECT})

    def run(self, context):
        return StepResult(None, {"frame": context.require_image().path.name})


class _NightList(Step):
    """A night step over the frames that improves the frames' next step, or fails."""

    name = "night_list"
    scope = Scope.NIGHT
    inputs = ("each",)
    image_types = frozenset({ImageType.OBJECT})
    parameters = (Parameter("fail", False),)

    def run(self, context):
        if context.parameters["fail"]:
            raise PermanentError("no frame to stack")
        return StepResult(None, {"frames": len(context.inputs["each"])})


class _Measure(Step):
    name = "measure"
    scope = Scope.IMAGE
    inputs = ("each", Input("night_list", Kind.AFTER))
    image_types = frozenset({ImageType.OBJECT})

    def run(self, context):
        listed = context.inputs.get("night_list", ())
        return StepResult(None, {"with_list": [p.qc.get("frames") for p in listed]})


@pytest.mark.parametrize("fail", [False, True])
def test_an_after_input_is_read_when_done_and_left_out_when_it_died(small_night, tmp_path, fail):
    """A frame step's optional night input (``after``): it waits for the night's task,
    reads its product when done, and runs without it when it died (a failed star list
    must not stop the night's photometry)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [_camera(small_night)], close=True)
    registry = Registry([_Each, _NightList, _Measure])
    assert {e.step: e.kind for e in registry.edges("measure")} == {
        "each": Kind.SAME, "night_list": Kind.AFTER}  # fmt: skip
    run_local(url, tmp_path, registry, jobs=2, step_parameters={"night_list": {"fail": fail}})
    ((night_list, _),) = _rows(url, "night_list")
    measured = [task for task, _ in _rows(url, "measure")]
    assert night_list.state is (TaskState.DEAD if fail else TaskState.DONE)
    assert len(measured) == len(_rows(url, "each")) > 0
    assert all(task.state is TaskState.DONE for task in measured), [t.last_error for t in measured]
    expected = [] if fail else [len(measured)]
    assert all(task.qc["with_list"] == expected for task in measured)
    assert all(task.inputs.get("night_list", []) == ([] if fail else [night_list.id])
               for task in measured)  # fmt: skip
