"""The deep stack: registration through the WCS, min/max-rejected combination, against truth."""

from __future__ import annotations

import numpy as np
import pytest
import sep
from scipy.spatial import cKDTree
from scipy.special import erf

from autowisp.core.bayer import channels
from autowisp.core.extraction import colour_normalised_centroids, extract_sources
from autowisp.core.projection import TanSip, sip_from_lens
from autowisp.core.stacking import (
    MinMaxStack,
    SkyPositions,
    StackBuilder,
    channel_mapping,
    detect_on_stack,
    frame_mapping,
    resample_channel,
)

SCALE = 10.0 / 3600  # deg/px


def _solution(shape, *, shift=(0.0, 0.0), rotation=0.0, distortion=True) -> TanSip:
    ny, nx = shape
    angle = np.radians(30.0 + rotation)
    cd = SCALE * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corner = np.hypot(nx, ny) / 2
    a, b = sip_from_lens(k1=0.004 / corner**2, k2=0.3 * 0.004 / corner**4, p1=1e-8, p2=-2e-8)
    if not distortion:
        a, b = np.zeros_like(a), np.zeros_like(b)
    return TanSip(
        crpix=np.array([(nx - 1) / 2 + shift[0], (ny - 1) / 2 + shift[1]]),
        crval=np.array([150.0, 40.0]),
        cd=cd,
        a=a,
        b=b,
    )


def test_registration_matches_the_exact_mapping_everywhere():
    shape = (300, 420)
    reference = _solution(shape)
    frame = _solution(shape, shift=(3.3, -2.7), rotation=0.2)
    mapping = frame_mapping(reference, frame, shape, grid_step=32)
    for channel in channels("GBRG"):
        rows, cols = channel_mapping(mapping, shape, channel, grid_step=32)
        yy, xx = np.mgrid[channel.y0 : shape[0] : 2, channel.x0 : shape[1] : 2]
        u, v = frame.sky_to_pixel(*reference.pixel_to_sky(xx.ravel(), yy.ravel()))
        exact_rows = (v.reshape(yy.shape) - channel.y0) / 2
        exact_cols = (u.reshape(xx.shape) - channel.x0) / 2
        assert rows.shape == yy.shape
        # In channel pixels; the distortion reaches 0.4 % of the radius at the corner.
        assert np.max(np.abs(rows - exact_rows)) < 1e-3
        assert np.max(np.abs(cols - exact_cols)) < 1e-3


def test_resampling_by_a_whole_pixel_is_a_copy_and_masks_spread_to_neighbours_only():
    rng = np.random.default_rng(1)
    plane = rng.normal(size=(40, 50)).astype(np.float32)
    plane[20, 25] = np.nan
    rows, cols = np.mgrid[0:40, 0:50].astype(float)
    out = resample_channel(plane, (rows + 1.0, cols - 2.0))
    np.testing.assert_array_equal(out[:-1, 2:][np.isfinite(out[:-1, 2:])],
                                  plane[1:, :-2][np.isfinite(out[:-1, 2:])])  # fmt: skip
    assert np.isnan(out[-1]).all() and np.isnan(out[:, :2]).all()  # beyond the plane
    # A half-pixel shift: the masked pixel spoils the two outputs that straddle it.
    half = resample_channel(plane, (rows, cols + 0.5))
    assert np.isnan(half[20, 24]) and np.isnan(half[20, 25])
    assert np.isfinite(half[20, 23]) and np.isfinite(half[20, 26]) and np.isfinite(half[19, 24])
    np.testing.assert_allclose(half[5, 5], 0.5 * (plane[5, 5] + plane[5, 6]), rtol=1e-6)


def _reference_minmax(planes: np.ndarray) -> np.ndarray:
    """Per pixel, drop the lowest and highest finite value (with >= 3) and average."""
    _, ny, nx = planes.shape
    out = np.full((ny, nx), np.nan)
    for i in range(ny):
        for j in range(nx):
            values = sorted(v for v in planes[:, i, j] if np.isfinite(v))
            if len(values) >= 3:
                values = values[1:-1]
            if values:
                out[i, j] = sum(values) / len(values)
    return out


