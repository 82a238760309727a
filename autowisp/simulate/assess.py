"""How precise a simulated night's photometry is, measured against its truth.

For each star of the truth measured on every frame, the magnitude difference between
the measured and the true channel flux (truth with the realised scintillation, so what
is left is the measurement's own error) is taken about each frame's median difference
(a per-frame zero point, as magnitude fitting will do); the star's precision is the RMS
of what remains over the night. :func:`night_precision` reports the median of that RMS
over the brightest unflagged stars and what the photometry's own errors predict.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autowisp.core.bayer import channels, colour_of_channels
from autowisp.io.photometry import GROUP_OF, read_frame_photometry
from autowisp.simulate.truth import read_truth

__all__ = ["Precision", "night_precision"]


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
    star_of = {int(s): i for i, s in enumerate(truth.stars["star_id"])}
    products = [read_frame_photometry(Path(p)) for p in photometry_files]
    products = [p for p in products if p.raw_file in frame_of]
    if not products:
        return []
    layout = products[0].layout
    colours = colour_of_channels(layout)
    results = []
    for index, channel in enumerate(channels(layout)):
        name = GROUP_OF.get(channel.name, channel.name)
        aperture = len(products[0].apertures) // 2
        ids = products[0].source_id
        known = np.array([int(s) in star_of for s in ids])
        rows = np.array([star_of.get(int(s), 0) for s in ids])
        measured, psf, expected = [], [], []
        for product in products:
            if not np.array_equal(product.source_id, ids):
                continue  # another star list: not comparable star by star
            frame = frame_of[product.raw_file]
            phot = product.channels[name]
            true = truth.object["flux"][frame, rows, colours[index]] * np.nan_to_num(
                truth.object["scintillation_factor"][frame, rows], nan=1.0
            )
            flux = phot.flux[:, aperture]
            with np.errstate(invalid="ignore", divide="ignore"):  # negative fluxes: NaN
                measured.append(-2.5 * np.log10(flux / true))
                psf.append(-2.5 * np.log10(phot.psf_flux / true))
            expected.append(1.0857 * phot.flux_err[:, aperture] / flux)
            good = (phot.flags == 0) & known
            known = good
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
