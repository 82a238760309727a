"""Photometry of synthetic fields against their truth (Moffat stars, Poisson noise)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import sep

from autowisp.core.bayer import channels
from autowisp.core.calibration import MaskBit
from autowisp.core.photometry import (
    Flag,
    PhotometryConfig,
    bad_codes,
    measure_channel,
    measure_mosaic,
)
from autowisp.core.subpixel import channel_map, uniform_map

from .synthetic import enclosed, make_field

APERTURES = (2.0, 3.0, 4.0, 5.0)


def test_sensitivity_maps():
    for layout in ("RGGB", "BGGR", "GRBG", "GBRG"):
        for channel in channels(layout):
            sensitivity = channel_map(channel)
            assert sensitivity.values.mean() == pytest.approx(1.0)
            (cell,) = sensitivity.cells()  # one sensitive quarter: the channel's own pixel
            assert tuple(cell) == (-0.5, 0.5, -0.5, 0.5, 4.0)
            x0, x1, y0, y1 = sensitivity.extent()
            assert x1 - x0 == 2 and y1 - y0 == 2
            assert (x0, y0) == (-0.5 - channel.x0, -0.5 - channel.y0)
    assert uniform_map().uniform and not channel_map(channels("RGGB")[0]).uniform
    with pytest.raises(ValueError, match="mean 1"):
        type(uniform_map())(np.array([[2.0, 0.5]]), 2)


def _measure(field, channel, **config):
    return measure_channel(
        field.image, field.error, bad_codes(field.mask), channel, field.x, field.y, field.mag,
        config=PhotometryConfig(apertures=APERTURES, **config),
        fwhm_guess=float(np.median(field.major)),
    )  # fmt: skip


def _true_aperture_flux(field, step, radius):
    fractions = np.array([enclosed(a, b, t, radius) for a, b, t in
                          zip(field.major, field.minor, field.theta, strict=True)])  # fmt: skip
    return field.flux / step**2 * fractions


CASES = [("MONO", 1.5, 1), ("MONO", 3.5, 2), ("RGGB", 2.0, 3), ("GBRG", 2.5, 4),
         ("BGGR", 3.5, 5)]  # fmt: skip


@functools.cache
def isolated_star_figures(layout: str, fwhm: float, seed: int) -> dict[str, float]:
    """Worst median aperture and PSF-flux biases of two channels of a field of isolated
    stars, pooled over three noise realisations of it (one realisation's median over ~70
    stars scatters by ±0.15 %: with the former annulus, seed 203 of the RGGB case alone
    gave -0.30 %, seeds 3 and 103 -0.20 % and -0.17 %, pooled -0.06 %), the worst
    FWHM/ellipticity errors of the first realisation's PSF map, and the RMS error pull
    over the three (computed once per case)."""
    field = make_field(layout=layout, fwhm=fwhm, n_stars=70, seed=seed, shape=(280, 280))
    pulls = []
    ratios: dict[tuple[str, int], list[np.ndarray]] = {}
    psf_ratios: dict[str, list[np.ndarray]] = {}
    figures = {"bias": 0.0, "fwhm": 0.0, "ellipticity": 0.0, "psf_bias": 0.0, "clean": 1e9,
               "first_bias": 0.0, "first_psf_bias": 0.0}  # fmt: skip
    again = [
        make_field(layout=layout, fwhm=fwhm, seed=seed + extra, shape=(280, 280),
                   positions=(field.x, field.y), fluxes=field.flux)
        for extra in (100, 200)
    ]  # fmt: skip
    realisations = [field, *again]
    for number, realisation in enumerate(realisations):
        for channel in channels(layout)[:2]:
            result = _measure(realisation, channel)
            clean = result.flags == 0
            for a, radius in enumerate(APERTURES):
                true = _true_aperture_flux(realisation, channel.step, radius)
                ratios.setdefault((channel.name, a), []).append(
                    result.flux[clean, a] / true[clean]
                )
                pulls.append((result.flux[clean, a] - true[clean]) / result.flux_err[clean, a])
            psf_true = realisation.flux / channel.step**2
            psf_ratios.setdefault(channel.name, []).append(
                result.psf_flux[clean] / psf_true[clean]
            )
            psf_pull = (result.psf_flux[clean] - psf_true[clean]) / result.psf_flux_err[clean]
            pulls.append(psf_pull - np.median(psf_pull))
            if number:
                continue
            # the first realisation alone, as the figures were before they were pooled
            figures["first_bias"] = max(figures["first_bias"], *(
                abs(float(np.median(ratios[channel.name, a][0]) - 1))
                for a in range(len(APERTURES))))  # fmt: skip
            figures["first_psf_bias"] = max(
                figures["first_psf_bias"], abs(float(np.median(psf_ratios[channel.name][0]) - 1))
            )
            figures["clean"] = min(figures["clean"], float(clean.sum()))
            major, minor, _ = result.shape_map.fwhm(field.x, field.y, field.mag)
            worst = max(
                np.max(np.abs(major / field.major - 1)), np.max(np.abs(minor / field.minor - 1))
            )
            figures["fwhm"] = max(figures["fwhm"], float(worst))
            e_error = np.max(np.abs((1 - minor / major) - (1 - field.minor / field.major)))
            figures["ellipticity"] = max(figures["ellipticity"], float(e_error))
    for values in ratios.values():
        bias = abs(float(np.median(np.concatenate(values)) - 1))
        figures["bias"] = max(figures["bias"], bias)
    for values in psf_ratios.values():
        psf_bias = abs(float(np.median(np.concatenate(values)) - 1))
        figures["psf_bias"] = max(figures["psf_bias"], psf_bias)
    figures["pull_rms"] = float(np.sqrt(np.mean(np.concatenate(pulls) ** 2)))
    return figures


def _not_reached(cases, reason):
    """The cases of CASES where the issue's target is not reached yet (strict: a case
    that starts passing must have its mark removed)."""
    return [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=reason[c]))
        if c in reason
        else c
        for c in CASES
    ]


BIAS_NOT_REACHED = {
    CASES[1]: "PSF-flux bias 0.64 % at FWHM 3.5 px (mono): the fitted Moffat β is 3.64 for 3.5",
    CASES[2]: "the first realisation's worst median aperture bias is 0.21 % at FWHM 2 px on a "
    "Bayer channel (0.198 % with the former annulus; pooled over three realisations 0.165 %)",
}
SHAPE_NOT_REACHED = {
    CASES[1]: "the PSF map's worst FWHM error is 5.2 % at FWHM 3.5 px (mono)",
    CASES[2]: "the PSF map's worst ellipticity error is 5.2 % at FWHM 2 px on a Bayer channel "
    "(2.5-5.2 % over five seeds and two channels, with the former annulus 2.5-5.0 %)",
    CASES[
        4
    ]: "the cubic PSF map misses the corners' FWHM by 12 % at FWHM 3.5 px on a Bayer channel",
}
PULL_NOT_REACHED = {
    CASES[1]: "pull RMS 1.10 over three realisations at FWHM 3.5 px (mono)",
}


@pytest.mark.parametrize("case", _not_reached(CASES, BIAS_NOT_REACHED))
def test_isolated_star_fluxes_are_unbiased(case):
    """Median fractional flux bias of each aperture < 0.2 %, of PSF fluxes < 0.5 %, over
    the three realisations pooled and over the first alone (pooled, worst of the
    apertures and channels: mono 0.04-0.06 %, Bayer 0.17-0.20 %; PSF fluxes: mono 0.03 %
    at FWHM 1.5 px, Bayer 0.20-0.37 %)."""
    figures = isolated_star_figures(*case)
    assert figures["clean"] >= 60, figures
    assert figures["bias"] < 0.002, figures
    assert figures["psf_bias"] < 0.005, figures
    assert figures["first_bias"] < 0.002, figures
    assert figures["first_psf_bias"] < 0.005, figures


@pytest.mark.parametrize("case", _not_reached(CASES, SHAPE_NOT_REACHED))
def test_fitted_psf_shape_matches_truth(case):
    """FWHM along both axes within 5 % of the truth everywhere on the frame."""
    figures = isolated_star_figures(*case)
    assert figures["fwhm"] < 0.05, figures
    assert figures["ellipticity"] < 0.05, figures


@pytest.mark.parametrize("case", _not_reached(CASES, PULL_NOT_REACHED))
def test_reported_errors_match_the_scatter(case):
    """RMS of (measured − true) / error between 0.9 and 1.1."""
    figures = isolated_star_figures(*case)
    assert 0.9 < figures["pull_rms"] < 1.1, figures


@pytest.mark.parametrize(("layout", "fwhm"), [("MONO", 2.0), ("RGGB", 2.2), ("MONO", 3.5)])
def test_the_default_annulus_keeps_the_background_error_small(layout, fwhm):
    """The background's error is the sky's noise over √(annulus pixels), and it enters
    the largest aperture times its pixel count: the default annulus (16 times the
    aperture's area) keeps over 9 times its pixels once the neighbours' discs and wings
    are out, so it adds under a ninth of the sky's variance (measured 10.0-14.3 times;
    the former 6 px wide annulus 5.3-5.8 times)."""
    field = make_field(layout=layout, fwhm=fwhm, n_stars=40, seed=7, shape=(256, 256))
    channel = channels(layout)[0]
    result = _measure(field, channel)
    clean = result.flags == 0
    assert clean.sum() >= 20
    sky_variance = field.sky + field.read_noise**2  # e⁻² per pixel of the channel
    pixels = sky_variance / result.background_err[clean] ** 2  # the annulus's pixels
    aperture = np.pi * max(APERTURES) ** 2 / channel.step**2
    assert np.median(pixels) >= 9 * aperture, (np.median(pixels), aperture)
    assert np.median(result.background[clean]) == pytest.approx(field.sky, rel=0.01)


def test_sub_pixel_phase_drift_on_one_green_sub_grid():
    """Over a night drifting across sub-pixel phases, PRF apertures and PSF fluxes scatter
    ≤ 1.3× the photon noise; a plain sum at the same radius scatters far more."""
    rng = np.random.default_rng(11)
    base = make_field(layout="RGGB", fwhm=2.0, n_stars=50, seed=11, shape=(240, 240))
    channel = channels("RGGB")[1]  # G1
    radius = 3.0
    rows = {"prf": [], "psf": [], "plain": []}
    for frame in range(10):
        dx, dy = rng.uniform(0, 2, 2)
        field = make_field(layout="RGGB", fwhm=2.0, seed=100 + frame, shape=(240, 240),
                           positions=(base.x + dx, base.y + dy), fluxes=base.flux)  # fmt: skip
        result = _measure(field, channel)
        true_ap = _true_aperture_flux(field, 2, radius)
        true_total = field.flux / 4
        # photon + read noise of the channel's light within the radius
        py, px = np.mgrid[channel.y0 : 240 : 2, channel.x0 : 240 : 2]
        noise = np.array([np.sqrt(np.sum((field.noiseless[py, px] + field.read_noise**2)[
            (px - xs) ** 2 + (py - ys) ** 2 <= radius**2])) for xs, ys in
            zip(field.x, field.y, strict=True)])  # fmt: skip
        sub = channel.view(field.image).astype(float).copy()
        plain, _, _ = sep.sum_circle(sub, (field.x - channel.x0) / 2, (field.y - channel.y0) / 2,
                                     radius / 2, subpix=0, bkgann=None)  # fmt: skip
        plain = plain - result.background * np.pi * (radius / 2) ** 2
        clean = result.flags == 0
        for key, value, truth in (("prf", result.flux[:, 1], true_ap),
                                  ("psf", result.psf_flux, true_total),
                                  ("plain", plain, true_ap)):  # fmt: skip
            ratio = value / truth
            zero = np.median(ratio[clean])
            rows[key].append(((ratio - zero) * truth / noise)[clean])
    excess = {key: float(np.sqrt(np.mean(np.concatenate(v) ** 2))) for key, v in rows.items()}
    print("scatter over photon noise:", excess)
    assert excess["prf"] <= 1.3, excess
    assert excess["psf"] <= 1.3, excess
    assert excess["plain"] > 2.0, excess  # the undersampled sub-grid's phase error


def _wcs_error(x, y, shape, rng, size=0.06):
    """A smooth position error field like a WCS fit's (shift, gradient, curvature), px."""
    ny, nx = shape
    u, v = (x - nx / 2) / (nx / 2), (y - ny / 2) / (ny / 2)
    a, b = rng.normal(0, size, (2, 6)) * [1, 0.6, 0.6, 0.3, 0.3, 0.3]
    terms = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v])
    return a @ terms, b @ terms


