"""The database's clock, for leases and retry times.

Workers on several hosts compare lease expiries with one clock, the database's, so a host
whose clock is off can neither steal a live lease nor keep a dead one. PostgreSQL's
``now()`` is the transaction's start; SQLite's ``strftime('%f', 'now')`` gives the same
text form SQLAlchemy stores (``YYYY-MM-DD HH:MM:SS.SSS``, UTC), so comparisons with stored
times are exact on both.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import func, literal
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from autowisp.db.models import UTCDateTime

__all__ = ["db_time"]


def db_time(session: Session, *, plus_seconds: float = 0.0) -> ColumnElement[Any]:
    """A SQL expression for the database's current UTC time plus ``plus_seconds``."""
    if session.get_bind().dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M:%f", "now", f"{plus_seconds:+.3f} seconds")
    later = literal(dt.timedelta(seconds=plus_seconds))
    return (func.now() + later).cast(UTCDateTime())
