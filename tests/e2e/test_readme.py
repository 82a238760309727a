"""The README's two commands work as a newcomer types them, in a fresh virtual environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.fresh_venv, pytest.mark.slow]


def _command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```\s*<!-- /{marker} -->", text, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


def _fresh_clone(destination: Path) -> Path:
    """The repository's files as a fresh clone would have them (no venv, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def _run(command: str, cwd: Path, extra_env: dict[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p
        for p in env.get("PATH", "").split(os.pathsep)
        if not p.startswith(str(REPO))
        and "/.venv/" not in p
        and not p.rstrip("/").endswith(".venv/bin")
    )
    env.update(extra_env or {})
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, (
        f"{command!r} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def test_ci_runs_the_readme_test_command():
    extracted = subprocess.run(
        [
            "bash",
            "-c",
            "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md"
            " | grep -v -e '^<!--' -e '^```'",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == _command("test-command")
    assert "pytest" in extracted


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory):
    """Both README commands, each in a fresh clone and venv, run at the same time (each
    takes a minute or more, most of it pip's): name -> (clone, future of the result)."""
    inner = "-q -p no:cacheprovider tests/unit/pipeline tests/unit/io"
    jobs = {
        # The exact command; the inner run is limited to the fast unit tests of the
        # pipeline's configuration and of the file formats, so it neither recurses nor
        # runs the numerical tests a second time (the outer run has them).
        "test-command": {"PYTEST_ADDOPTS": inner},
        "main-command": {},
    }
    clones = {name: _fresh_clone(tmp_path_factory.mktemp(name) / "clone") for name in jobs}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {
            name: pool.submit(_run, _command(name), clones[name], extra)
            for name, extra in jobs.items()
        }
    return {name: (clones[name], futures[name]) for name in jobs}


def test_main_command_in_a_fresh_venv(fresh_runs):
    clone, future = fresh_runs["main-command"]
    result = future.result()
    assert "night_qc" in result.stdout and "truth" in result.stdout
    home = clone / "autowisp-data"
    assert (home / "autowisp.sqlite").is_file()
    assert len(list(home.rglob("night-*.png"))) == 1
    assert len(list(home.rglob("object_*.fits"))) == 8


def test_test_command_installs_and_runs_pytest_in_a_fresh_venv(fresh_runs):
    _, future = fresh_runs["test-command"]
    result = future.result()
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]
