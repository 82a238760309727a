"""The aperture, background and PSF-flux kernels against plain reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import sep
from numpy.testing import assert_allclose

from autowisp.core.aperture import (
    annulus_background,
    aperture_photometry,
    clear_owners,
    disc_rect_integral,
    paint_owners,
    psf_photometry,
    rect_disc_area,
)
from autowisp.core.bayer import channels
from autowisp.core.psf import (
    _NODES,
    _WEIGHTS,
    GAUSSIAN,
    MOFFAT,
    pixel_integrals,
    profile,
    rect_integral,
    shape_from_fwhm,
)
from autowisp.core.subpixel import channel_map


def _fine_integral(func, x0, x1, y0, y1, r, n=1200):
    """Midpoint rule on an n × n grid over the rectangle, masked by the disc."""
    xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
    ys = y0 + (np.arange(n) + 0.5) * (y1 - y0) / n
    gx, gy = np.meshgrid(xs, ys)
    inside = gx**2 + gy**2 <= r * r
    return float(np.sum(func(gx, gy) * inside) * (x1 - x0) * (y1 - y0) / n**2)


@pytest.mark.parametrize(
    "rect, r",
    [
        ((-0.5, 0.5, -0.5, 0.5), 0.3),  # disc inside the pixel
        ((0.2, 1.2, -0.4, 0.6), 1.0),  # straddling
        ((1.7, 2.7, 1.1, 2.1), 2.5),  # corner clipped
        ((-3.0, -1.0, -1.0, 1.0), 2.2),  # a 2-px super-pixel across the edge
        ((3.0, 4.0, 0.0, 1.0), 2.0),  # outside
        ((-1.0, 1.0, -1.0, 1.0), 5.0),  # inside the disc
    ],
)
def test_exact_area_matches_a_fine_grid(rect, r):
    exact = rect_disc_area(*rect, r)
    # the midpoint grid's own error is ~1e-5 of a pixel
    assert exact == pytest.approx(_fine_integral(lambda x, y: np.ones_like(x), *rect, r), abs=1e-4)
    assert rect_disc_area(-0.5, 0.5, -0.5, 0.5, 0.3) == pytest.approx(np.pi * 0.09, rel=1e-14)
    assert rect_disc_area(-1.0, 1.0, -1.0, 1.0, 5.0) == pytest.approx(4.0, rel=1e-14)


def test_psf_over_exact_overlap_matches_a_fine_grid():
    s, d, k = shape_from_fwhm(np.array(2.2), np.array(1.8), np.array(0.4), kind="moffat")

    def moffat(x, y):
        q = s * (x * x + y * y) + d * (x * x - y * y) + 2 * k * x * y
        return 2.5 * np.sqrt(s * s - d * d - k * k) / np.pi * (1 + q) ** -3.5

    for rect, r in [((0.4, 1.4, -0.3, 0.7), 1.3), ((1.5, 2.5, 0.5, 1.5), 2.2),
                    ((-2.5, -1.5, -2.5, -1.5), 3.0)]:  # fmt: skip
        ours = disc_rect_integral(MOFFAT, 3.5, float(s), float(d), float(k), *rect, r, _NODES,
                                  _WEIGHTS)  # fmt: skip
        assert ours == pytest.approx(_fine_integral(moffat, *rect, r), rel=2e-4, abs=1e-7)
    # the whole rectangle, no disc, against the numpy integrals
    full = rect_integral(MOFFAT, 3.5, float(s), float(d), float(k), -0.5, 0.5, 0.2, 1.2, _NODES,
                         _WEIGHTS)  # fmt: skip
    vectorised = pixel_integrals(
        MOFFAT,
        3.5,
        np.array([s, d, k]),
        np.array([0.0]),
        np.array([0.7]),
        np.array([[-0.5, 0.5, -0.5, 0.5, 1.0]]),
    )
    assert full == pytest.approx(float(vectorised[0]), rel=1e-12)
    assert full == pytest.approx(_fine_integral(moffat, -0.5, 0.5, 0.2, 1.2, 99.0), rel=1e-4)
    assert profile(GAUSSIAN, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0) == pytest.approx(1 / (2 * np.pi))


def _run_aperture(image, error, bad, x, y, bg, bg_err, guess, shapes, plain, radii, channel,
                  kind=MOFFAT, beta=3.5):  # fmt: skip
    n = len(x)
    flux = np.zeros((n, len(radii)))
    var = np.zeros_like(flux)
    lost = np.zeros_like(flux)
    touched = np.zeros(flux.shape, np.uint8)
    sensitivity = channel_map(channel)
    aperture_photometry(image, error, bad, x, y, bg, bg_err, guess, shapes, kind, beta, plain,
                        np.asarray(radii, float), channel.step, channel.y0, channel.x0,
                        sensitivity.cells(), sensitivity.extent(), _NODES, _WEIGHTS, flux, var,
                        lost, touched)  # fmt: skip
    return flux, var, lost, touched


def test_plain_mode_is_seps_exact_circular_sum():
    rng = np.random.default_rng(3)
    image = rng.normal(100, 10, (60, 70))
    error = np.full(image.shape, 10.0)
    x = rng.uniform(10, 60, 25)
    y = rng.uniform(10, 50, 25)
    (mono,) = channels("MONO")
    radii = [1.3, 2.0, 3.7]
    bad = np.zeros(image.shape, np.uint8)
    zeros = np.zeros(25)
    flux, var, lost, _ = _run_aperture(image, error, bad, x, y, zeros, zeros, zeros,
                                       np.zeros((25, 3)), True, radii, mono)  # fmt: skip
    for a, r in enumerate(radii):
        ref, ref_err, _ = sep.sum_circle(image, x, y, r, err=error, subpix=0)
        assert_allclose(flux[:, a], ref, rtol=1e-7)  # sep sums in single precision
        # sep counts a partial pixel's variance with weight w, not w² (the sum's own
        # variance): ours is smaller by exactly the edge pixels' w − w² share.
        area, _, _ = sep.sum_circle(np.ones_like(image), x, y, r, subpix=0)
        assert_allclose(ref_err**2, 100.0 * area, rtol=1e-6)
        assert np.all(var[:, a] < ref_err**2) and np.all(var[:, a] > 0.6 * ref_err**2)
    assert np.all(lost == 0)


def _prf_reference(image, error, x, y, bg, amplitude, shape, r, channel, n=120):
    """PRF-weighted sum by brute force: fine sampling of g over each super-pixel."""
    s, d, k = shape
    level = bg / channel.step**2
    sensitivity = channel_map(channel)
    ex0, ex1, ey0, ey1 = sensitivity.extent()

    def g(px, py):
        q = s * (px**2 + py**2) + d * (px**2 - py**2) + 2 * k * px * py
        return 2.5 * np.sqrt(s * s - d * d - k * k) / np.pi * (1 + q) ** -3.5 + level / amplitude

    total = 0.0
    var = 0.0
    for py in range(channel.y0, image.shape[0], channel.step):
        for px in range(channel.x0, image.shape[1], channel.step):
            if np.hypot(px - x, py - y) > r + 3:
                continue
            raw = _fine_integral(g, px + ex0 - x, px + ex1 - x, py + ey0 - y, py + ey1 - y, r, n)
            seen = sum(c[4] * _fine_integral(g, px + c[0] - x, px + c[1] - x, py + c[2] - y,
                                             py + c[3] - y, 1e9, n)
                       for c in sensitivity.cells())  # fmt: skip
            total += image[py, px] * raw / seen
            var += (raw / seen) ** 2 * error[py, px] ** 2
    return total - level * np.pi * r * r, var


@pytest.mark.parametrize("radius", [2.5, 4.5])
@pytest.mark.parametrize("layout, name", [("RGGB", "G1"), ("GBRG", "R"), ("MONO", "L")])
def test_prf_weighting_matches_brute_force(layout, name, radius):
    rng = np.random.default_rng(5)
    channel = next(c for c in channels(layout) if c.name == name)
    image = rng.normal(50, 5, (40, 40))
    error = np.full(image.shape, 5.0)
    s, d, k = shape_from_fwhm(np.array(2.0), np.array(1.7), np.array(1.0), kind="moffat")
    shape = (float(s), float(d), float(k))
    x, y = np.array([19.3]), np.array([20.8])
    bad = np.zeros(image.shape, np.uint8)
    flux, var, _, _ = _run_aperture(
        image,
        error,
        bad,
        x,
        y,
        np.array([40.0]),
        np.zeros(1),
        np.array([3000.0]),
        np.array([shape]),
        False,
        [2.5],
        channel,
    )
    ref, ref_var = _prf_reference(image, error, 19.3, 20.8, 40.0, 3000.0, shape, 2.5, channel)
    assert flux[0, 0] == pytest.approx(ref, rel=2e-3)
    assert var[0, 0] == pytest.approx(ref_var, rel=4e-3)


def test_masked_and_edge_pixels_are_compensated_and_reported():
    (mono,) = channels("MONO")
    s, d, k = shape_from_fwhm(np.array(2.0), np.array(2.0), np.array(0.0), kind="moffat")
    shapes = np.array([[s, d, k]] * 2, float)
    yy, xx = np.mgrid[0:40, 0:40]
    x, y = np.array([20.2, 1.0]), np.array([19.6, 20.0])
    image = np.zeros((40, 40))
    cells = channel_map(mono).cells()
    for xs, ys in zip(x, y, strict=True):
        image += 1e5 * pixel_integrals(MOFFAT, 3.5, np.array([s, d, k]), (xx - xs).ravel(),
                                       (yy - ys).ravel(), cells).reshape(40, 40)  # fmt: skip
    error = np.ones(image.shape)
    bad = np.zeros(image.shape, np.uint8)
    bad[20, 21] = 2  # one masked pixel beside the first star's centre
    guess = np.array([1e5, 1e5])
    flux, _, lost, touched = _run_aperture(image, error, bad, x, y, np.zeros(2), np.zeros(2),
                                           guess, shapes, False, [3.0], mono)  # fmt: skip
    enclosed_fraction = 1 - (1 + 9 / (2.0 / (2 * np.sqrt(2 ** (1 / 3.5) - 1))) ** 2) ** -2.5
    assert flux[:, 0] == pytest.approx(1e5 * enclosed_fraction, rel=2e-3)
    assert touched[0, 0] == 2 and touched[1, 0] == 4
    assert 0.05 < lost[0, 0] < 0.2 and 0.02 < lost[1, 0] < 0.2  # PSF weight, not area


def test_annulus_background_rejects_stars_and_masks():
    rng = np.random.default_rng(8)
    image = rng.normal(200.0, 4.0, (80, 80))
    image[30:33, 50:53] += 5000  # an unlisted star in the annulus: clipped
    bad = np.zeros(image.shape, np.uint8)
    bad[40, 25:35] = 2
    image[40, 25:35] = 1e6  # masked: never used
    x, y = np.array([40.0, 48.0]), np.array([40.0, 40.0])
    cover = np.zeros(image.shape, np.int32)
    owner = np.full(image.shape, -1, np.int64)
    paint_owners(cover, owner, x, y, np.array([10.0, 4.0]))  # the first star's disc is wide
    level, err, count = np.zeros(2), np.zeros(2), np.zeros(2, np.int64)
    annulus_background(image, bad, cover, owner, x, y, 1, 0, 0, 8.0, 16.0, 3.0, level, err,
                       count)  # fmt: skip
    assert level == pytest.approx([200.0, 200.0], abs=3 * 4.0 / np.sqrt(count.min()) + 0.05)
    assert np.all(err > 0) and count[0] > 300
    # the second star's annulus loses the part within the first star's disc
    full = np.sum(
        (np.hypot(*np.mgrid[-16:17, -16:17]) >= 8) & (np.hypot(*np.mgrid[-16:17, -16:17]) <= 16)
    )
    assert count[1] < full - 100


def test_painting_one_channel_matches_the_full_grid_on_its_pixels():
    rng = np.random.default_rng(4)
    x, y = rng.uniform(-3, 43, 30), rng.uniform(-3, 43, 30)
    radius = rng.uniform(0.5, 7.0, 30)
    full_count = np.zeros((40, 40), np.int32)
    full_owner = np.full((40, 40), -1, np.int32)
    paint_owners(full_count, full_owner, x, y, radius)
    for y0, x0 in ((0, 0), (0, 1), (1, 0), (1, 1)):
        count = np.zeros((40, 40), np.int32)
        owner = np.full((40, 40), -1, np.int32)
        paint_owners(count, owner, x, y, radius, True, 2, y0, x0)
        np.testing.assert_array_equal(count[y0::2, x0::2], full_count[y0::2, x0::2])
        np.testing.assert_array_equal(owner[y0::2, x0::2], full_owner[y0::2, x0::2])
        others = np.ones((40, 40), bool)
        others[y0::2, x0::2] = False
        assert not count[others].any() and np.all(owner[others] == -1)
        # clearing the same discs leaves the map as it was, for the next pass
        clear_owners(count, x, y, radius, 2, y0, x0)
        assert not count.any()
    clear_owners(full_count, x, y, radius)
    assert not full_count.any()


def test_psf_fluxes_solve_overlapping_stars_jointly():
    """Gauss–Seidel sweeps reach the joint weighted least-squares solution."""
    (mono,) = channels("MONO")
    s, d, k = shape_from_fwhm(np.array(2.5), np.array(2.5), np.array(0.0))
    x, y = np.array([20.0, 22.5, 30.0]), np.array([20.0, 21.0, 25.0])
    amplitude = np.array([5e4, 2e4, 1e4])
    yy, xx = np.mgrid[0:50, 0:50]
    cells = channel_map(mono).cells()
    columns = []
    for xs, ys in zip(x, y, strict=True):
        columns.append(pixel_integrals(GAUSSIAN, 0.0, np.array([s, d, k]), (xx - xs).ravel(),
                                       (yy - ys).ravel(), cells))  # fmt: skip
    design = np.column_stack(columns)
    rng = np.random.default_rng(1)
    model = design @ amplitude
    image = (model + rng.normal(0, 10, model.size)).reshape(50, 50)
    error = np.full(image.shape, 10.0)
    bad = np.zeros(image.shape, np.uint8)
    radius = 6.0
    flux, err, chi2 = np.zeros(3), np.zeros(3), np.zeros(3)
    npix = np.zeros(3, np.int64)
    shapes = np.array([[s, d, k]] * 3, float)
    psf_photometry(image, error, bad, x, y, np.zeros(3), np.zeros(3), shapes, GAUSSIAN, 0.0, 1,
                   0, 0, cells, radius, amplitude * 0.5, 30, _NODES, _WEIGHTS, flux, err, chi2,
                   npix)  # fmt: skip
    # reference: joint weighted least squares over the union of the stars' pixels
    near = np.zeros(image.size, bool)
    for xs, ys in zip(x, y, strict=True):
        near |= ((xx - xs) ** 2 + (yy - ys) ** 2).ravel() <= radius**2
    var = 100.0 + np.maximum(model, 0)  # the kernel's model variance at convergence
    a = design[near] / np.sqrt(var[near])[:, None]
    b = image.ravel()[near] / np.sqrt(var[near])
    reference = np.linalg.lstsq(a, b, rcond=None)[0]
    assert_allclose(flux, reference, rtol=2e-3)
    assert_allclose(flux, amplitude, rtol=0.02)
    assert np.all(np.isfinite(err)) and np.all(npix > 50)


def _disc_psf_integral(fwhm, r, cx, cy, far_distance, near_rule):
    """∫_disc PSF summed over unit squares as the kernels do: the 3-point rule on squares
    farther than ``far_distance`` from the star, ``near_rule`` on the others."""
    from autowisp.core import aperture
    from autowisp.core.psf import MOFFAT, rect_integral, shape_from_fwhm

    width = np.array(fwhm)
    shape = shape_from_fwhm(width, width, np.array(0.0), kind="moffat", beta=3.5)
    s, d, k = (float(v) for v in shape)
    total = 0.0
    for j in range(-8, 9):
        for i in range(-8, 9):
            x0, y0 = i - 0.5 - cx, j - 0.5 - cy
            where = aperture._rect_class(x0, x0 + 1, y0, y0 + 1, r)
            if where == 0:
                continue
            near_x, near_y = min(max(0.0, x0), x0 + 1), min(max(0.0, y0), y0 + 1)
            far = near_x**2 + near_y**2 > far_distance**2
            nodes, weights = (aperture._FAR_NODES, aperture._FAR_WEIGHTS) if far else near_rule
            if where == 1:
                total += rect_integral(MOFFAT, 3.5, s, d, k, x0, x0 + 1, y0, y0 + 1, nodes,
                                       weights)  # fmt: skip
            else:
                total += disc_rect_integral(MOFFAT, 3.5, s, d, k, x0, x0 + 1, y0, y0 + 1, r,
                                            nodes, weights)  # fmt: skip
    return total


@pytest.mark.parametrize("fwhm", [1.0, 1.5, 2.5, 3.5])
def test_the_far_squares_rule_keeps_the_aperture_integral_exact(fwhm):
    """With the 3-point rule beyond FAR_DISTANCE the PSF's integral over each aperture is
    within 1e-4 of a 12-point rule's (measured ≤ 3.4e-5), at random sub-pixel phases."""
    from autowisp.core.aperture import FAR_DISTANCE
    from autowisp.core.psf import _NODES, _WEIGHTS

    fine = np.polynomial.legendre.leggauss(12)
    rng = np.random.default_rng(int(fwhm * 10))
    for r in (2.0, 3.0, 5.0):
        for cx, cy in rng.uniform(-0.5, 0.5, (4, 2)):
            ours = _disc_psf_integral(fwhm, r, cx, cy, FAR_DISTANCE, (_NODES, _WEIGHTS))
            reference = _disc_psf_integral(fwhm, r, cx, cy, 99.0, fine)
            assert ours == pytest.approx(reference, rel=1e-4), (fwhm, r, cx, cy)


