"""The simulator's noise matches its theoretical photometric noise (issue: within 5 %)."""

import numpy as np
import pytest

from autowisp.core.bayer import channel_index_map
from autowisp.simulate.camera import CameraSpec, Scene, expose, make_detector, predict

REALISATIONS = 4000  # the std of a std is 1.1 % here, so 5 % is a 4.5-sigma bound


def _scene(flux, fwhm, scintillation, sky):
    one = np.array([1.0])
    return Scene(
        120.0,
        np.array([23.3]),
        np.array([24.6]),
        np.array([flux]),
        fwhm * one,
        0.85 * fwhm * one,
        0.5 * one,
        scintillation * one,
        np.full((48, 48), sky),
    )


@pytest.mark.parametrize(
    ("regime", "scene"),
    [
        ("sky and read noise", _scene([800.0, 1200.0, 600.0], 2.2, 0.0, 450.0)),
        ("photon noise", _scene([6e4, 9e4, 4e4], 2.6, 0.0, 150.0)),
        ("scintillation", _scene([1.2e5, 1.5e5, 0.9e5], 3.4, 0.02, 150.0)),
    ],
)
def test_aperture_scatter_matches_theory(regime, scene):
    spec = CameraSpec(
        width=48, height=48, layout="RGGB", gain=1.6, read_noise=7.5, dark_current=0.05
    )
    detector = make_detector(spec, np.random.default_rng(1))
    radii = [2.5, 4.0]
    _, stats = predict(detector, scene, radii)
    background = detector.flat * scene.sky + detector.dark_rate * scene.exptime
    yy, xx = np.mgrid[0:48, 0:48]
    distance2 = (xx - scene.x[0]) ** 2 + (yy - scene.y[0]) ** 2
    index = channel_index_map("RGGB", (48, 48))
    masks = np.array([[(index == c) & (distance2 <= r * r) for r in radii] for c in range(4)])
    sums = np.empty((REALISATIONS, 4, 2))
    rng = np.random.default_rng(2)
    for k in range(REALISATIONS):
        raw = expose(detector, scene, rng, cosmic_rays=False).raw
        electrons = (raw - detector.bias) * spec.gain - background
        sums[k] = np.tensordot(masks, electrons, axes=([2, 3], [0, 1]))
    measured = sums.std(axis=0, ddof=1)
    expected = stats.sigma[0]
    np.testing.assert_allclose(measured, expected, rtol=0.05, err_msg=regime)
    # The mean is the expected signal (4 standard errors).
    assert np.all(np.abs(sums.mean(axis=0) - stats.signal[0]) < 4 * expected / REALISATIONS**0.5)


def test_scintillation_dominates_where_expected():
    bright = _scene([1.2e5, 1.5e5, 0.9e5], 3.4, 0.02, 150.0)
    spec = CameraSpec(width=48, height=48)
    detector = make_detector(spec, np.random.default_rng(1))
    _, stats = predict(detector, bright, [4.0])
    scint = 0.02 * stats.signal[0, :, 0]
    assert np.all(scint > 0.7 * stats.sigma[0, :, 0])
