"""The magnitude fit's pieces against synthetic truth and plain reference implementations."""

from __future__ import annotations

import numpy as np
import pytest

from autowisp.core.magfit import (
    Expression,
    MagfitConfig,
    apply_correction,
    fit_frame,
    fit_frame_adaptive,
    master_block,
    parse_expression,
    reference_merit,
    residual_pattern,
    solve_least_squares,
    star_airmass,
    variable_stars,
)


def test_expression_terms():
    original = parse_expression("O3{mag, x, y}")
    assert len(original.terms) == 20  # the original's default
    assert () in original.terms and (("mag", 3),) in original.terms
    assert (("mag", 1), ("x", 1), ("y", 1)) in original.terms
    wide = parse_expression("O3{mag, x, y} + colour + colour*airmass")
    assert len(wide.terms) == 22
    assert wide.variables == ("airmass", "colour", "mag", "x", "y")
    assert wide.describe((("colour", 1), ("airmass", 1))) == "colour*airmass"
    # Products of sets, duplicates counted once.
    product = parse_expression("O1{x}*O1{y} + x + 1")
    assert set(product.terms) == {(), (("x", 1),), (("y", 1),), (("x", 1), ("y", 1))}
    assert len(product.without(["y"]).terms) == 2


@pytest.mark.parametrize(
    "text", ["", "O3{}", "O3{mag, x", "__import__('os')", "mag**2", "O{x}", "x - y"]
)
def test_expression_rejects_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="expression"):
        parse_expression(text)


def test_design_matches_the_terms():
    rng = np.random.default_rng(1)
    v = {"mag": rng.normal(size=50), "x": rng.uniform(-1, 1, 50), "y": rng.uniform(-1, 1, 50)}
    e = parse_expression("O3{mag, x, y}")
    design = e.design(v)
    for column, term in enumerate(e.terms):
        expected = np.ones(50)
        for name, power in term:
            expected = expected * v[name] ** power
        np.testing.assert_allclose(design[:, column], expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("order", [3, 6, 12])
def test_solver_agrees_with_svd(order):
    """The normal equations with refinement against numpy's SVD least squares."""
    rng = np.random.default_rng(order)
    n = 1500
    v = {"mag": rng.uniform(-4, 3, n), "x": rng.uniform(-1, 1, n), "y": rng.uniform(-1, 1, n)}
    design = parse_expression(f"O3{{mag, x, y}} + O{order}{{x, y}}").design(v)
    target = np.sin(3 * v["x"]) * 0.05 + rng.normal(0, 0.01, n)
    beta = solve_least_squares(design, target)
    reference, *_ = np.linalg.lstsq(design, target, rcond=None)
    assert np.max(np.abs(design @ beta - design @ reference)) < 1e-9
    # A singular design (a repeated column) falls back to the SVD's minimum-norm answer.
    twice = np.column_stack([design[:, :5], design[:, :1]])
    np.testing.assert_allclose(
        twice @ solve_least_squares(twice, target),
        twice @ np.linalg.lstsq(twice, target, rcond=None)[0],
        atol=1e-9,
    )


def _frame(rng, n=800, outliers=0.05):
    """A frame: the correction ref − mag a known polynomial of (mag, x, y), noise by
    magnitude, and a fraction of wild points."""
    mag = rng.uniform(-4, 3, n)
    x, y = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    sigma = 0.002 + 0.02 * 10 ** (0.4 * mag) / 10 ** (0.4 * 3)
    truth = 0.3 + 0.05 * x - 0.03 * y + 0.02 * x * y + 0.01 * mag + 0.004 * mag**2
    target = truth + rng.normal(0, 1, n) * sigma
    wild = rng.uniform(size=n) < outliers
    target[wild] += rng.choice([-1, 1], wild.sum()) * rng.uniform(0.2, 1.0, wild.sum())
    return mag, x, y, sigma, truth, target, wild


def _reference_fit(target, sigma, design, config):
    """A plain implementation: weighted least squares by the normal equations in a loop
    over points, rejection until nothing changes."""
    weight = 1.0 / (sigma + config.error_floor) ** 2
    used = (sigma <= config.max_error) & np.isfinite(target)
    beta = np.zeros(design.shape[1])
    for _ in range(config.max_rejection_iterations + 1):
        a = np.zeros((design.shape[1], design.shape[1]))
        b = np.zeros(design.shape[1])
        for i in np.flatnonzero(used):
            a += weight[i] * np.outer(design[i], design[i])
            b += weight[i] * design[i] * target[i]
        beta = np.linalg.solve(a, b)
        residual = target - design @ beta
        chi2 = sum(weight[i] * residual[i] ** 2 for i in np.flatnonzero(used))
        scale2 = chi2 / used.sum()  # weighted residual variance of a unit-weight point
        new = (sigma <= config.max_error) & (weight * residual**2 <= config.rejection**2 * scale2)
        if np.array_equal(new, used):
            break
        used = new
    return beta, used


def test_fit_frame_recovers_the_correction_and_rejects_wild_points():
    rng = np.random.default_rng(7)
    mag, x, y, sigma, truth, target, wild = _frame(rng)
    e = parse_expression("O3{mag, x, y}")
    design = e.design({"mag": mag, "x": x, "y": y})
    config = MagfitConfig()
    fit = fit_frame(target, sigma, design, config, magnitude=mag)
    assert fit.ok
    # The fitted correction against the truth, where the fitting stars are (σ ≤ 0.1).
    good = sigma <= config.max_error
    error = (design @ fit.coefficients - truth)[good]
    assert np.sqrt(np.mean(error**2)) < 0.0015  # measured 0.0009 mag
    assert fit.used[wild].mean() < 0.05  # wild points rejected (0.2–1 mag off)
    assert fit.used[~wild & good].mean() > 0.99
    beta, used = _reference_fit(target, sigma, design, config)
    np.testing.assert_array_equal(used, fit.used)
    np.testing.assert_allclose(design @ beta, design @ fit.coefficients, atol=1e-9)
    # With the reference at 0, mag = −target: corrected, the stars are at 0 within
    # their noise.
    corrected = apply_correction(-target, design, fit)
    pulls = corrected[good & ~wild] / sigma[good & ~wild]
    assert 0.9 < np.std(pulls) < 1.1


def test_fit_frame_fails_with_a_reason_when_too_few_stars():
    rng = np.random.default_rng(3)
    mag, x, y, sigma, _, target, _ = _frame(rng, n=40, outliers=0)
    design = parse_expression("O3{mag, x, y}").design({"mag": mag, "x": x, "y": y})
    fit = fit_frame(target, sigma, design, MagfitConfig())
    assert not fit.ok and "20 terms" in fit.reason
    assert np.all(np.isnan(apply_correction(mag, design, fit)))


def test_finer_terms_follow_a_cloud_and_not_the_noise():
    rng = np.random.default_rng(11)
    base = parse_expression("O3{mag, x, y}")
    finer = Expression("", tuple(t for t in parse_expression("O12{x, y}").terms
                                 if t not in base.terms))  # fmt: skip
    levels = [len([t for t in parse_expression(f"O{o}{{x, y}}").terms if t not in base.terms])
              for o in (6, 9, 12)]  # fmt: skip
    config = MagfitConfig()
    kept_on_clear = 0
    for trial in range(10):
        mag, x, y, sigma, truth, target, _ = _frame(rng, n=2000, outliers=0.0)
        design = base.design({"mag": mag, "x": x, "y": y})
        extra = finer.design({"x": x, "y": y})
        _fit, used = fit_frame_adaptive(target, sigma, design, extra, config, levels=levels)
        kept_on_clear += used > 0
        if trial < 3:  # the same frame under a blob of cloud
            cx, cy = rng.uniform(-0.5, 0.5, 2)
            cloud = 0.4 * np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / 0.35**2)
            cloudy, used = fit_frame_adaptive(
                target + cloud, sigma, design, extra, config, levels=levels
            )
            assert used == levels[-1]
            full = np.column_stack([design, extra])
            error = full @ cloudy.coefficients - (truth + cloud)
            smooth_only = fit_frame(target + cloud, sigma, design, config)
            error_smooth = design @ smooth_only.coefficients - (truth + cloud)
            good = sigma < 0.01
            # Measured: 0.9 mmag with the finer terms, 47–58 mmag without.
            assert np.sqrt(np.mean(error[good] ** 2)) < 0.003
            assert np.sqrt(np.mean(error_smooth[good] ** 2)) > 0.015
    assert kept_on_clear <= 1  # measured 0 of 10


