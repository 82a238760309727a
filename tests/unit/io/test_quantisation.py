"""The calibrated frame's quantisation step, measured from the image's own noise."""

from __future__ import annotations

import numpy as np
import pytest

from autowisp.io.products import background_noise


def test_background_noise_of_a_mosaic_with_stars_and_vignetting():
    rng = np.random.default_rng(3)
    ny, nx = 512, 640
    yy, xx = np.mgrid[0:ny, 0:nx]
    # Bayer channels of different levels, vignetting, a few hundred bright stars
    level = np.array([[900.0, 1400.0], [1350.0, 700.0]])[yy % 2, xx % 2]
    level *= 1 - 0.3 * ((xx - nx / 2) ** 2 + (yy - ny / 2) ** 2) / (nx / 2) ** 2
    image = level + rng.normal(0, 20.0, (ny, nx))
    for x, y in rng.uniform(10, [nx - 10, ny - 10], (300, 2)):
        image += 5e4 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 2.0) / (2 * np.pi)
    image[100:110, 200:300] = np.nan  # masked pixels do not count
    assert background_noise(image) == pytest.approx(20.0, rel=0.05)
    # the quietest tenth of the frame's bands sets it
    image[: ny // 2] += rng.normal(0, 40.0, (ny // 2, nx))
    assert background_noise(image) == pytest.approx(20.0, rel=0.08)


def test_no_noise_to_measure():
    assert background_noise(np.zeros((64, 64))) == 0.0
    assert background_noise(np.full((64, 64), np.nan)) == 0.0
    assert background_noise(np.zeros((4, 2))) == 0.0
