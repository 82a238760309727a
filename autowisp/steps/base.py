"""What a step is: a name, a scope, its inputs, parameters with defaults and units, and run().

A step never touches the database or the queue. The runner hands it a
:class:`StepContext` (its target, parameters, and the outputs of its inputs) and records
the :class:`StepResult` it returns. Outputs are written atomically under
:meth:`StepContext.output_path`, a path that encodes step, configuration and target, so a
task that runs twice writes the same file.
"""

from __future__ import annotations

import abc
import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from autowisp.errors import PermanentError
from autowisp.vocabulary import ImageType, Scope

__all__ = [
    "FieldInfo",
    "ImageInfo",
    "Input",
    "InputProduct",
    "Kind",
    "NightInfo",
    "Parameter",
    "PlacedNight",
    "ShardInfo",
    "ShardStars",
    "Step",
    "StepContext",
    "StepResult",
]


class Kind(enum.StrEnum):
    """How a step's task finds the upstream task(s) an input comes from.

    ``same``: the same target — the same frame (image step on image step), the same night
    and generation (night on night), or the frame's own night (image step on night step).
    ``barrier``: a night step over an image step — every frame of the closed night's
    generation; it runs once they are all done, dead or excluded, on the done ones.
    ``master``: a night step's product, the task's own night's when that night has frames
    for it, else (its master dead or absent) the nearest valid night's of the same camera.
    ``after``: an image step on a night step that improves it but is not needed — the
    frame's own night's task: the image task waits for it to end, then runs with its
    product when it is done and without it when it died or was excluded (a failed star
    list must not stop a night's photometry of the catalogue's stars).

    Shards and fields (a shard's or field's task works on one of its generations):

    ``same`` also joins a shard step to a shard step (the same shard and generation), a
    field step to a field step (the same generation), and a shard step to a field step
    (its field, at the field generation its shard generation was placed in).
    ``nights``: a shard step over a night step — the nights placed in the shard since the
    generation the task appends to (its ``previous`` input; all of them without one), at
    the night generation placed; it runs once they are all done, dead or excluded.
    ``shards``: a night step over a shard step — the shards the night touched, each at the
    generation the night's closed generation was placed in; a barrier over them.
    ``field_shards``: a field step over a shard step — all shards of the field at the
    field's generation; a barrier over them.
    ``previous``: a shard (or field) step over itself — its latest done earlier
    generation of the same shard, which the task appends to; none at first, or after a
    reconfiguration (the task then builds from every night placed so far).
    """

    SAME = "same"
    BARRIER = "barrier"
    MASTER = "master"
    AFTER = "after"
    NIGHTS = "nights"
    SHARDS = "shards"
    FIELD_SHARDS = "field_shards"
    PREVIOUS = "previous"


@dataclass(frozen=True)
class Input:
    """One input edge of the DAG: the upstream step and how its task is found."""

    step: str
    kind: Kind


@dataclass(frozen=True)
class Parameter:
    """A step parameter: name, default, unit (empty if none) and what it does."""

    name: str
    default: Any
    unit: str = ""
    doc: str = ""


@dataclass(frozen=True)
class ImageInfo:
    """An ingested raw frame as a step sees it."""

    id: int
    path: Path
    image_type: ImageType
    exptime: float
    date_obs: dt.datetime
    jd: float
    layout: str
    camera_serial: str
    header: Mapping[str, Any]
    sha256: str = ""
    field_id: int | None = None
    field_name: str = ""


