"""Astrometry core: triangle invariants, the TAN-SIP fit, and solving against truth."""

import numpy as np
import pytest

from autowisp.core.astrometry import SolveError, fit_tan_sip, solve, triangles
from autowisp.core.projection import TanSip, sip_from_lens
from autowisp.io.gaia import cone_search

SHAPE = (900, 1200)


def _truth_wcs(rotation=37.0, flip=False, scale=10.3, centre=(301.0, 44.0), k1=3e-8, shape=SHAPE):
    theta = np.radians(rotation)
    cd = scale / 3600 * np.array([[-np.cos(theta), np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if flip:
        cd = cd @ np.diag([-1.0, 1.0])
    a, b = sip_from_lens(k1=k1, p1=2e-6, order=3)
    crpix = np.array([(shape[1] - 1) / 2 + 13.0, (shape[0] - 1) / 2 - 7.0])
    return TanSip(crpix, np.array(centre), cd, a, b)


def test_triangle_invariants_ignore_rotation_scale_parity_and_order():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 500, (2, 40))
    vertices, invariants = triangles(x, y)
    theta = 1.1
    xr = 1.3 * (np.cos(theta) * x - np.sin(theta) * y) + 40
    yr = 1.3 * (np.sin(theta) * x + np.cos(theta) * y) - 7
    order = rng.permutation(40)
    v2, q2 = triangles(-xr[order], yr[order])  # mirrored, shuffled
    first = {tuple(sorted(v)): q for v, q in zip(vertices.tolist(), invariants, strict=True)}
    second = {tuple(sorted(order[v].tolist())): q for v, q in zip(v2, q2, strict=True)}
    common = first.keys() & second.keys()
    assert len(common) > 0.8 * len(first)
    assert max(np.abs(first[key] - second[key]).max() for key in common) < 1e-12
    # Vertices come ordered by their opposite side, so corresponding corners line up.
    for v, q in zip(vertices[:50], invariants[:50], strict=True):
        p = np.column_stack([x, y])[v]
        sides = [np.hypot(*(p[1] - p[2])), np.hypot(*(p[2] - p[0])), np.hypot(*(p[0] - p[1]))]
        assert sides[0] <= sides[1] <= sides[2]
        assert q == pytest.approx([sides[0] / sides[2], sides[1] / sides[2]])


@pytest.mark.parametrize("order", [1, 3])
def test_tan_sip_fit_recovers_a_known_solution(order):
    truth = _truth_wcs(k1=3e-8 if order == 3 else 0.0)
    if order == 1:
        truth = TanSip(truth.crpix, truth.crval, truth.cd)
    rng = np.random.default_rng(2)
    x = rng.uniform(0, SHAPE[1] - 1, 300)
    y = rng.uniform(0, SHAPE[0] - 1, 300)
    ra, dec = truth.pixel_to_sky(x, y)
    fitted = fit_tan_sip(x, y, ra, dec, crpix=tuple(truth.crpix), crval=(300.0, 45.0), order=order)
    grid_y, grid_x = np.mgrid[0 : SHAPE[0] : 50, 0 : SHAPE[1] : 50]
    ra_t, dec_t = truth.pixel_to_sky(grid_x.ravel(), grid_y.ravel())
    px, py = fitted.sky_to_pixel(ra_t, dec_t)
    assert np.max(np.hypot(px - grid_x.ravel(), py - grid_y.ravel())) < 1e-6
    assert fitted.crval == pytest.approx(truth.crval, abs=1e-9)
    assert fitted.cd == pytest.approx(truth.cd, rel=1e-8)


def test_fit_refuses_too_few_stars():
    with pytest.raises(SolveError, match="cannot constrain"):
        fit_tan_sip(np.arange(5.0), np.arange(5.0), np.arange(5.0), np.arange(5.0),
                    crpix=(0, 0), crval=(1.0, 1.0), order=3)  # fmt: skip


def _scene(
    truth, rng, *, dropped=0.2, spurious=0.3, noise=0.1, gmax=10.0, shape=SHAPE, fakes=(6, 10)
):
    """Sources of a frame: catalogue stars through ``truth``, some lost, some extra."""
    stars = cone_search(*truth.crval, 6.0, gmax=gmax)
    x, y = truth.sky_to_pixel(stars.ra, stars.dec)
    inside = np.flatnonzero((x >= 0) & (x < shape[1] - 1) & (y >= 0) & (y < shape[0] - 1))
    kept = inside[rng.random(inside.size) > dropped]
    n_fake = int(spurious * kept.size)
    sx = np.concatenate(
        [x[kept] + rng.normal(0, noise, kept.size), rng.uniform(0, shape[1], n_fake)]
    )
    sy = np.concatenate(
        [y[kept] + rng.normal(0, noise, kept.size), rng.uniform(0, shape[0], n_fake)]
    )
    # Brightness order: catalogue order with some scatter, fakes anywhere.
    brightness = np.concatenate([-stars.gmag[kept] + rng.normal(0, 0.3, kept.size),
                                 rng.uniform(-fakes[1], -fakes[0], n_fake)])  # fmt: skip
    order = np.argsort(-brightness)
    true_xy = np.concatenate([np.column_stack([x[kept], y[kept]]), np.full((n_fake, 2), np.nan)])
    return sx[order], sy[order], true_xy[order]


@pytest.mark.parametrize(
    ("rotation", "flip", "offset", "scale_error"),
    [
        (37.0, False, (7.0, -6.0), 1.15),
        (-120.0, True, (-3.0, 8.5), 0.85),
        (180.0, False, (0, 0), 1.0),
    ],
)
def test_solve_far_from_the_hint_at_any_rotation_and_parity(rotation, flip, offset, scale_error):
    truth = _truth_wcs(rotation=rotation, flip=flip)
    rng = np.random.default_rng(3)
    sx, sy, _ = _scene(truth, rng)
    hint = (truth.crval[0] + offset[0] / np.cos(np.radians(44.0)), truth.crval[1] + offset[1])
    stars = cone_search(*hint, 10.0 + 1.2)
    solution = solve(sx, sy, stars.ra, stars.dec, SHAPE, hint=hint, pixel_scale=10.3 * scale_error)
    assert solution.parity == (-1 if flip else 1)
    assert solution.wcs.pixel_scale == pytest.approx(10.3, rel=1e-3)
    # The frame's +y axis, east of north, is the truth's rotation (either parity).
    turn = (solution.rotation_deg - rotation + 180.0) % 360.0 - 180.0
    assert abs(turn) < 0.05
    # Catalogue positions through the solution against the true positions: the fit
    # averages the 0.1 px centroid noise over ~100 stars.
    grid_y, grid_x = np.mgrid[0 : SHAPE[0] : 60, 0 : SHAPE[1] : 60]
    ra, dec = truth.pixel_to_sky(grid_x.ravel(), grid_y.ravel())
    px, py = solution.wcs.sky_to_pixel(ra, dec)
    error = np.hypot(px - grid_x.ravel(), py - grid_y.ravel())
    assert np.sqrt(np.mean(error**2)) < 0.05
    assert solution.rms_px == pytest.approx(0.1 * np.sqrt(2), rel=0.25)
    assert solution.pointing_offset_deg == pytest.approx(np.hypot(*offset), abs=0.3)


def test_empty_sky_and_too_few_sources_fail_with_their_reason():
    rng = np.random.default_rng(4)
    stars = cone_search(301.0, 44.0, 11.0)
    x, y = rng.uniform(0, 1200, (2, 400))  # noise, no stars
    with pytest.raises(SolveError, match=r"no match|matches an image triangle"):
        solve(x, y, stars.ra, stars.dec, SHAPE, hint=(301.0, 44.0), pixel_scale=10.3)
    with pytest.raises(SolveError, match="too few sources"):
        solve(x[:3], y[:3], stars.ra, stars.dec, SHAPE, hint=(301.0, 44.0), pixel_scale=10.3)


def test_a_small_sparse_frame_solves():
    """384×384 px (1.1°): about 25 catalogue stars, a fifth of them lost, many extra
    sources; the demo's frames are this size."""
    shape = (384, 384)
    truth = _truth_wcs(rotation=-23.5, shape=shape, k1=0.0)
    rng = np.random.default_rng(6)
    # Twice as many extra sources as catalogue stars, as bright as the catalogue's
    # faintest (G 9–12: the stars just below the catalogue's limit).
    sx, sy, _ = _scene(truth, rng, spurious=2.0, shape=shape, fakes=(9, 12))
    hint = (truth.crval[0] + 0.4, truth.crval[1] - 0.3)
    stars = cone_search(*hint, 11.0)
    solution = solve(sx, sy, stars.ra, stars.dec, shape, hint=hint, pixel_scale=10.3 * 1.1)
    assert solution.matched >= 12
    grid_y, grid_x = np.mgrid[0:384:32, 0:384:32]
    ra, dec = truth.pixel_to_sky(grid_x.ravel(), grid_y.ravel())
    px, py = solution.wcs.sky_to_pixel(ra, dec)
    error = np.hypot(px - grid_x.ravel(), py - grid_y.ravel())
    assert np.sqrt(np.mean(error**2)) < 0.1  # 0.1 px centroids, ~15 stars


def test_the_matching_plan_scales_with_the_catalogue_stars_in_the_frame():
    from autowisp.core.astrometry import matching_plan, required_matches

    sparse, small, large = matching_plan(3.0), matching_plan(12.0), matching_plan(200.0)
    assert (sparse.sources, sparse.min_votes) == (30, 6)  # the floor
    assert (small.sources, small.min_votes) == (36, 6)
    assert (large.sources, large.min_votes) == (300, 8)  # as before on large frames
    assert matching_plan(21.0).min_votes == 8 and matching_plan(21.0).sources == 63
    assert [required_matches(n) for n in (3, 12, 15, 80)] == [6, 6, 8, 10]


def test_an_adaptive_fit_check_names_the_catalogue_stars_in_the_frame():
    from autowisp.core.astrometry import check_fit

    residual = np.full(5, 0.1)
    with pytest.raises(SolveError, match="5 stars matched of 12 catalogue stars in the frame, 6"):
        check_fit(residual, min_matches=0, max_rms=1.0, in_frame=12)
    assert check_fit(np.full(6, 0.1), min_matches=0, max_rms=1.0, in_frame=12) == pytest.approx(
        0.1
    )