@pytest.mark.parametrize(
    "layout, fwhm",
    [
        ("MONO", 2.0),
        ("RGGB", 2.0),
        pytest.param("BGGR", 3.5, marks=pytest.mark.xfail(strict=True, reason=(
            "the second channel's refined 2 px aperture is 0.32 % off the truth (target "
            "0.3 %; 0.22 % with the former annulus); at the true positions it is 0.33 % off, "
            "so this is the aperture's own bias in this realisation, not the positions'"))),
    ],
)  # fmt: skip
def test_projected_positions_are_corrected_from_the_psf_fits(layout, fwhm):
    """Positions given with a smooth 0.05–0.1 px error (a WCS fit's) are measured where the
    stars are: within 0.006 px (median, at FWHM 2 px) of the truth, and the 2 px aperture
    measures what it measures at the true positions (within 0.2 %; measured 0.001-0.12 %)
    and is unbiased against the truth (within 0.3 %),
    where measuring at the given positions biases it by over 1 % on a Bayer channel. (The
    aperture's own bias is :func:`test_isolated_star_fluxes_are_unbiased`'s: one
    realisation's median scatters by ±0.15 %, 0.33 % on this one's second BGGR channel.)"""
    field = make_field(layout=layout, fwhm=fwhm, n_stars=70, seed=3, shape=(280, 280))
    u, v = (field.x - 140) / 140, (field.y - 140) / 140
    ex, ey = 0.06 + 0.04 * u - 0.03 * u * v, -0.05 + 0.03 * v + 0.02 * u * u
    biases = []
    for channel in channels(layout)[:2]:
        results = {
            refine: measure_channel(
                field.image, field.error, bad_codes(field.mask), channel, field.x + ex,
                field.y + ey, field.mag, fwhm_guess=float(np.median(field.major)),
                config=PhotometryConfig(apertures=APERTURES, refine_positions=refine),
            )
            for refine in (True, False)
        }  # fmt: skip
        at_truth = measure_channel(
            field.image, field.error, bad_codes(field.mask), channel, field.x, field.y,
            field.mag, fwhm_guess=float(np.median(field.major)),
            config=PhotometryConfig(apertures=APERTURES, refine_positions=False),
        )  # fmt: skip
        result = results[True]
        clean = result.flags == 0
        assert clean.sum() >= 60
        error = np.hypot(result.x - field.x, result.y - field.y)[clean]
        assert result.correction.order >= 1 and result.correction.used >= 30
        # the fits' centroid noise grows with the FWHM, and the stars isolated enough to
        # shape the PSF fall as 1/FWHM²: the correction's error grows as FWHM²
        bound = 0.006 * (fwhm / 2.0) ** 2
        assert np.median(error) < bound and error.max() < 0.04, (np.median(error), error.max())
        np.testing.assert_allclose(result.dx, result.x - (field.x + ex))
        assert float(result.qc["position_shift_rms"]) == pytest.approx(
            np.sqrt(np.mean(ex**2 + ey**2)), rel=0.15
        )
        unrefined = results[False]
        np.testing.assert_array_equal(unrefined.x, field.x + ex)
        true = _true_aperture_flux(field, channel.step, 2.0)
        bias = float(np.median(result.flux[clean, 0] / true[clean] - 1))
        before = float(np.median(unrefined.flux[clean, 0] / true[clean] - 1))
        own = float(np.median(at_truth.flux[clean, 0] / true[clean] - 1))
        print(layout, fwhm, channel.name, "2 px aperture bias", bias, "unrefined", before,
              "at the true positions", own)  # fmt: skip
        assert abs(bias - own) < 0.002
        if channel.step == 2 and fwhm <= 2.0:
            assert abs(before) > 0.005  # what the test would see without the correction
        biases.append(bias)
    # Last, once every other check has run: the refined 2 px aperture against the truth.
    assert max(abs(b) for b in biases) < 0.003, biases


