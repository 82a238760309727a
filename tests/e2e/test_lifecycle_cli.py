"""Nights, waiting and configuration through the CLI: an open night's barriers wait and
`autowisp run` says so (exit 3); `close-night` lets them run; a shared database keeps its
active configuration when a CLI brings another; status never reads text as markup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import run_cli


def _cli(home: Path, *args: str, check: bool = True, extra_env=None):
    return run_cli(*args, check=check, env={"AUTOWISP_HOME": str(home), **(extra_env or {})})


def _camera(small_night: Path) -> Path:
    return sorted(p for p in small_night.iterdir() if p.is_dir())[0]


def test_an_open_night_waits_and_says_why_until_it_is_closed(small_night, tmp_path):
    home = tmp_path / "home"
    upload = tmp_path / "upload"
    shutil.copytree(_camera(small_night), upload)
    _cli(home, "ingest", str(upload))
    result = _cli(home, "run", check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "open nights: 1 (2024-09-10)" in result.stdout
    assert "autowisp close-night" in result.stdout
    status = _cli(home, "status")
    assert "is open since its last frame" in status.stdout
    progress = json.loads(_cli(home, "status", "--json").stdout)["progress"]
    assert {row["step"] for row in progress} == {"frame_qc"}
    assert progress[0]["night_state"] == "open"
    _cli(home, "close-night", "1")
    again = _cli(home, "run", check=False)
    # Calibrate waits for nothing now; astrometry may die on these small frames.
    assert again.returncode == 0, again.stdout + again.stderr
    report = json.loads(_cli(home, "status", "--json").stdout)
    steps = {row["step"]: row for row in report["progress"]}
    assert steps["night_qc"]["done"] == 1 and steps["calibrate"]["done"] == 6
    assert steps["night_qc"]["night_state"] == "closed" and steps["night_qc"]["generation"] == 1
    # The simulator's two bad flats, rejected by master_flat, with their reasons.
    flats = {
        Path(row["path"]).name: row["reason"]
        for row in report["rejected_frames"]
        if row["step"] == "master_flat"
    }
    assert set(flats) == {"flat_0011.fits", "flat_0012.fits"}, flats
    assert any("clouds" in r for r in flats.values()) and any("over" in r for r in flats.values())
    assert "frames rejected by master steps" in _cli(home, "status").stdout


def test_run_exits_non_zero_and_lists_what_waits(small_night, tmp_path):
    """Object frames of a camera without calibration frames wait for masters."""
    home = tmp_path / "home"
    upload = tmp_path / "upload"
    upload.mkdir()
    for frame in sorted(_camera(small_night).rglob("object_*.fits"))[:2]:
        shutil.copy(frame, upload / frame.name)
    result = _cli(home, "run", str(upload), check=False)
    assert result.returncode == 3, result.stdout + result.stderr
    # calibrate, astrometry, photometry of 2 frames, the night's star_list and magfit
    assert "8 task(s) still waiting" in result.stdout
    assert "waiting for a master_bias of camera" in result.stdout
    status = _cli(home, "status").stdout
    assert "waiting tasks and why" in status and "master_bias" in status


def test_status_shows_file_names_and_errors_as_plain_text(small_night, tmp_path):
    home = tmp_path / "home"
    upload = tmp_path / "upload"
    upload.mkdir()
    bad = upload / "[red]broken[blink].fits"
    bad.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    _cli(home, "ingest", str(upload))
    status = _cli(home, "status").stdout
    assert "[red]broken[blink].fits" in status


def test_a_shared_database_keeps_its_active_configuration(pg_url, small_night, tmp_path):
    home = tmp_path / "home"
    upload = tmp_path / "upload"
    shutil.copytree(_camera(small_night), upload)
    env = {"AUTOWISP_DATABASE_URL": pg_url, "AUTOWISP_STORAGE_ROOT": str(tmp_path / "s")}
    _cli(home, "init", extra_env=env)
    other = tmp_path / "other.toml"
    other.write_text("[steps.night_qc]\noutlier_sigma = 3.0\n")
    result = _cli(
        home, "run", str(upload), check=False,
        extra_env={**env, "AUTOWISP_CONFIG": str(other)},
    )  # fmt: skip
    assert "differs from the database's active configuration for night_qc" in result.stderr
    assert _active_outlier_sigma(pg_url) == 5.0  # not flipped by the run
    progress = json.loads(_cli(home, "status", "--json", extra_env=env).stdout)["progress"]
    assert {row["step"] for row in progress} >= {"night_qc", "frame_qc"}
    applied = _cli(home, "config", "apply", extra_env={**env, "AUTOWISP_CONFIG": str(other)})
    assert "new versions for night_qc" in applied.stdout
    assert _active_outlier_sigma(pg_url) == 3.0


def _active_outlier_sigma(url: str) -> float:
    from sqlalchemy import select

    from autowisp.db.models import Configuration, Step
    from autowisp.db.session import session_scope

    with session_scope(url) as session:
        parameters = session.scalar(
            select(Configuration.parameters)
            .join(Step, Step.id == Configuration.step_id)
            .where(Step.name == "night_qc", Configuration.active.is_(True))
        )
    return float(parameters["outlier_sigma"])