def _reference_master(values, config, frames):
    """Per star in a loop: the median with rejection beyond k median absolute deviations."""
    out = np.full(values.shape[1], np.nan)
    for s in range(values.shape[1]):
        v = values[:, s][np.isfinite(values[:, s])]
        for _ in range(config.master_iterations):
            if v.size == 0:
                break
            centre = np.median(v)
            spread = max(np.median(np.abs(v - centre)), 1e-6)
            kept = v[np.abs(v - centre) <= config.master_rejection * spread]
            if kept.size == v.size:
                break
            v = kept
        if v.size >= config.min_frames_fraction * frames:
            out[s] = np.median(v)
    return out


def test_master_block_against_a_loop_and_the_truth():
    rng = np.random.default_rng(5)
    frames, stars = 40, 300
    truth = rng.uniform(-3, 3, stars)
    sigma = rng.uniform(0.002, 0.05, stars)
    values = truth + rng.normal(size=(frames, stars)) * sigma
    hits = rng.uniform(size=values.shape) < 0.03
    values[hits] += 2.0  # cosmic rays, satellites
    values[rng.uniform(size=values.shape) < 0.1] = np.nan
    values[:25, :10] = np.nan  # ten stars seen on 15 of 40 frames
    config = MagfitConfig()
    master = master_block(values, config, frames)
    np.testing.assert_allclose(master.magnitude, _reference_master(values, config, frames),
                               rtol=0, atol=1e-12)  # fmt: skip
    assert np.all(np.isnan(master.magnitude[:10]))
    error = (master.magnitude - truth)[10:] / sigma[10:]
    assert np.sqrt(np.mean(error**2)) < 0.35  # the median of ~31 points: measured 0.23 σ
    np.testing.assert_allclose(np.median(master.scatter[10:] / sigma[10:]), 1.0, atol=0.1)


