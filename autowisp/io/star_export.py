"""The star-list export: a field's stars as a FITS binary table (``.fits``) or CSV (``.csv``).

Written by ``autowisp stars export`` (:func:`autowisp.db.stars.export_stars`), one row per
star of the field, by star index, with the columns

``star_index``, ``star_id``
    the star's index within the field (0, 1, 2...: append-only, the light-curve shards
    split the field by it) and its id across every field and camera;
``gaia_source_id``
    Gaia DR3 source id, -1 for none;
``ra``, ``dec``, ``epoch``
    position (ICRS, deg) and its epoch (Julian year), as first registered;
``g``, ``bp``, ``rp``, ``mag_<channel>``
    Gaia magnitudes and instrumental magnitudes per channel (``mag_R``, ``mag_G1``...)
    on a reference stack, mag, NaN where unknown;
``flags``
    :class:`~autowisp.vocabulary.StarFlag` bits;
``first_night``
    local date (ISO) of the night that first registered the star, empty if none.

The FITS table (extension ``STARS``) has the keywords ``FIELD`` (name), ``FIELDID``,
``EXPORTED`` (UTC, ISO), ``REGVER`` (the star registry version: the export holds the
registrations 1..REGVER) and ``AWVERS``, and the column units. The CSV file begins with
``#`` comment lines saying the same; read it with ``astropy.table.Table.read(path,
format="ascii.csv", comment="#")`` or ``pandas.read_csv(path, comment="#")``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from autowisp import __version__
from autowisp.io.atomic import atomic_path
from autowisp.vocabulary import StarFlag

__all__ = ["STAR_EXPORT_FORMATS", "star_export_format", "write_star_export"]

#: File suffix -> astropy format of a star-list export.
STAR_EXPORT_FORMATS = {".fits": "fits", ".csv": "ascii.csv"}

_UNITS = {"ra": "deg", "dec": "deg", "epoch": "yr", "g": "mag", "bp": "mag", "rp": "mag"}


def star_export_format(path: str | os.PathLike[str]) -> str:
    """The astropy format of a star-list export, from its suffix; ValueError for others."""
    file_format = STAR_EXPORT_FORMATS.get(Path(path).suffix.lower())
    if file_format is None:
        raise ValueError(
            f"cannot write a star list to {str(path)!r}: name a .fits file (FITS binary "
            "table) or a .csv file (CSV)"
        )
    return file_format


def write_star_export(
    path: str | os.PathLike[str],
    columns: Mapping[str, np.ndarray],
    *,
    field_name: str,
    field_id: int,
    registry_version: int,
    exported: dt.datetime,
) -> None:
    """Write the columns of this module's docstring, in the given order, to ``path``
    atomically, with the header (FITS) or comment lines (CSV) naming the field, the
    export time and the registry version."""
    file_format = star_export_format(path)
    table = Table()
    for name, values in columns.items():
        table[name] = values
        unit = "mag" if name.startswith("mag_") else _UNITS.get(name)
        if unit is not None:
            table[name].unit = unit
    when = exported.astimezone(dt.UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
    flags = ", ".join(f"{flag.name}={flag.value}" for flag in StarFlag)
    notes = [
        f"AutoWISP {__version__} star list of field {field_name} (id {field_id})",
        f"exported {when} at star registry version {registry_version}",
        "ra, dec: deg at epoch (Julian year); g, bp, rp: Gaia, mag; mag_<channel>: "
        "instrumental, mag; nan: unknown; gaia_source_id -1: none",
        f"flags: {flags}; first_night: local date of the night that first saw the star",
    ]
    options: dict[str, Any] = {}
    if file_format == "fits":
        table.meta.update(
            EXTNAME="STARS",
            FIELD=field_name,
            FIELDID=field_id,
            EXPORTED=when,
            REGVER=registry_version,
            AWVERS=__version__,
            COMMENT=notes,
        )
    else:
        table.meta["comments"] = notes
        options["comment"] = "# "
    with atomic_path(path) as temporary:
        table.write(temporary, format=file_format, **options)
