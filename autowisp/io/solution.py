"""The astrometric solution of a frame: its own product, never written into another's.

One FITS file: the TAN-SIP WCS in the primary header (readable by astropy and DS9), the
quality figures (short header keywords for people, all of them as JSON in ``QCJSON``),
the provenance (:mod:`autowisp.io.provenance`, naming the calibrated frame solved),
a ``SOURCES`` table (the extracted sources, each with the catalogue star it matched or
-1) and a ``CATALOGUE`` table of every catalogue star inside the frame with its
projected position (x, y; px, 0-based, the positions photometry uses).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from autowisp.core.projection import TanSip
from autowisp.io.atomic import atomic_path
from autowisp.io.provenance import Provenance, stamp

__all__ = ["AstrometricSolution", "read_astrometric_solution", "write_astrometric_solution"]

#: Keywords of the (data-less) primary HDU that are not part of the solution.
STRUCTURAL = ("SIMPLE", "BITPIX", "NAXIS", "EXTEND")

SOURCE_COLUMNS = (
    ("x", "D"),
    ("y", "D"),
    ("flux", "D"),
    ("peak", "D"),
    ("fwhm", "D"),
    ("flags", "J"),
    ("source_id", "K"),
)
CATALOGUE_COLUMNS = (
    ("source_id", "K"),
    ("ra", "D"),
    ("dec", "D"),
    ("g", "E"),
    ("bp", "E"),
    ("rp", "E"),
    ("x", "D"),
    ("y", "D"),
)


@dataclass(frozen=True)
class AstrometricSolution:
    """A frame's solution.

    Parameters
    ----------
    wcs_header : the TAN-SIP WCS (1-based CRPIX) with MJD-OBS and DATE-OBS (as read:
        the whole primary header but its structural keywords).
    sources : column -> array: x, y (px), flux (e⁻), peak (e⁻), fwhm (px), flags,
        source_id (matched Gaia star, -1 for none).
    catalogue : column -> array: source_id, ra, dec (deg, at ``epoch``), g, bp, rp
        (mag), x, y (px, projected through the solution).
    epoch : Julian year of the catalogue positions.
    qc : the quality figures (matched, rms_px, pixel_scale...), JSON-able.
    provenance : raw frame, versions, configuration, UNCALIB and the calibrated frame.
    """

    wcs_header: fits.Header
    sources: Mapping[str, np.ndarray]
    catalogue: Mapping[str, np.ndarray]
    epoch: float
    qc: Mapping[str, Any]
    provenance: Provenance

    @property
    def wcs(self) -> TanSip:
        return TanSip.from_header(self.wcs_header)


def _table(name: str, columns, values: Mapping[str, np.ndarray]) -> fits.BinTableHDU:
    return fits.BinTableHDU.from_columns(
        [fits.Column(key, code, array=np.asarray(values[key])) for key, code in columns],
        name=name,
    )


def write_astrometric_solution(path: Path, product: AstrometricSolution) -> None:
    """Write the solution (see the module docstring), atomically."""
    primary = fits.PrimaryHDU(header=product.wcs_header.copy())
    header = primary.header
    for key, value in product.qc.items():
        if isinstance(value, int | float | bool | str) and len(key) <= 8:
            header[key.upper()] = value
    header["MATCHED"] = product.qc["matched"]
    header["RMSPX"] = (product.qc["rms_px"], "[px] RMS residual of the fit")
    header["QCJSON"] = json.dumps(dict(product.qc), sort_keys=True)
    stamp(header, product.provenance)
    catalogue = _table("CATALOGUE", CATALOGUE_COLUMNS, product.catalogue)
    catalogue.header["EPOCH"] = (product.epoch, "Julian year of the positions")
    hdus = [primary, _table("SOURCES", SOURCE_COLUMNS, product.sources), catalogue]
    with atomic_path(path) as temporary:
        fits.HDUList(hdus).writeto(temporary)


def read_astrometric_solution(path: Path) -> AstrometricSolution:
    """Read a solution written by :func:`write_astrometric_solution`."""
    with fits.open(path, memmap=False) as hdus:
        header = hdus[0].header.copy()
        sources = {key: np.array(hdus["SOURCES"].data[key]) for key, _ in SOURCE_COLUMNS}
        table = hdus["CATALOGUE"].data
        catalogue = {key: np.array(table[key]) for key, _ in CATALOGUE_COLUMNS}
        epoch = float(hdus["CATALOGUE"].header["EPOCH"])
    wcs_header = header.copy()
    for key in STRUCTURAL:  # the primary HDU's, not the image's (astropy's WCS warns)
        wcs_header.remove(key, ignore_missing=True)
    return AstrometricSolution(
        wcs_header=wcs_header,
        sources=sources,
        catalogue=catalogue,
        epoch=epoch,
        qc=json.loads(header["QCJSON"]),
        provenance=Provenance.read(header),
    )
