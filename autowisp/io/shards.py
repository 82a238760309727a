"""Light-curve shard generations: appending a night costs the night, never the history.

A shard (a range of a field's stars) grows night by night. Each generation is its own
HDF5 file, written once, atomically, by the task of that generation:

* ``nights/<night id>`` groups hold the data of the nights this generation wrote (the
  ones placed in the shard since the generation it appends to), one dataset per column
  given by the step (for example ``jd`` and ``mag`` of shape frames × stars), with the
  night's date, night generation and where the data came from as attributes;
* ``members``, a table of every night the generation holds — night id, date, night
  generation, and the file (a generation of the same shard in the same directory) that
  holds its data. A night's newer generation (late frames) replaces the older one from
  the generation that writes it; a night no longer usable is dropped from the table.

An earlier generation's file is never touched, so a reader that opened it keeps a
consistent view, and the database names the current generation (the latest done task
of the shard). :func:`read_shard_generation` follows the member table, and checks that
each member file is a generation of the same shard holding that night generation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from autowisp.errors import PermanentError
from autowisp.io.atomic import atomic_path
from autowisp.io.provenance import Provenance, stamp

__all__ = ["NightBlock", "ShardGeneration", "read_shard_generation", "write_shard_generation"]

FORMAT = "autowisp-shard-1"


@dataclass(frozen=True)
class NightBlock:
    """One night's data in a shard: columns (arrays) and scalar attributes (``date``,
    ``night_generation`` and ``source`` are set by the writer)."""

    night_id: int
    local_date: str
    night_generation: int
    columns: Mapping[str, np.ndarray]
    source: str = ""
    stored_in: str = ""


@dataclass(frozen=True)
class ShardGeneration:
    """A shard's generation as read: which shard, its nights (loaded from the files that
    hold them), and the provenance of the file."""

    shard: str
    field: str
    star_lo: int
    star_hi: int
    generation: int
    previous: str
    nights: Mapping[int, NightBlock] = dataclass_field(default_factory=dict)
    provenance: Provenance | None = None


def _members(path: Path) -> list[tuple[int, str, int, str]]:
    with h5py.File(path, "r") as source:
        _check(source, path)
        table = source["members"][()]
    return [
        (int(row["night_id"]), row["date"].decode(), int(row["night_generation"]),
         row["file"].decode())
        for row in table
    ]  # fmt: skip


def _check(source: h5py.File, path: Path) -> None:
    kind = source.attrs.get("format", b"")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind != FORMAT:
        raise PermanentError(f"{path} is not a light-curve shard generation ({kind!r})")


def write_shard_generation(
    path: Path,
    *,
    shard: str,
    field_name: str,
    star_lo: int,
    star_hi: int,
    generation: int,
    provenance: Provenance,
    previous: Path | None,
    written: Iterable[NightBlock],
    dropped: Iterable[int] = (),
) -> None:
    """Write generation ``generation`` of a shard: the nights of ``previous`` (an earlier
    generation's file of the same shard, in the same directory; None to build from
    nothing) except those in ``dropped`` or rewritten, plus ``written``."""
    blocks = {block.night_id: block for block in written}
    members: dict[int, tuple[str, int, str]] = {}
    if previous is not None:
        if previous.parent.resolve() != path.parent.resolve():
            raise ValueError(f"{previous} is not in the directory of {path}")
        with h5py.File(previous, "r") as source:
            _check(source, previous)
            if str(_text(source.attrs["shard"])) != shard:
                raise PermanentError(f"{previous} is a generation of another shard")
        members = {n: (d, g, f) for n, d, g, f in _members(previous)}
    for night in dropped:
        members.pop(int(night), None)
    for night_id, block in blocks.items():
        members[night_id] = (block.local_date, block.night_generation, path.name)
    rows = np.array(
        [(n, d.encode(), g, f.encode()) for n, (d, g, f) in sorted(members.items())],
        dtype=[("night_id", "i8"), ("date", "S10"), ("night_generation", "i4"),
               ("file", "S128")],
    )  # fmt: skip
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as out:
        stamp(out.attrs, provenance)
        out.attrs["format"] = FORMAT
        out.attrs["shard"] = shard
        out.attrs["field"] = field_name
        out.attrs["star_lo"] = star_lo
        out.attrs["star_hi"] = star_hi
        out.attrs["generation"] = generation
        out.attrs["previous"] = previous.name if previous is not None else ""
        out.create_dataset("members", data=rows)
        group = out.create_group("nights")
        for night_id, block in sorted(blocks.items()):
            night = group.create_group(str(night_id))
            night.attrs["date"] = block.local_date
            night.attrs["night_generation"] = block.night_generation
            night.attrs["source"] = block.source
            for name, values in sorted(block.columns.items()):
                night.create_dataset(name, data=np.asarray(values))


def read_shard_generation(
    path: Path, *, columns: bool = True, stars: np.ndarray | None = None
) -> ShardGeneration:
    """Read a shard generation and the nights it holds (their data from the member
    files; only the member table with ``columns=False``). With ``stars`` (positions in
    the shard, ``star − star_lo``, increasing), columns of two or more dimensions are
    read at those positions of their second axis only (frames × stars ...)."""
    wanted = None if stars is None else np.asarray(stars, np.int64)
    if wanted is not None and wanted.size > 1 and np.any(np.diff(wanted) <= 0):
        raise ValueError("stars must be increasing positions in the shard")
    with h5py.File(path, "r") as source:
        _check(source, path)
        attrs: dict[str, Any] = {k: _text(v) for k, v in source.attrs.items()}
        shard = str(attrs["shard"])
    nights = {}
    for night_id, date, night_generation, name in _members(path):
        data: dict[str, np.ndarray] = {}
        holder = path.parent / name
        if columns:
            if not holder.exists():
                raise PermanentError(
                    f"{path}: night {night_id} is in {name}, which is missing (pruned?)"
                )
            with h5py.File(holder, "r") as source:
                _check(source, holder)
                group = source.get(f"nights/{night_id}")
                if (
                    _text(source.attrs["shard"]) != shard
                    or group is None
                    or int(group.attrs["night_generation"]) != night_generation
                ):
                    raise PermanentError(
                        f"{path}: {name} does not hold generation {night_generation} of "
                        f"night {night_id} of shard {shard}"
                    )
                data = {key: _read(group[key], wanted) for key in group}
                source_text = _text(group.attrs.get("source", ""))
        else:
            source_text = ""
        nights[night_id] = NightBlock(
            night_id, date, night_generation, data, source_text, stored_in=name
        )
    return ShardGeneration(
        shard=shard,
        field=str(attrs["field"]),
        star_lo=int(attrs["star_lo"]),
        star_hi=int(attrs["star_hi"]),
        generation=int(attrs["generation"]),
        previous=str(attrs["previous"]),
        nights=nights,
        provenance=Provenance.read(attrs),
    )


def _read(dataset: Any, stars: np.ndarray | None) -> np.ndarray:
    if stars is None or dataset.ndim < 2:
        return np.asarray(dataset[()])
    if stars.size == 0:
        return np.zeros((dataset.shape[0], 0, *dataset.shape[2:]), dataset.dtype)
    return np.asarray(dataset[:, stars])


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