@pytest.mark.parametrize("frames", [1, 2, 3, 7])
def test_min_max_stack_against_a_plain_reference(frames):
    rng = np.random.default_rng(frames)
    planes = rng.normal(10, 3, size=(frames, 9, 11)).astype(np.float32)
    planes[rng.random(planes.shape) < 0.2] = np.nan
    stack = MinMaxStack((9, 11))
    for plane in planes:
        stack.add(plane)
    combined, count = stack.result()
    np.testing.assert_array_equal(count, np.isfinite(planes).sum(axis=0))
    np.testing.assert_allclose(combined, _reference_minmax(planes), rtol=1e-5, equal_nan=True)


def _render(shape, x, y, flux, sigma, layout, response) -> np.ndarray:
    """Gaussian stars integrated over pixels; a Bayer channel's pixels get its colour's
    share ``response[channel]`` of the light."""
    ny, nx = shape
    image = np.zeros(shape)
    half = int(np.ceil(5 * sigma)) + 1
    root2 = np.sqrt(2) * sigma
    for xs, ys, fs in zip(x, y, flux, strict=True):
        x0, y0 = round(xs), round(ys)
        cols = np.arange(max(0, x0 - half), min(nx, x0 + half + 1))
        rows = np.arange(max(0, y0 - half), min(ny, y0 + half + 1))
        if cols.size == 0 or rows.size == 0:
            continue
        fx = 0.5 * (erf((cols + 0.5 - xs) / root2) - erf((cols - 0.5 - xs) / root2))
        fy = 0.5 * (erf((rows + 0.5 - ys) / root2) - erf((rows - 0.5 - ys) / root2))
        image[np.ix_(rows, cols)] += fs * np.outer(fy, fx)
    weight = np.ones(shape)
    for channel in channels(layout):
        channel.view(weight)[...] = response[channel.name]
    return image * weight


