"""A night's star list: what the ``star_list`` step found on the night's deep stacks
(the field's whole list, with the database's ids, is exported by :mod:`autowisp.io.star_list`).

One FITS file per night (written once, atomically, by the step). The primary header holds
the provenance (:mod:`autowisp.io.provenance`) and the step's quality figures as JSON in
``QCJSON``; then one binary table per field the night's frames belong to, named
``FIELD<id>``, whose header gives ``FIELD`` (the field's id), ``FIELDNAM``, ``REFFRAME``
(the raw file of the reference frame, whose grid the stack is on), ``NFRAMES`` (frames
stacked), ``EPOCH`` (Julian year of the positions) and ``MATCHRAD`` (the radius within
which a detection is the same star as a known one, deg). One row per star candidate:

``ra``, ``dec``
    deg: the detection's position measured on the frames (or the catalogue's, for a
    catalogue star the stack did not detect).
``gaia_source_id``
    the catalogue star it matched (-1: none).
``g``, ``bp``, ``rp``
    catalogue magnitudes (NaN: unknown).
``flags``
    :class:`autowisp.vocabulary.StarFlag` bits (blended, catalogue only...).
``snr``
    S/N of the channels' summed flux on the stack (0 for catalogue-only rows).
``x``, ``y``
    position on the reference frame, px (0-based).
``frames``
    frames whose centroid went into the position.
``pos_err``
    uncertainty of the position, px (NaN where one frame or none measured it).
``mag_<channel>``
    instrumental magnitude per channel on the reference frame's scale,
    ``-2.5 log10(e⁻/s)`` (NaN where not measured).

The star ids are not in the file: they are the database's (``star`` and ``field_star``
tables), given when the task's result is recorded (:mod:`autowisp.db.stars`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from autowisp.io.atomic import atomic_path
from autowisp.io.provenance import Provenance, stamp

__all__ = [
    "FieldCandidates",
    "NightStarList",
    "field_star_indices",
    "read_star_list",
    "write_star_list",
]

COLUMNS = (
    ("ra", "D"),
    ("dec", "D"),
    ("gaia_source_id", "K"),
    ("g", "E"),
    ("bp", "E"),
    ("rp", "E"),
    ("flags", "J"),
    ("snr", "E"),
    ("x", "D"),
    ("y", "D"),
    ("frames", "J"),
    ("pos_err", "E"),
)


@dataclass(frozen=True)
class FieldCandidates:
    """The star candidates of one field on one night (columns as in the module docstring;
    ``instrumental`` maps a channel name to its magnitudes)."""

    field_id: int
    field_name: str
    reference_frame: str
    frames: int
    epoch: float
    match_radius_deg: float
    columns: Mapping[str, np.ndarray]
    instrumental: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return int(np.asarray(self.columns["ra"]).size)


@dataclass(frozen=True)
class NightStarList:
    """A night's star list: per field its candidates, the QC figures, the provenance."""

    fields: tuple[FieldCandidates, ...]
    qc: Mapping[str, Any]
    provenance: Provenance


def write_star_list(path: Path, star_list: NightStarList) -> Path:
    """Write ``star_list`` to ``path`` atomically; returns the path."""
    primary = fits.PrimaryHDU()
    stamp(primary.header, star_list.provenance)
    primary.header["QCJSON"] = json.dumps(star_list.qc, sort_keys=True, allow_nan=True)
    hdus = [primary]
    for candidates in star_list.fields:
        size = len(candidates)
        columns = [
            fits.Column(name=name, format=form, array=np.asarray(candidates.columns[name]))
            for name, form in COLUMNS
        ]
        for channel, values in sorted(candidates.instrumental.items()):
            values = np.asarray(values, float)
            if values.size != size:
                raise ValueError(f"{channel} magnitudes: {values.size} values for {size} stars")
            columns.append(fits.Column(name=f"mag_{channel}", format="E", array=values))
        table = fits.BinTableHDU.from_columns(columns, name=f"FIELD{candidates.field_id}")
        header = table.header
        header["FIELD"] = (candidates.field_id, "field id in the database")
        header["FIELDNAM"] = candidates.field_name
        header["REFFRAME"] = (candidates.reference_frame, "raw file of the reference")
        header["NFRAMES"] = (candidates.frames, "frames stacked")
        header["EPOCH"] = (candidates.epoch, "Julian year of the positions")
        header["MATCHRAD"] = (candidates.match_radius_deg, "same-star radius, deg")
        hdus.append(table)
    with atomic_path(path) as temporary:
        fits.HDUList(hdus).writeto(temporary)
    return path


def read_star_list(path: Path) -> NightStarList:
    """Read a star list written by :func:`write_star_list`."""
    fields = []
    with fits.open(path, memmap=False) as hdus:
        primary = hdus[0].header
        for hdu in hdus[1:]:
            data = hdu.data
            names = list(hdu.columns.names)
            columns = {name: np.array(data[name]) for name, _ in COLUMNS}
            instrumental = {
                name[4:]: np.array(data[name], float) for name in names if name.startswith("mag_")
            }
            header = hdu.header
            fields.append(
                FieldCandidates(
                    field_id=int(header["FIELD"]),
                    field_name=str(header["FIELDNAM"]),
                    reference_frame=str(header["REFFRAME"]),
                    frames=int(header["NFRAMES"]),
                    epoch=float(header["EPOCH"]),
                    match_radius_deg=float(header["MATCHRAD"]),
                    columns=columns,
                    instrumental=instrumental,
                )
            )
        return NightStarList(
            fields=tuple(fields),
            qc=json.loads(primary["QCJSON"]),
            provenance=Provenance.read(primary),
        )


def field_star_indices(
    list_row: np.ndarray, rows: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    """The field star index of each ``list_row`` (-1 for rows below 0 and rows the
    registration ``rows`` = (list rows, their star indices) does not name)."""
    wanted = np.asarray(list_row, np.int64)
    found = np.full(wanted.size, -1, np.int64)
    if rows is None or not np.asarray(rows[0]).size:
        return found
    order = np.argsort(rows[0], kind="stable")
    known_rows = np.asarray(rows[0], np.int64)[order]
    known_index = np.asarray(rows[1], np.int64)[order]
    listed = np.flatnonzero(wanted >= 0)
    where = np.clip(np.searchsorted(known_rows, wanted[listed]), 0, known_rows.size - 1)
    hit = known_rows[where] == wanted[listed]
    found[listed[hit]] = known_index[where[hit]]
    return found
