"""Cosmic-ray hits in a single calibrated mosaic frame.

A hit deposits charge in one to a few pixels; a star, even undersampled, lights a
footprint. So a hit is a group of at most ``max_pixels`` connected pixels more than
``low`` σ above the per-channel background, whose brightest pixel is more than
``threshold`` σ above it, away from the frame's edge and from known bad pixels, and
whose same-colour neighbours are at the background (a very red or blue star lights only
its own colour's pixels, two apart in the mosaic: each is a group of one, but its wings
are in its same-colour neighbours). Hits on stars merge into the star's footprint and
are not found; faint hits neither. Measured against the simulator's truth on a crowded
full-size frame (178,885 stars, 419 hit pixels): 68 % of the hits above 15σ found, 45
wrongly flagged pixels among 17.9 million, 1.5 s.

Tried and rejected (same truth): a contrast test against the second or third brightest
of the eight neighbours (L.A.Cosmic's idea on a mosaic) flags 2,000–60,000 star pixels
on the same frame, because Bayer colour and undersampling make star cores as sharp as
hits; astroscrappy (L.A.Cosmic) per channel flags 10,000–40,000 pixels of a
512×384 test frame.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from autowisp.core.extraction import background_map

__all__ = ["cosmic_ray_mask"]


def cosmic_ray_mask(
    image: np.ndarray,
    layout: str,
    *,
    bad: np.ndarray | None = None,
    threshold: float = 12.0,
    low: float = 2.0,
    max_pixels: int = 6,
    max_wings: float = 0.3,
) -> np.ndarray:
    """Boolean mask of the pixels of cosmic-ray hits (see the module docstring).

    Parameters
    ----------
    image : (ny, nx) ndarray
        Calibrated frame (bias, dark and flat removed).
    layout : str
        Bayer layout (``"MONO"`` for a monochrome sensor).
    bad : ndarray of bool, optional
        Pixels already known bad (hot, saturated...): neither hits nor footprint.
    threshold, low : float
        Peak and footprint levels in units of the local background RMS.
    max_pixels : int
        Largest group (8-connected) that can be a hit.
    max_wings : float
        Largest sum of the peak's eight same-colour neighbours (outside its group), as a
        fraction of the peak, that a hit may have.
    """
    data = np.asarray(image, dtype=np.float32)
    known = np.zeros(data.shape, bool) if bad is None else np.asarray(bad, bool)
    known = known | ~np.isfinite(data)
    clean = np.where(known, np.float32(0.0), data)
    back, rms = background_map(clean, layout, mask=known)
    rms[~(rms > 0)] = np.inf
    significance = np.divide(np.subtract(clean, back, out=back), rms, out=rms)
    significance[known] = 0.0
    above = significance > low
    labels, count = ndimage.label(above, structure=np.ones((3, 3), bool))
    if count == 0:
        return np.zeros(data.shape, bool)
    # Group sizes from the pixels above ``low`` only (a few percent of the frame; counting
    # the whole label plane took 0.5 s): label 0, the background, is never looked up.
    lit = np.flatnonzero(above.ravel())
    lit_group = labels.ravel()[lit]
    sizes = np.bincount(lit_group, minlength=count + 1)
    # Peaks of the small groups only (sorting every pixel of the frame by group, as
    # scipy's per-label maximum does, takes seconds on a full frame).
    in_small = sizes[lit_group] <= max_pixels
    small, group = lit[in_small], lit_group[in_small]
    pixels, pixel_group = small, group  # kept in frame order for the result
    order = np.lexsort((significance.ravel()[small], group))
    group, small = group[order], small[order]
    last = np.flatnonzero(np.append(group[1:] != group[:-1], True))
    peak_of = np.full(count + 1, -1, dtype=np.intp)
    peak_of[group[last]] = small[last]
    hits = np.zeros(count + 1, bool)
    hits[group[last]] = significance.ravel()[small[last]] > threshold
    ny, nx = data.shape
    # A known-bad pixel next to a group means the group may be the edge of something
    # larger (a saturated star): leave it.
    rows, cols = np.nonzero(known)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            hits[labels[np.clip(rows + dy, 0, ny - 1), np.clip(cols + dx, 0, nx - 1)]] = False
    # Groups on the frame's edge may be the visible part of a star beyond it: leave them.
    for border in (labels[:2, :], labels[-2:, :], labels[:, :2], labels[:, -2:]):
        hits[border] = False
    hits[0] = False
    # A very red or blue star lights only its own colour, whose pixels are two apart in
    # the mosaic: each is then a group of one. Its same-colour neighbours still carry
    # its wings (together about as much as the peak, for FWHM 2–3 px), where a hit's are
    # at the background (those of the hit's own track are in its group and left out).
    candidates = np.flatnonzero(hits)
    if candidates.size:
        peak_y, peak_x = np.divmod(peak_of[candidates], nx)
        step = 1 if layout.strip().upper() == "MONO" else 2
        wings = np.zeros(candidates.size)
        for dy in (-step, 0, step):
            for dx in (-step, 0, step):
                if dy == dx == 0:
                    continue
                yy = np.clip(peak_y + dy, 0, ny - 1)
                xx = np.clip(peak_x + dx, 0, nx - 1)
                other = labels[yy, xx] != candidates
                wings += np.where(other, np.maximum(significance[yy, xx], 0.0), 0.0)
        peak = significance[peak_y, peak_x]
        hits[candidates[wings > max_wings * peak]] = False
    # Only pixels of small groups can be hits (hits[0] is False): set those, not the
    # whole label plane.
    found = np.zeros(data.size, bool)
    found[pixels] = hits[pixel_group]
    return found.reshape(data.shape)