def test_backgrounds_do_not_depend_on_what_the_owner_map_held():
    """The photometry reuses its disc maps between passes and never fills ``owner``: the
    annulus counts must be those of freshly initialised maps, whatever ``owner`` held
    (another pass's star indices, or garbage), with unmeasured sources' discs painted."""
    rng = np.random.default_rng(9)
    image = rng.normal(200.0, 4.0, (90, 90))
    bad = np.zeros(image.shape, np.uint8)
    x, y = rng.uniform(10, 80, 12), rng.uniform(10, 80, 12)
    other_x, other_y = rng.uniform(0, 90, 30), rng.uniform(0, 90, 30)
    radius, other_radius = np.full(12, 5.0), np.full(30, 3.0)

    def counts(cover, owner):
        paint_owners(cover, owner, x, y, radius, True, 2, 1, 0)
        paint_owners(cover, owner, other_x, other_y, other_radius, False, 2, 1, 0)
        level, err, count = np.zeros(12), np.zeros(12), np.zeros(12, np.int64)
        annulus_background(image, bad, cover, owner, x, y, 2, 1, 0, 7.0, 14.0, 3.0, level, err,
                           count)  # fmt: skip
        clear_owners(cover, x, y, radius, 2, 1, 0)
        clear_owners(cover, other_x, other_y, other_radius, 2, 1, 0)
        assert not cover.any()
        return count, level

    fresh = counts(np.zeros(image.shape, np.int32), np.full(image.shape, -1, np.int32))
    garbage = rng.integers(0, 12, image.shape).astype(np.int32)  # any star's index
    reused = np.zeros(image.shape, np.int32)
    for _ in range(2):  # a second pass on the same maps
        got = counts(reused, garbage)
        np.testing.assert_array_equal(got[0], fresh[0])
        np.testing.assert_array_equal(got[1], fresh[1])
