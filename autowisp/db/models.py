"""SQLAlchemy 2.0 typed models: the same schema on PostgreSQL and the embedded SQLite.

The database is the truth about progress: every (target, step, configuration) has one
:class:`Task` row whose state changes in single transactions. Alembic migrations in
``alembic/versions`` create this schema; tests check the two agree.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from autowisp.vocabulary import (
    ErrorKind,
    ImageState,
    ImageType,
    NightState,
    Scope,
    StarFlag,
    TaskState,
)

__all__ = [
    "Base",
    "Camera",
    "CameraType",
    "Channel",
    "Configuration",
    "ErrorKind",
    "Field",
    "FieldStar",
    "Image",
    "ImageState",
    "ImageType",
    "LightCurveShard",
    "MasterFrame",
    "Night",
    "NightState",
    "Observatory",
    "Scope",
    "ShardNight",
    "Star",
    "StarFlag",
    "StarRegistry",
    "Step",
    "Task",
    "TaskState",
    "Wakeup",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Timezone-aware current UTC time."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: AutoWISP stores aware UTC times only")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so migrations name constraints stably."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON,
        list[Any]: JSON,
        dt.datetime: UTCDateTime,
    }
    if TYPE_CHECKING:
        # Every model here is mapped to a table (no mapping to a join or a select), so
        # ``Model.__table__`` is a Table; SQLAlchemy can only declare it a FromClause.
        __table__: ClassVar[Table]


def _enum(cls: type[enum.Enum]) -> Enum:
    """A string column holding an enum's values (no native enum type: SQLite has none)."""
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Observatory(Base):
    __tablename__ = "observatory"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, doc="Site name or 'lat,lon'.")
    latitude: Mapped[float] = mapped_column(Float, doc="Geodetic latitude, deg.")
    longitude: Mapped[float] = mapped_column(Float, doc="Longitude, deg, east positive.")
    height: Mapped[float] = mapped_column(Float, default=0.0, doc="Height above sea level, m.")