def test_mosaic_pools_the_position_correction_over_its_channels():
    """A small frame of 7 stars: too few in any one channel for a correction of its own
    (fewer than 8 shape stars), so each channel alone is measured 0.07 px off; the four
    channels' 28 fits together correct every channel to < 0.01 px (median)."""
    field = make_field(layout="RGGB", fwhm=2.0, n_stars=12, seed=3, shape=(240, 240))
    u, v = (field.x - 120) / 120, (field.y - 120) / 120
    ex, ey = 0.06 + 0.04 * u - 0.03 * u * v, -0.05 + 0.03 * v + 0.02 * u * u
    bad = bad_codes(field.mask)
    config = PhotometryConfig(apertures=APERTURES)
    fwhm = float(np.median(field.major))
    mosaic = channels("RGGB")
    pooled = measure_mosaic(field.image, field.error, bad, mosaic, field.x + ex, field.y + ey,
                            field.mag, config=config, fwhm_guess=fwhm)  # fmt: skip
    assert [r.channel for r in pooled] == ["R", "G1", "G2", "B"]
    for channel, result in zip(mosaic, pooled, strict=True):
        alone = measure_channel(field.image, field.error, bad, channel, field.x + ex,
                                field.y + ey, field.mag, config=config,
                                fwhm_guess=fwhm)  # fmt: skip
        assert alone.correction.order == -1  # 7 stars: no correction
        assert result.correction.order >= 1 and result.correction.used >= 24
        error = np.hypot(result.x - field.x, result.y - field.y)
        before = np.hypot(alone.x - field.x, alone.y - field.y)
        print(channel.name, "pooled", np.median(error), "alone", np.median(before))
        assert np.median(error) < 0.01 and error.max() < 0.03, (channel.name, error)
        assert np.median(before) > 0.05
        np.testing.assert_allclose(result.dx, result.x - (field.x + ex))


