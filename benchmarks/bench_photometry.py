"""Benchmark aperture photometry and the PSF map fit on a full-size frame.

A 5184×3456 frame with 20,000 Moffat stars (FWHM 2.5 px) on a noisy sky; three radii
(2, 3, 5 px) at the true positions, in the same run:

- sep: ``sep.sum_circle(subpix=0)`` (exact circle–pixel overlap, one radius per call);
- photutils: ``aperture_photometry(CircularAperture, method='exact')`` (if installed:
  ``pip install photutils``);
- ours, plain: :func:`autowisp.core.aperture.aperture_photometry` exact-area mode on the
  frame as one monochrome channel (the same sums as sep);
- ours, PRF: the PSF × sub-pixel-sensitivity weighted mode on one RGGB channel (each
  pixel's weight integrated over its exact overlap with the aperture);
- the PSF map: per-source fits of the 150 brightest isolated stars and the smooth map
  (:func:`autowisp.core.photometry._fit_shapes`), one channel.

Times are the best of three; ratios are against sep in the same run.
Usage (from the repository root): python -m benchmarks.bench_photometry
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import sep

from autowisp.core.aperture import aperture_photometry
from autowisp.core.bayer import channels
from autowisp.core.photometry import PhotometryConfig, _fit_shapes
from autowisp.core.psf import _NODES, _WEIGHTS, MOFFAT, shape_from_fwhm
from autowisp.core.subpixel import channel_map
from autowisp.simulate.render import fwhm_to_alpha, render_stars, stamp_half_sizes


def _best_of(function, repeats: int = 3) -> float:
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def make_frame(n_stars: int, shape=(3456, 5184), fwhm=2.5, seed=0):
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x = rng.uniform(10, nx - 11, n_stars)
    y = rng.uniform(10, ny - 11, n_stars)
    flux = 10 ** rng.uniform(3.5, 6.0, n_stars)
    alpha = np.full(n_stars, fwhm_to_alpha(fwhm, 3.5))
    half = stamp_half_sizes(flux, alpha, beta=3.5, threshold=1.0, minimum=6, maximum=20)
    image = np.zeros(shape)
    zeros = np.zeros((n_stars, 1, 1))
    render_stars(image, x, y, flux[:, None], np.ones(n_stars), alpha, alpha, np.zeros(n_stars),
                 3.5, half, np.zeros((1, 1), np.int64), 1, 3, 3.0, np.zeros(1), np.ones(shape),
                 np.zeros(shape), zeros, np.zeros((n_stars, 1, 1), np.int64), zeros.copy())  # fmt: skip
    image += 400.0
    image = rng.poisson(image).astype(float) + rng.normal(0, 5, shape)
    error = np.sqrt(25 + np.maximum(image, 0))
    return image, error, x, y, flux


def _ours(image, error, x, y, radii, channel, plain, flux_guess, shapes):
    n = x.size
    out = [np.zeros((n, radii.size)) for _ in range(3)] + [np.zeros((n, radii.size), np.uint8)]
    sensitivity = channel_map(channel)
    bad = np.zeros(image.shape, np.uint8)
    aperture_photometry(image, error, bad, x, y, np.full(n, 400.0), np.zeros(n), flux_guess,
                        shapes, MOFFAT, 3.5, plain, radii, channel.step, channel.y0, channel.x0,
                        sensitivity.cells(), sensitivity.extent(), _NODES, _WEIGHTS, *out)  # fmt: skip
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stars", type=int, default=20000)
    args = parser.parse_args()
    image, error, x, y, flux = make_frame(args.stars)
    radii = np.array([2.0, 3.0, 5.0])
    n = x.size
    shapes = np.tile(np.array(shape_from_fwhm(np.array(2.5), np.array(2.5), np.array(0.0),
                                              kind="moffat")), (n, 1))  # fmt: skip
    (mono,) = channels("MONO")
    green = channels("RGGB")[1]
    _ours(image, error, x[:10], y[:10], radii, mono, True, flux[:10], shapes[:10])  # compile
    _ours(image, error, x[:10], y[:10], radii, green, False, flux[:10], shapes[:10])
    data = np.ascontiguousarray(image)
    t_sep = _best_of(lambda: [sep.sum_circle(data, x, y, r, subpix=0) for r in radii])
    t_plain = _best_of(lambda: _ours(image, error, x, y, radii, mono, True, flux, shapes))
    t_prf = _best_of(lambda: _ours(image, error, x, y, radii, green, False, flux, shapes))
    ours = _ours(image, error, x, y, radii, mono, True, flux, shapes)
    reference = np.column_stack([sep.sum_circle(data, x, y, r, subpix=0)[0] for r in radii])
    agree = float(np.max(np.abs(ours + 400.0 * np.pi * radii**2 - reference)
                         / np.abs(reference)))  # fmt: skip
    try:
        from photutils.aperture import CircularAperture
        from photutils.aperture import aperture_photometry as photutils_photometry
    except ImportError:
        t_photutils = float("nan")
    else:
        xy = np.column_stack([x, y])
        t_photutils = _best_of(
            lambda: [photutils_photometry(data, CircularAperture(xy, r=r), method="exact")
                     for r in radii], repeats=1,
        )  # fmt: skip
    bright = np.argsort(-flux)
    chosen = bright[(flux[bright] < 3e5)][:150]
    config = PhotometryConfig()
    good = np.ones(image.shape, bool)
    cells = channel_map(green).cells()
    t_map = _best_of(lambda: _fit_shapes(image, error, good, x[chosen], y[chosen],
                                         np.full(chosen.size, 400.0), 25 - 2.5 * np.log10(flux[chosen]),
                                         green, cells, 2.5, config, image.shape), repeats=1)  # fmt: skip
    print(f"frame {image.shape[1]}x{image.shape[0]}, {n} stars, radii {radii.tolist()} px")
    print(f"  sep.sum_circle (exact)          {t_sep * 1e3:8.1f} ms  (1.00x)")
    print(
        f"  photutils exact                 {t_photutils * 1e3:8.1f} ms  ({t_photutils / t_sep:.2f}x)"
    )
    print(
        f"  ours, plain exact-area          {t_plain * 1e3:8.1f} ms  ({t_plain / t_sep:.2f}x); "
        f"largest difference from sep {agree:.1e} (relative)"
    )
    print(f"  ours, PRF-weighted (1 channel)  {t_prf * 1e3:8.1f} ms  ({t_prf / t_sep:.2f}x)")
    print(f"  PSF map fit (150 stars, 1 ch.)  {t_map * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
