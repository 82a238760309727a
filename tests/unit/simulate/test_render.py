import numpy as np
import pytest

from autowisp.core.bayer import LAYOUTS, channel_index_map, channels, colour_of_channels
from autowisp.simulate.camera import CameraSpec, Detector, Scene, predict
from autowisp.simulate.render import (
    fwhm_to_alpha,
    render_stars,
    render_stars_reference,
    stamp_half_sizes,
)


def _kernel(shape, x, y, flux, a, b, theta, beta, half, cell, oversample, fine, response):
    image = np.zeros(shape)
    n = len(x)
    radii = np.array([3.0])
    out = [
        np.zeros((n, flux.shape[1], 1)),
        np.zeros((n, flux.shape[1], 1), np.int64),
        np.zeros((n, flux.shape[1], 1)),
    ]
    render_stars(
        image,
        x,
        y,
        flux,
        np.ones(n),
        a,
        b,
        theta,
        beta,
        half,
        cell,
        cell.shape[0],
        oversample,
        fine,
        radii,
        response,
        np.zeros(shape),
        *out,
    )
    return image, out


def test_kernel_matches_numpy_reference():
    rng = np.random.default_rng(3)
    n, shape = 40, (60, 70)
    x, y = rng.uniform(-3, 72, n), rng.uniform(-3, 62, n)
    flux = rng.uniform(1e3, 1e5, (n, 4))
    a, b = rng.uniform(0.8, 2.0, n), rng.uniform(0.6, 1.5, n)
    theta = rng.uniform(0, np.pi, n)
    half = rng.integers(3, 12, n)
    cell = channel_index_map("GBRG", (2, 2)).astype(np.int64)
    response = rng.uniform(0.8, 1.2, shape)
    fast, _ = _kernel(shape, x, y, flux, a, b, theta, 3.2, half, cell, 5, 4.0, response)
    slow = render_stars_reference(
        shape, x, y, flux, a, b, theta, 3.2, half, cell, 5, 4.0, response
    )
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-9)


def test_psf_integrates_to_flux_on_a_monochrome_sensor():
    beta = 3.5
    alpha = fwhm_to_alpha(np.array([2.5]), beta)
    half = stamp_half_sizes(np.array([1e6]), alpha, beta=beta, threshold=1e-3, maximum=200)
    shape = (2 * half[0] + 11, 2 * half[0] + 11)
    cell = np.zeros((1, 1), np.int64)
    image, _ = _kernel(
        shape,
        np.array([shape[1] / 2 - 0.3]),
        np.array([shape[0] / 2 + 0.2]),
        np.array([[1e6]]),
        alpha,
        alpha * 0.8,
        np.array([0.4]),
        beta,
        half,
        cell,
        7,
        6.0,
        np.ones(shape),
    )
    # Moffat wings beyond the stamp carry < 0.1 %; sub-pixel sampling errors are smaller.
    assert image.sum() == pytest.approx(1e6, rel=2e-3)
    assert image.sum() < 1e6
    # FWHM along the major axis of a circular cut is about 2.5 px.
    peak_y, peak_x = np.unravel_index(np.argmax(image), shape)
    assert abs(peak_x - shape[1] / 2) <= 1 and abs(peak_y - shape[0] / 2) <= 1


def _detector(layout, shape=(40, 40)):
    spec = CameraSpec(width=shape[1], height=shape[0], layout=layout)
    ones = np.ones(shape)
    zeros = np.zeros(shape, bool)
    return Detector(spec, ones * spec.bias_level, ones * 0.0, ones, zeros, zeros)


def _single_star(colour_flux):
    one = np.array([1.0])
    return Scene(
        120.0,
        np.array([19.4]),
        np.array([20.3]),
        np.array([colour_flux]),
        2.2 * one,
        1.9 * one,
        0.3 * one,
        0.0 * one,
        np.zeros((40, 40)),
    )


@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout != "MONO"])
@pytest.mark.parametrize("colour", [0, 1, 2])
def test_one_colour_star_lights_only_its_subgrid(layout, colour):
    detector = _detector(layout)
    flux = [0.0, 0.0, 0.0]
    flux[colour] = 1e5
    image, _ = predict(detector, _single_star(flux))
    lit = image > 0
    assert lit.sum() > 20
    allowed = np.zeros_like(lit)
    for index, channel in enumerate(channels(layout)):
        if colour_of_channels(layout)[index] == colour:
            channel.view(allowed)[...] = True
    assert np.all(~lit | allowed)
    # Every channel of that colour gets light, and about a quarter of the flux each.
    for index, channel in enumerate(channels(layout)):
        if colour_of_channels(layout)[index] == colour:
            assert channel.view(image).sum() == pytest.approx(0.25e5, rel=0.05)


def test_aperture_stats_match_direct_sums():
    detector = _detector("RGGB")
    scene = _single_star([3e4, 5e4, 2e4])
    image, stats = predict(detector, scene, radii=[2.0, 4.0])
    yy, xx = np.mgrid[0:40, 0:40]
    inside = (xx - 19.4) ** 2 + (yy - 20.3) ** 2 <= 16.0
    for index in range(len(channels("RGGB"))):
        mask = inside & (channel_index_map("RGGB", (40, 40)) == index)
        assert stats.npix[0, index, 1] == mask.sum()
        assert stats.signal[0, index, 1] == pytest.approx(image[mask].sum(), rel=1e-12)