def test_phase_drift_with_frame_to_frame_position_errors():
    """The phase-drift night with each frame's positions off by its own smooth error field
    (0.06 px scale, as the WCS fits of the demo night): PRF apertures and PSF fluxes still
    scatter ≤ 1.3× the photon noise on G1 (r = 3 px)."""
    rng = np.random.default_rng(12)
    base = make_field(layout="RGGB", fwhm=2.0, n_stars=50, seed=11, shape=(240, 240))
    channel = channels("RGGB")[1]
    radius = 3.0
    rows = {"prf": [], "psf": [], "prf_unrefined": []}
    for frame in range(10):
        dx, dy = rng.uniform(0, 2, 2)
        field = make_field(layout="RGGB", fwhm=2.0, seed=100 + frame, shape=(240, 240),
                           positions=(base.x + dx, base.y + dy), fluxes=base.flux)  # fmt: skip
        ex, ey = _wcs_error(field.x, field.y, (240, 240), rng)
        given = dataclasses.replace(field, x=field.x + ex, y=field.y + ey)
        result = _measure(given, channel)
        unrefined = _measure(given, channel, refine_positions=False)
        true_ap = _true_aperture_flux(field, 2, radius)
        py, px = np.mgrid[channel.y0 : 240 : 2, channel.x0 : 240 : 2]
        noise = np.array([np.sqrt(np.sum((field.noiseless[py, px] + field.read_noise**2)[
            (px - xs) ** 2 + (py - ys) ** 2 <= radius**2])) for xs, ys in
            zip(field.x, field.y, strict=True)])  # fmt: skip
        clean = result.flags == 0
        for key, value, truth in (("prf", result.flux[:, 1], true_ap),
                                  ("psf", result.psf_flux, field.flux / 4),
                                  ("prf_unrefined", unrefined.flux[:, 1], true_ap)):  # fmt: skip
            ratio = value / truth
            zero = np.median(ratio[clean])
            rows[key].append(((ratio - zero) * truth / noise)[clean])
    excess = {key: float(np.sqrt(np.mean(np.concatenate(v) ** 2))) for key, v in rows.items()}
    print("scatter over photon noise, positions with WCS errors:", excess)
    assert excess["prf"] <= 1.3, excess
    assert excess["psf"] <= 1.3, excess


