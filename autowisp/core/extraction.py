"""Background map and source extraction on a (calibrated) mosaic frame, with sep.

Measured on the PANOPTES RGGB frame against Gaia (see ``benchmarks/bench_astrometry.py``):
extracting on the full-resolution mosaic after a per-channel background subtraction and
refining positions with sep's windowed centroid gives 0.30 px RMS against a TAN-SIP fit
to Gaia, where 2×2 super-pixel sums give 0.72 px (binning throws the sub-pixel
information of the undersampled cores away). So the background is per channel (each
colour has its own sky level and response) and detection and centroids are on the full
grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import sep

from autowisp.core.bayer import channels

__all__ = ["Sources", "background_map", "colour_normalised_centroids", "extract_sources"]


@dataclass(frozen=True)
class Sources:
    """Sources found in a frame, brightest first.

    Attributes
    ----------
    x, y : ndarray
        Windowed centroids, 0-based pixels of the full frame.
    flux : ndarray
        Sum over the isophotal footprint of the residual in units of its local noise,
        times the frame's typical noise: image units where the noise is uniform, and
        the order of brightness that matching needs.
    peak : ndarray
        Highest pixel of the same.
    fwhm : ndarray
        FWHM from the second moments, px.
    flags : ndarray
        sep extraction flags (blended, truncated at the edge, ...), plus :data:`MASKED`
        where a masked pixel lies within one pixel of the source's peak.
    background_rms : float
        Median RMS of the background, image units.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    peak: np.ndarray
    fwhm: np.ndarray
    flags: np.ndarray
    background_rms: float

    def __len__(self) -> int:
        return int(self.x.size)


#: Flag added to a source with a masked or saturated pixel within a pixel of its peak.
MASKED = 256


