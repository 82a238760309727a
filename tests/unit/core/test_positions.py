"""The smooth position correction: recovered offsets against known fields."""

from __future__ import annotations

import numpy as np
import pytest

from autowisp.core.positions import fit_position_correction, order_for

SHAPE = (400, 600)


def _field(n, seed, noise=0.01):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, SHAPE[1] - 1, n)
    y = rng.uniform(0, SHAPE[0] - 1, n)
    u, v = (x - 299.5) / 300, (y - 199.5) / 200
    true_dx = 0.05 + 0.03 * u - 0.02 * u * v + 0.01 * v**2
    true_dy = -0.04 + 0.02 * v + 0.015 * u**2
    sigma = rng.uniform(0.5, 2.0, n) * noise
    dx = true_dx + rng.normal(0, 1, n) * sigma
    dy = true_dy + rng.normal(0, 1, n) * sigma
    return x, y, dx, dy, sigma, true_dx, true_dy


def test_recovers_a_second_order_field_and_rejects_outliers():
    x, y, dx, dy, sigma, true_dx, true_dy = _field(150, 1)
    dx[:8] += 0.4  # blended stars, a wrong cross-match
    dy[8:12] -= 0.3
    dx[12] = np.nan
    dx[13] = 3.0  # a fit that ran off: beyond max_offset
    correction = fit_position_correction(x, y, dx, dy, sigma, SHAPE)
    assert correction.order == 2
    assert correction.used <= 150 - 14
    assert correction.used >= 150 - 14 - 6  # few good stars lost to the clipping
    got_dx, got_dy = correction.offsets(x, y)
    error = np.hypot(got_dx - true_dx, got_dy - true_dy)
    # 0.0125 px offsets' noise over ~130 stars and 6 terms: ~0.003 px per axis at the
    # centre, more at the corners; the 12 outliers kept would shift it by ~0.03 px
    assert np.median(error) < 0.004
    assert error.max() < 0.012
    assert correction.residual_rms == pytest.approx(0.0125, rel=0.25)  # the noise itself
    assert correction.shift_rms == pytest.approx(
        np.sqrt(np.mean(true_dx**2 + true_dy**2)), rel=0.1
    )


def test_order_follows_the_stars_and_too_few_give_none():
    assert [order_for(n) for n in (0, 3, 7, 8, 11, 12, 23, 24, 500)] == [
        -1,
        -1,
        -1,
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    x, y, dx, dy, sigma, true_dx, _ = _field(20, 2)
    correction = fit_position_correction(x, y, dx, dy, sigma, SHAPE)
    assert correction.order == 1
    # a first-order fit of the field: the shift and gradient right to ~0.02 px
    got_dx, _ = correction.offsets(np.array([299.5]), np.array([199.5]))
    assert abs(got_dx[0] - 0.05) < 0.02
    few = fit_position_correction(x[:3], y[:3], dx[:3], dy[:3], sigma[:3], SHAPE)
    assert few.order == -1 and few.used == 0
    zero_x, zero_y = few.offsets(x, y)
    assert not zero_x.any() and not zero_y.any()
    shift = fit_position_correction(x[:9], y[:9], dx[:9], dy[:9], sigma[:9], SHAPE)
    assert shift.order == 0
    got_dx, _ = shift.offsets(x, y)
    assert np.ptp(got_dx) == 0 and abs(got_dx[0] - np.mean(true_dx[:9])) < 0.02


def test_max_order_is_respected_and_weights_matter():
    x, y, dx, dy, sigma, _, _ = _field(200, 3)
    assert fit_position_correction(x, y, dx, dy, sigma, SHAPE, max_order=1).order == 1
    # one precise star among noisy ones decides a shift
    x, y = np.linspace(10, 400, 9), np.linspace(10, 170, 9)
    dx = np.array([0.1, 0.0, 0.2, -0.1, 0.05, 0.1, -0.05, 0.15, 0.0])
    sigma = np.r_[1e-4, np.full(8, 0.2)]
    correction = fit_position_correction(x, y, dx, np.zeros(9), sigma, SHAPE, floor=0.0)
    assert correction.order == 0
    assert correction.offsets(x[:1], y[:1])[0][0] == pytest.approx(0.1, abs=1e-3)