def test_saturated_edge_and_masked_stars_are_flagged_and_measured():
    others = make_field(layout="MONO", fwhm=2.5, seed=20, shape=(200, 200), n_stars=40,
                        margin=20)  # fmt: skip
    far = np.hypot(others.x[:, None] - [60, 2, 100, 140], others.y[:, None] - [60, 80, 100, 140])
    keep = far.min(axis=1) > 20
    positions = (np.r_[[60.0, 2.0, 100.0, 140.3], others.x[keep]],
                 np.r_[[60.0, 80.0, 100.0, 140.7], others.y[keep]])  # fmt: skip
    fluxes = np.r_[[3e6, 1e5, 1e5, 1e5], others.flux[keep]]
    field = make_field(layout="MONO", fwhm=2.5, seed=21, shape=(200, 200), positions=positions,
                       fluxes=fluxes, saturation=60000.0)  # fmt: skip
    field.mask[(field.mask == 1)] = MaskBit.SATURATED
    field.mask[100, 101] = MaskBit.COSMIC_RAY
    (mono,) = channels("MONO")
    result = _measure(field, mono, profile="moffat")
    flags = result.flags
    assert result.shape_map is not None
    assert flags[0] & Flag.SATURATED and not flags[3]
    assert flags[1] & Flag.EDGE
    assert flags[2] & Flag.MASKED and not flags[2] & Flag.SATURATED
    # finite values where the data allow; the saturated star from its wings
    assert np.all(np.isfinite(result.flux[1:4])) and np.isfinite(result.psf_flux[0])
    assert result.psf_flux[0] == pytest.approx(3e6, rel=0.03)
    true = _true_aperture_flux(field, 1, 3.0)
    assert result.flux[2, 1] == pytest.approx(true[2], rel=0.01)
    assert result.flux[1, 1] == pytest.approx(true[1], rel=0.02)


