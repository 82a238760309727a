"""A smooth correction of projected star positions from the PSF fits' own centres.

Catalogue positions projected through a frame's WCS carry the WCS fit's error: a smooth
field of a few hundredths of a pixel that changes from frame to frame (on the demo night
0.03–0.07 px, the WCS being fitted to ~50 extraction centroids of 0.1 px scatter). A star
measured 0.05 px off its centre loses or gains a few mmag in a small aperture, and the
error follows the frame, not the photon noise. The per-source PSF fits of the bright
isolated stars measure their centres to about 0.01 px on a clean field;
:func:`fit_position_correction` fits the offsets (fitted − projected) with a low-order
polynomial over the frame, so every star, faint ones included, is measured at the
projected position plus the correction. :func:`fit_pooled_correction` fits the channels
of a mosaic together (they share the WCS error), with a constant per channel where a
lens's lateral colour shifts them apart.

On a crowded real-like field the fitted centres are heavy-tailed: a fainter star the
catalogue does not list pulls a bright star's fit by 0.02–0.5 px (the demo night, a
G < 10 catalogue over stars to G 13.5, has fit centres 0.04–0.06 px off the truth
(median), worse than its WCS). Hence ten or more stars per fitted term
(:func:`order_for`), and the caller leaves out fits the PSF does not describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autowisp.core.psf import polynomial_terms

__all__ = ["PositionCorrection", "fit_pooled_correction", "fit_position_correction", "order_for"]


@dataclass(frozen=True)
class PositionCorrection:
    """Offsets (px) to add to projected positions: polynomials in the normalised
    position of total order ``order`` (−1: no correction)."""

    order: int
    coefficients: np.ndarray  # (2, terms): dx, dy
    centre: tuple[float, float]  # (x, y) px
    half: tuple[float, float]
    used: int  # stars that determine it (or, with no correction, that were tested)
    residual_rms: float  # px, per axis, of the used stars' offsets about it
    shift_rms: float  # px, of the correction at the used stars (both axes)

    def offsets(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The correction (dx, dy) at positions (x, y) px."""
        x = np.asarray(x, float)
        y = np.asarray(y, float)
        if self.order < 0:
            return np.zeros_like(x), np.zeros_like(y)
        terms = _terms(x, y, self.centre, self.half, self.order)
        dx, dy = (terms @ c for c in self.coefficients)
        return dx, dy


NONE = PositionCorrection(-1, np.zeros((2, 0)), (0.0, 0.0), (1.0, 1.0), 0, np.nan, 0.0)


def order_for(count: int) -> int:
    """Polynomial order a number of stars supports, ten or more per term: 2 from 64 stars
    (6 terms per axis), 1 from 32 (3 terms), a shift from 16; none below. Centroids of
    real frames are heavy-tailed (a fainter star the catalogue does not list pulls a
    bright star's fit by 0.05–0.5 px): on the demo night, with four stars per term, the
    fits of 16–32 stars moved the positions from 0.04 px to 0.08 px off the truth
    (median), up to 7× worse on one frame."""
    if count >= 64:
        return 2
    if count >= 32:
        return 1
    if count >= 16:
        return 0
    return -1


def _terms(x, y, centre, half, order):
    u = (x - centre[0]) / half[0]
    v = (y - centre[1]) / half[1]
    return polynomial_terms(u, v, np.zeros_like(u), order, 0)


def fit_position_correction(
    x: np.ndarray,
    y: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    sigma: np.ndarray,
    frame_shape: tuple[int, int],
    *,
    max_order: int = 2,
    max_offset: float = 1.0,
    floor: float = 0.01,
    clip: float = 4.0,
    iterations: int = 6,
) -> PositionCorrection:
    """Fit the offsets (dx, dy) px measured at projected positions (x, y) px.

    ``sigma`` (px) is each offset's expected error per axis (from the star's S/N);
    ``floor`` (px) is added in quadrature for what S/N does not cover (a faint neighbour,
    the catalogue's proper motions). Offsets beyond ``max_offset`` or not finite are left
    out; stars more than ``clip`` robust standard deviations off the fit are rejected and
    the fit repeated. The order is at most what the stars kept support
    (:func:`order_for`) and ``max_order``, and the lowest of those the offsets call for
    by the Bayesian information criterion, none if the offsets are consistent with zero;
    too few stars give no correction either (``order`` −1).
    """
    group = np.zeros(np.size(x), np.int64)
    (correction,) = fit_pooled_correction(
        x, y, dx, dy, sigma, group, 1, frame_shape, max_order=max_order,
        max_offset=max_offset, floor=floor, clip=clip, iterations=iterations,
    )  # fmt: skip
    return correction


