"""Ingest of simulated nights and real PANOPTES frames; duplicates and bad files."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from autowisp.db.models import (
    Camera,
    CameraType,
    Image,
    ImageState,
    ImageType,
    Night,
    Observatory,
)
from autowisp.db.session import session_scope
from autowisp.ingest import ingest as ingest_module
from autowisp.ingest.ingest import ingest_paths
from tests.conftest import TEST_DATA

PANOPTES = TEST_DATA / "panoptes"


def _count(url, *where):
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(Image).where(*where))


def test_simulated_night(db_url, small_night):
    report = ingest_paths(db_url, [small_night])
    # 2 cameras × (6 object + 32 calibration frames); truth.h5 and night.json ignored.
    assert report.ingested == 76 and not report.rejected and report.duplicates == 0
    with session_scope(db_url) as session:
        nights = session.scalars(select(Night)).all()
        assert len(nights) == 2
        assert {n.local_date for n in nights} == {dt.date(2024, 9, 10)}
        types = dict(
            session.execute(
                select(Image.image_type, func.count()).group_by(Image.image_type)
            ).all()
        )
        assert types == {
            ImageType.BIAS: 20,
            ImageType.DARK: 20,
            ImageType.FLAT: 24,
            ImageType.OBJECT: 12,
        }
        cameras = session.scalars(select(Camera)).all()
        assert len(cameras) == 2
        layouts = {t.layout for t in session.scalars(select(CameraType))}
        assert layouts == {"RGGB"}
        image = session.scalar(select(Image).where(Image.image_type == ImageType.OBJECT))
        assert image.exptime == 120.0 and image.date_obs.tzinfo is not None
        assert image.header["IMAGETYP"] == "object" and len(image.sha256) == 64
        assert abs(image.jd - (2440587.5 + image.date_obs.timestamp() / 86400 + 60 / 86400)) < 1e-6
    # The same upload again changes nothing.
    again = ingest_paths(db_url, [small_night])
    assert again.ingested == 0 and again.duplicates == 76
    assert _count(db_url) == 76


def test_panoptes_frames_with_rules(db_url, tmp_path):
    for name in ("unsolved.fits", "solved.fits.fz", "tiny.fits", "pole.fits", "rotation.fits"):
        shutil.copy(PANOPTES / name, tmp_path / name)
    rules = {"camera_defaults": {"012070048413": "object", "022071246706": "object"}}
    report = ingest_paths(db_url, [tmp_path], rules=rules)
    assert report.ingested == 5, report.rejected
    with session_scope(db_url) as session:
        images = {Path(i.path).name: i for i in session.scalars(select(Image))}
        unsolved = images["unsolved.fits"]
        assert unsolved.image_type is ImageType.OBJECT and unsolved.exptime == pytest.approx(120.4)
        assert unsolved.camera.serial == "012070048413"
        assert unsolved.camera.camera_type.layout == "RGGB"  # from FILTER='RGGB'
        # 2016-09-09T08:12 UTC at longitude -155.58 is the night of 8 September, local.
        assert unsolved.night.local_date == dt.date(2016, 9, 8)
        assert images["solved.fits.fz"].width == 700
        assert images["solved.fits.fz"].night_id == unsolved.night_id
        assert images["pole.fits"].camera.serial == "022071246706"


def test_panoptes_without_rules_is_rejected_with_the_reason(db_url, tmp_path):
    shutil.copy(PANOPTES / "unsolved.fits", tmp_path / "unsolved.fits")
    report = ingest_paths(db_url, [tmp_path])
    assert report.ingested == 0
    [(_path, reason)] = report.rejected
    assert "unknown image type" in reason and "012070048413" in reason


def _write(path: Path, header_updates: dict, remove: tuple[str, ...] = ()) -> Path:
    with fits.open(PANOPTES / "tiny.fits") as hdus:
        header = hdus[0].header.copy()
        data = hdus[0].data.copy()
    for key, value in header_updates.items():
        header[key] = value
    for key in remove:
        del header[key]
    fits.PrimaryHDU(data, header).writeto(path)
    return path


def test_bad_files_are_rejected_and_the_rest_goes_on(db_url, tmp_path):
    good = _write(tmp_path / "good.fits", {"IMAGETYP": "Light Frame"})
    _write(tmp_path / "no_date.fits", {"IMAGETYP": "object"}, remove=("DATE-OBS",))
    _write(tmp_path / "no_exptime.fits", {"IMAGETYP": "object"}, remove=("EXPTIME",))
    _write(tmp_path / "focus.fits", {"IMAGETYP": "focus"})
    _write(tmp_path / "bad_bayer.fits", {"IMAGETYP": "object", "BAYERPAT": "RGBX"})
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(good.read_bytes()[:40000])
    (tmp_path / "text.fits").write_text("this is not an image\n")
    (tmp_path / "empty.fits").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored: not a FITS name\n")
    report = ingest_paths(db_url, [tmp_path])
    assert report.ingested == 1
    reasons = {Path(path).name: reason for path, reason in report.rejected}
    assert set(reasons) == {
        "no_date.fits",
        "no_exptime.fits",
        "focus.fits",
        "bad_bayer.fits",
        "truncated.fits",
        "text.fits",
        "empty.fits",
    }
    assert "missing DATE-OBS" in reasons["no_date.fits"]
    assert "missing EXPTIME" in reasons["no_exptime.fits"]
    assert "unknown image type 'focus'" in reasons["focus.fits"]
    assert "RGBX" in reasons["bad_bayer.fits"]
    assert reasons["truncated.fits"].startswith("truncated")
    assert reasons["text.fits"].startswith("not a readable FITS image")
    assert "empty" in reasons["empty.fits"]
    assert _count(db_url, Image.state == ImageState.REJECTED) == 7
    # Rejected frames of a known camera are attributed to it: files go in name order, and
    # the camera is known once good.fits registered it (no_date, no_exptime come after).
    with session_scope(db_url) as session:
        camera = session.scalar(select(Camera).where(Camera.serial == "012070048413"))
        attributed = session.scalars(
            select(Image.path).where(
                Image.state == ImageState.REJECTED, Image.camera_id == camera.id
            )
        ).all()
    assert sorted(Path(p).name for p in attributed) == ["no_date.fits", "no_exptime.fits"]
    # Rejected files are remembered too: the same upload again adds nothing.
    again = ingest_paths(db_url, [tmp_path])
    assert again.duplicates == 8 and again.ingested == 0 and not again.rejected


def test_rules_classify_by_header_and_path(db_url, tmp_path):
    flats = tmp_path / "flats"
    flats.mkdir()
    _write(flats / "a.fits", {})
    _write(tmp_path / "b.fits", {"EXPTIME": 0.0, "FILTER": "RGGB"})
    rules = {
        "rules": [
            {"path": "*/flats/*", "type": "flat"},
            {"header": {"EXPTIME": "0.0"}, "type": "bias"},
        ]
    }
    report = ingest_paths(db_url, [tmp_path], rules=rules)
    assert report.ingested == 2, report.rejected
    with session_scope(db_url) as session:
        kinds = {Path(i.path).name: i.image_type for i in session.scalars(select(Image))}
    assert kinds == {"a.fits": ImageType.FLAT, "b.fits": ImageType.BIAS}


def test_missing_path_is_an_error(db_url, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ingest_paths(db_url, [tmp_path / "nowhere"])


# Two ingests at once: the upload watcher and an operator (or two `autowisp ingest`
# processes) reach the same new site, camera models, cameras and nights together.

RACE_MODELS = ("Canon EOS R", "Canon EOS Ra")
RACE_SERIALS_PER_MODEL = 2
RACE_NIGHTS = 2
RACE_FRAMES = 4  # per camera and night
RACE_BATCH = 4  # files per transaction: many commits, so the two ingests interleave


def _race_frames(root: Path, round_number: int) -> tuple[list[Path], dict[str, tuple]]:
    """One directory per camera and night; a round has its own site, models and serials.

    Returns the directories and, for each file's name, (serial, model, night date).
    """
    directories, truth = [], {}
    latitude = 19.5 + round_number  # a new site each round: the observatory is raced too
    index = 0
    for model_number, base_model in enumerate(RACE_MODELS):
        model = f"{base_model} r{round_number}"
        for serial_number in range(RACE_SERIALS_PER_MODEL):
            serial = f"R{round_number}M{model_number}S{serial_number}"
            for night in range(RACE_NIGHTS):
                directory = root / f"{serial}_n{night}"
                directory.mkdir(parents=True)
                directories.append(directory)
                for frame in range(RACE_FRAMES):
                    index += 1
                    header = fits.Header()
                    header["IMAGETYP"] = "object"
                    header["EXPTIME"] = 30.0
                    # 04:00 UTC at longitude 0: the night of the evening before.
                    header["DATE-OBS"] = f"2024-09-{11 + night:02d}T04:{frame:02d}:00"
                    header["CAMSN"] = serial
                    header["CAMMODEL"] = model
                    header["BAYERPAT"] = "RGGB"
                    header["LAT-OBS"] = latitude
                    header["LONG-OBS"] = 0.0
                    data = np.full((8, 10), 1000 + index + 10000 * round_number, np.int16)
                    name = f"{serial}_n{night}_{frame}.fits"
                    fits.PrimaryHDU(data, header).writeto(directory / name)
                    truth[name] = (serial, model, dt.date(2024, 9, 10 + night))
    return directories, truth


def _ingest_in_child(url, directories, barrier, results, name):
    """Run in a child process: wait for the other ingest, then ingest at the same time."""
    ingest_module.BATCH = RACE_BATCH
    barrier.wait(timeout=120)
    try:
        report = ingest_paths(url, directories)
    except Exception:  # handed to the parent, which fails the test with the traceback
        results.put((name, traceback.format_exc()))
        return
    counts = {"ingested": report.ingested, "duplicates": report.duplicates}
    results.put((name, {**counts, "rejected": report.rejected}))


@pytest.mark.slow
def test_two_ingests_at_once_lose_nothing(db_url, tmp_path):
    """Two processes ingest the same directories at once (started together at a barrier),
    so both meet each new site, camera model, camera and night at about the same time.

    A race is probabilistic: several rounds, each with a new site, models, cameras and
    nights, and small batches (many commits) to interleave the two ingests often.
    """
    context = multiprocessing.get_context("spawn")
    rounds = 4
    for round_number in range(rounds):
        directories, truth = _race_frames(tmp_path / f"round{round_number}", round_number)
        # The same directories, each camera's nights in the other order: while one ingest
        # registers a camera from its first night, the other meets it in its last.
        swapped = [
            directory
            for start in range(0, len(directories), RACE_NIGHTS)
            for directory in directories[start : start + RACE_NIGHTS][::-1]
        ]
        orders = {"forward": directories, "swapped": swapped}
        barrier, results = context.Barrier(len(orders)), context.Queue()
        processes = [
            context.Process(
                target=_ingest_in_child,
                args=(db_url, [str(d) for d in order], barrier, results, name),
            )
            for name, order in orders.items()
        ]
        for process in processes:
            process.start()
        reports = dict(results.get(timeout=300) for _ in processes)
        for process in processes:
            process.join(timeout=60)
        failed = {name: text for name, text in reports.items() if isinstance(text, str)}
        assert not failed, f"round {round_number}: an ingest failed:\n{failed}"
        assert [p.exitcode for p in processes] == [0, 0]
        files = len(truth)
        assert not any(r["rejected"] for r in reports.values()), reports
        total = sum(r["ingested"] + r["duplicates"] for r in reports.values())
        assert total == 2 * files, (round_number, reports)
        prefix = f"R{round_number}M"
        with session_scope(db_url) as session:
            rows = session.execute(
                select(Image.path, Camera.serial, CameraType.model, Night.local_date)
                .join(Camera, Image.camera_id == Camera.id)
                .join(CameraType, Camera.camera_type_id == CameraType.id)
                .join(Night, Image.night_id == Night.id)
                .where(Camera.serial.startswith(prefix))
            ).all()
            stored = {Path(path).name: (serial, model, date) for path, serial, model, date in rows}
            # Every file once, under its own camera and night.
            assert len(rows) == len(stored), (round_number, "a file is stored twice")
            lost = sorted(set(truth) - set(stored))
            assert not lost, (round_number, f"{len(lost)} of {files} files lost", lost, reports)
            assert stored == truth
            assert sum(r["ingested"] for r in reports.values()) == files
            serials = session.execute(
                select(Camera.serial, func.count())
                .where(Camera.serial.startswith(prefix))
                .group_by(Camera.serial)
            ).all()
            assert len(serials) == len(RACE_MODELS) * RACE_SERIALS_PER_MODEL
            assert {n for _s, n in serials} == {1}
            nights = session.execute(
                select(Night.camera_id, Night.local_date, func.count())
                .join(Camera, Night.camera_id == Camera.id)
                .where(Camera.serial.startswith(prefix))
                .group_by(Night.camera_id, Night.local_date)
            ).all()
            assert len(nights) == len(serials) * RACE_NIGHTS and {n for *_k, n in nights} == {1}
            types = session.scalars(
                select(CameraType).where(CameraType.model.endswith(f" r{round_number}"))
            ).all()
            assert sorted(t.model for t in types) == sorted(
                f"{m} r{round_number}" for m in RACE_MODELS
            )
            for camera_type in types:
                assert sorted(c.name for c in camera_type.channels) == ["B", "G1", "G2", "R"]
            sites = session.scalars(
                select(func.count())
                .select_from(Observatory)
                .where(Observatory.latitude == 19.5 + round_number)
            ).one()
            assert sites == 1


def test_same_bytes_stored_meanwhile_by_another_ingest_is_a_duplicate(db_url, tmp_path):
    first = _write(tmp_path / "a.fits", {"IMAGETYP": "object"})
    _write(tmp_path / "b.fits", {"IMAGETYP": "object", "EXPTIME": 60.0})
    others = []

    def another_ingest_stores_a_meanwhile(path, done, total):
        if path == first:  # after this ingest looked for known files, before it stores
            others.append(ingest_paths(db_url, [first]))

    report = ingest_paths(db_url, [tmp_path], progress=another_ingest_stores_a_meanwhile)
    assert [o.ingested for o in others] == [1]
    assert (report.ingested, report.duplicates, report.rejected) == (1, 1, [])
    assert _count(db_url) == 2


def test_other_integrity_errors_are_raised_not_counted_as_duplicates(
    db_url, tmp_path, monkeypatch
):
    _write(tmp_path / "a.fits", {"IMAGETYP": "object"})
    # A night id that is not in the table: the image row breaks its foreign key.
    monkeypatch.setattr(ingest_module, "get_or_create_night", lambda session, **_: 987654)
    with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
        ingest_paths(db_url, [tmp_path])
    assert _count(db_url) == 0


def test_a_file_named_twice_is_ingested_once(db_url, small_night):
    camera = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    frame = sorted(camera.rglob("bias_*.fits"))[0]
    report = ingest_paths(db_url, [camera, frame])
    assert report.ingested == len(list(camera.rglob("*.fits"))) and report.duplicates == 0
