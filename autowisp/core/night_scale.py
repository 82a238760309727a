"""A field's nights on one magnitude scale.

Each night's magnitude fit (:mod:`autowisp.core.magfit`) is on its own reference
frame's scale: the fits cannot tell the master reference from the master plus any smooth
function of the stars' positions, magnitudes and colours, so the master keeps the
reference frame's zero point, its extinction and cloud pattern across the field and its
magnitude scale. Two nights of the same stars then differ by such a function (8 mmag
median, 12 mmag from star to star on two synthetic nights).

The field's *reference night* (its first, by date: a later night never changes it)
defines the scale. For every other night, each star's median over the night is compared
with its median over the reference night, over the stars both measured, and the
difference fitted as a smooth function: cubic in the star's position on the detector,
quadratic in its magnitude, linear in its colour, weighted by the medians' errors (the
scatter about each median over the square root of its points, with a floor), stars
beyond ``rejection`` times the robust scatter of the normalised residuals left out and
the fit repeated. The star's *night offset* is that function at the star; subtracting it
from the night's fitted magnitudes puts the night on the reference night's scale.

This module is pure: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NightOffsets", "fit_night_offsets", "night_medians"]

#: Fewest stars for the smooth function; with fewer (but at least 3) the night's
#: offset is one weighted zero point.
MIN_STARS = 40


@dataclass(frozen=True)
class NightOffsets:
    """A night's offsets onto the reference night (``offset``: per star, NaN where the
    night has no position for it) and the fit's figures: ``used`` stars, the weighted
    RMS of their residuals (mag), the ``terms`` fitted (0: none), and ``reason``
    ("" or why the smooth function was not fitted)."""

    offset: np.ndarray
    used: int
    rms: float
    terms: int
    reason: str = ""


def night_medians(values: np.ndarray, *, min_points: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``values`` (points × stars × ...): the median over the points and
    its error (1.2533 × 1.4826 × MAD / √n: the median's standard error for normal
    scatter), NaN with fewer than ``min_points`` finite points."""
    data = np.asarray(values, float)
    count = np.isfinite(data).sum(axis=0)
    enough = count >= min_points
    median = np.full(data.shape[1:], np.nan)
    error = np.full(data.shape[1:], np.nan)
    if data.shape[0] and enough.any():
        with np.errstate(invalid="ignore"):
            filled = np.where(enough[None], data, 0.0)
            med = np.nanmedian(filled, axis=0)
            mad = np.nanmedian(np.abs(filled - med[None]), axis=0)
        median = np.where(enough, med, np.nan)
        error = np.where(enough, 1.2533 * 1.4826 * mad / np.sqrt(np.maximum(count, 1)), np.nan)
    return median, error


def _scaled(values: np.ndarray, finite: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(values[finite])), float(np.max(values[finite]))
    half = max((hi - lo) / 2.0, 1e-9)
    return (values - (lo + hi) / 2.0) / half


def _design(
    x: np.ndarray, y: np.ndarray, mag: np.ndarray, colour: np.ndarray | None
) -> np.ndarray:
    columns = [np.ones_like(x)]
    for order in (1, 2, 3):
        columns += [x ** (order - k) * y**k for k in range(order + 1)]
    columns += [mag, mag**2]
    if colour is not None:
        columns.append(colour)
    return np.column_stack(columns)


def fit_night_offsets(
    median: np.ndarray,
    error: np.ndarray,
    reference: np.ndarray,
    reference_error: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    colour: np.ndarray | None = None,
    *,
    error_floor: float = 0.002,
    rejection: float = 4.0,
    iterations: int = 5,
    min_stars: int = MIN_STARS,
) -> NightOffsets:
    """The night's offsets onto the reference night (see the module docstring).

    Parameters
    ----------
    median, error : (n,) float
        Each star's median fitted magnitude over the night and its error (NaN: none).
    reference, reference_error : (n,) float
        The same over the reference night.
    x, y : (n,) float
        The star's position on the detector over the night (px; NaN: not measured).
    colour : (n,) float, optional
        The star's colour (NaN: unknown, taken as the median colour); None leaves the
        colour term out (a mono camera).
    """
    median, error = np.asarray(median, float), np.asarray(error, float)
    reference = np.asarray(reference, float)
    reference_error = np.asarray(reference_error, float)
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = median.size
    offset = np.full(n, np.nan)
    placed = np.isfinite(x) & np.isfinite(y)
    difference = median - reference
    variance = error**2 + reference_error**2 + error_floor**2
    common = placed & np.isfinite(difference) & np.isfinite(variance)
    if common.sum() < 3:
        reason = f"{int(common.sum())} stars in common with the reference night"
        return NightOffsets(offset, int(common.sum()), np.nan, 0, reason)
    weight = 1.0 / variance
    # The variables: the star's magnitude on the reference (its own night's moved onto
    # it for a star the reference night did not measure), its colour.
    shift = float(np.median(difference[common]))
    magnitude = np.where(np.isfinite(reference), reference, median - shift)
    zero = float(np.median(magnitude[common]))
    mag = magnitude - zero
    finite_colour = None
    if colour is not None:
        colour = np.asarray(colour, float)
        known = np.isfinite(colour)
        centre = float(np.median(colour[common & known])) if (common & known).any() else 0.0
        finite_colour = np.where(known, colour, centre) - centre
    sx = _scaled(x, placed)
    sy = _scaled(y, placed)
    use = common.copy()
    smooth = use.sum() >= max(min_stars, 3 * _design(sx[:1], sy[:1], mag[:1], None).shape[1])
    reason = "" if smooth else f"{int(use.sum())} stars in common: one zero point"
    coefficients = np.zeros(0)
    mag_range = (float(np.min(mag[use])), float(np.max(mag[use])))
    for _ in range(iterations):
        root = np.sqrt(weight[use])
        if smooth:
            mag_range = (float(np.min(mag[use])), float(np.max(mag[use])))
            design = _design(sx[use], sy[use], mag[use],
                             None if finite_colour is None else finite_colour[use])  # fmt: skip
            coefficients, *_ = np.linalg.lstsq(
                design * root[:, None], difference[use] * root, rcond=None
            )
            model = design @ coefficients
        else:
            coefficients = np.array([np.sum(weight[use] * difference[use]) / np.sum(weight[use])])
            model = np.full(int(use.sum()), coefficients[0])
        normalised = (difference[use] - model) * root
        spread = 1.4826 * float(np.median(np.abs(normalised)))
        keep = np.abs(normalised) <= rejection * max(spread, 1e-12)
        if keep.all() or keep.sum() < 3:
            break
        indices = np.flatnonzero(use)
        use[indices[~keep]] = False
        if smooth and use.sum() < 3 * coefficients.size:
            break
    root = np.sqrt(weight[use])
    if smooth:
        design_use = _design(sx[use], sy[use], mag[use],
                             None if finite_colour is None else finite_colour[use])  # fmt: skip
        residual = difference[use] - design_use @ coefficients
        clamped = np.clip(mag, *mag_range)
        full = _design(sx, sy, clamped, finite_colour)
        offset[placed] = (full @ coefficients)[placed]
    else:
        residual = difference[use] - coefficients[0]
        offset[placed] = coefficients[0]
    rms = float(np.sqrt(np.sum((residual * root) ** 2) / np.sum(root**2)))
    return NightOffsets(offset, int(use.sum()), rms, int(coefficients.size), reason)
