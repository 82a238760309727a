"""Shared fixtures: a small simulated night written through the CLI, once per session, and
databases: the embedded SQLite and the real PostgreSQL.

Each database test gets a fresh database. PostgreSQL is the machine's server at
127.0.0.1:5432 (override with AUTOWISP_TEST_POSTGRES); a throwaway database is created and
dropped per test. When it is unreachable the PostgreSQL cases are skipped locally, and
fail when CI=true.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from autowisp.db.migrate import upgrade

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # committed test frames (tests/data/panoptes/README.md)


def run_cli(
    *args: str,
    check: bool = True,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``autowisp ARGS`` in a subprocess with this interpreter.

    With ``env``, the AUTOWISP_* variables of this process are dropped and ``env`` added.
    """
    environment = None
    if env is not None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("AUTOWISP_")}
        environment.update(env)
    result = subprocess.run(
        [sys.executable, "-m", "autowisp.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
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
    """Two cameras, 6 object frames of 320×256 px, 10 bias, 10 dark, 10 + 2 bad flats."""
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


POSTGRES = os.environ.get(
    "AUTOWISP_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def _admin_engine():
    return create_engine(POSTGRES, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    engine = _admin_engine()
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except OperationalError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {POSTGRES} is unreachable in CI: {error}")
        return False
    finally:
        engine.dispose()


def postgres_database(postgres_available):
    if not postgres_available:
        pytest.skip(f"PostgreSQL at {POSTGRES} is unreachable (CI=true makes this a failure)")
    name = f"autowisp_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from autowisp.db.session import dispose_engine

        dispose_engine(url)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request, tmp_path, postgres_available):
    """A URL of an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'autowisp.sqlite'}"
    else:
        yield from postgres_database(postgres_available)


@pytest.fixture
def db_url(empty_db):
    """A URL of a database of each kind, migrated to head."""
    upgrade(empty_db)
    return empty_db


@pytest.fixture
def pg_url(postgres_available):
    """A URL of a fresh PostgreSQL database migrated to head."""
    gen = postgres_database(postgres_available)
    url = next(gen)
    upgrade(url)
    yield url
    for _ in gen:
        pass
