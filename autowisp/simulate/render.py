"""Rendering stars onto a Bayer mosaic: elliptical Moffat PSFs integrated over pixels.

Each star is rendered into its own postage stamp (half-size chosen from its flux), with
the PSF integrated over every pixel by ``oversample × oversample`` sub-pixel sampling.
A pixel belongs to one channel of the mosaic (:mod:`autowisp.core.bayer`) and receives
the star's flux *in that channel's colour* times the PSF integral over the pixel: a
star of flux F in red puts light only on the red quarter of every super-pixel, and the
red pixels together collect about F/4.

The PSF is the normalised elliptical Moffat profile

    I(dx, dy) = (β − 1) / (π a b) · (1 + (dx'/a)² + (dy'/b)²)^(−β),

with ``(dx', dy')`` the offset rotated by ``theta`` (radians, counter-clockwise from +x)
and ``a``, ``b`` the Moffat widths (px) of the major and minor axes; the FWHM along an
axis is ``2 a sqrt(2^(1/β) − 1)``.

:func:`render_stars` is the numba kernel; :func:`render_stars_reference` is a plain
numpy implementation of the same sums used to test it.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "fwhm_to_alpha",
    "render_stars",
    "render_stars_reference",
    "stamp_half_sizes",
]


def fwhm_to_alpha(fwhm: np.ndarray | float, beta: float) -> np.ndarray:
    """Moffat width ``alpha`` (px) of a given FWHM (px) and index ``beta``."""
    return np.asarray(fwhm, dtype=float) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def stamp_half_sizes(
    peak_flux: np.ndarray,
    alpha_major: np.ndarray,
    *,
    beta: float,
    threshold: float = 0.2,
    minimum: int = 3,
    maximum: int = 48,
) -> np.ndarray:
    """Half-size (px) of each star's stamp: out to where the PSF falls below ``threshold``.

    ``peak_flux`` is the star's largest channel flux (e⁻); beyond the returned radius a
    pixel would receive less than ``threshold`` e⁻ from the star.
    """
    peak_density = np.asarray(peak_flux, dtype=float) * (beta - 1.0) / (np.pi * alpha_major**2)
    ratio = np.maximum(peak_density / threshold, 1.0)
    radius = alpha_major * np.sqrt(np.maximum(ratio ** (1.0 / beta) - 1.0, 0.0))
    return np.clip(np.ceil(radius), minimum, maximum).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def render_stars(
    image,
    x,
    y,
    flux,
    scale,
    alpha_a,
    alpha_b,
    theta,
    beta,
    half_size,
    channel_of_cell,
    step,
    oversample,
    fine_radius,
    radii,
    response,
    background,
    ap_signal,
    ap_npix,
    ap_background,
):
    """Add stars to ``image`` in place and accumulate per-aperture sums.

    Pixels whose centre lies within ``fine_radius`` px of a star are integrated with
    ``oversample × oversample`` samples, the others (where the PSF is smooth on the
    pixel scale) with one sample at the pixel centre.

    Parameters
    ----------
    image : (ny, nx) float64
        Electrons; each star's contribution is added times ``response`` of the pixel.
    x, y : (n,) float64
        Star centres, px (pixel centres at integers).
    flux : (n, n_channels) float64
        Star flux (e⁻) in the colour of each channel, before the pixel response.
    scale : (n,) float64
        Factor applied to each star's light in ``image`` only (e.g. a scintillation
        draw); the aperture sums use the unscaled flux.
    alpha_a, alpha_b, theta : (n,) float64
        Moffat widths (px) along the major and minor axes and the angle (rad).
    beta : float
        Moffat index.
    half_size : (n,) int64
        Stamp half-size (px).
    channel_of_cell : (step, step) int64
        Channel index of each pixel of the super-pixel.
    step : int
        Super-pixel size: 2 for Bayer, 1 for monochrome.
    oversample : int
        Sub-pixel samples per axis.
    fine_radius : float
        Radius (px) within which pixels are oversampled.
    radii : (n_ap,) float64
        Aperture radii (px); a pixel is in an aperture if its centre is within the
        radius of the star centre.
    response : (ny, nx) float64
        Pixel response (the flat field, including vignetting).
    background : (ny, nx) float64
        Expected background electrons per pixel (sky after response, plus dark).
    ap_signal, ap_npix, ap_background : (n, n_channels, n_ap)
        Outputs, overwritten: the star's expected electrons, the pixel count, and the
        expected background electrons within each aperture, per channel.
    """
    ny, nx = image.shape
    n_ap = radii.shape[0]
    norm = (beta - 1.0) / np.pi
    fine2 = fine_radius * fine_radius
    for star in range(x.shape[0]):
        xs = x[star]
        ys = y[star]
        inv_a2 = 1.0 / (alpha_a[star] * alpha_a[star])
        inv_b2 = 1.0 / (alpha_b[star] * alpha_b[star])
        amplitude = norm / (alpha_a[star] * alpha_b[star])
        cos_t = np.cos(theta[star])
        sin_t = np.sin(theta[star])
        cx = int(np.floor(xs + 0.5))
        cy = int(np.floor(ys + 0.5))
        h = half_size[star]
        for c in range(ap_signal.shape[1]):
            for a in range(n_ap):
                ap_signal[star, c, a] = 0.0
                ap_npix[star, c, a] = 0
                ap_background[star, c, a] = 0.0
        for py in range(max(cy - h, 0), min(cy + h + 1, ny)):
            for px in range(max(cx - h, 0), min(cx + h + 1, nx)):
                distance2 = (px - xs) ** 2 + (py - ys) ** 2
                samples = oversample if distance2 <= fine2 else 1
                total = 0.0
                for sy in range(samples):
                    dy = py - 0.5 + (sy + 0.5) / samples - ys
                    for sx in range(samples):
                        dx = px - 0.5 + (sx + 0.5) / samples - xs
                        u = cos_t * dx + sin_t * dy
                        v = -sin_t * dx + cos_t * dy
                        total += (1.0 + u * u * inv_a2 + v * v * inv_b2) ** (-beta)
                channel = channel_of_cell[py % step, px % step]
                value = (
                    flux[star, channel]
                    * amplitude
                    * total
                    / (samples * samples)
                    * response[py, px]
                )
                image[py, px] += value * scale[star]
                for a in range(n_ap):
                    if distance2 <= radii[a] * radii[a]:
                        ap_signal[star, channel, a] += value
                        ap_npix[star, channel, a] += 1
                        ap_background[star, channel, a] += background[py, px]


def render_stars_reference(
    shape,
    x,
    y,
    flux,
    alpha_a,
    alpha_b,
    theta,
    beta,
    half_size,
    channel_of_cell,
    oversample,
    fine_radius,
    response,
):
    """Plain numpy version of :func:`render_stars` (image only), for testing the kernel."""
    ny, nx = shape
    step = channel_of_cell.shape[0]
    image = np.zeros(shape)

    def integral(dx, dy, star, samples):
        offsets = (np.arange(samples) + 0.5) / samples - 0.5
        sub_dy = dy[..., None, None] + offsets[:, None]
        sub_dx = dx[..., None, None] + offsets[None, :]
        u = np.cos(theta[star]) * sub_dx + np.sin(theta[star]) * sub_dy
        v = -np.sin(theta[star]) * sub_dx + np.cos(theta[star]) * sub_dy
        profile = (1 + (u / alpha_a[star]) ** 2 + (v / alpha_b[star]) ** 2) ** (-beta)
        return profile.mean(axis=(-2, -1)) * (beta - 1) / (np.pi * alpha_a[star] * alpha_b[star])

    for star in range(len(x)):
        cx, cy, h = int(np.floor(x[star] + 0.5)), int(np.floor(y[star] + 0.5)), half_size[star]
        rows = np.arange(max(cy - h, 0), min(cy + h + 1, ny))
        cols = np.arange(max(cx - h, 0), min(cx + h + 1, nx))
        py, px = np.meshgrid(rows, cols, indexing="ij")
        dx, dy = px - x[star], py - y[star]
        fine = dx**2 + dy**2 <= fine_radius**2
        weight = np.where(fine, integral(dx, dy, star, oversample), integral(dx, dy, star, 1))
        channel = channel_of_cell[py % step, px % step]
        image[py, px] += flux[star][channel] * weight * response[py, px]
    return image