@pytest.mark.parametrize("layout", ["RGGB", "MONO"])
def test_stack_finds_faint_stars_at_their_true_positions_and_drops_a_satellite(layout):
    rng = np.random.default_rng(7)
    shape, sky, sigma = (256, 320), 200.0, 1.1  # FWHM 2.6 px
    response = {c.name: r for c, r in zip(channels(layout), (0.8, 1.0, 1.0, 0.6), strict=False)}
    reference = _solution(shape)
    count = 150
    ra, dec = reference.pixel_to_sky(rng.uniform(10, shape[1] - 10, count),
                                     rng.uniform(10, shape[0] - 10, count))  # fmt: skip
    # Fluxes down to S/N ~ 6 in one frame: found only on the stack.
    flux = 10 ** rng.uniform(np.log10(150), np.log10(5e4), count)
    builder = StackBuilder(reference, shape, layout)
    frames = 9
    single = None
    measured = []
    for k in range(frames):
        solution = _solution(shape, shift=tuple(rng.uniform(-4, 4, 2)), rotation=0.05 * k)
        x, y = solution.sky_to_pixel(ra, dec)
        expected = _render(shape, x, y, flux, sigma, layout, response) + sky
        image = rng.poisson(expected).astype(float) + rng.normal(0, 5, shape)
        if k == 4:  # a satellite trail across the frame, in one frame only
            rows = np.arange(shape[0])
            image[rows, np.clip((0.7 * rows + 40).astype(int), 0, shape[1] - 1)] += 5000
        image[rng.random(shape) < 1e-3] = np.nan  # masked pixels
        residual = image - sky
        if k == 0:
            single = residual
        builder.add(residual, solution)
        measured.append((residual, solution))
    stack = builder.result()
    assert stack.frames == frames
    assert stack.count.max() == frames and (stack.count >= frames - 2).mean() > 0.9

    true_x, true_y = reference.sky_to_pixel(ra, dec)
    deep_sources = detect_on_stack(stack, layout, reference)
    d_deep, n_deep = cKDTree(np.column_stack([true_x, true_y])).query(
        np.column_stack([deep_sources.x, deep_sources.y])
    )
    ok = d_deep < 1.0
    assert ok.mean() > 0.97
    # Every true star of S/N > 20 on the stack that is not blended is found.
    found_ids = set(n_deep[ok])
    # Channel fluxes: their sum follows the true flux (the responses sum to the mean
    # over the layout's channels).
    total = sum(deep_sources.flux.values())
    share = np.mean(list(response.values())) * len(response) / (4 if layout != "MONO" else 1)
    ratio = total[ok] / (flux[n_deep[ok]] * share)
    bright_ok = flux[n_deep[ok]] > 3000
    assert 0.97 < np.median(ratio[bright_ok]) < 1.03  # 1.5 FWHM holds 99.8 % of a Gaussian
    spread = 1.4826 * np.median(np.abs(ratio[bright_ok] - np.median(ratio[bright_ok])))
    assert spread < 0.03  # (neighbours' light makes the tail)
    # Completeness: the criterion, unblended stars of S/N > 20 on the stack.
    npix = np.pi * (1.5 * 2.355 * sigma) ** 2
    signal = flux * share
    snr_stack = signal * np.sqrt(frames - 2) / np.sqrt(signal + npix * (sky + 25.0))
    neighbours = cKDTree(np.column_stack([true_x, true_y])).query(
        np.column_stack([true_x, true_y]), k=2
    )[0][:, 1]
    wanted = np.flatnonzero((snr_stack > 20) & (neighbours > 2 * 2.355 * sigma))
    assert wanted.size > 50
    assert np.isin(wanted, list(found_ids)).mean() >= 0.95
    image = np.where(np.isfinite(stack.image), stack.image, 0.0)
    found = extract_sources(image, layout, mask=stack.count < 5, threshold=5.0)
    distance, nearest = cKDTree(np.column_stack([true_x, true_y])).query(
        np.column_stack([found.x, found.y])
    )
    matched = distance < 1.0
    # Every detection is a true star, or a blend of two (closer than 2 FWHM): the trail
    # left nothing behind.
    tree = cKDTree(np.column_stack([true_x, true_y]))
    for x, y in np.column_stack([found.x, found.y])[~matched]:
        assert len(tree.query_ball_point([x, y], 2 * 2.355 * sigma)) >= 2, (x, y)
    assert matched.mean() > 0.97
    deep = set(nearest[matched])
    single_found = extract_sources(
        np.where(np.isfinite(single), single, 0.0), layout, mask=~np.isfinite(single)
    )
    d1, _ = cKDTree(np.column_stack([true_x, true_y])).query(
        np.column_stack([single_found.x, single_found.y])
    )
    assert len(deep) > 1.3 * (d1 < 1.0).sum()  # the stack goes deeper than one frame
    # Centroids of the bright isolated stars on the stack against their true positions:
    # sep's windowed centroids, then the channels scaled to the star's own colour.
    crowded = np.array([len(tree.query_ball_point(p, 4 * 2.355 * sigma)) > 1
                        for p in np.column_stack([true_x, true_y])])  # fmt: skip
    star = nearest[matched]
    bright = (flux[star] > 3000) & ~crowded[star]
    assert bright.sum() > 20
    sep_error = distance[matched][bright]
    # The stack's windowed centroids are off by up to 0.1 px on a mosaic (a Bayer
    # channel's resampled profile changes with its sub-pixel phase); the frames' own
    # colour-normalised centroids, averaged on the sky, are not.
    ra0, dec0 = reference.pixel_to_sky(found.x[matched][bright], found.y[matched][bright])
    positions = SkyPositions(ra0, dec0)
    for residual, solution in measured:
        positions.add(residual, layout, solution, sigma, mask=~np.isfinite(residual))
    ra1, dec1, used, scatter = positions.result()
    assert (used >= frames - 2).all()
    x, y = reference.sky_to_pixel(ra1, dec1)
    error = np.hypot(x - true_x[star[bright]], y - true_y[star[bright]])
    print(f"{layout}: stack median {np.median(sep_error):.4f} max {sep_error.max():.4f}; "
          f"frames median {np.median(error):.4f} max {error.max():.4f} px")  # fmt: skip
    assert np.median(error) < 0.02
    assert np.max(error) < 0.1
    # The rest is noise: each star's error against its own reported uncertainty
    # (the scatter of one frame over the square root of the frames, per axis).
    sigma_mean = scatter * 3600 / 10.0 / np.sqrt(used)
    assert np.max(error / sigma_mean) < 4.5
    assert 0.5 < np.sqrt(np.mean((error / sigma_mean) ** 2) / 2) < 1.5