def test_bad_codes_follow_the_mask_bits():
    """The lookup table against the plain rule for every mask value: masked pixels
    (hot, low response, cosmic ray, non-finite) and saturated ones (saturated, bleed),
    non-finite winning over saturated."""
    from autowisp.core.aperture import BAD_MASKED, BAD_SATURATED
    from autowisp.core.calibration import MaskBit

    mask = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.zeros(mask.shape, np.uint8)
    for j, i in np.ndindex(mask.shape):
        bits = MaskBit(int(mask[j, i]) & 63)
        if bits & MaskBit.NON_FINITE:
            expected[j, i] = BAD_MASKED
        elif bits & (MaskBit.SATURATED | MaskBit.BLEED):
            expected[j, i] = BAD_SATURATED
        elif bits & (MaskBit.HOT | MaskBit.LOW_RESPONSE | MaskBit.COSMIC_RAY):
            expected[j, i] = BAD_MASKED
    np.testing.assert_array_equal(bad_codes(mask), expected)
    np.testing.assert_array_equal(bad_codes(mask.astype(np.int32)), expected)
    with pytest.raises(ValueError, match="MaskBit"):
        bad_codes(mask.astype(np.int32) * 2)
    with pytest.raises(ValueError, match="MaskBit"):
        bad_codes(mask.astype(float))


