"""Source extraction against the simulator's true star positions."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from autowisp.core.extraction import MASKED, extract_sources
from autowisp.simulate.camera import CameraSpec, Scene, expose, make_detector


@pytest.fixture(scope="module")
def frame():
    """400 stars (S/N 10–3,000 in a 3-px aperture) with DSLR colours on a 512×384 RGGB
    mosaic, FWHM 2.2 px, calibrated to e⁻ with the true bias and flat."""
    spec = CameraSpec(width=512, height=384, gain=1.55, read_noise=6.5, dark_current=0.0)
    detector = make_detector(spec, np.random.default_rng(3))
    rng = np.random.default_rng(11)
    n = 400
    ny, nx = spec.shape
    flux = 10 ** rng.uniform(3, 5.5, n)
    colour = np.column_stack([rng.uniform(0.5, 2.0, n), np.ones(n), rng.uniform(0.3, 1.2, n)])
    x, y = rng.uniform(8, nx - 8, n), rng.uniform(8, ny - 8, n)
    scene = Scene(
        120.0, x, y, flux[:, None] * colour, np.full(n, 2.2), np.full(n, 2.2 * 0.9),
        rng.uniform(0, 3, n), np.zeros(n), np.full(spec.shape, 300.0),
    )  # fmt: skip
    exposure = expose(detector, scene, rng, cosmic_rays=False, radii=[3.0])
    image = (exposure.raw.astype(float) - detector.bias) * spec.gain / detector.flat
    signal = exposure.apertures.signal[:, :, 0].sum(axis=1)
    noise = np.sqrt((exposure.apertures.sigma[:, :, 0] ** 2).sum(axis=1))
    neighbour, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), 2)
    saturated = exposure.raw >= spec.saturation_adu
    return image, saturated, x, y, signal / noise, neighbour[:, 1] > 8


def _nearest(sources, x, y):
    distance, index = cKDTree(np.column_stack([sources.x, sources.y])).query(
        np.column_stack([x, y])
    )
    return distance, index


def test_isolated_stars_are_found_where_they_are(frame):
    image, saturated, x, y, snr, isolated = frame
    sources = extract_sources(image, "RGGB", saturated=saturated)
    distance, _ = _nearest(sources, x, y)
    bright = isolated & (snr > 100)
    faint = isolated & (snr > 20) & (snr <= 100)
    assert bright.sum() > 100 and faint.sum() > 60
    assert np.mean(distance[bright] < 1.0) == 1.0
    assert np.mean(distance[faint] < 1.0) > 0.95
    # Windowed centroids on the colour mosaic: 0.067 px RMS for S/N > 100 (measured);
    # the mosaic's colour structure, not photon noise (~0.01 px), sets it.
    assert np.sqrt(np.mean(distance[bright] ** 2)) < 0.09
    assert np.sqrt(np.mean(distance[faint][distance[faint] < 1] ** 2)) < 0.15
    # Brightest first: the flux order follows the true S/N.
    assert np.all(np.diff(sources.flux) <= 0)


def test_masked_pixels_are_ignored_and_flag_their_sources(frame):
    image, saturated, x, y, snr, isolated = frame
    star = int(np.flatnonzero(isolated & (snr > 100))[0])
    mask = np.zeros(image.shape, bool)
    mask[round(y[star]), round(x[star])] = True
    hot = np.zeros(image.shape, bool)
    hot[10, 400] = True
    spiked = image.copy()
    spiked[10, 400] += 1e5  # a hot pixel, masked: no source there
    sources = extract_sources(spiked, "RGGB", mask=mask | hot, saturated=saturated)
    distance, index = _nearest(sources, np.array([x[star], 400.0]), np.array([y[star], 10.0]))
    assert distance[0] < 1.0 and sources.flags[index[0]] & MASKED
    assert distance[1] > 3.0