def test_colour_normalised_centroids_remove_the_pull_of_the_channel_responses():
    rng = np.random.default_rng(3)
    shape, sigma = (200, 200), 1.1
    grid_y, grid_x = np.mgrid[15:190:20, 15:190:20]  # isolated stars, every sub-pixel phase
    x = grid_x.ravel() + rng.uniform(-1, 1, grid_x.size)
    y = grid_y.ravel() + rng.uniform(-1, 1, grid_y.size)
    n = x.size
    for layout, responses in (("RGGB", (0.8, 1.0, 1.0, 0.6)), ("GBRG", (1.0, 0.5, 1.0, 1.0))):
        response = {c.name: r for c, r in zip(channels(layout), responses, strict=True)}
        image = _render(shape, x, y, np.full(n, 2e4), sigma, layout, response)
        plain_x, plain_y, _ = sep.winpos(image, x, y, np.full(n, sigma))
        cx, cy, flags = colour_normalised_centroids(image, layout, x + 0.3, y - 0.2, sigma)
        assert not flags.any()
        assert np.median(np.hypot(plain_x - x, plain_y - y)) > 0.015  # sep's pull
        assert np.max(np.hypot(cx - x, cy - y)) < 0.006
    # Near the edge the window uses what is on the frame; off it, flagged and kept.
    edge = _render(shape, np.array([2.3, -3.0]), np.array([100.4, 50.0]), np.full(2, 2e4),
                   sigma, "GBRG", response)  # fmt: skip
    cx, cy, flags = colour_normalised_centroids(edge, "GBRG", [2.0, -3.0], [100.0, 50.0], sigma)
    assert flags.tolist() == [0, 1] and cx[1] == -3.0
    assert abs(cx[0] - 2.3) < 0.02 and abs(cy[0] - 100.4) < 0.02


@pytest.mark.parametrize("layout", ["RGGB", "MONO"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_compiled_centroid_kernel_matches_the_numpy_reference(layout, masked):
    """The numba kernel (a star at a time) against the plain numpy implementation
    (chunks of stars): the same centroids to 1e-10 px and the same flags, stars on the
    edges, off the frame, on NaN and masked pixels, in blends included."""
    rng = np.random.default_rng(5)
    shape = (160, 220)
    x = rng.uniform(-4, shape[1] + 3, 300)
    y = rng.uniform(-4, shape[0] + 3, 300)
    response = {c.name: r for c, r in zip(channels(layout), (0.7, 1.0, 0.9, 0.5), strict=False)}
    image = _render(shape, x, y, rng.uniform(500, 3e4, x.size), 1.2, layout, response)
    image += rng.normal(0, 5, shape)
    image[rng.random(shape) < 0.002] = np.nan
    mask = (rng.random(shape) < 0.01) if masked else None
    start_x, start_y = x + rng.normal(0, 0.3, x.size), y + rng.normal(0, 0.3, y.size)
    fast = colour_normalised_centroids(image, layout, start_x, start_y, 1.2, mask=mask)
    plain = colour_normalised_centroids(image, layout, start_x, start_y, 1.2, mask=mask,
                                        reference=True)  # fmt: skip
    np.testing.assert_array_equal(fast[2], plain[2])
    assert 0 < fast[2].sum() < x.size  # some flagged (off the frame, moved), most not
    np.testing.assert_allclose(fast[0], plain[0], atol=1e-10, rtol=0)
    np.testing.assert_allclose(fast[1], plain[1], atol=1e-10, rtol=0)


def test_the_compiled_resampling_kernel_matches_the_numpy_reference():
    """NaN pixels, points off the plane, whole-pixel shifts and a one-row plane."""
    rng = np.random.default_rng(8)
    plane = rng.normal(size=(40, 50)).astype(np.float32)
    plane[rng.random(plane.shape) < 0.03] = np.nan
    rows = rng.uniform(-2, 41, (30, 45))
    cols = rng.uniform(-2, 51, (30, 45))
    rows[:3] = np.round(rows[:3])  # exact pixel centres: no mask spreads
    cols[:3] = np.round(cols[:3])
    rows[4, :5] = np.nan
    for data in (plane, plane[:1]):
        fast = resample_channel(data, (rows, cols))
        plain = resample_channel(data, (rows, cols), reference=True)
        assert fast.dtype == plain.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(fast), np.isnan(plain))
        np.testing.assert_allclose(fast, plain, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert np.isfinite(plain).sum() > (100 if data.shape[0] > 1 else 0)


def test_resampling_agrees_with_scipy_bilinear_interpolation():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    plane = rng.normal(size=(30, 40)).astype(np.float32)
    rows = rng.uniform(0, 29, (25, 35))
    cols = rng.uniform(0, 39, (25, 35))
    ours = resample_channel(plane, (rows, cols))
    reference = ndimage.map_coordinates(plane.astype(float), [rows, cols], order=1)
    np.testing.assert_allclose(ours, reference, atol=2e-6)
