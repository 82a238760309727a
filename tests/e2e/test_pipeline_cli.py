"""The pipeline through the CLI on the embedded default: demo, run, status, config, ingest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_DATA, run_cli


def _cli(home: Path, *args: str, check: bool = True, extra_env=None):
    return run_cli(*args, check=check, env={"AUTOWISP_HOME": str(home), **(extra_env or {})})


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    result = _cli(home, "demo", "--frames", "4", "--size", "384x384")
    return home, result


DONE = {
    "frame_qc": 36,
    "night_qc": 1,
    "master_bias": 1,
    "master_dark": 1,
    "master_flat": 1,
    "calibrate": 4,
    "astrometry": 4,
    "star_list": 1,
    "photometry": 4,
    "magfit": 1,
}


def test_demo_processes_a_night_end_to_end(demo_home):
    home, result = demo_home
    out = result.stdout
    assert "ingested 36 files into 1 night(s)" in out  # 4 objects, 10+10+12 calibration
    # frame_qc 36, night_qc 1, three masters, calibrate 4, astrometry 4, star_list 1,
    # photometry 4, magfit 1, the light curves of the field's one shard and their
    # statistics
    assert "ran 56 tasks" in out and "56 done" in out
    assert "after magnitude fitting" in out
    assert "frame_qc" in out and "night_qc" in out and "calibrate" in out
    plot = Path(out.split("night_qc plot: ")[1].split()[0])
    summary = Path(out.split("night_qc: ")[1].split()[0])
    assert Path(out.split("master_flat: ")[1].split()[0]).is_file()
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    night = json.loads(summary.read_text())
    # night_qc flags the simulator's over-exposed flat, and nothing among bias/dark.
    assert [Path(p).name for p in night["types"]["flat"]["outliers"]] == ["flat_0012.fits"]
    assert night["types"]["bias"]["outliers"] == [] and night["frames_used"] == 36
    assert (home / "autowisp.sqlite").is_file()


def test_status_json_and_rerun_does_nothing(demo_home):
    home, _ = demo_home
    status = json.loads(_cli(home, "status", "--json").stdout)
    steps = {row["step"]: row for row in status["progress"]}
    assert {name: row["done"] for name, row in steps.items()} == DONE
    # The field's stars in one shard, its light curves and their statistics done.
    [field] = status["fields"]
    assert (field["shards"], field["nights_in_shards"], field["tasks"]) == (1, 1, {"done": 2})
    assert status["failures"] == [] and status["images"] == {"ingested": 36}
    assert status["throughput"]["tasks_done"] == 56
    again = _cli(home, "run").stdout
    assert "ran 0 tasks" in again and "nothing to do" in again


def test_light_curves_export_through_the_cli(demo_home, tmp_path):
    import sqlite3

    from astropy.io import fits

    from autowisp.simulate.truth import read_truth

    home, _ = demo_home
    out = tmp_path / "lc"
    result = _cli(home, "lc", "export", "--all", "--out", str(out))
    files = sorted(out.rglob("*.fits"))
    assert f"wrote {len(files)} light curves under {out}" in result.stdout
    assert len(files) > 50
    with sqlite3.connect(home / "autowisp.sqlite") as db:
        frames = np.array(
            [jd for (jd,) in db.execute("select jd from image where image_type = 'object'")]
        )
        stars = db.execute("select count(*) from field_star").fetchone()[0]
    assert len(files) <= stars
    truth = read_truth(next(home.rglob("truth.h5")))
    names = [str(n) for n in truth.object["filename"]]
    truth_id = np.asarray(truth.stars["star_id"], np.int64)
    owners = {}
    catalogue = None
    for path in files:
        with fits.open(path) as hdus:
            header, data = hdus[0].header, hdus["LIGHTCURVE"].data
            # Against the truth: every point of a light curve is one and the same
            # simulated star (the nearest within 1 px on that frame), the Gaia star the
            # header names, and no two light curves are one star.
            stars_seen = set()
            for raw, x, y in zip(data["RAWFILE"], data["X_G1"], data["Y_G1"], strict=True):
                if not (np.isfinite(x) and np.isfinite(y)):
                    continue
                frame = names.index(str(raw))
                distance = np.hypot(truth.object["x"][frame] - x, truth.object["y"][frame] - y)
                nearest = int(np.nanargmin(distance))
                if distance[nearest] < 1.0:
                    stars_seen.add(nearest)
            assert len(stars_seen) <= 1, (path.name, stars_seen)
            if stars_seen:
                owners[path.name] = star = stars_seen.pop()
                if header["GAIAID"] >= 0:
                    assert truth_id[star] == header["GAIAID"]
            assert "lightcurve" in header["CREATOR"].lower()
            # Each point is one of the night's frames, at its mid-exposure.
            assert np.isin(data["JD_UTC"], frames).all() and 1 <= len(data) <= frames.size
            # BTJD: TDB is 69.2 s ahead of UTC, and the light reaches the barycentre
            # at most 499 s before or after the Earth.
            offset = (data["TIME"] + 2457000.0 - data["JD_UTC"]) * 86400.0 - 69.184
            assert np.all(np.abs(offset) < 500.0)
            if header["GAIAID"] >= 0 and catalogue is None:
                catalogue = (header["GAIAID"], data["MAG_MAGFIT_G1"].copy())
    assert len(set(owners.values())) == len(owners) > 0.8 * len(files)
    assert catalogue is not None
    gaia, magnitudes = catalogue
    csv_dir = tmp_path / "csv"
    named = _cli(home, "lc", "export", f"gaia:{gaia}", "987654321", "--format", "csv",
                 "--out", str(csv_dir)).stdout  # fmt: skip
    assert "987654321: no such star" in named and "wrote 1 light curves" in named
    [written] = list(csv_dir.rglob("*.csv"))
    lines = [line for line in written.read_text().splitlines() if not line.startswith("#")]
    column = lines[0].split(",").index("MAG_MAGFIT_G1")
    values = np.array([float(line.split(",")[column]) for line in lines[1:]])
    np.testing.assert_array_equal(values, magnitudes)


def test_config_change_reruns_only_downstream(demo_home, tmp_path):
    home, _ = demo_home
    config = tmp_path / "autowisp.toml"
    config.write_text("[steps.night_qc]\noutlier_sigma = 4.0\n")
    env = {"AUTOWISP_CONFIG": str(config)}
    shown = _cli(home, "config", "show", extra_env=env).stdout
    assert "outlier_sigma = 4.0" in shown and "[steps.frame_qc]" in shown
    result = _cli(home, "run", extra_env=env).stdout
    assert "ran 1 tasks" in result and "1 done" in result
    status = json.loads(_cli(home, "status", "--json", extra_env=env).stdout)
    assert {row["step"]: row["done"] for row in status["progress"]} == DONE
    # A master's parameter: that master and the frames calibrated with it run again.
    config.write_text(
        "[steps.night_qc]\noutlier_sigma = 4.0\n[steps.master_flat]\nmax_structure = 0.03\n"
    )
    result = _cli(home, "run", extra_env=env).stdout
    # the flat, 4 x 3 frame steps, the night's star_list and magfit, the shard's light
    # curves and the field's statistics
    assert "ran 17 tasks" in result and "17 done" in result


def test_ingest_command_reports_rejections(tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    shutil.copy(TEST_DATA / "panoptes" / "unsolved.fits", upload)
    shutil.copy(TEST_DATA / "panoptes" / "noheader.fits", upload)
    config = tmp_path / "autowisp.toml"
    config.write_text('[ingest.camera_defaults]\n"012070048413" = "object"\n')
    result = _cli(
        tmp_path / "home", "ingest", str(upload), extra_env={"AUTOWISP_CONFIG": str(config)}
    )
    assert "ingested 1 files into 1 night(s)" in result.stdout
    assert "noheader.fits: missing DATE-OBS" in result.stdout
    failed = _cli(tmp_path / "home", "ingest", str(tmp_path / "missing"), check=False)
    assert failed.returncode == 2 and "no such file" in failed.stderr


def test_bad_configuration_is_explained(tmp_path):
    config = tmp_path / "autowisp.toml"
    config.write_text("[steps.night_qc]\nno_such = 1\n")
    result = _cli(
        tmp_path, "config", "show", check=False, extra_env={"AUTOWISP_CONFIG": str(config)}
    )
    assert result.returncode == 2 and "no_such" in result.stderr