@dataclass(frozen=True)
class NightInfo:
    """A night: one camera's session, with its ingested frames (for an image task, only
    the task's own frame). For a step that declares ``night_star_rows``, ``star_rows``:
    per field, per star list of the night (its product's path as
    :func:`autowisp.io.provenance.product_reference` shows it), its rows and the field
    stars they are, ``(list_row, star_index)``."""

    id: int
    local_date: dt.date
    camera_serial: str
    layout: str
    images: tuple[ImageInfo, ...]
    star_rows: Mapping[int, Mapping[str, tuple[Any, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class PlacedNight:
    """A night generation placed in a shard: which night, its closed generation, and the
    shard generation from which the shard holds it."""

    night_id: int
    local_date: dt.date
    night_generation: int
    shard_generation: int


@dataclass(frozen=True)
class ShardStars:
    """A shard's stars as the database knows them, for a step that declares
    ``shard_stars``: arrays over the stars ``star_lo .. star_hi`` in index order
    (``gaia_source_id`` -1 where none, magnitudes NaN where unknown), and ``list_rows``:
    per star list of the nights the task writes (its product's path as
    :func:`autowisp.io.provenance.product_reference` shows it), its rows that are stars of
    this shard and their star indices, ``(list_row, star_index)``."""

    star_index: Any
    star_id: Any
    gaia_source_id: Any
    ra: Any
    dec: Any
    g: Any
    bp: Any
    rp: Any
    list_rows: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardInfo:
    """A light-curve shard at one generation: its field's stars ``star_lo .. star_hi``
    (exclusive), every night it holds at this generation (each night once, at its newest
    generation placed), the nights this generation writes anew (``appended``: placed
    since ``previous_generation``, the generation whose file the task appends to; 0 when
    it builds from nothing), and the field's generation it belongs to."""

    id: int
    name: str
    field_id: int
    field_name: str
    index: int
    star_lo: int
    star_hi: int
    generation: int
    field_generation: int
    nights: tuple[PlacedNight, ...]
    appended: tuple[PlacedNight, ...]
    previous_generation: int = 0
    stars: ShardStars | None = None


@dataclass(frozen=True)
class FieldInfo:
    """A field (one camera pointing across nights) at one generation, with its shards
    at the generations that field generation holds."""

    id: int
    name: str
    camera_serial: str
    ra: float
    dec: float
    radius: float
    generation: int
    shards: tuple[ShardInfo, ...] = ()


@dataclass(frozen=True)
class InputProduct:
    """The result of an upstream task that is done.

    ``night_date`` is the local date of the night the product belongs to (for a master
    taken from another night, that night's), ``config_version`` the configuration
    version of the upstream task and ``task_id`` its row: together they name where a
    product came from (the MBIAS/MDARK/MFLAT provenance keywords).
    """

    target: str
    image_id: int | None
    output_path: Path | None
    qc: Mapping[str, Any]
    task_id: int = 0
    config_version: str = ""
    night_date: dt.date | None = None


@dataclass(frozen=True)
class StepContext:
    """Everything a step's run() may use."""

    task_id: int
    step: str
    target: str
    config_version: str
    parameters: Mapping[str, Any]
    storage_root: Path
    image: ImageInfo | None = None
    night: NightInfo | None = None
    inputs: Mapping[str, tuple[InputProduct, ...]] = field(default_factory=dict)
    generation: int = 0
    shard: ShardInfo | None = None
    field: FieldInfo | None = None

    def require_image(self) -> ImageInfo:
        """The target frame; a permanent error for a task that has none."""
        if self.image is None:
            raise PermanentError(f"{self.step} needs an image target, got {self.target!r}")
        return self.image

    def require_input(self, step: str, what: str) -> tuple[InputProduct, Path]:
        """The one product of upstream ``step`` this task reads and its file (``what``
        names it in the error); a permanent error when there is none."""
        products = self.inputs.get(step, ())
        path = products[0].output_path if products else None
        if path is None:
            name = self.image.path.name if self.image is not None else self.target
            raise PermanentError(f"no {what} ({step}) for {name}")
        return products[0], Path(path)

    def require_night(self) -> NightInfo:
        """The target night; a permanent error for a task that has none."""
        if self.night is None:
            raise PermanentError(f"{self.step} needs a night target, got {self.target!r}")
        return self.night

    def require_shard(self) -> ShardInfo:
        """The target shard; a permanent error for a task that has none."""
        if self.shard is None:
            raise PermanentError(f"{self.step} needs a shard target, got {self.target!r}")
        return self.shard

    def require_field(self) -> FieldInfo:
        """The target field; a permanent error for a task that has none."""
        if self.field is None:
            raise PermanentError(f"{self.step} needs a field target, got {self.target!r}")
        return self.field

    def output_path(self, suffix: str) -> Path:
        """``<storage>/<step>/<config version>/<night date>/<target>[-g<N>].<suffix>``: a
        night's second and later generations (late frames) get their own files. A shard's
        or field's every generation is its own file,
        ``<storage>/<step>/<config version>/<field>/<shard or "field">-g<N>.<suffix>``, so
        appending never rewrites an earlier generation."""
        base = self.storage_root / self.step / self.config_version
        if self.shard is not None:
            return base / self.shard.field_name / f"{self.shard.name}-g{self.generation}.{suffix}"
        if self.field is not None:
            return base / self.field.name / f"field-g{self.generation}.{suffix}"
        night = self.night.local_date.isoformat() if self.night else "no-night"
        name = self.target.replace(":", "-")
        if self.generation > 1:
            name += f"-g{self.generation}"
        return self.storage_root / self.step / self.config_version / night / f"{name}.{suffix}"


@dataclass(frozen=True)
class StepResult:
    """What a run produced: its main output file and quality figures (JSON-able)."""

    output_path: Path | None = None
    qc: Mapping[str, Any] = field(default_factory=dict)


class Step(abc.ABC):
    """Base class of a processing step (see the module docstring).

    Class attributes
    ----------------
    name : the step's key in the database, CLI and logs.
    scope : IMAGE (one task per frame), NIGHT (per camera night), SHARD (per light-curve
        shard and generation) or FIELD (per field and generation).
    inputs : the steps whose outputs it needs, as names or :class:`Input` edges. A name
        takes its kind from the scopes: an image step on an image step, or on a night
        step, is ``same`` (the same frame, the frame's night); a night step on a night
        step ``same``; a night step on an image step a ``barrier``; a shard step on a
        night step ``nights``, a night step on a shard step ``shards``, a field step on a
        shard step ``field_shards``, shard or field on shard or field ``same``, and a step
        naming itself ``previous`` (see :class:`Kind`).
    master_inputs : night steps (calibration masters) taken with kind ``master``: the own
        night's once it is closed and its master done, else the nearest valid night's of
        the same camera; the task waits, pending with the reason, while there is none
        (cameras listed in an ``uncalibrated_cameras`` parameter proceed without).
    outputs : the kinds of product it writes, by their names in :mod:`autowisp.io`
        ("master_frame", "calibrated_frame", "astrometric_solution", "frame_qc",
        "night_qc"); each has one writer and one reader there.
    parameters : the parameters with their defaults and units.
    version : bump when the code changes what the step computes.
    image_types : frames an image step runs on; for a night step, the night needs at
        least one such frame.
    queue : "light" for per-frame work, "heavy" for night-level work.
    time_limit : seconds a task may run (0: the ``[pipeline] time_limit_seconds``).
    recorder : what the runner records in the database from the step's output, in the
        transaction that marks the task done ("" for nothing; "stars": the star list's
        identities, :mod:`autowisp.pipeline.recorders`).
    shard_stars : a shard step that needs its stars' identities gets them in
        ``ShardInfo.stars`` (:class:`ShardStars`).
    night_star_rows : a night step that needs the field star of each row of the night's
        star lists gets them in ``NightInfo.star_rows``.
    """

    name: ClassVar[str]
    scope: ClassVar[Scope]
    inputs: ClassVar[tuple[str | Input, ...]] = ()
    master_inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    version: ClassVar[str] = "1"
    image_types: ClassVar[frozenset[ImageType]] = frozenset(ImageType)
    queue: ClassVar[str] = "light"
    time_limit: ClassVar[float] = 0.0
    recorder: ClassVar[str] = ""
    shard_stars: ClassVar[bool] = False
    night_star_rows: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, context: StepContext) -> StepResult:
        """Do the work for one target; raise TransientError or PermanentError on failure."""
