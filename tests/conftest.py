"""Shared fixtures: a small simulated night written through the CLI, once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(
    *args: str, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``autowisp ARGS`` in a subprocess with this interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "autowisp.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"autowisp {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def small_night(tmp_path_factory) -> Path:
    """Two cameras, 6 object frames of 320×256 px, 10 of each calibration frame."""
    outdir = tmp_path_factory.mktemp("night") / "upload"
    run_cli(
        "simulate",
        str(outdir),
        "--frames",
        "6",
        "--size",
        "320x256",
        "--seed",
        "11",
        "--cameras",
        "2",
    )
    return outdir
