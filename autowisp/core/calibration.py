"""Calibration numerics: sigma-clipped stacks, photon transfer, calibrated frames.

The calibration of a raw frame I (HATNet/HATPI, as the original pipeline):

    C(I) = (I − O(I) − B0 − (τI / τD0) · D0) / (F0 / ‖F0‖)

Here the dark master is kept as a rate D0/τD0 (ADU/s), so exposure scaling is a product,
and calibrated images are in electrons (ADU × gain). Everything is per pixel of the
mosaic; channel-dependent quantities (gain, flat normalisation) take the channel map
of :mod:`autowisp.core.bayer`.

Bit mask values (:class:`MaskBit`) are OR-ed per pixel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numba
import numpy as np

from autowisp.core.bayer import channel_index_map

__all__ = [
    "MaskBit",
    "StackResult",
    "calibrate_frame",
    "calibrated_error",
    "clipped_stack",
    "measured_saturation",
    "overscan_levels",
    "parse_section",
    "photon_transfer",
    "robust_level",
]


class MaskBit(enum.IntFlag):
    """Why a calibrated pixel should not be trusted (bits of the mask image)."""

    SATURATED = 1
    HOT = 2
    LOW_RESPONSE = 4  # dead or nearly dead pixel in the flat
    BLEED = 8  # next to a saturated pixel
    COSMIC_RAY = 16
    NON_FINITE = 32


@dataclass(frozen=True)
class StackResult:
    """A sigma-clipped median stack.

    ``value`` is the clipped median per pixel, ``error`` its standard error
    (1.2533 σ / sqrt(n used), the median's efficiency for Gaussian noise), ``used`` how
    many frames survived clipping at each pixel.
    """

    value: np.ndarray
    error: np.ndarray
    used: np.ndarray


def measured_saturation(raw: np.ndarray, *, pile_up: int = 3) -> float:
    """The level a raw frame clips at, measured from the frame (for a camera whose header
    gives none): its maximum where at least ``pile_up`` pixels sit exactly on it (the
    cores of saturated stars pile up at the white level; a lone hot pixel does not),
    else the all-ones value of the least bit depth that holds the maximum (2^k − 1:
    nothing in the frame reached saturation, so nothing is flagged)."""
    values = np.asarray(raw)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    if finite.size == 0:
        return 1.0
    top = finite.max()
    if top > 0 and int(np.count_nonzero(finite == top)) >= pile_up:
        return float(top)
    return float(2 ** max(int(np.ceil(top)), 1).bit_length() - 1)


@numba.njit(cache=True, nogil=True)
def _window_median(values: np.ndarray, low: int, high: int) -> float:
    count = high - low
    return 0.5 * (values[low + (count - 1) // 2] + values[low + count // 2])


@numba.njit(cache=True, nogil=True)
def _clipped_columns(data, sigma, iterations, value, error, used):
    """Clipped median of each column of ``data`` (frames, pixels); see clipped_stack."""
    n, pixels = data.shape
    column = np.empty(n, dtype=np.float64)
    for p in range(pixels):
        # Insertion sort: fastest for the few tens of frames of a master.
        for k in range(n):
            item = data[k, p]
            j = k - 1
            while j >= 0 and column[j] > item:
                column[j + 1] = column[j]
                j -= 1
            column[j + 1] = item
        spread = (column[(3 * (n - 1)) // 4] - column[(n - 1) // 4]) / 1.349
        if spread <= 0.0:
            mean = column.mean()
            spread = np.sqrt(np.sum((column - mean) ** 2) / (n - 1))
        low, high = 0, n
        for _ in range(iterations):
            centre = _window_median(column, low, high)
            lower = centre - sigma * spread
            upper = centre + sigma * spread
            new_low = 0
            while new_low < n and column[new_low] < lower:
                new_low += 1
            new_high = n
            while new_high > 0 and column[new_high - 1] > upper:
                new_high -= 1
            if new_high - new_low < 1:
                new_low, new_high = low, high
            count = new_high - new_low
            total = 0.0
            for k in range(new_low, new_high):
                total += column[k]
            mean = total / count
            squares = 0.0
            for k in range(new_low, new_high):
                squares += (column[k] - mean) ** 2
            variance = squares / max(count - 1, 1)
            converged = new_low == low and new_high == high
            low, high = new_low, new_high
            if variance > 0.0:
                spread = np.sqrt(variance)
            if converged:
                break
        count = high - low
        value[p] = _window_median(column, low, high)
        error[p] = 1.2533 * spread / np.sqrt(count)
        used[p] = count


def clipped_stack(stack: np.ndarray, *, sigma: float = 5.0, iterations: int = 3) -> StackResult:
    """Sigma-clipped median along axis 0 of ``stack`` (frames, ...).

    Per pixel (a numba kernel; processes, not threads, give the parallelism, since
    numba's thread pool does not survive the executors' ``fork``): the values are sorted;
    the scatter starts as the interquartile range / 1.349 (robust to the outliers
    being clipped; the plain standard deviation where quantised data give equal
    quartiles); each iteration keeps the values within ``sigma`` scatters of the
    median of the kept values — a contiguous window of the sorted column — and takes
    their standard deviation as the new scatter, until the window stops moving.
    """
    n = stack.shape[0]
    if n < 3:
        raise ValueError(f"a clipped stack needs at least 3 frames, got {n}")
    shape = stack.shape[1:]
    data = np.ascontiguousarray(stack, dtype=np.float32).reshape(n, -1)
    value = np.empty(data.shape[1], dtype=np.float32)
    error = np.empty(data.shape[1], dtype=np.float32)
    used = np.empty(data.shape[1], dtype=np.int16)
    _clipped_columns(data, float(sigma), int(iterations), value, error, used)
    return StackResult(value.reshape(shape), error.reshape(shape), used.reshape(shape))


def _tile_variance(image: np.ndarray, tile: int) -> float:
    """Median over ``tile``×``tile`` blocks of each block's variance: immune to smooth
    gradients across the frame and to the few blocks hit by cosmic rays or hot pixels."""
    ny, nx = (d - d % tile for d in image.shape)
    tiled = image[:ny, :nx].reshape(ny // tile, tile, nx // tile, tile).swapaxes(1, 2)
    blocks = tiled.reshape(-1, tile * tile)
    if blocks.shape[0] == 0:
        raise ValueError(f"image {image.shape} is smaller than one {tile}×{tile} tile")
    return float(np.median(np.var(blocks, axis=1, ddof=1)))


def photon_transfer(
    flat_pair: tuple[np.ndarray, np.ndarray],
    bias_pair: tuple[np.ndarray, np.ndarray],
    *,
    bias_level: np.ndarray | float,
    tile: int = 16,
) -> tuple[float, float]:
    """Gain (e⁻/ADU) and read noise (e⁻) from two flats and two biases of one channel.

    The difference of two frames removes the fixed pattern (bias structure, flat
    field). With the second flat scaled by r = S_a/S_b to the first's level S_a (ADU
    above bias), var(a − r b) = S_a (1 + r)/g + σ_r² (1 + r²) and var(ΔB) = 2 σ_r², so
    g = S_a (1 + r) / (var(a − r b) − σ_r² (1 + r²)). Variances are medians over small
    tiles (see :func:`_tile_variance`).
    """
    a, b = (np.asarray(f, dtype=np.float64) - bias_level for f in flat_pair)
    level_a, level_b = float(np.median(a)), float(np.median(b))
    if level_a <= 0 or level_b <= 0:
        raise ValueError(f"flats must be above the bias level, got {level_a:.1f}, {level_b:.1f}")
    ratio = level_a / level_b
    flat_var = _tile_variance(a - ratio * b, tile)
    read_var = (
        _tile_variance(
            np.asarray(bias_pair[0], np.float64) - np.asarray(bias_pair[1], np.float64), tile
        )
        / 2.0
    )
    signal_var = flat_var - read_var * (1 + ratio**2)
    if signal_var <= 0:
        raise ValueError("flat noise does not exceed read noise: flats too faint to find a gain")
    gain = level_a * (1 + ratio) / signal_var
    return float(gain), float(np.sqrt(read_var) * gain)


def calibrate_frame(
    raw: np.ndarray,
    *,
    exptime: float,
    bias: np.ndarray,
    dark_rate: np.ndarray,
    flat: np.ndarray,
    gain: np.ndarray | float,
    read_noise: np.ndarray | float,
    saturation: float,
    bias_error: np.ndarray | float = 0.0,
    dark_error: np.ndarray | float = 0.0,
    flat_error: np.ndarray | float = 0.0,
    hot: np.ndarray | None = None,
    low_response: float = 0.5,
    overscan: np.ndarray | float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibrated image and its error (both e⁻ per pixel, before the flat) and mask.

    Parameters
    ----------
    raw : (ny, nx) array, ADU.
    exptime : exposure time, s.
    bias, dark_rate : masters, ADU and ADU/s; ``flat`` normalised (median 1 per channel).
    gain : e⁻/ADU, scalar or per pixel; ``read_noise`` e⁻.
    saturation : raw level (ADU) at and above which a pixel is saturated.
    bias_error, dark_error, flat_error : the masters' errors (same units).
    hot : pixels known to be hot (from the dark master), masked.
    low_response : flat values below this are masked as dead or low-response.
    overscan : this frame's overscan level (ADU, per pixel or scalar), removed first; the
        bias master is then the bias pattern above the overscan level.

    One pass of a numba kernel over the frame (the numpy version,
    :func:`_calibrate_reference`, makes some twenty full-frame temporaries: 2.5–4.9 s on
    a 5184×3456 frame, against 0.3 s with float32 masters and Python scalars, whose
    master-only terms the kernel forms too); it follows the reference's arithmetic in
    order and precision, and the two agree bit for bit.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"calibrate_frame needs a 2-D raw frame, got shape {raw.shape}")
    if raw.dtype.kind not in "uif":
        raw = raw.astype(np.float64)
    shape = raw.shape

    def full(value: np.ndarray | float) -> np.ndarray:
        return np.broadcast_to(np.asarray(value), shape)

    image = np.empty(shape, np.float32)
    error = np.empty(shape, np.float32)
    mask = np.empty(shape, np.uint8)
    low = full(np.asarray(flat) < low_response)
    hot_map = full(False) if hot is None else full(np.asarray(hot, bool))
    common = (full(overscan), full(bias), full(flat), float(saturation), hot_map, low)
    if _weak_float32(shape, gain, exptime, read_noise, dark_rate, bias_error, dark_error):
        # The steps' case: the master-only terms in the kernel too, in float32 as numpy
        # computes a float32 master times a Python float.
        _calibrate_pixels32(
            raw, *common, dark_rate, bias_error, dark_error, np.float32(gain),
            np.float32(exptime), float(gain), float(np.square(gain)),
            float(np.square(read_noise)), full(flat_error), image, error, mask,
        )  # fmt: skip
        return image, error, mask
    # Otherwise the master-only terms with numpy's own type promotion, as the reference
    # computes them, and the per-pixel rest in one pass.
    dark_adu = dark_rate * exptime
    dark_e = np.multiply(gain, dark_rate) * exptime
    read_var = np.square(read_noise)
    masters_var = np.square(gain) * (
        np.square(bias_error) + np.square(np.multiply(dark_error, exptime))
    )
    _calibrate_pixels(
        raw, *common, full(dark_adu), full(gain), full(dark_e), full(read_var),
        full(masters_var), full(flat_error), image, error, mask,
    )  # fmt: skip
    return image, error, mask


def _weak_float32(shape, gain, exptime, read_noise, *planes) -> bool:
    """Whether the scalars are Python numbers (numpy casts them to a float32 array's type)
    and the planes float32 frames: the terms can then be formed in the kernel."""
    return all(type(v) in (int, float) for v in (gain, exptime, read_noise)) and all(
        isinstance(p, np.ndarray) and p.dtype == np.float32 and p.shape == shape for p in planes
    )


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _finish_pixel(
    raw, i, j, level, value, f, dark_e, read_var, masters_var, flat_error, saturation, hot,
    low, image_out, error_out, mask_out,
):  # fmt: skip
    """The error and mask of one calibrated pixel and its three outputs: the part both
    calibration kernels share (numpy's operations, order and precision)."""
    ny, nx = raw.shape
    detected = value * f + dark_e
    if not detected > 0.0 and detected == detected:  # np.maximum keeps NaN
        detected = 0.0
    variance = detected + read_var + masters_var
    relative = value * flat_error / f
    sigma = np.sqrt(variance / (f * f) + relative * relative)
    bits = 0
    if level >= saturation:
        bits |= 1  # SATURATED
    elif (
        (i > 0 and np.float64(raw[i - 1, j]) >= saturation)
        or (i < ny - 1 and np.float64(raw[i + 1, j]) >= saturation)
        or (j > 0 and np.float64(raw[i, j - 1]) >= saturation)
        or (j < nx - 1 and np.float64(raw[i, j + 1]) >= saturation)
    ):
        bits |= 8  # BLEED
    if hot:
        bits |= 2  # HOT
    if low:
        bits |= 4  # LOW_RESPONSE
    if not (np.isfinite(value) and np.isfinite(sigma)):
        bits |= 32  # NON_FINITE
        value = 0.0
        sigma = np.inf
    image_out[i, j] = np.float32(value)
    error_out[i, j] = np.float32(sigma)
    mask_out[i, j] = bits


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _calibrate_pixels(
    raw, overscan, bias, flat, saturation, hot, low, dark_adu, gain, dark_e, read_var,
    masters_var, flat_error, image_out, error_out, mask_out,
):  # fmt: skip
    """:func:`_calibrate_reference` pixel by pixel, the master-only terms given: the same
    operations in the same order and precision (float64, the inputs' own precision
    promoted), so the results agree bit for bit (tests/unit/core/test_calibration.py)."""
    ny, nx = raw.shape
    for i in range(ny):
        for j in range(nx):
            f = flat[i, j]
            level = np.float64(raw[i, j])
            value = (level - overscan[i, j] - bias[i, j] - dark_adu[i, j]) * gain[i, j] / f
            _finish_pixel(raw, i, j, level, value, f, dark_e[i, j], read_var[i, j],
                          masters_var[i, j], flat_error[i, j], saturation, hot[i, j],
                          low[i, j], image_out, error_out, mask_out)  # fmt: skip


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _calibrate_pixels32(
    raw, overscan, bias, flat, saturation, hot, low, dark_rate, bias_error, dark_error,
    gain32, exptime32, gain, gain2, read_var, flat_error, image_out, error_out, mask_out,
):  # fmt: skip
    """:func:`_calibrate_pixels` with the master-only terms formed here as numpy forms
    them from float32 masters and Python scalars: ``dark_rate · t`` and
    ``g · dark_rate · t`` in float32, ``g² · (σB² + (σD t)²)`` a float64 g² times a
    float32 sum."""
    ny, nx = raw.shape
    for i in range(ny):
        for j in range(nx):
            f = flat[i, j]
            rate = dark_rate[i, j]
            dark_adu = rate * exptime32
            dark_e = (gain32 * rate) * exptime32
            dark_sigma = dark_error[i, j] * exptime32
            masters_var = gain2 * (bias_error[i, j] * bias_error[i, j] + dark_sigma * dark_sigma)
            level = np.float64(raw[i, j])
            value = (level - overscan[i, j] - bias[i, j] - dark_adu) * gain / f
            _finish_pixel(raw, i, j, level, value, f, dark_e, read_var, masters_var,
                          flat_error[i, j], saturation, hot[i, j], low[i, j], image_out,
                          error_out, mask_out)  # fmt: skip


def _calibrate_reference(
    raw: np.ndarray,
    *,
    exptime: float,
    bias: np.ndarray,
    dark_rate: np.ndarray,
    flat: np.ndarray,
    gain: np.ndarray | float,
    read_noise: np.ndarray | float,
    saturation: float,
    bias_error: np.ndarray | float = 0.0,
    dark_error: np.ndarray | float = 0.0,
    flat_error: np.ndarray | float = 0.0,
    hot: np.ndarray | None = None,
    low_response: float = 0.5,
    overscan: np.ndarray | float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`calibrate_frame` in numpy, plane by plane: the definition the kernel follows."""
    raw = np.asarray(raw, dtype=np.float64)
    signal_adu = raw - overscan - bias - dark_rate * exptime
    with np.errstate(divide="ignore", invalid="ignore"):
        image = signal_adu * gain / flat
    error = _error_reference(
        image,
        exptime=exptime,
        dark_rate=dark_rate,
        flat=flat,
        gain=gain,
        read_noise=read_noise,
        bias_error=bias_error,
        dark_error=dark_error,
        flat_error=flat_error,
    )
    mask = np.zeros(raw.shape, dtype=np.uint8)
    saturated = raw >= saturation
    mask[saturated] |= np.uint8(MaskBit.SATURATED)
    if saturated.any():
        grown = np.zeros_like(saturated)
        grown[1:, :] |= saturated[:-1, :]
        grown[:-1, :] |= saturated[1:, :]
        grown[:, 1:] |= saturated[:, :-1]
        grown[:, :-1] |= saturated[:, 1:]
        mask[grown & ~saturated] |= np.uint8(MaskBit.BLEED)
    if hot is not None:
        mask[hot] |= np.uint8(MaskBit.HOT)
    mask[flat < low_response] |= np.uint8(MaskBit.LOW_RESPONSE)
    bad = ~np.isfinite(image) | ~np.isfinite(error)
    mask[bad] |= np.uint8(MaskBit.NON_FINITE)
    image[bad] = 0.0
    error[bad] = np.inf
    return image.astype(np.float32), error.astype(np.float32), mask


def calibrated_error(
    image: np.ndarray,
    *,
    exptime: float,
    dark_rate: np.ndarray | float,
    flat: np.ndarray | float,
    gain: np.ndarray | float,
    read_noise: np.ndarray | float,
    bias_error: np.ndarray | float = 0.0,
    dark_error: np.ndarray | float = 0.0,
    flat_error: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Error (e⁻, float64) of a calibrated image, from the image itself and the masters.

    The variance is the Poisson noise of every detected electron (light and dark
    current: ``image · flat + gain · dark_rate · exptime``, i.e. (I − O − B0)·g, floored
    at 0), the read noise and the masters' errors, divided by the flat, plus the flat's
    error. It depends on the raw frame only through the calibrated image, so a product
    that stores the image, names its masters and records gain, read noise and exposure
    time need not store the error (:mod:`autowisp.io.products`). Units as
    :func:`calibrate_frame`; non-finite where the flat is 0.

    A 2-D image takes one pass of a numba kernel that does the per-pixel arithmetic of
    :func:`_error_reference` in its order and precisions, so the two agree bit for bit
    (a test holds them to it): with float32 masters and Python scalars (the reader's
    case) the kernel forms the master-only terms too, in numpy's types; otherwise numpy
    forms them first.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        return _error_reference(
            image, exptime=exptime, dark_rate=dark_rate, flat=flat, gain=gain,
            read_noise=read_noise, bias_error=bias_error, dark_error=dark_error,
            flat_error=flat_error,
        )  # fmt: skip
    shape = image.shape
    out = np.empty(shape, dtype=np.float64)
    if _weak_float32(shape, gain, exptime, read_noise, dark_rate, bias_error, dark_error):
        _error_pixels32(
            image, np.broadcast_to(np.asarray(flat), shape), dark_rate, bias_error,
            dark_error, np.float32(gain), np.float32(exptime), float(np.square(gain)),
            float(np.square(read_noise)), np.broadcast_to(np.asarray(flat_error), shape), out,
        )  # fmt: skip
        return out
    # The terms that do not depend on the image, as numpy types them (a Python float
    # times a float32 master stays float32); broadcast, not copied, to the image's shape.
    dark_e = np.multiply(gain, dark_rate) * exptime
    read_var = np.square(read_noise)
    masters_var = np.square(gain) * (
        np.square(bias_error) + np.square(np.multiply(dark_error, exptime))
    )
    _error_pixels(
        image,
        np.broadcast_to(np.asarray(flat), shape),
        np.broadcast_to(np.asarray(dark_e), shape),
        np.broadcast_to(np.asarray(read_var), shape),
        np.broadcast_to(np.asarray(masters_var), shape),
        np.broadcast_to(np.asarray(flat_error), shape),
        out,
    )
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _error_pixels(image, flat, dark_e, read_var, masters_var, flat_error, out):
    """:func:`_error_reference` pixel by pixel, into ``out`` (see calibrated_error)."""
    ny, nx = image.shape
    for i in range(ny):
        for j in range(nx):
            value = image[i, j]
            f = flat[i, j]
            detected = value * f + dark_e[i, j]
            if not detected > 0.0 and detected == detected:  # np.maximum keeps NaN
                detected = 0.0
            variance = detected + read_var[i, j] + masters_var[i, j]
            relative = value * flat_error[i, j] / f
            out[i, j] = np.sqrt(variance / (f * f) + relative * relative)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _error_pixels32(
    image, flat, dark_rate, bias_error, dark_error, gain32, exptime32, gain2, read_var,
    flat_error, out,
):  # fmt: skip
    """:func:`_error_pixels` with the master-only terms formed as in
    :func:`_calibrate_pixels32`."""
    ny, nx = image.shape
    for i in range(ny):
        for j in range(nx):
            dark_e = (gain32 * dark_rate[i, j]) * exptime32
            dark_sigma = dark_error[i, j] * exptime32
            masters_var = gain2 * (bias_error[i, j] * bias_error[i, j] + dark_sigma * dark_sigma)
            value = image[i, j]
            f = flat[i, j]
            detected = value * f + dark_e
            if not detected > 0.0 and detected == detected:  # np.maximum keeps NaN
                detected = 0.0
            variance = detected + read_var + masters_var
            relative = value * flat_error[i, j] / f
            out[i, j] = np.sqrt(variance / (f * f) + relative * relative)


def _error_reference(
    image: np.ndarray,
    *,
    exptime: float,
    dark_rate: np.ndarray | float,
    flat: np.ndarray | float,
    gain: np.ndarray | float,
    read_noise: np.ndarray | float,
    bias_error: np.ndarray | float = 0.0,
    dark_error: np.ndarray | float = 0.0,
    flat_error: np.ndarray | float = 0.0,
) -> np.ndarray:
    """:func:`calibrated_error` in numpy (any shape): the definition the kernel follows."""
    image = np.asarray(image, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        detected = np.maximum(image * flat + np.multiply(gain, dark_rate) * exptime, 0.0)
        variance_e = (
            detected
            + np.square(read_noise)
            + np.square(gain)
            * (np.square(bias_error) + np.square(np.multiply(dark_error, exptime)))
        )
        return np.sqrt(variance_e / np.square(flat) + np.square(image * flat_error / flat))


def parse_section(text: str) -> tuple[slice, slice]:
    """A FITS/IRAF section ``[x1:x2,y1:y2]`` (1-based, inclusive) as numpy (rows, columns)
    slices. Raises ``ValueError`` naming the text when it is not one."""
    body = str(text).strip()
    try:
        if not (body.startswith("[") and body.endswith("]")):
            raise ValueError
        columns, rows = body[1:-1].split(",")
        x1, x2 = (int(v) for v in columns.split(":"))
        y1, y2 = (int(v) for v in rows.split(":"))
    except ValueError:
        raise ValueError(f"not a FITS section [x1:x2,y1:y2]: {text!r}") from None
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        raise ValueError(f"empty or reversed section: {text!r}")
    return slice(y1 - 1, y2), slice(x1 - 1, x2)


def overscan_levels(raw: np.ndarray, biassec: tuple[slice, slice], layout: str) -> np.ndarray:
    """Bias level of each mosaic channel in the overscan region, ADU: a full-frame map
    holding every pixel's channel level (the clipped mean of that channel's overscan pixels).

    Channels follow the frame's own pixel parity (``layout`` is ``image[0:2, 0:2]``).
    """
    raw = np.asarray(raw)
    region = np.zeros(raw.shape, bool)
    region[biassec] = True
    if not region.any():
        raise ValueError("the overscan section lies outside the frame")
    index = channel_index_map(layout, raw.shape)
    levels = np.zeros(raw.shape, dtype=np.float64)
    for channel in np.unique(index):
        inside = region & (index == channel)
        if not inside.any():
            raise ValueError(f"the overscan section holds no pixel of channel {channel}")
        levels[index == channel] = robust_level(raw[inside])
    return levels


def robust_level(values: np.ndarray, clip: float = 5.0) -> float:
    """Mean of ``values`` within ``clip`` robust σ of their median: unlike the median of
    quantised ADU, it is not rounded to half an ADU, and a hit pixel does not move it."""
    values = np.asarray(values, dtype=np.float64).ravel()
    centre = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - centre)))
    if spread == 0:
        return float(np.mean(values))
    return float(np.mean(values[np.abs(values - centre) <= clip * spread]))
