"""Calibration numerics against plain references and the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest

from autowisp.core.bayer import channel_index_map
from autowisp.core.calibration import MaskBit, calibrate_frame, clipped_stack, photon_transfer
from autowisp.simulate.camera import CameraSpec, Scene, expose, make_detector


def _reference_clipped(column: np.ndarray, sigma: float, iterations: int) -> tuple[float, int]:
    """The same algorithm, one pixel at a time with plain numpy."""
    values = np.sort(column.astype(np.float32))
    n = values.size
    keep = np.ones(n, bool)
    spread = (float(values[(3 * (n - 1)) // 4]) - float(values[(n - 1) // 4])) / 1.349
    if spread <= 0:
        spread = float(np.std(values.astype(np.float64), ddof=1))
    for _ in range(iterations):
        kept = values[keep]
        centre = 0.5 * (float(kept[(kept.size - 1) // 2]) + float(kept[kept.size // 2]))
        new = (values >= np.float32(centre - sigma * spread)) & (
            values <= np.float32(centre + sigma * spread)
        )
        if not new.any():
            new = keep
        done = np.array_equal(new, keep)
        keep = new
        if keep.sum() > 1 and np.std(values[keep].astype(np.float64)) > 0:
            spread = float(np.std(values[keep].astype(np.float64), ddof=1))
        if done:
            break
    kept = values[keep]
    return 0.5 * (float(kept[(kept.size - 1) // 2]) + float(kept[kept.size // 2])), int(keep.sum())


def test_clipped_stack_matches_the_reference():
    rng = np.random.default_rng(0)
    stack = rng.normal(1000, 10, (15, 20, 30)).astype(np.float32)
    stack[3, :5] += 5000  # cosmic rays / satellites in one frame
    stack[7, 10:, :4] -= 300
    result = clipped_stack(stack, sigma=5.0, iterations=3)
    for y in range(20):
        for x in range(30):
            value, used = _reference_clipped(stack[:, y, x], 5.0, 3)
            assert result.value[y, x] == pytest.approx(value, abs=1e-3)
            assert result.used[y, x] == used


def test_clipped_stack_rejects_outliers_and_reports_its_error():
    rng = np.random.default_rng(1)
    truth = rng.uniform(500, 1500, (200, 200))
    stack = truth + rng.normal(0, 8, (20, 200, 200))
    hits = rng.random(stack.shape) < 0.01
    stack[hits] += rng.uniform(200, 5000, hits.sum())
    result = clipped_stack(stack)
    pull = (result.value - truth) / result.error
    assert abs(np.mean(pull)) < 0.05
    assert 0.9 < np.std(pull) < 1.1
    # Every hit (25σ and more) is clipped; a good value goes with it only where the scatter
    # of 17-20 values, itself uncertain by ~17 %, puts it past 5σ (0.15 % of pixels here).
    expected = 20 - hits.sum(axis=0)
    assert np.all(result.used <= expected)
    assert np.mean(result.used == expected) > 0.995


def _detector(seed=3, width=256, height=192, dark_current=0.04):
    spec = CameraSpec(
        width=width, height=height, gain=1.55, read_noise=6.5, dark_current=dark_current
    )
    return make_detector(spec, np.random.default_rng(seed))


def _scene(detector, exptime, sky, stars=None):
    empty = np.zeros(0)
    if stars is None:
        return Scene(exptime, empty, empty, np.zeros((0, 3)), empty, empty, empty, empty, sky)
    return stars


def test_photon_transfer_recovers_gain_and_read_noise():
    detector = _detector(width=512, height=512)  # 256 tiles per channel: ~1 % precision
    rng = np.random.default_rng(4)
    level = np.full(detector.spec.shape, 12000.0)
    flats = [
        expose(detector, _scene(detector, 2.0, level * f), rng, cosmic_rays=False).raw
        for f in (1.0, 0.9)
    ]
    biases = [
        expose(detector, _scene(detector, 0.0, level * 0), rng, cosmic_rays=False).raw
        for _ in range(2)
    ]
    index = channel_index_map("RGGB", detector.spec.shape)
    gains = []
    for channel in range(4):
        rows, cols = np.nonzero(index == channel)
        view = np.s_[rows.min() :: 2, cols.min() :: 2]
        gain, read_noise = photon_transfer(
            (flats[0][view], flats[1][view]),
            (biases[0][view], biases[1][view]),
            bias_level=detector.bias[view],
        )
        gains.append(gain)
        assert gain == pytest.approx(detector.spec.gain, rel=0.03)
        assert read_noise == pytest.approx(detector.spec.read_noise, rel=0.04)
    assert np.mean(gains) == pytest.approx(detector.spec.gain, rel=0.015)


@pytest.mark.parametrize(
    ("dark_exptime", "dark_current"),
    [(120.0, 0.04), (30.0, 2.0)],  # the second: darks 4x shorter than the light, 240 e-
)
def test_calibrated_frame_matches_truth_within_its_errors(dark_exptime, dark_current):
    detector = _detector(dark_current=dark_current)
    spec = detector.spec
    rng = np.random.default_rng(5)
    ny, nx = spec.shape
    zero = np.zeros(spec.shape)
    biases = np.array(
        [expose(detector, _scene(detector, 0.0, zero), rng).raw for _ in range(15)],
        dtype=np.float32,
    )
    bias = clipped_stack(biases)
    darks = np.array(
        [expose(detector, _scene(detector, dark_exptime, zero), rng).raw for _ in range(15)],
        dtype=np.float32,
    )
    dark = clipped_stack((darks - bias.value) / dark_exptime)
    # As master_dark does: the master bias's error is common to all darks.
    dark_error = np.hypot(dark.error, bias.error / dark_exptime)
    index = channel_index_map("RGGB", spec.shape)
    flats = []
    for level in rng.uniform(15000, 20000, 20):
        raw = expose(
            detector, _scene(detector, 2.0, np.full(spec.shape, level)), rng, cosmic_rays=False
        ).raw
        frame = raw - bias.value - dark.value * 2.0
        for c in range(4):
            frame[index == c] /= np.median(frame[index == c])
        flats.append(frame)
    flat = clipped_stack(np.array(flats, dtype=np.float32))
    normalised = flat.value.copy()
    for c in range(4):
        normalised[index == c] /= np.median(flat.value[index == c])
    # An object frame: a few stars on a sky with a gradient.
    n = 40
    scene = Scene(
        120.0,
        rng.uniform(5, nx - 5, n),
        rng.uniform(5, ny - 5, n),
        rng.uniform(2e3, 2e5, (n, 3)),
        np.full(n, 2.4),
        np.full(n, 2.0),
        rng.uniform(0, 3, n),
        np.zeros(n),
        300.0 * (1 + 0.1 * np.linspace(0, 1, nx))[None, :] * np.ones((ny, 1)),
    )
    exposure = expose(detector, scene, rng)
    image, error, mask = calibrate_frame(
        exposure.raw,
        exptime=120.0,
        bias=bias.value,
        dark_rate=dark.value,
        flat=normalised,
        gain=spec.gain,
        read_noise=spec.read_noise,
        saturation=spec.saturation_adu,
        bias_error=bias.error,
        dark_error=dark_error,
        flat_error=flat.error,
        hot=detector.hot,
    )
    # Truth before the instrument: stars and sky in e⁻, scaled like the normalised flat.
    pre_flat = (exposure.mean - detector.dark_rate * 120.0) / detector.flat
    scale = np.zeros(spec.shape)
    for c in range(4):
        scale[index == c] = np.median(detector.flat[index == c])
    truth = pre_flat * scale
    good = mask == 0
    hit = np.zeros(spec.shape, bool)
    hit[exposure.cosmic_rays[:, 1].astype(int), exposure.cosmic_rays[:, 0].astype(int)] = True
    good &= ~hit  # calibrate_frame does not look for hits (the step does): leave them out
    pull = ((image - truth) / error)[good]
    assert abs(np.mean(pull)) < 0.05
    assert 0.9 < np.std(pull) < 1.1
    # Hot pixels and dead pixels are flagged.
    assert np.all(mask[detector.hot] & MaskBit.HOT)
    assert np.all(mask[detector.dead] & MaskBit.LOW_RESPONSE)


def _kernel_cases():
    """Inputs for the calibration kernels: float32 masters and Python scalars as the steps
    pass them (the kernels' float32 path), float64 planes as an uncalibrated frame passes,
    numpy scalars, per-pixel gain and overscan, and the pixels
    where things go wrong (a zero, NaN or negative flat, non-finite raw values)."""
    rng = np.random.default_rng(11)
    shape = (37, 52)
    raw = rng.integers(1900, 4200, shape).astype(np.uint16)
    raw[3, 4:9] = 4095  # saturated, with their bleed
    raw[-1, -1] = raw[0, 0] = 4095  # at the corners
    f32 = np.float32
    flat = rng.normal(1.0, 0.05, shape).astype(f32)
    flat[7, :4] = [0.0, np.nan, 0.3, -1.0]
    masters = dict(
        exptime=120.0, bias=rng.normal(2048, 2, shape).astype(f32),
        dark_rate=np.abs(rng.normal(0.01, 0.003, shape)).astype(f32), flat=flat,
        gain=1.7, read_noise=3.2, saturation=4095.0,
        bias_error=np.abs(rng.normal(0.3, 0.05, shape)).astype(f32),
        dark_error=np.abs(rng.normal(1e-3, 2e-4, shape)).astype(f32),
        flat_error=np.abs(rng.normal(1e-3, 2e-4, shape)).astype(f32),
        hot=rng.random(shape) < 0.01,
    )  # fmt: skip
    floats = rng.normal(2100.0, 40.0, shape)
    floats[9, :3] = [np.nan, np.inf, -np.inf]
    yield raw, masters
    yield raw, dict(masters, gain=np.full(shape, 1.3), overscan=np.full(shape, 3.5), hot=None)
    yield floats, dict(masters, saturation=2150.0, low_response=0.3)
    yield raw, dict(exptime=30.0, bias=np.full(shape, 2048.0), dark_rate=np.zeros(shape),
                    flat=np.ones(shape), gain=1.0, read_noise=0.0, saturation=3000.0)  # fmt: skip
    # numpy scalars are not cast to a float32 master's type as Python floats are
    yield raw, dict(masters, gain=np.float64(1.7), exptime=np.float32(120.0))


@pytest.mark.parametrize("case", range(5))
def test_calibrate_frame_kernel_matches_the_numpy_reference_bit_for_bit(case):
    from autowisp.core.calibration import _calibrate_reference

    raw, parameters = list(_kernel_cases())[case]
    with np.errstate(invalid="ignore", over="ignore"):
        expected = _calibrate_reference(raw, **parameters)
    for got, want in zip(calibrate_frame(raw, **parameters), expected, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", range(5))
def test_calibrated_error_kernel_matches_the_numpy_reference_bit_for_bit(case):
    from autowisp.core.calibration import _error_reference, calibrated_error

    raw, parameters = list(_kernel_cases())[case]
    image, _, _ = calibrate_frame(raw, **parameters)
    names = ("exptime", "dark_rate", "flat", "gain", "read_noise", "bias_error",
             "dark_error", "flat_error")  # fmt: skip
    given = {k: parameters[k] for k in names if k in parameters}
    with np.errstate(invalid="ignore"):
        expected = _error_reference(image, **given)
    got = calibrated_error(image, **given)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_measured_saturation_from_the_frame():
    from autowisp.core.calibration import measured_saturation

    rng = np.random.default_rng(4)
    frame = rng.normal(300, 10, (64, 64)).astype(np.uint16)
    # Nothing saturated in a 12-bit frame: the all-ones value above its maximum, so no
    # pixel of it is flagged.
    frame[10, 10] = 3000
    assert measured_saturation(frame) == 4095
    assert np.count_nonzero(frame >= measured_saturation(frame)) == 0
    # A lone hot pixel at the top is no plateau.
    frame[20, 20] = 4095
    assert measured_saturation(frame) == 4095
    # A saturated star's core piles up at the white level, below the container's range
    # (a DSLR clipping at 15,000 of its 14 bits).
    frame[30:33, 30:33] = 15000
    assert measured_saturation(frame) == 15000
    assert np.count_nonzero(frame >= measured_saturation(frame)) == 9
    assert measured_saturation(np.full((4, 4), np.nan)) == 1.0
