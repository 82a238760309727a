"""The smooth position correction: recovered offsets against known fields."""

from __future__ import annotations

import numpy as np
import pytest

from autowisp.core.positions import fit_pooled_correction, fit_position_correction, order_for

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
    counts = (0, 3, 15, 16, 31, 32, 63, 64, 500)
    assert [order_for(n) for n in counts] == [-1, -1, -1, 0, 0, 1, 1, 2, 2]
    x, y, dx, dy, sigma, true_dx, _ = _field(40, 2)
    correction = fit_position_correction(x, y, dx, dy, sigma, SHAPE)
    assert correction.order == 1
    # a first-order fit of the field: the shift and gradient right to ~0.02 px
    got_dx, _ = correction.offsets(np.array([299.5]), np.array([199.5]))
    assert abs(got_dx[0] - 0.05) < 0.02
    few = fit_position_correction(x[:3], y[:3], dx[:3], dy[:3], sigma[:3], SHAPE)
    assert few.order == -1 and few.used == 0
    zero_x, zero_y = few.offsets(x, y)
    assert not zero_x.any() and not zero_y.any()
    shift = fit_position_correction(x[:18], y[:18], dx[:18], dy[:18], sigma[:18], SHAPE)
    assert shift.order == 0
    got_dx, _ = shift.offsets(x, y)
    assert np.ptp(got_dx) == 0 and abs(got_dx[0] - np.mean(true_dx[:18])) < 0.02


def test_max_order_is_respected_and_weights_matter():
    x, y, dx, dy, sigma, _, _ = _field(200, 3)
    assert fit_position_correction(x, y, dx, dy, sigma, SHAPE, max_order=1).order == 1
    # one precise star among noisy ones decides a shift
    x, y = np.linspace(10, 400, 18), np.linspace(10, 170, 18)
    dx = np.tile([0.1, 0.0, 0.2, -0.1, 0.05, 0.1, -0.05, 0.15, 0.0], 2)
    sigma = np.r_[1e-4, np.full(17, 0.2)]
    correction = fit_position_correction(x, y, dx, np.zeros(18), sigma, SHAPE, floor=0.0)
    assert correction.order == 0
    assert correction.offsets(x[:1], y[:1])[0][0] == pytest.approx(0.1, abs=1e-3)


def _pooled_field(per_group, seed, shifts):
    """Offsets of ``per_group`` stars in each of len(shifts) channels: the frame's shared
    second-order field plus each channel's own constant shift (lateral colour)."""
    groups = len(shifts)
    parts = [_field(per_group, seed + g) for g in range(groups)]
    x, y, dx, dy, sigma, true_dx, true_dy = (
        np.concatenate([p[k] for p in parts]) for k in range(7)
    )
    group = np.repeat(np.arange(groups), per_group)
    shift = np.asarray(shifts, float)[group]  # (stars, 2)
    return x, y, dx + shift[:, 0], dy + shift[:, 1], sigma, group, true_dx, true_dy, shift


def test_pooled_channels_share_the_field_and_keep_their_own_shifts():
    """Four channels of 12 stars each (too few for a correction of their own): pooled, they
    determine the shared field (to first order: 48 stars), and a lens's lateral colour
    (0.05–0.1 px between channels) comes out as each channel's constant."""
    shifts = [(0.0, 0.0), (0.05, -0.03), (0.05, -0.03), (-0.04, 0.06)]
    x, y, dx, dy, sigma, group, true_dx, true_dy, shift = _pooled_field(12, 40, shifts)
    corrections = fit_pooled_correction(x, y, dx, dy, sigma, group, 4, SHAPE)
    assert {c.order for c in corrections} <= {1, 2}
    for g, correction in enumerate(corrections):
        own = group == g
        got_dx, got_dy = correction.offsets(x[own], y[own])
        error = np.hypot(
            got_dx - true_dx[own] - shift[own, 0], got_dy - true_dy[own] - shift[own, 1]
        )
        # 48 stars of 0.0125 px offsets, 3 shared terms per axis and a constant of 12
        # stars per channel: ~0.004 px per axis (the unfitted curvature: ~0.01 px)
        assert np.median(error) < 0.012, (g, np.median(error))
    centre = (np.array([299.5]), np.array([199.5]))
    base = np.ravel(corrections[0].offsets(*centre))
    for g in (1, 3):  # the channels' relative shifts, to ~0.005 px (12 stars of 0.0125 px)
        relative = np.ravel(corrections[g].offsets(*centre)) - base
        np.testing.assert_allclose(relative, shifts[g], atol=0.012)
    # each channel on its own: 12 stars give no correction at all
    alone = [
        fit_position_correction(*(v[group == g] for v in (x, y, dx, dy, sigma)), SHAPE)
        for g in range(4)
    ]
    assert [c.order for c in alone] == [-1] * 4
    # without lateral colour the shifts are not called for: one field for every channel
    x, y, dx, dy, sigma, group, true_dx, true_dy, _ = _pooled_field(12, 40, [(0.0, 0.0)] * 4)
    shared = fit_pooled_correction(x, y, dx, dy, sigma, group, 4, SHAPE)
    for correction in shared[1:]:
        np.testing.assert_array_equal(correction.coefficients, shared[0].coefficients)
    got_dx, got_dy = shared[0].offsets(x, y)
    # first order (48 stars): the field's curvature it leaves is ~0.008 px
    assert np.median(np.hypot(got_dx - true_dx, got_dy - true_dy)) < 0.01


def test_pooled_correction_with_one_group_is_the_single_fit():
    x, y, dx, dy, sigma, _, _ = _field(40, 9)
    (pooled,) = fit_pooled_correction(x, y, dx, dy, sigma, np.zeros(40, int), 1, SHAPE)
    single = fit_position_correction(x, y, dx, dy, sigma, SHAPE)
    assert pooled.order == single.order
    np.testing.assert_allclose(pooled.coefficients, single.coefficients)
