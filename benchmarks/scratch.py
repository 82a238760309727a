"""A throwaway PostgreSQL database for a benchmark, created and dropped around it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

from autowisp.db.session import dispose_engine

ADMIN = os.environ.get(
    "AUTOWISP_BENCH_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


@contextmanager
def scratch_database() -> Iterator[str]:
    """Yield the URL of a new empty database on the server of ``ADMIN``; drop it after."""
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    name = f"autowisp_bench_{uuid.uuid4().hex[:8]}"
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url
    finally:
        dispose_engine(url)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