class CameraType(Base):
    __tablename__ = "camera_type"
    __table_args__ = (UniqueConstraint("model", "layout"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    make: Mapped[str] = mapped_column(String(64), doc="Manufacturer, e.g. Canon.")
    model: Mapped[str] = mapped_column(String(128), doc="Model as the header names it.")
    width: Mapped[int] = mapped_column(Integer, doc="Width of the first frame seen, px.")
    height: Mapped[int] = mapped_column(Integer, doc="Height of the first frame seen, px.")
    layout: Mapped[str] = mapped_column(String(8), doc="Bayer layout (RGGB...) or MONO.")
    pixel_size: Mapped[float | None] = mapped_column(Float, doc="Pixel pitch, µm.")
    default_gain: Mapped[float | None] = mapped_column(Float, doc="Gain, e⁻/ADU.")
    default_read_noise: Mapped[float | None] = mapped_column(Float, doc="Read noise, e⁻.")

    channels: Mapped[list[Channel]] = relationship(back_populates="camera_type")


class Channel(Base):
    __tablename__ = "channel"
    __table_args__ = (UniqueConstraint("camera_type_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    camera_type_id: Mapped[int] = mapped_column(ForeignKey("camera_type.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(4), doc="R, G1, G2, B (or L).")
    colour: Mapped[str] = mapped_column(String(2), doc="R, G, B (or L).")
    y0: Mapped[int] = mapped_column(Integer, doc="Row offset in the super-pixel.")
    x0: Mapped[int] = mapped_column(Integer, doc="Column offset in the super-pixel.")

    camera_type: Mapped[CameraType] = relationship(back_populates="channels")


class Camera(Base):
    __tablename__ = "camera"
    __table_args__ = (UniqueConstraint("serial", "camera_type_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    serial: Mapped[str] = mapped_column(String(64), doc="Serial number from the header.")
    camera_type_id: Mapped[int] = mapped_column(ForeignKey("camera_type.id"))
    observatory_id: Mapped[int | None] = mapped_column(ForeignKey("observatory.id"))

    camera_type: Mapped[CameraType] = relationship()
    observatory: Mapped[Observatory | None] = relationship()


class Night(Base):
    __tablename__ = "night"
    __table_args__ = (UniqueConstraint("camera_id", "local_date"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    camera_id: Mapped[int] = mapped_column(ForeignKey("camera.id"))
    local_date: Mapped[dt.date] = mapped_column(
        Date, doc="Local date at the observatory of the evening the night began."
    )
    upload_path: Mapped[str | None] = mapped_column(Text, doc="Directory it was uploaded to.")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    state: Mapped[NightState] = mapped_column(
        _enum(NightState), default=NightState.OPEN, server_default=NightState.OPEN.value
    )
    generation: Mapped[int] = mapped_column(
        Integer, default=1, server_default="1", doc="Generation that arriving frames join."
    )
    closed_generation: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default="0",
        doc="Latest closed generation (0: never closed): the one barriers and what "
        "depends on them work on.",
    )
    closed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    close_reason: Mapped[str | None] = mapped_column(Text, doc="Who or what closed it.")
    last_file_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), doc="When its latest frame was ingested (for the quiet period)."
    )
    planned_generation: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default="0",
        doc="Latest closed generation whose tasks the planner has created.",
    )

    camera: Mapped[Camera] = relationship()


class Image(Base):
    __tablename__ = "image"
    __table_args__ = (
        Index("ix_image_camera_state", "camera_id", "state"),
        Index("ix_image_night_type", "night_id", "image_type"),
        Index("ix_image_planned_at", "planned_at"),
        Index("ix_image_field", "field_id"),
        # The planner's "frames not planned yet, in id order": a handful among millions.
        Index(
            "ix_image_unplanned",
            "id",
            postgresql_where=text("planned_at IS NULL"),
            sqlite_where=text("planned_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text, doc="Absolute path when ingested.")
    sha256: Mapped[str] = mapped_column(
        String(64), unique=True, doc="Of the file's bytes: the same bytes are one image."
    )
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[ImageState] = mapped_column(_enum(ImageState))
    reject_reason: Mapped[str | None] = mapped_column(Text)
    night_id: Mapped[int | None] = mapped_column(ForeignKey("night.id"))
    camera_id: Mapped[int | None] = mapped_column(ForeignKey("camera.id"))
    image_type: Mapped[ImageType | None] = mapped_column(_enum(ImageType))
    exptime: Mapped[float | None] = mapped_column(Float, doc="Exposure time, s.")
    date_obs: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), doc="UTC start of the exposure."
    )
    jd: Mapped[float | None] = mapped_column(Float, doc="UTC Julian date of mid-exposure.")
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    ra: Mapped[float | None] = mapped_column(Float, doc="Header pointing RA, deg.")
    dec: Mapped[float | None] = mapped_column(Float, doc="Header pointing Dec, deg.")
    header: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, doc="FITS header.")
    ingested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    generation: Mapped[int] = mapped_column(
        Integer,
        default=1,
        server_default="1",
        doc="The night's generation the frame arrived in (barriers of generation g use "
        "the frames of generations <= g).",
    )
    planned_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), doc="When the planner created the frame's tasks (None: not yet)."
    )
    field_id: Mapped[int | None] = mapped_column(
        ForeignKey("field.id"), doc="The field of an object frame with a known pointing."
    )

    night: Mapped[Night | None] = relationship()
    camera: Mapped[Camera | None] = relationship()


class Step(Base):
    __tablename__ = "step"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[Scope] = mapped_column(_enum(Scope))
    code_version: Mapped[str] = mapped_column(String(32))


class Configuration(Base):
    __tablename__ = "configuration"
    __table_args__ = (UniqueConstraint("step_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("step.id"))
    version: Mapped[str] = mapped_column(
        String(16), doc="Hash of the parameters, code version and upstream versions."
    )
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    upstream: Mapped[dict[str, Any]] = mapped_column(
        JSON,
        default=dict,
        doc="Input step name -> configuration id: the exact upstream configurations whose "
        "outputs this one reads.",
    )
    active: Mapped[bool] = mapped_column(
        Boolean, default=True, doc="The step's current configuration (others are history)."
    )
    planned_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(),
        doc="When the planner last created tasks for every target of this configuration "
        "(None: since its activation, not yet).",
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    step: Mapped[Step] = relationship()


class Field(Base):
    """One camera pointing across nights: the unit of star lists, magnitude-fitting
    references and light curves. A frame joins the camera's field whose centre is within
    ``radius`` of its pointing, else starts a new one (:mod:`autowisp.db.fields`)."""

    __tablename__ = "field"
    __table_args__ = (Index("ix_field_camera", "camera_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    camera_id: Mapped[int] = mapped_column(ForeignKey("camera.id"))
    name: Mapped[str] = mapped_column(String(64), unique=True, doc="<serial>-<RA>+<Dec>.")
    ra: Mapped[float] = mapped_column(Float, doc="Centre RA (the first frame's pointing), deg.")
    dec: Mapped[float] = mapped_column(Float, doc="Centre Dec, deg.")
    radius: Mapped[float] = mapped_column(
        Float, doc="A frame pointing within this of the centre belongs to the field, deg."
    )
    planned_generation: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default="0",
        doc="Latest field generation (each placement of nights into its shards is one).",
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    camera: Mapped[Camera] = relationship()


class LightCurveShard(Base):
    """A range of a field's stars whose light curves are kept together. Its content grows
    night by night in generations: generation ``s`` holds the nights placed in
    generations <= s (:class:`ShardNight`), each written as its own file, so appending
    never rewrites history in place; the current file is the latest done task's."""

    __tablename__ = "light_curve_shard"
    __table_args__ = (UniqueConstraint("field_id", "shard_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, doc="<field>-s<index>.")
    field_id: Mapped[int] = mapped_column(ForeignKey("field.id"))
    shard_index: Mapped[int] = mapped_column(Integer, doc="0, 1, ... within the field.")
    star_lo: Mapped[int] = mapped_column(Integer, doc="First star index (inclusive).")
    star_hi: Mapped[int] = mapped_column(Integer, doc="Last star index (exclusive).")
    planned_generation: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", doc="Latest generation nights were placed in."
    )
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    field: Mapped[Field] = relationship()


class ShardNight(Base):
    """Night ``night_id``'s closed generation ``night_generation`` is in the shard from
    generation ``shard_generation`` on, placed in the field's generation
    ``field_generation``. A night that reopened and closed again is placed anew."""

    __tablename__ = "shard_night"
    __table_args__ = (
        UniqueConstraint("shard_id", "night_id", "night_generation"),
        Index("ix_shard_night_night", "night_id", "night_generation"),
        Index("ix_shard_night_shard_generation", "shard_id", "shard_generation"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("light_curve_shard.id"))
    night_id: Mapped[int] = mapped_column(ForeignKey("night.id"))
    night_generation: Mapped[int] = mapped_column(Integer)
    shard_generation: Mapped[int] = mapped_column(Integer)
    field_generation: Mapped[int] = mapped_column(Integer)
    placed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Star(Base):
    """A star of the sky, one identity across frames, nights, fields and cameras.

    Registered by :func:`autowisp.db.stars.register_stars`; its id and position never
    change once registered (later registrations only fill in what it lacked: a Gaia id,
    magnitudes, instrumental magnitudes, flags). Overlapping fields share its row.
    """

    __tablename__ = "star"
    __table_args__ = (Index("ix_star_dec_ra", "dec", "ra"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    gaia_source_id: Mapped[int | None] = mapped_column(
        BigInteger, unique=True, doc="Gaia DR3 source_id (None: not in the catalogue)."
    )
    ra: Mapped[float] = mapped_column(Float, doc="RA at ``epoch`` (ICRS), deg, in [0, 360).")
    dec: Mapped[float] = mapped_column(Float, doc="Dec at ``epoch`` (ICRS), deg.")
    epoch: Mapped[float] = mapped_column(Float, doc="Julian year of the position.")
    g: Mapped[float | None] = mapped_column(Float, doc="Gaia G, mag (None: unknown).")
    bp: Mapped[float | None] = mapped_column(Float, doc="Gaia BP, mag (None: unknown).")
    rp: Mapped[float | None] = mapped_column(Float, doc="Gaia RP, mag (None: unknown).")
    instrumental: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True),  # None is SQL NULL, not the JSON text 'null'
        doc="Channel name (R, G1, G2, B or L) -> instrumental magnitude on a reference "
        "stack, mag; each channel is filled in once, by the first registration that "
        "measures it.",
    )
    first_night_id: Mapped[int | None] = mapped_column(
        ForeignKey("night.id"), doc="The night whose registration created it."
    )
    first_field_id: Mapped[int] = mapped_column(
        ForeignKey("field.id"), doc="The field whose registration created it."
    )
    flags: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", doc="StarFlag bits (autowisp.vocabulary)."
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FieldStar(Base):
    """Star ``star_id`` is star ``star_index`` of field ``field_id``.

    Indices are 0, 1, 2... in order of registration and append-only: the field's
    light-curve shards (:func:`autowisp.db.fields.define_shards`) split its stars by
    index, so an index never changes and is never reused.
    """

    __tablename__ = "field_star"
    __table_args__ = (
        UniqueConstraint("field_id", "star_index"),
        UniqueConstraint("field_id", "star_id"),
        Index("ix_field_star_star", "star_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    field_id: Mapped[int] = mapped_column(ForeignKey("field.id"))
    star_index: Mapped[int] = mapped_column(Integer, doc="0, 1, 2... within the field.")
    star_id: Mapped[int] = mapped_column(ForeignKey("star.id"))
    added_night_id: Mapped[int | None] = mapped_column(
        ForeignKey("night.id"), doc="The night whose registration added it to the field."
    )


class StarListRow(Base):
    """Row ``list_row`` of field ``field_id`` in the product of star-list task ``task_id``
    is the field's star ``star_index`` (recorded with the task's completion)."""

    __tablename__ = "star_list_row"
    __table_args__ = (
        UniqueConstraint("task_id", "field_id", "list_row"),
        Index("ix_star_list_row_field_index", "field_id", "star_index"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("task.id"))
    field_id: Mapped[int] = mapped_column(ForeignKey("field.id"))
    list_row: Mapped[int] = mapped_column(Integer, doc="Row in the star list's field table.")
    star_index: Mapped[int] = mapped_column(Integer, doc="The star's index in the field.")


class StarRegistry(Base):
    """The single row (id 1) that serialises star registrations.

    A registration begins with ``UPDATE star_registry SET version = version + 1 WHERE
    id = 1``: the row lock on PostgreSQL, the database's write lock on SQLite, held until
    the registration commits. Two registrations of overlapping fields therefore never
    both create the same star. The migration inserts the row.
    """

    __tablename__ = "star_registry"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default="0",
        doc="Registrations so far: an export at version v holds those up to v.",
    )


class Task(Base):
    __tablename__ = "task"
    __table_args__ = (
        UniqueConstraint("step_id", "configuration_id", "target", "generation"),
        Index("ix_task_state_not_before", "state", "not_before"),
        Index("ix_task_night_step_state", "night_id", "step_id", "state"),
        Index("ix_task_image", "image_id"),
        Index("ix_task_shard", "shard_id"),
        Index("ix_task_field", "field_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("step.id"))
    configuration_id: Mapped[int] = mapped_column(ForeignKey("configuration.id"))
    target: Mapped[str] = mapped_column(
        String(32),
        doc="'image:<id>', 'night:<id>', 'shard:<id>' or 'field:<id>': part of the unique key.",
    )
    generation: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default="0",
        doc="The generation the task works on: its night's (0: a frame's own work, "
        "independent of its night's completeness), its shard's or its field's; part of "
        "the unique key.",
    )
    image_id: Mapped[int | None] = mapped_column(ForeignKey("image.id"))
    night_id: Mapped[int | None] = mapped_column(
        ForeignKey("night.id"), doc="The night of the target (also for image tasks)."
    )
    shard_id: Mapped[int | None] = mapped_column(ForeignKey("light_curve_shard.id"))
    field_id: Mapped[int | None] = mapped_column(
        ForeignKey("field.id"), doc="The field of a shard or field task."
    )
    state: Mapped[TaskState] = mapped_column(_enum(TaskState), default=TaskState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    wait_reason: Mapped[str | None] = mapped_column(
        Text, doc="Why a pending task cannot run yet (shown by `autowisp status`)."
    )
    error_kind: Mapped[ErrorKind | None] = mapped_column(_enum(ErrorKind))
    not_before: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), doc="A failed task is retried after this time."
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    worker_host: Mapped[str | None] = mapped_column(String(128))
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), doc="Database clock: the lease ends then unless renewed."
    )
    lease_token: Mapped[str | None] = mapped_column(
        String(32), doc="Issued by claim; heartbeat, finish and fail must present it."
    )
    inputs: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, doc="Input step name -> upstream task ids: exactly what the task reads."
    )
    output_path: Mapped[str | None] = mapped_column(Text)
    output_sha256: Mapped[str | None] = mapped_column(String(64), doc="Of the output file.")
    output_pruned_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(),
        doc="When the retention policy deleted the output file (None: not deleted); "
        "output_path and output_sha256 stay as history.",
    )
    qc: Mapped[dict[str, Any] | None] = mapped_column(JSON, doc="Quality figures of the run.")

    step: Mapped[Step] = relationship()
    configuration: Mapped[Configuration] = relationship()
    image: Mapped[Image | None] = relationship()
    night: Mapped[Night | None] = relationship()


class Wakeup(Base):
    """A task of ``step_id`` in ``night_id`` changed state: the planner looks at that
    night's pending tasks again (and, for a master, at the camera's other nights').
    Rows are appended by state transitions and consumed by the planner."""

    __tablename__ = "wakeup"

    id: Mapped[int] = mapped_column(primary_key=True)
    night_id: Mapped[int | None] = mapped_column(Integer)
    step_id: Mapped[int | None] = mapped_column(Integer)


class MasterFrame(Base):
    __tablename__ = "master_frame"
    __table_args__ = (Index("ix_master_frame_camera_type", "camera_id", "frame_type"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    camera_id: Mapped[int] = mapped_column(ForeignKey("camera.id"))
    frame_type: Mapped[ImageType] = mapped_column(_enum(ImageType))
    channel: Mapped[str | None] = mapped_column(String(4), doc="None: all channels in one.")
    path: Mapped[str] = mapped_column(Text)
    source_night_id: Mapped[int | None] = mapped_column(ForeignKey("night.id"))
    valid_from: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    valid_to: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    frame_count: Mapped[int] = mapped_column(Integer)
    qc: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
