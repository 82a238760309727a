"""Fields from frame pointings, and shards from a field's stars."""

from __future__ import annotations

from pathlib import Path

import pytest
from astropy.io import fits
from sqlalchemy import select

from autowisp.db.fields import (
    FIELD_RADIUS_FRACTION,
    angular_distance,
    assign_fields,
    define_shards,
)
from autowisp.db.models import Field, Image, LightCurveShard
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths


def _variants(small_night: Path, target: Path) -> dict[str, Path]:
    """Copies of one camera's first object frame: dithered, re-pointed, without pointing."""
    camera = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    source = sorted(camera.rglob("object_*.fits"))[0]
    target.mkdir(parents=True)
    with fits.open(source) as hdus:
        data, header = hdus[0].data, hdus[0].header
        ra, dec = header["RA-MNT"], header["DEC-MNT"]
    # 256 px of 10.4"/px: the field's radius is a quarter of 0.74 deg.
    shifts = {"base": (0.0, 0.0), "dither": (0.0, 0.1), "elsewhere": (0.0, 0.5)}
    written = {}
    for index, (name, (dra, ddec)) in enumerate(shifts.items()):
        copy = header.copy()
        copy["RA-MNT"], copy["DEC-MNT"] = ra + dra, dec + ddec
        copy["EXPTIME"] = 120.0 + index  # new bytes
        written[name] = target / f"{name}.fits"
        fits.PrimaryHDU(data, copy).writeto(written[name])
    blind = header.copy()
    del blind["RA-MNT"], blind["DEC-MNT"]
    blind["EXPTIME"] = 130.0
    written["blind"] = target / "blind.fits"
    fits.PrimaryHDU(data, blind).writeto(written["blind"])
    return written


def test_frames_join_the_field_of_their_pointing(db_url, small_night, tmp_path):
    frames = _variants(small_night, tmp_path / "up")
    ingest_paths(db_url, [tmp_path / "up"])
    with session_scope(db_url) as session:
        assert assign_fields(session) == 3  # the blind frame gets none
        assert assign_fields(session) == 0  # idempotent
        field_of = {
            Path(path).stem: field_id
            for path, field_id in session.execute(select(Image.path, Image.field_id))
        }
        fields = {f.id: f for f in session.scalars(select(Field))}
    assert field_of["base"] == field_of["dither"] != field_of["elsewhere"]
    assert field_of["blind"] is None
    base = fields[field_of["base"]]
    scale = 206.265 * 4.3 / 85.0  # FOCALLEN and XPIXSZ of the simulated camera
    assert base.radius == pytest.approx(FIELD_RADIUS_FRACTION * 256 * scale / 3600)
    assert base.name.startswith(fits.getheader(frames["base"])["CAMSN"])
    assert len(fields) == 2


def test_a_field_s_radius_falls_back_to_the_configured_one(db_url, small_night, tmp_path):
    _variants(small_night, tmp_path / "up")
    for path in (tmp_path / "up").glob("*.fits"):
        with fits.open(path, mode="update") as hdus:
            del hdus[0].header["FOCALLEN"]
    ingest_paths(db_url, [tmp_path / "up"])
    with session_scope(db_url) as session:
        assign_fields(session, default_radius=2.0)
        fields = list(session.scalars(select(Field)))
    # Without a pixel scale the 2-degree default puts the 0.5-degree offset in the field.
    assert [f.radius for f in fields] == [2.0]


def test_angular_distance_wraps_in_right_ascension():
    assert angular_distance(359.95, 10.0, 0.05, 10.0) == pytest.approx(0.1 * 0.98481, rel=1e-4)
    assert angular_distance(10.0, 89.9, 190.0, 89.9) == pytest.approx(0.2, rel=1e-6)
    assert angular_distance(12.0, -30.0, 12.0, -30.0) == 0.0


def test_shards_cover_the_stars_and_never_change(db_url, small_night, tmp_path):
    _variants(small_night, tmp_path / "up")
    ingest_paths(db_url, [tmp_path / "up"])
    with session_scope(db_url) as session:
        assign_fields(session)
        field_id = session.scalars(select(Field.id).order_by(Field.id)).first()
        first = define_shards(session, field_id, 250, stars_per_shard=100)
        again = define_shards(session, field_id, 250, stars_per_shard=100)
        more = define_shards(session, field_id, 420, stars_per_shard=100)
        shards = session.execute(
            select(LightCurveShard.shard_index, LightCurveShard.star_lo, LightCurveShard.star_hi)
            .where(LightCurveShard.field_id == field_id)
            .order_by(LightCurveShard.shard_index)
        ).all()
        with pytest.raises(ValueError, match="at least 1"):
            define_shards(session, field_id, 10, stars_per_shard=0)
    assert len(first) == 3 and again == [] and len(more) == 2
    assert [tuple(s) for s in shards] == [
        (0, 0, 100), (1, 100, 200), (2, 200, 250), (3, 250, 350), (4, 350, 420),
    ]  # fmt: skip
