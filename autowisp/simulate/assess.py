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

__all__ = ["Precision", "night_precision", "truth_rows"]

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
