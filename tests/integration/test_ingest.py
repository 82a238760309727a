"""Ingest of simulated nights and real PANOPTES frames; duplicates and bad files."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from astropy.io import fits
from sqlalchemy import func, select

from autowisp.db.models import Camera, CameraType, Image, ImageState, ImageType, Night
from autowisp.db.session import session_scope
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