def background_map(
    image: np.ndarray, layout: str, *, mask: np.ndarray | None = None, box: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth background and its RMS, per channel of ``layout``, on the full grid.

    ``box`` is the mesh size in pixels of a channel's sub-image.
    """
    image = np.asarray(image, dtype=np.float32)
    back = np.empty_like(image)
    rms = np.empty_like(image)
    for channel in channels(layout):
        plane = np.ascontiguousarray(channel.view(image))
        plane_mask = None if mask is None else np.ascontiguousarray(channel.view(mask) != 0)
        size = max(8, min(box, *plane.shape))
        model = sep.Background(plane, mask=plane_mask, bw=size, bh=size, fw=3, fh=3)
        channel.view(back)[...] = model.back()
        channel.view(rms)[...] = model.rms()
    return back, rms


def extract_sources(
    image: np.ndarray,
    layout: str,
    *,
    mask: np.ndarray | None = None,
    saturated: np.ndarray | None = None,
    threshold: float = 5.0,
    min_area: int = 5,
    box: int = 64,
    max_sources: int = 20000,
    max_windowed: int = 8000,
    deblend_contrast: float = 0.005,
) -> Sources:
    """Detect sources ``threshold`` σ above the per-channel background.

    Parameters
    ----------
    image : (ny, nx) ndarray
        The frame (electrons or ADU, bias removed or not: the background takes it out).
    layout : str
        Bayer layout of the mosaic (``"MONO"`` for a monochrome sensor).
    mask : ndarray, optional
        Non-zero where pixels are bad (hot, dead, cosmic-ray hits): left out of the
        background and of detection; sources next to them are flagged :data:`MASKED`.
    saturated : ndarray, optional
        True where pixels are saturated (or bled into). They still belong to their star
        (a hole in the middle would split it), but sources on them are flagged
        :data:`MASKED` and do not set the centroid window.
    threshold : float
        Detection threshold in units of the local background RMS.
    min_area : int
        Minimum number of connected pixels above the threshold.
    max_sources : int
        Keep at most this many, the brightest.
    max_windowed : int
        Refine the positions of this many of the brightest with windowed centroids.
    deblend_contrast : float
        sep's ``deblend_cont``: a blend's branch is its own source when it holds this
        fraction of the blend's flux. On a crowded deep stack the 5σ footprints join
        into islands of many stars, whose total flux makes sep's default (0.005) drop
        stars of 10 % of a neighbour's flux.
    """
    # Single precision throughout (a full frame's float64 copies took 1 GB): ample for
    # pixel values and for centroids to a thousandth of a pixel.
    data = np.asarray(image, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"source extraction needs a 2-D image, got shape {data.shape}")
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= np.asarray(mask) != 0
    flat_top = np.zeros(data.shape, bool) if saturated is None else np.asarray(saturated, bool)
    bad &= ~flat_top
    if bad.any():
        data = np.where(bad, np.float32(0.0), data)
    back, rms = background_map(data, layout, mask=bad | flat_top, box=box)
    residual = np.subtract(data, back, out=back)  # the background is not needed again
    residual[bad] = 0.0
    typical_rms = float(
        np.median(rms[:: max(1, rms.shape[0] // 64), :: max(1, rms.shape[1] // 64)])
    )
    rms[~(np.isfinite(rms) & (rms > 0))] = typical_rms
    # Detection on the residual in units of its local noise (one threshold for every
    # channel, as an error map would give, at half sep's cost with a map).
    significance = np.divide(residual, rms, out=rms)
    del rms
    sep.set_extract_pixstack(max(300_000, data.size // 10))
    sep.set_sub_object_limit(4096)
    sep_mask = bad if bad.any() else None
    found = sep.extract(
        significance,
        threshold,
        err=1.0,
        mask=sep_mask,
        minarea=min_area,
        segmentation_map=False,
        # sep's cleaning (merging faint detections into bright neighbours' wings) costs
        # 90 % of the time on a crowded full frame (22 s of 24 s); spurious wing
        # detections match no catalogue star and do not harm the solution.
        clean=False,
        deblend_cont=deblend_contrast,
    )
    del significance
    if found.size == 0:
        return _empty(typical_rms)
    order = np.argsort(-found["flux"], kind="stable")[:max_sources]
    found = found[order]
    sigma = np.sqrt(np.maximum((found["a"] ** 2 + found["b"] ** 2) / 2.0, 0.0))
    fwhm = 2.3548 * sigma
    # The window of the windowed centroid: the PSF's own sigma, from the bright
    # unsaturated sources.
    touched = _near(flat_top | bad, found["x"], found["y"])
    bright = (found["flux"] > 20 * threshold) & ~touched & (found["flag"] == 0)
    psf_sigma = float(np.median(sigma[bright])) if bright.sum() >= 5 else float(np.median(sigma))
    # Windowed centroids for the brightest (astrometry's stars are among them); the
    # faint rest keep their isophotal barycentres.
    refined = min(found.size, max_windowed)
    window = np.full(refined, np.clip(psf_sigma, 0.7, 5.0))
    x, y = found["x"].astype(float), found["y"].astype(float)
    wx, wy, win_flags = sep.winpos(residual, x[:refined], y[:refined], window, mask=sep_mask)
    diverged = np.ones(found.size, bool)
    diverged[:refined] = (win_flags != 0) | (
        np.hypot(wx - x[:refined], wy - y[:refined]) > 2.0 * window
    )
    x[:refined] = np.where(diverged[:refined], x[:refined], wx)
    y[:refined] = np.where(diverged[:refined], y[:refined], wy)
    # (The isophotal barycentre is worse for saturated stars too: 1–2 px off Gaia on
    # the PANOPTES frame against 0.5 px for the windowed centroid.)
    flags = np.where(touched, found["flag"].astype(np.int32) | MASKED, found["flag"])
    return Sources(
        x=np.asarray(x, float),
        y=np.asarray(y, float),
        flux=found["flux"].astype(float) * typical_rms,
        peak=found["peak"].astype(float) * typical_rms,
        fwhm=fwhm.astype(float),
        flags=flags.astype(np.int32),
        background_rms=typical_rms,
    )


def _near(pixels: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether any of ``pixels`` lies within one pixel of each position."""
    if not pixels.any():
        return np.zeros(np.shape(x), bool)
    ny, nx = pixels.shape
    near = np.zeros(np.shape(x), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy = np.clip(np.rint(y).astype(int) + dy, 0, ny - 1)
            xx = np.clip(np.rint(x).astype(int) + dx, 0, nx - 1)
            near |= pixels[yy, xx]
    return near


def _empty(background_rms: float) -> Sources:
    empty = np.zeros(0)
    return Sources(empty, empty, empty, empty, empty, np.zeros(0, np.int32), background_rms)


def colour_normalised_centroids(
    image: np.ndarray,
    layout: str,
    x: np.ndarray,
    y: np.ndarray,
    sigma: float,
    *,
    iterations: int = 8,
    mask: np.ndarray | None = None,
    reference: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windowed centroids of stars on a mosaic, each channel scaled by the star's share.

    On a Bayer mosaic a star's light reaches each channel times its colour's response, so
    a plain centroid is pulled toward the channel its colour favours (0.04 px on a
    mosaic whose channels differ by 40 %). Here each star's channels are first scaled to
    equal mean level over its window, from its own pixels, then the Gaussian-windowed
    centroid (sep's ``winpos``: window ``sigma``) is iterated from ``(x, y)``.

    Returns ``x, y`` and a flag per star: 0, or 1 where the star is off the frame, had no
    positive signal in a channel, or moved by more than ``2 sigma`` (its input position is
    kept then); near the edge the window uses the pixels on the frame. ``image`` has its
    background removed; ``mask`` marks pixels to leave out (non-zero). ``reference``
    runs the plain numpy implementation (chunks of stars) instead of the compiled kernel
    (a star at a time: 73,000 stars of a full frame in well under a second instead of
    11 s), which the tests hold to it.
    """
    data = np.asarray(image)
    ny, nx = data.shape
    x = np.asarray(x, dtype=float).copy()
    y = np.asarray(y, dtype=float).copy()
    half = int(np.ceil(4 * sigma)) + 1
    offsets = np.arange(-half, half + 1)
    found = channels(layout)
    # The channel of pixel (row, column) from the parities (one channel for MONO).
    lookup = np.zeros((2, 2), np.intp)
    for index, channel in enumerate(found):
        lookup[channel.y0 :: channel.step, channel.x0 :: channel.step] = index
    bad = None if mask is None else np.asarray(mask) != 0
    flags = np.zeros(x.size, np.int32)
    col0 = np.rint(np.nan_to_num(x)).astype(int)
    row0 = np.rint(np.nan_to_num(y)).astype(int)
    # A window reaching beyond the frame uses the pixels it has; a star off the frame
    # is flagged.
    finite = np.isfinite(x) & np.isfinite(y)
    off = ~finite
    off[finite] = (x[finite] < 0) | (x[finite] > nx - 1) | (y[finite] < 0) | (y[finite] > ny - 1)
    flags[off] = 1
    inside = np.flatnonzero(~off)
    if not reference:  # the compiled kernel (the numpy one below is its reference)
        values = np.ascontiguousarray(data, dtype=np.float64)
        excluded = (
            np.zeros((1, 1), np.uint8) if bad is None else np.ascontiguousarray(bad, np.uint8)
        )
        cx, cy, ok = x.copy(), y.copy(), np.zeros(x.size, np.bool_)
        _colour_centroids_kernel(values, excluded, bad is not None, lookup, x, y, inside,
                                 float(sigma), half, len(found), int(iterations), cx, cy,
                                 ok)  # fmt: skip
        flags[inside[~ok[inside]]] = 1
        good = inside[ok[inside]]
        x[good], y[good] = cx[good], cy[good]
        return x, y, flags
    for start in range(0, inside.size, _CENTROID_CHUNK):
        chunk = inside[start : start + _CENTROID_CHUNK]
        rows = row0[chunk, None, None] + offsets[None, :, None]
        cols = col0[chunk, None, None] + offsets[None, None, :]
        on_frame = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
        rows = np.clip(rows, 0, ny - 1)
        cols = np.clip(cols, 0, nx - 1)
        values = data[rows, cols].astype(np.float64)
        valid = np.isfinite(values) & on_frame
        if bad is not None:
            valid &= ~bad[rows, cols]
        stamps = np.where(valid, values, 0.0)
        which = lookup[rows % 2, cols % 2]
        cx, cy, ok = _colour_centroid_chunk(
            stamps, valid, which, rows, cols, x[chunk], y[chunk], sigma, len(found), iterations
        )
        flags[chunk[~ok]] = 1
        x[chunk[ok]] = cx[ok]
        y[chunk[ok]] = cy[ok]
    return x, y, flags


#: Stars per batch of :func:`colour_normalised_centroids` (bounds its memory: ~40 MB).
_CENTROID_CHUNK = 2048


def _colour_centroid_chunk(stamps, valid, which, rows, cols, x0, y0, sigma, n_channels,
                           iterations):  # fmt: skip
    px = cols.astype(float)
    py = rows.astype(float)
    cx, cy = x0.copy(), y0.copy()
    n_stars = stamps.shape[0]
    star_index = np.arange(n_stars)[:, None, None]
    positive = np.ones(n_stars, bool)
    for _ in range(iterations):
        dx = px - cx[:, None, None]
        dy = py - cy[:, None, None]
        window = np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) * valid
        # Each channel's amplitude: the PSF-matched filter over the channel's pixels
        # (unbiased by where the pixel grid samples the star), as a share of the mean.
        level = np.zeros((n_stars, n_channels))
        for c in range(n_channels):
            model = window * (which == c)
            level[:, c] = (model * stamps).sum(axis=(1, 2)) / np.maximum(
                (model * model).sum(axis=(1, 2)), 1e-12
            )
        positive = np.all(level > 0, axis=1)
        mean_level = level.mean(axis=1, keepdims=True)
        scale = np.where(positive[:, None], mean_level / np.where(level > 0, level, 1.0), 1.0)
        normalised = stamps * scale[star_index, which]
        total = (window * normalised).sum(axis=(1, 2))
        ok = total > 0
        step_x = 2 * (window * normalised * dx).sum(axis=(1, 2)) / np.where(ok, total, 1.0)
        step_y = 2 * (window * normalised * dy).sum(axis=(1, 2)) / np.where(ok, total, 1.0)
        cx = np.where(ok, cx + step_x, cx)
        cy = np.where(ok, cy + step_y, cy)
    moved = np.hypot(cx - x0, cy - y0)
    good = positive & (moved <= 2 * sigma) & np.isfinite(cx) & np.isfinite(cy)
    return cx, cy, good


@numba.njit(cache=True, nogil=True)
def _colour_centroids_kernel(data, excluded, has_mask, lookup, x, y, stars, sigma, half,
                             n_channels, iterations, out_x, out_y, ok):  # fmt: skip
    """:func:`_colour_centroid_chunk`, one star at a time (results in ``out_x``,
    ``out_y``, ``ok``)."""
    ny, nx = data.shape
    size = 2 * half + 1
    stamp = np.zeros((size, size))
    valid = np.zeros((size, size))
    which = np.zeros((size, size), np.int64)
    window = np.zeros((size, size))
    gx = np.zeros(size)
    gy = np.zeros(size)
    level = np.zeros(n_channels)
    top = np.zeros(n_channels)
    bottom = np.zeros(n_channels)
    for s in range(stars.size):
        i = stars[s]
        x0, y0 = x[i], y[i]
        c0 = int(np.rint(x0))
        r0 = int(np.rint(y0))
        for a in range(size):
            row = r0 - half + a
            for b in range(size):
                col = c0 - half + b
                stamp[a, b] = 0.0
                valid[a, b] = 0.0
                which[a, b] = 0
                if 0 <= row < ny and 0 <= col < nx:
                    value = data[row, col]
                    which[a, b] = lookup[row % 2, col % 2]
                    if np.isfinite(value) and not (has_mask and excluded[row, col] != 0):
                        stamp[a, b] = value
                        valid[a, b] = 1.0
        cx, cy = x0, y0
        positive = True
        for _ in range(iterations):
            for c in range(n_channels):
                top[c] = 0.0
                bottom[c] = 0.0
            # the Gaussian window is separable: exp(-(dx² + dy²)/2σ²) = gx[b] gy[a]
            for a in range(size):
                dy = (r0 - half + a) - cy
                gy[a] = np.exp(-(dy * dy) / (2 * sigma * sigma))
                dx = (c0 - half + a) - cx
                gx[a] = np.exp(-(dx * dx) / (2 * sigma * sigma))
            for a in range(size):
                for b in range(size):
                    if valid[a, b] == 0.0:
                        continue
                    w = gx[b] * gy[a]
                    window[a, b] = w
                    c = which[a, b]
                    top[c] += w * stamp[a, b]
                    bottom[c] += w * w
            positive = True
            mean_level = 0.0
            for c in range(n_channels):
                level[c] = top[c] / max(bottom[c], 1e-12)
                positive = positive and level[c] > 0
                mean_level += level[c]
            mean_level /= n_channels
            total = 0.0
            sum_x = 0.0
            sum_y = 0.0
            for a in range(size):
                dy = (r0 - half + a) - cy
                for b in range(size):
                    if valid[a, b] == 0.0:
                        continue
                    dx = (c0 - half + b) - cx
                    w = window[a, b]
                    c = which[a, b]
                    scale = 1.0
                    if positive:
                        scale = mean_level / (level[c] if level[c] > 0 else 1.0)
                    value = w * stamp[a, b] * scale
                    total += value
                    sum_x += value * dx
                    sum_y += value * dy
            if total > 0:
                cx += 2 * sum_x / total
                cy += 2 * sum_y / total
        moved = np.hypot(cx - x0, cy - y0)
        out_x[i] = cx
        out_y[i] = cy
        ok[i] = positive and moved <= 2 * sigma and np.isfinite(cx) and np.isfinite(cy)
