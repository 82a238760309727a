"""The words every layer shares: kinds of frames, task scopes and states, error kinds,
star flags.

Plain string enums (and one integer bit flag), below the database, the steps and the
pipeline alike: the ORM models (:mod:`autowisp.db.models`) store their values, steps
declare them, the pipeline moves tasks through them. This module imports nothing from
``autowisp``.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorKind",
    "ImageState",
    "ImageType",
    "NightState",
    "Scope",
    "StarFlag",
    "TaskState",
]


class ImageType(enum.StrEnum):
    """Kind of a raw frame."""

    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"
    OBJECT = "object"


class ImageState(enum.StrEnum):
    """Ingest outcome of a file."""

    INGESTED = "ingested"
    REJECTED = "rejected"


class Scope(enum.StrEnum):
    """What one task of a step works on.

    ``field`` (the frames of one sky field, across nights) is declared for the steps that
    will work per field; the registry accepts no step of that scope yet.
    """

    IMAGE = "image"
    NIGHT = "night"
    SHARD = "shard"
    FIELD = "field"


class TaskState(enum.StrEnum):
    """Life of a task: pending → queued → running → done | failed | dead; or excluded.

    ``failed`` is a transient failure waiting for its retry (``not_before``); ``dead``
    is final (permanent error or attempts exhausted); ``excluded`` means the task will
    not run because an input is dead or excluded, or an operator excluded it.
    """

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    EXCLUDED = "excluded"


class ErrorKind(enum.StrEnum):
    """Classification of a task's last error: ``transient`` (I/O, connections, memory,
    time limits: retried), ``permanent`` (the data: dead at once) or ``bug`` (any other
    exception, a defect in the code: dead at once, with its traceback)."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    BUG = "bug"


class NightState(enum.StrEnum):
    """A night is ``open`` while its files arrive and ``closed`` once complete (an upload
    marker, a quiet period, an operator, or ``autowisp run PATH``). Only closed nights'
    barriers run; a frame arriving after closing reopens the night as a new generation."""

    OPEN = "open"
    CLOSED = "closed"


class StarFlag(enum.IntFlag):
    """Bits of ``star.flags`` (:mod:`autowisp.db.stars`), set by the star-list step.

    A registration ORs the bits of its candidates into a known star's, except
    ``CATALOGUE_ONLY``, which stays set only while no registration has detected the star.
    """

    #: Blended with a neighbour on the reference stack.
    BLENDED = 1
    #: Near a much brighter star.
    NEAR_BRIGHT = 2
    #: Suspected variable.
    VARIABLE_SUSPECT = 4
    #: In the catalogue, not detected on a stack yet.
    CATALOGUE_ONLY = 8