@pytest.mark.parametrize("layout, fwhm", [("MONO", 2.0), ("BGGR", 3.5)])
def test_bicubic_psf_model_in_measure_channel(layout, fwhm):
    """psf_model='bicubic': PSF fluxes from the bicubic map within 0.5 % of the truth
    (median, clean stars) and the aperture fluxes as in the analytic run. (The bicubic
    errors' pulls are tested, and not yet reached, in test_bicubic.py: here 1.20 and
    1.27.)"""
    field = make_field(layout=layout, fwhm=fwhm, n_stars=70, seed=7, shape=(280, 280))
    channel = channels(layout)[-1]
    analytic = _measure(field, channel)
    result = _measure(field, channel, psf_model="bicubic")
    assert result.qc["psf_model"] == "bicubic" and result.bicubic_map is not None
    assert analytic.qc["psf_model"] == "analytic" and analytic.bicubic_map is None
    np.testing.assert_allclose(result.flux, analytic.flux, rtol=0.02)
    clean = (result.flags == 0) & np.isfinite(result.psf_flux)
    assert clean.sum() >= 50
    true = field.flux / channel.step**2
    bias = float(np.median(result.psf_flux[clean] / true[clean] - 1))
    pull = (result.psf_flux[clean] - true[clean]) / result.psf_flux_err[clean]
    rms = float(np.sqrt(np.mean((pull - np.median(pull)) ** 2)))
    print(layout, fwhm, "bicubic PSF-flux bias", bias, "pull RMS", rms)
    assert abs(bias) < 0.005
    with pytest.raises(ValueError, match="PSF model"):
        PhotometryConfig(psf_model="spline")


def test_blended_shape_stars_do_not_mislead_the_position_correction(monkeypatch):
    """Half the stars with a neighbour the catalogue does not list (3–10 % of their flux,
    2–3.5 px away) whose light pulls their fitted centres: at exact positions the
    correction keeps the stars within 0.01 px (median), helped by leaving out the fits of
    χ²/dof > 3 (without that cut 0.013 px here), and WCS errors of 0.08 px are still
    corrected to ~0.01 px."""
    import autowisp.core.photometry as photometry

    rng = np.random.default_rng(5)
    base = make_field(layout="RGGB", fwhm=2.0, n_stars=48, seed=21, shape=(320, 320))
    n = base.x.size
    blended = rng.random(n) < 0.5
    angle, distance = rng.uniform(0, 2 * np.pi, n), rng.uniform(2.0, 3.5, n)
    positions = (np.r_[base.x, (base.x + distance * np.cos(angle))[blended]],
                 np.r_[base.y, (base.y + distance * np.sin(angle))[blended]])  # fmt: skip
    fluxes = np.r_[base.flux, (base.flux * rng.uniform(0.03, 0.1, n))[blended]]
    field = make_field(layout="RGGB", fwhm=2.0, seed=22, shape=(320, 320), positions=positions,
                       fluxes=fluxes)  # fmt: skip
    u, v = (base.x - 160) / 160, (base.y - 160) / 160

    def median_error(ex, ey):
        results = measure_mosaic(field.image, field.error, bad_codes(field.mask),
                                 channels("RGGB"), base.x + ex, base.y + ey, field.mag[:n],
                                 config=PhotometryConfig(), fwhm_guess=2.0)  # fmt: skip
        return max(float(np.median(np.hypot(r.x - base.x, r.y - base.y))) for r in results)

    exact = median_error(0 * u, 0 * v)
    ex, ey = 0.06 + 0.04 * u - 0.03 * u * v, -0.05 + 0.03 * v + 0.02 * u * u
    corrected = median_error(ex, ey)
    monkeypatch.setattr(photometry, "POSITION_CHI2", np.inf)
    ungated = median_error(0 * u, 0 * v)
    print("median position error: exact", exact, "ungated", ungated, "WCS errors", corrected)
    assert exact < 0.01 and ungated > exact
    assert corrected < 0.015 < np.median(np.hypot(ex, ey)) / 5