def fit_pooled_correction(
    x: np.ndarray,
    y: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    sigma: np.ndarray,
    group: np.ndarray,
    groups: int,
    frame_shape: tuple[int, int],
    *,
    max_order: int = 2,
    max_offset: float = 1.0,
    floor: float = 0.01,
    clip: float = 4.0,
    iterations: int = 6,
) -> list[PositionCorrection]:
    """One correction per group (the channels of a mosaic) from the offsets of all.

    The channels of one frame share its WCS error: one polynomial fitted to all their
    stars is 2× better determined than each channel's own (a 512² Bayer frame has ~5
    fitting stars per channel). A lens's lateral colour shifts the channels apart; a
    constant shift per group is added where the Bayesian information criterion calls
    for it. Everything else as :func:`fit_position_correction`; the corrections differ
    in their constant terms only.
    """
    x, y, dx, dy, sigma = (np.asarray(v, float).ravel() for v in (x, y, dx, dy, sigma))
    group = np.asarray(group, np.int64).ravel()
    ny, nx = frame_shape
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    half = (max(nx / 2.0, 1.0), max(ny / 2.0, 1.0))
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(dx) & np.isfinite(dy)
    keep &= np.isfinite(sigma) & (sigma >= 0)
    keep &= (np.abs(dx) < max_offset) & (np.abs(dy) < max_offset)
    scale = np.sqrt(np.square(np.where(keep, sigma, 1.0)) + floor**2)
    none = [NONE] * groups

    def design(order: int, shifts: bool, rows: np.ndarray) -> np.ndarray:
        terms = _terms(x[rows], y[rows], centre, half, order)
        if shifts:  # a constant per group past the first
            indicator = (group[rows, None] == np.arange(1, groups)[None, :]).astype(float)
            terms = np.hstack([terms, indicator])
        return terms

    def solve(order: int, shifts: bool, rows: np.ndarray):
        """Coefficients (2, columns), every star's larger |pull| and the kept χ²."""
        weight = 1.0 / scale[rows]
        matrix = design(order, shifts, rows) * weight[:, None]
        coefficients = np.vstack(
            [np.linalg.lstsq(matrix, d[rows] * weight, rcond=None)[0] for d in (dx, dy)]
        )
        every = design(order, shifts, np.arange(x.size))
        rx = (dx - every @ coefficients[0]) / scale
        ry = (dy - every @ coefficients[1]) / scale
        chi2 = float(np.sum(rx[rows] ** 2) + np.sum(ry[rows] ** 2))
        return coefficients, np.maximum(np.abs(rx), np.abs(ry)), chi2

    def shifts_allowed(rows: np.ndarray) -> bool:
        counts = np.bincount(group[rows], minlength=groups)
        return groups > 1 and bool(np.all(counts >= 8))  # a shift of its own: 8 stars

    order, shifts, spread = -1, False, 1.0
    for _ in range(iterations):
        order = min(order_for(int(keep.sum())), max_order)
        if order < 0:
            return none
        shifts = shifts_allowed(keep)
        _, pull, _ = solve(order, shifts, keep)
        # the pulls' robust spread (σ may be under- or overestimated by a common factor):
        # the larger of two unit normals' absolute values has the median 1.05
        spread = max(float(np.median(pull[keep])) / 1.05, 1e-6)
        within = keep & (pull <= clip * spread)
        if np.array_equal(within, keep):
            break
        keep = within
    # The simplest model the offsets call for (Bayesian information criterion, the
    # noise scale from the richest model's fit): a curvature term fitted to noisy
    # centroids of few stars adds more error than it removes, and offsets consistent
    # with zero stay zero.
    kept = int(keep.sum())
    penalty = np.log(2 * kept)
    best = (-1, False, None)
    best_bic = float(np.sum((dx[keep] ** 2 + dy[keep] ** 2) / scale[keep] ** 2)) / spread**2
    for trial in range(order + 1):
        for per_group in (False, True) if shifts else (False,):
            coefficients, _, chi2 = solve(trial, per_group, keep)
            bic = chi2 / spread**2 + coefficients.size * penalty
            if bic < best_bic:
                best, best_bic = (trial, per_group, coefficients), bic
    order, per_group, coefficients = best
    if order < 0 or coefficients is None:  # the stars kept, their offsets' scatter about 0
        raw = np.concatenate([dx[keep], dy[keep]])
        rms = float(np.sqrt(np.mean(np.square(raw)))) if raw.size else np.nan
        return [PositionCorrection(-1, np.zeros((2, 0)), centre, half, kept, rms, 0.0)] * groups
    n_terms = _terms(x[:1], y[:1], centre, half, order).shape[1]
    every = design(order, per_group, np.arange(x.size))
    fitted = np.column_stack([every @ coefficients[0], every @ coefficients[1]])
    residual = (np.column_stack([dx, dy]) - fitted)[keep]
    residual_rms = float(np.sqrt(np.mean(np.square(residual))))
    shift_rms = float(np.sqrt(np.mean(np.sum(np.square(fitted[keep]), axis=1))))
    corrections = []
    for g in range(groups):
        own = coefficients[:, :n_terms].copy()
        if per_group and g > 0:
            own[:, 0] += coefficients[:, n_terms + g - 1]
        corrections.append(
            PositionCorrection(order, own, centre, half, kept, residual_rms, shift_rms)
        )
    return corrections
