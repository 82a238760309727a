"""How precise a simulated night's photometry is, measured against its truth.

For each star of the truth measured on every frame, the magnitude difference between
the measured and the true channel flux (truth with the realised scintillation, so what
is left is the measurement's own error) is taken about each frame's median difference
(a per-frame zero point, as magnitude fitting will do); the star's precision is the RMS
of what remains over the night. :func:`night_precision` reports the median of that RMS
over the brightest stars no flag spoils on any frame (``SPOILING``: a crowded star
counts, its neighbours are fitted with it) and what the photometry's own errors predict.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from autowisp.core.bayer import channels, colour_of_channels
from autowisp.core.photometry import SPOILING
from autowisp.io.photometry import GROUP_OF, FramePhotometry, read_frame_photometry
from autowisp.simulate.truth import Truth, read_truth

__all__ = ["MagfitPrecision", "Precision", "magfit_precision", "night_precision", "truth_rows"]

#: A measured star beyond the catalogue is the truth's star nearest it within this (px).
TRUTH_RADIUS_PX = 1.0


def truth_rows(product: FramePhotometry, truth: Truth, frame: int) -> np.ndarray:
    """The truth's star (row of ``truth.stars``) each star of ``product`` is, -1 for
    none: by Gaia id where the truth has it, else the truth's star nearest the
    WCS-projected position on ``frame`` (within ``TRUTH_RADIUS_PX``; the truth's
    synthetic stars beyond the catalogue have negative ids the pipeline never sees)."""
    ids = np.asarray(truth.stars["star_id"], np.int64)
    order = np.argsort(ids, kind="stable")
    source = np.asarray(product.source_id, np.int64)
    where = np.clip(np.searchsorted(ids[order], source), 0, ids.size - 1)
    by_id = np.where((source >= 0) & (ids[order][where] == source), order[where], -1)
    rows = by_id.copy()
    unknown = np.flatnonzero(rows < 0)
    if unknown.size:
        tx = np.asarray(truth.object["x"][frame], float)
        ty = np.asarray(truth.object["y"][frame], float)
        finite = np.flatnonzero(np.isfinite(tx) & np.isfinite(ty))
        distance, nearest = cKDTree(np.column_stack([tx[finite], ty[finite]])).query(
            np.column_stack([product.x[unknown], product.y[unknown]]),
            distance_upper_bound=TRUTH_RADIUS_PX,
        )
        hit = np.isfinite(distance)
        rows[unknown[hit]] = finite[nearest[hit]]
    return rows


@dataclass(frozen=True)
class Precision:
    """Median per-star scatter (mmag) of one channel and aperture over the night."""

    channel: str
    aperture: float
    stars: int
    frames: int
    measured_mmag: float  # aperture photometry against truth
    psf_mmag: float  # PSF fluxes against truth
    expected_mmag: float  # from the reported errors


def night_precision(
    photometry_files: Iterable[Path], truth_path: Path, *, brightest: int = 20
) -> list[Precision]:
    """One :class:`Precision` per channel (middle aperture) of a simulated night."""
    truth = read_truth(truth_path)
    frame_of = {str(name): i for i, name in enumerate(truth.object["filename"])}
    products = [read_frame_photometry(Path(p)) for p in photometry_files]
    products = [p for p in products if p.raw_file in frame_of]
    if not products:
        return []
    layout = products[0].layout
    colours = colour_of_channels(layout)
    frames = [frame_of[p.raw_file] for p in products]
    stars_of = [truth_rows(p, truth, f) for p, f in zip(products, frames, strict=True)]
    # The truth's stars measured once on every frame, and where each frame has them.
    once = []
    for rows in stars_of:
        unique, counts = np.unique(rows[rows >= 0], return_counts=True)
        once.append(unique[counts == 1])
    common = functools.reduce(np.intersect1d, once)
    indices = []
    for rows in stars_of:
        order = np.argsort(rows, kind="stable")
        indices.append(order[np.searchsorted(rows[order], common)])
    results = []
    for index, channel in enumerate(channels(layout)):
        name = GROUP_OF.get(channel.name, channel.name)
        aperture = len(products[0].apertures) // 2
        measured, psf, expected = [], [], []
        known = np.ones(common.size, bool)
        for product, frame, take in zip(products, frames, indices, strict=True):
            phot = product.channels[name]
            true = truth.object["flux"][frame, common, colours[index]] * np.nan_to_num(
                truth.object["scintillation_factor"][frame, common], nan=1.0
            )
            flux = phot.flux[take, aperture]
            with np.errstate(invalid="ignore", divide="ignore"):  # negative fluxes: NaN
                measured.append(-2.5 * np.log10(flux / true))
                psf.append(-2.5 * np.log10(phot.psf_flux[take] / true))
            expected.append(1.0857 * phot.flux_err[take, aperture] / flux)
            known &= (phot.flags[take] & SPOILING) == 0
        if len(measured) < 2:
            continue
        m, p, e = (np.array(v) for v in (measured, psf, expected))
        use = known & np.all(np.isfinite(m), axis=0) & np.all(np.isfinite(p), axis=0)
        if use.sum() == 0:
            continue
        m = m - np.median(m[:, use], axis=1, keepdims=True)
        p = p - np.median(p[:, use], axis=1, keepdims=True)
        order = np.argsort(np.median(e[:, use], axis=0))[:brightest]
        chosen = np.flatnonzero(use)[order]
        results.append(
            Precision(
                channel=name,
                aperture=float(products[0].apertures[aperture]),
                stars=int(chosen.size),
                frames=int(m.shape[0]),
                measured_mmag=1e3 * float(np.median(np.std(m[:, chosen], axis=0, ddof=1))),
                psf_mmag=1e3 * float(np.median(np.std(p[:, chosen], axis=0, ddof=1))),
                expected_mmag=1e3 * float(np.median(np.sqrt(np.mean(e[:, chosen] ** 2, axis=0)))),
            )
        )
    return results


@dataclass(frozen=True)
class MagfitPrecision:
    """Light curves after magnitude fitting against the theory, one channel,
    photometry and magnitude bin: the median over stars of RMS / theoretical noise (the
    truth's photon, sky, read and scintillation noise of the aperture)."""

    channel: str
    photometry: str
    g_range: tuple[float, float]
    stars: int
    ratio: float  # median of RMS / theory
    rms_mmag: float  # median RMS
    theory_mmag: float  # median theory
    zero_point_ratio: float  # the same with only a per-frame zero point taken from truth


def magfit_precision(
    magfit_path: Path,
    truth_path: Path,
    *,
    bins: Iterable[tuple[float, float]] = ((7.0, 11.0),),
    min_fraction: float = 0.8,
) -> list[MagfitPrecision]:
    """The precision of a simulated night's magnitude fit (:mod:`autowisp.io.magfit`)
    per channel, aperture photometry and G bin, over the truth's stars that are matched
    (within ``TRUTH_RADIUS_PX`` on some frame), never saturated, not variable and
    measured on ``min_fraction`` of the frames.

    ``zero_point_ratio`` is what a per-frame zero point alone gives when it is taken
    from the truth (the raw magnitudes minus the true ones, each frame's median removed):
    what magnitude fitting improves on by following the patterns over the frame.
    """
    from autowisp.io.magfit import read_fitted_block, read_magfit

    truth = read_truth(truth_path)
    names = [str(n) for n in truth.object["filename"]]
    _, fields = read_magfit(magfit_path)
    variables = {int(v["star_id"]) for v in truth.variables}
    not_variable = ~np.isin(np.asarray(truth.stars["star_id"], np.int64), list(variables))
    results = []
    for field in fields:
        frames = np.array([names.index(n) for n in field.raw_file])
        layout = "MONO" if field.channels == ("MONO",) else "RGGB"
        colours = colour_of_channels(layout)
        for ci, channel in enumerate(field.channels):
            data = read_fitted_block(magfit_path, field.field_id, channel, slice(None),
                                     ("fitted", "magnitude", "x", "y"))  # fmt: skip
            x, y = data["x"], data["y"]
            n_frames, n_stars = x.shape
            rows = np.full(n_stars, -1)
            for i in range(n_frames):
                tx, ty = truth.object["x"][frames[i]], truth.object["y"][frames[i]]
                finite = np.flatnonzero(np.isfinite(tx) & np.isfinite(ty))
                todo = np.flatnonzero((rows < 0) & np.isfinite(x[i]))
                if not todo.size or not finite.size:
                    continue
                distance, nearest = cKDTree(np.column_stack([tx[finite], ty[finite]])).query(
                    np.column_stack([x[i, todo], y[i, todo]]), distance_upper_bound=TRUTH_RADIUS_PX
                )
                hit = np.isfinite(distance)
                rows[todo[hit]] = finite[nearest[hit]]
            matched = np.flatnonzero(rows >= 0)
            truth_rows_ = rows[matched]
            saturated = truth.object["saturated"][frames][:, truth_rows_, ci].any(axis=0)
            keep = ~saturated & not_variable[truth_rows_]
            gmag = np.asarray(truth.stars["gmag"], float)[truth_rows_]
            true_flux = truth.object["flux"][frames][:, truth_rows_, colours[ci]] * np.nan_to_num(
                truth.object["scintillation_factor"][frames][:, truth_rows_], nan=1.0
            )
            exptime = field.exptime[:, None]
            for p, photometry in enumerate(field.photometries):
                if not photometry.startswith("ap"):
                    continue  # the truth has the theory of apertures only
                radius = float(photometry[2:])
                apertures = np.asarray(truth.attrs.get("apertures", (2.0, 3.0, 4.0, 5.0)), float)
                if not np.any(np.isclose(apertures, radius)):
                    continue
                a = int(np.flatnonzero(np.isclose(apertures, radius))[0])
                signal = truth.object["aperture_signal"][frames][:, truth_rows_, ci, a]
                sigma = truth.object["aperture_sigma"][frames][:, truth_rows_, ci, a]
                with np.errstate(invalid="ignore", divide="ignore"):
                    theory_points = 1.0857 * sigma / signal
                fitted = data["fitted"][:, matched, p].astype(float)
                raw = data["magnitude"][:, matched, p].astype(float)
                use = np.isfinite(fitted) & np.isfinite(theory_points)
                enough = keep & (use.sum(axis=0) >= min_fraction * n_frames)
                with np.errstate(invalid="ignore", divide="ignore"):
                    zero = raw + 2.5 * np.log10(true_flux / exptime)
                zero -= _column_median(zero[:, enough])[:, None]
                for lo, hi in bins:
                    chosen = np.flatnonzero(enough & (gmag >= lo) & (gmag < hi))
                    if chosen.size == 0:
                        continue
                    rms, theory, zero_rms = [], [], []
                    for s in chosen:
                        u = use[:, s]
                        rms.append(np.std(fitted[u, s], ddof=1))
                        theory.append(np.sqrt(np.mean(theory_points[u, s] ** 2)))
                        z = zero[u, s]
                        z = z[np.isfinite(z)]
                        zero_rms.append(np.std(z, ddof=1) if z.size > 1 else np.nan)
                    rms_a, theory_a = np.array(rms), np.array(theory)
                    results.append(
                        MagfitPrecision(
                            channel=channel,
                            photometry=photometry,
                            g_range=(lo, hi),
                            stars=int(chosen.size),
                            ratio=float(np.median(rms_a / theory_a)),
                            rms_mmag=1e3 * float(np.median(rms_a)),
                            theory_mmag=1e3 * float(np.median(theory_a)),
                            zero_point_ratio=float(np.nanmedian(np.array(zero_rms) / theory_a)),
                        )
                    )
    return results


def _column_median(values: np.ndarray) -> np.ndarray:
    """The median over axis 1 of each row's finite values (NaN for none)."""
    out = np.full(values.shape[0], np.nan)
    for i, row in enumerate(values):
        finite = row[np.isfinite(row)]
        if finite.size:
            out[i] = np.median(finite)
    return out
