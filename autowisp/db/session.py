"""Engines and sessions: one engine per process and URL, made on demand, never at import."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["dispose_engine", "engine_for", "rowcount", "session_scope"]

_ENGINES: dict[str, tuple[int, Engine]] = {}


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    # WAL lets readers (status) run while a worker writes; busy_timeout waits for locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def engine_for(url: str) -> Engine:
    """This process's engine for ``url``.

    A child process made by ``fork`` gets a new engine of its own: connections
    inherited from the parent are abandoned (``dispose(close=False)``), never shared.
    """
    pid = os.getpid()
    known = _ENGINES.get(url)
    if known is not None:
        owner, engine = known
        if owner == pid:
            return engine
        engine.dispose(close=False)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        # Batched executemany for UPDATEs too (one round trip per page, not per row).
        options = {"executemany_mode": "values_plus_batch"} if "psycopg2" in url else {}
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **options)
    _ENGINES[url] = (pid, engine)
    return engine


def dispose_engine(url: str) -> None:
    """Close this process's engine for ``url`` (before dropping that database)."""
    known = _ENGINES.pop(url, None)
    if known is not None:
        known[1].dispose()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = sessionmaker(engine_for(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """How many rows an INSERT, UPDATE or DELETE without RETURNING matched.

    ``Session.execute`` returns a :class:`~sqlalchemy.engine.CursorResult` for such a
    statement, which has ``rowcount``, but SQLAlchemy declares its return type as the
    base :class:`~sqlalchemy.engine.Result` (sqlalchemy/sqlalchemy#9185): this names
    the subclass for the type checker and changes nothing at run time.
    """
    return cast("CursorResult[*tuple[Any, ...]]", result).rowcount
