"""Cosmic-ray hits found in a single crowded frame, against the simulator's truth."""

import numpy as np

from autowisp.core.cosmics import cosmic_ray_mask
from autowisp.simulate.camera import CameraSpec, Scene, cosmic_ray_hits, expose, make_detector


def _frame(seed=7, n_stars=1500, fwhm=2.2):
    spec = CameraSpec(width=512, height=384, gain=1.55, read_noise=6.5, dark_current=0.0)
    detector = make_detector(spec, np.random.default_rng(3))
    rng = np.random.default_rng(seed)
    ny, nx = spec.shape
    flux = 10 ** rng.uniform(2.5, 6, n_stars)
    # Star colours as a DSLR sees them: R/G and B/G from 0.3 to 2.
    colour = np.column_stack(
        [rng.uniform(0.5, 2.0, n_stars), np.ones(n_stars), rng.uniform(0.3, 1.2, n_stars)]
    )
    scene = Scene(
        120.0, rng.uniform(3, nx - 3, n_stars), rng.uniform(3, ny - 3, n_stars),
        flux[:, None] * colour, np.full(n_stars, fwhm), np.full(n_stars, fwhm * 0.9),
        rng.uniform(0, 3, n_stars), np.zeros(n_stars), np.full(spec.shape, 300.0),
    )  # fmt: skip
    exposure = expose(detector, scene, rng, cosmic_rays=False)
    hits = cosmic_ray_hits(rng, spec.shape, 120.0, rate=3.0)  # ~40x the real rate
    image = (exposure.raw.astype(float) - detector.bias) * spec.gain / detector.flat
    rows, cols = hits[:, 1].astype(int), hits[:, 0].astype(int)
    np.add.at(image, (rows, cols), hits[:, 2] / detector.flat[rows, cols])
    hit = np.zeros(spec.shape, bool)
    hit[rows, cols] = True
    energy = np.zeros(spec.shape)
    np.add.at(energy, (rows, cols), hits[:, 2])
    noise = np.sqrt(exposure.mean + spec.read_noise**2)
    saturated = exposure.raw >= spec.saturation_adu
    return image, hit, energy / noise, detector.hot | saturated


def test_hits_are_found_and_star_pixels_left_alone():
    image, hit, significance, bad = _frame()
    mask = cosmic_ray_mask(image, "RGGB", bad=bad)
    strong = hit & (significance > 15) & ~bad
    assert strong.sum() > 100
    recall = mask[strong].mean()
    false = np.sum(mask & ~hit)
    # Hits on stars are not found (they merge with the star's footprint): 57 % of the
    # hits above 15σ are found in this crowded frame (one star per 130 pixels).
    assert recall > 0.5, recall
    assert false < 20, false  # of 196,608 pixels, 1,500 stars
    assert not np.any(mask & bad)


def test_a_frame_without_hits_has_an_empty_mask():
    image, hit, _, bad = _frame(seed=9)
    image = np.where(hit, np.nan, image)  # the hits' pixels removed, as bad
    mask = cosmic_ray_mask(image, "RGGB", bad=bad | hit)
    assert mask.sum() < 10
