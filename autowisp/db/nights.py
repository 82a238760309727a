"""A night's lifecycle: open while its files arrive, closed once complete.

Frames join the night's current ``generation``. Closing seals it (``closed_generation``
= ``generation``): the barriers and what depends on them then run on exactly the frames
of generations up to it. A frame arriving after the close reopens the night as
generation + 1; when that closes, the night's work runs again as the new generation.
Each transition is one conditional UPDATE, and a frame's arrival takes the night's row
lock first (PostgreSQL), so a close and an arrival are ordered: a frame either belongs to
the generation being closed (and is committed before the close sees the row) or opens
the next one.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from autowisp.db.clock import db_time
from autowisp.db.models import Night, NightState

__all__ = ["close_nights", "close_quiet_nights", "join_night"]


def join_night(session: Session, night_id: int) -> int:
    """Register a frame's arrival in a night (in the frame's transaction): reopen it as a
    new generation if it was closed, note the time; return the frame's generation."""
    query = select(Night.state).where(Night.id == night_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    state = session.scalar(query)
    values: dict[str, object] = {"last_file_at": db_time(session)}
    if state is NightState.CLOSED:
        values.update(state=NightState.OPEN, generation=Night.generation + 1)
    session.execute(update(Night).where(Night.id == night_id).values(**values))
    return int(session.scalar(select(Night.generation).where(Night.id == night_id)) or 1)


def close_nights(session: Session, night_ids: Iterable[int], *, reason: str) -> list[int]:
    """Close these nights (those open); return the ids closed."""
    ids = sorted(set(night_ids))
    if not ids:
        return []
    closed = session.scalars(
        update(Night)
        .where(Night.id.in_(ids), Night.state == NightState.OPEN)
        .values(
            state=NightState.CLOSED,
            closed_generation=Night.generation,
            closed_at=db_time(session),
            close_reason=reason,
        )
        .returning(Night.id)
    ).all()
    return list(closed)


def close_quiet_nights(session: Session, *, quiet_seconds: float) -> list[int]:
    """Close the open nights whose latest frame arrived more than ``quiet_seconds`` ago."""
    ids = session.scalars(
        select(Night.id).where(
            Night.state == NightState.OPEN,
            Night.last_file_at.is_not(None),
            Night.last_file_at < db_time(session, plus_seconds=-quiet_seconds),
        )
    ).all()
    return close_nights(session, ids, reason=f"no new frame for {quiet_seconds:g} s")