def test_variables_stand_out_of_the_scatter_magnitude_relation():
    rng = np.random.default_rng(9)
    n = 1500
    mag = rng.uniform(-4, 3, n)
    relation = 0.002 + 0.03 * 10 ** (0.4 * (mag - 3))
    scatter = relation * np.exp(rng.normal(0, 0.1, n))  # 60 frames: ~9 % per estimate
    variables = rng.choice(n, 8, replace=False)
    scatter[variables] = np.hypot(scatter[variables], 0.03)  # 3 % amplitude
    quiet = np.argsort(scatter)[:5]
    flagged, _ = variable_stars(mag, scatter)
    assert flagged[variables].all()
    assert not flagged[quiet].any()  # one-sided
    assert flagged.sum() - 8 < 0.05 * n  # measured 1.6 % of the quiet stars flagged


def test_reference_merit_prefers_sharp_dark_full_frames():
    merit, quantiles = reference_merit(
        {
            "fwhm": np.array([2.5, 2.0, 2.1, np.nan]),
            "background": np.array([10.0, 9.5, 10.5, 9.0]),
            "stars": -np.array([500, 530, 510, 520]),
        }
    )
    assert int(np.argmax(merit)) == 1
    assert quantiles["fwhm"][3] == 1.0  # unknown is the worst


def test_airmass_against_astropy():
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    iers.conf.auto_download = False
    rng = np.random.default_rng(2)
    # Stars over the sky of the site, and five at dec −85, never above its horizon.
    ra = np.concatenate([rng.uniform(250, 350, 200), rng.uniform(0, 360, 5)])
    dec = np.concatenate([rng.uniform(-10, 50, 200), np.full(5, -85.0)])
    jd = 2460563.85
    site = EarthLocation(lat=19.53 * u.deg, lon=-155.58 * u.deg, height=0 * u.m)
    with iers.conf.set_temp("iers_degraded_accuracy", "ignore"):
        altaz = SkyCoord(ra * u.deg, dec * u.deg).transform_to(
            AltAz(obstime=Time(jd, format="jd", scale="utc"), location=site)
        )
    altitude = altaz.alt.deg
    with np.errstate(invalid="ignore"):  # below the horizon: no airmass
        expected = 1 / (np.sin(np.radians(altitude)) + 0.50572 * (altitude + 6.07995) ** -1.6364)
    ours = star_airmass(ra, dec, jd, 19.53, -155.58)
    up = altitude > 15
    assert up.sum() > 50
    # Aberration (20″) is left out: measured at most 6e-5 of the airmass.
    assert np.max(np.abs(ours[up] - expected[up]) / expected[up]) < 2e-4
    below = altitude < -1
    assert below.sum() == 5 and np.all(np.isnan(ours[below]))


def test_residual_pattern_sees_clouds_not_noise():
    rng = np.random.default_rng(21)
    flagged_noise = 0
    for _ in range(50):
        n = 1500
        x, y = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
        sigma = rng.uniform(0.002, 0.08, n)
        weight = 1 / (sigma + 0.01) ** 2
        residual = rng.normal(0, 1, n) * sigma
        used = np.ones(n, bool)
        flagged_noise += residual_pattern(residual, weight, used, x, y)
        # A 50 mmag blob is always seen (measured: 30 mmag 47 of 50 times, 20 mmag 8).
        cloud = 0.05 * np.exp(-0.5 * ((x - 0.3) ** 2 + (y + 0.2) ** 2) / 0.25**2)
        assert residual_pattern(residual + cloud - cloud.mean(), weight, used, x, y)
    assert flagged_noise <= 2  # measured 0 of 50 (3 σ of the χ² of 36 cells)


def test_the_ladder_is_skipped_on_frames_without_a_pattern():
    rng = np.random.default_rng(11)
    base = parse_expression("O3{mag, x, y}")
    finer = Expression("", tuple(t for t in parse_expression("O12{x, y}").terms
                                 if t not in base.terms))  # fmt: skip
    mag, x, y, sigma, _, target, _ = _frame(rng, n=2000, outliers=0.0)
    design = base.design({"mag": mag, "x": x, "y": y})
    extra = finer.design({"x": x, "y": y})
    config = MagfitConfig()
    clear, used = fit_frame_adaptive(target, sigma, design, extra, config, levels=[18, 45, 81],
                                     positions=(x, y))  # fmt: skip
    plain = fit_frame(target, sigma, design, config)
    assert used == 0
    np.testing.assert_allclose(clear.coefficients[: design.shape[1]], plain.coefficients)
    cloud = 0.4 * np.exp(-0.5 * ((x - 0.2) ** 2 + (y - 0.1) ** 2) / 0.35**2)
    _, used = fit_frame_adaptive(target + cloud, sigma, design, extra, config,
                                 levels=[18, 45, 81], positions=(x, y))  # fmt: skip
    assert used == 81
