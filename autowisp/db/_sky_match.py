"""Matching positions on the sphere, for :mod:`autowisp.db.stars` (numpy and scipy only).

Positions are (RA, Dec) in deg; distances are great-circle distances, compared as chords
between unit vectors (a k-d tree over unit vectors has no trouble at RA 0/360 or the
poles).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.spatial import cKDTree

__all__ = ["match_one_to_one", "ra_window", "unit_vectors"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def unit_vectors(ra: FloatArray, dec: FloatArray) -> FloatArray:
    """(n, 3) unit vectors of positions in deg."""
    alpha, delta = np.radians(ra), np.radians(dec)
    cos_delta = np.cos(delta)
    return np.column_stack([cos_delta * np.cos(alpha), cos_delta * np.sin(alpha), np.sin(delta)])


def ra_window(ra: FloatArray, dec: FloatArray, radius: float) -> tuple[float, float] | None:
    """The RA arc holding every position within ``radius`` (deg) of the given ones, as
    (start in [0, 360), width), deg; None when that is every RA.

    The arc is the circle less the largest gap between the RAs (so positions on both
    sides of RA 0 give a narrow arc), widened on each side by the largest RA offset of a
    position within ``radius``: asin(sin r / cos d) at the largest |dec| d.
    """
    reach = math.sin(math.radians(radius)) / math.cos(math.radians(float(np.abs(dec).max())))
    if reach >= 1.0:
        return None  # a pole is within reach
    pad = math.degrees(math.asin(reach)) + 1e-9
    ordered = np.sort(np.asarray(ra, dtype=np.float64))
    gaps = np.diff(np.append(ordered, ordered[0] + 360.0))
    widest = int(np.argmax(gaps))
    start = float(ordered[(widest + 1) % ordered.size]) - pad
    width = float(360.0 - gaps[widest]) + 2.0 * pad
    return None if width >= 360.0 else (start % 360.0, width)


def match_one_to_one(
    *,
    ra: FloatArray,
    dec: FloatArray,
    gaia: IntArray,
    known_id: IntArray,
    known_ra: FloatArray,
    known_dec: FloatArray,
    known_gaia: IntArray,
    radius: float,
) -> IntArray:
    """Per candidate, the index of its known star, or -1 for none.

    A candidate whose Gaia id (-1: none) is a known star's is that star. The others are
    matched one to one with the remaining known stars within ``radius`` (deg): pairs are
    taken nearest first and skipped when the star or the candidate is taken; a pair of
    two different Gaia ids is never taken. Equal distances are ordered by the star's id,
    then by the candidate's RA, Dec and Gaia id, so the result does not depend on the
    order of the candidates (unless two are identical).
    """
    match = np.full(ra.size, -1, dtype=np.int64)
    if known_id.size == 0 or ra.size == 0:
        return match
    by_gaia = {g: i for i, g in enumerate(known_gaia.tolist()) if g >= 0}
    for c in np.flatnonzero(gaia >= 0).tolist():
        match[c] = by_gaia.get(int(gaia[c]), -1)
    taken = np.zeros(known_id.size, dtype=bool)
    taken[match[match >= 0]] = True
    free, free_known = np.flatnonzero(match < 0), np.flatnonzero(~taken)
    if free.size == 0 or free_known.size == 0:
        return match
    chord = 2.0 * math.sin(math.radians(radius) / 2.0)
    near = cKDTree(unit_vectors(ra[free], dec[free])).sparse_distance_matrix(
        cKDTree(unit_vectors(known_ra[free_known], known_dec[free_known])),
        chord,
        output_type="ndarray",
    )
    c_index, k_index = free[near["i"]], free_known[near["j"]]
    allowed = (gaia[c_index] < 0) | (known_gaia[k_index] < 0)
    c_index, k_index, distance = c_index[allowed], k_index[allowed], near["v"][allowed]
    order = np.lexsort(
        (c_index, gaia[c_index], dec[c_index], ra[c_index], known_id[k_index], distance)
    )
    for c, k in zip(c_index[order].tolist(), k_index[order].tolist(), strict=True):
        if match[c] < 0 and not taken[k]:
            match[c], taken[k] = k, True
    return match
