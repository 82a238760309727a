"""Synthetic star fields with known truth for the photometry tests.

Stars are elliptical Moffat profiles integrated over pixels by the simulator's renderer
(:func:`autowisp.simulate.render.render_stars`), on a flat sky with Poisson and read
noise, pixel response 1. Truth per star: centre, the channel flux ``A`` (the flux the
star's colour puts on the frame over the channel's pixel share, i.e. ``F / step²``) and
the PSF (FWHMs, angle, β).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autowisp.core.bayer import channels
from autowisp.simulate.render import fwhm_to_alpha, render_stars, stamp_half_sizes

BETA = 3.5


@dataclass
class Field:
    image: np.ndarray  # e⁻
    error: np.ndarray  # e⁻
    mask: np.ndarray  # uint8 MaskBit
    layout: str
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray  # (n,) e⁻ in the star's colour over the whole PSF
    mag: np.ndarray
    major: np.ndarray
    minor: np.ndarray
    theta: np.ndarray
    sky: float
    read_noise: float
    noiseless: np.ndarray

    def channel_flux(self) -> float:
        """Factor from total flux to a channel's collected flux (1/step²)."""
        return 1.0 / channels(self.layout)[0].step ** 2


def psf_over_field(x, y, shape, fwhm):
    """Smoothly varying Moffat FWHMs (px) and angle over the frame."""
    ny, nx = shape
    u = (x - nx / 2) / nx
    v = (y - ny / 2) / ny
    major = fwhm * (1 + 0.25 * (u**2 + v**2) * 4)
    minor = major * (1 - 0.15 * (u**2 + v**2) * 4)
    theta = np.mod(np.arctan2(v, u) + np.pi / 2, np.pi)
    return major, minor, theta


def make_field(
    *,
    shape=(256, 256),
    layout="MONO",
    n_stars=60,
    fwhm=2.0,
    seed=0,
    sky=400.0,
    read_noise=5.0,
    flux_range=(2e4, 4e5),
    margin=12,
    positions=None,
    min_separation=14.0,
    saturation=None,
    fluxes=None,
) -> Field:
    rng = np.random.default_rng(seed)
    ny, nx = shape
    if positions is None:
        xs: list[float] = []
        ys: list[float] = []
        tries = 0
        while len(xs) < n_stars and tries < 100000:
            tries += 1
            px = rng.uniform(margin, nx - 1 - margin)
            py = rng.uniform(margin, ny - 1 - margin)
            if all(
                (px - a) ** 2 + (py - b) ** 2 >= min_separation**2
                for a, b in zip(xs, ys, strict=True)
            ):
                xs.append(px)
                ys.append(py)
        x, y = np.array(xs), np.array(ys)
    else:
        x, y = (np.asarray(v, float) for v in positions)
    n = x.size
    flux = np.exp(rng.uniform(np.log(flux_range[0]), np.log(flux_range[1]), n))
    if fluxes is not None:
        flux = np.asarray(fluxes, float).copy()
    mag = 25.0 - 2.5 * np.log10(flux)
    major, minor, theta = psf_over_field(x, y, shape, fwhm)
    n_ch = len(channels(layout))
    step = channels(layout)[0].step
    cell = np.zeros((step, step), np.int64)
    for c in range(n_ch):
        ch = channels(layout)[c]
        cell[ch.y0, ch.x0] = c
    per_channel = np.repeat(flux[:, None], n_ch, axis=1)
    a = fwhm_to_alpha(major, BETA)
    b = fwhm_to_alpha(minor, BETA)
    half = stamp_half_sizes(flux, a, beta=BETA, threshold=0.05, minimum=12, maximum=40)
    image = np.zeros(shape)
    zeros = np.zeros((n, n_ch, 1))
    render_stars(image, x, y, per_channel, np.ones(n), a, b, theta, BETA, half, cell, step,
                 9, 5.0, np.zeros(1), np.ones(shape), np.zeros(shape), zeros,
                 np.zeros((n, n_ch, 1), np.int64), zeros.copy())  # fmt: skip
    noiseless = image + sky
    data = rng.poisson(noiseless).astype(float) + rng.normal(0, read_noise, shape)
    mask = np.zeros(shape, np.uint8)
    if saturation is not None:
        mask[data >= saturation] = 1
        data = np.minimum(data, saturation)
    error = np.sqrt(read_noise**2 + np.maximum(data, 0))
    return Field(data, error, mask, layout, x, y, flux, mag, major, minor, theta, sky,
                 read_noise, noiseless)  # fmt: skip


def enclosed(major, minor, theta, radius, *, beta=BETA, dx=0.0, dy=0.0, nodes=200, angles=720):
    """Fraction of an elliptical Moffat's light within ``radius`` px of the star centre
    (polar Gauss–Legendre quadrature, 1e-10 accurate at the default resolution)."""
    nodes, weights = np.polynomial.legendre.leggauss(nodes)
    rho = 0.5 * radius * (nodes + 1)
    w_r = 0.5 * radius * weights
    phi = np.linspace(0, 2 * np.pi, angles, endpoint=False)
    a = fwhm_to_alpha(major, beta)
    b = fwhm_to_alpha(minor, beta)
    px = rho[:, None] * np.cos(phi)[None, :] + dx
    py = rho[:, None] * np.sin(phi)[None, :] + dy
    u = np.cos(theta) * px + np.sin(theta) * py
    v = -np.sin(theta) * px + np.cos(theta) * py
    f = (beta - 1) / (np.pi * a * b) * (1 + (u / a) ** 2 + (v / b) ** 2) ** (-beta)
    return float(np.sum(f * rho[:, None] * w_r[:, None]) * (2 * np.pi / phi.size))
