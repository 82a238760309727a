"""The analytic PSF: shapes, PRF integrals and the fits' analytic Jacobian."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy.optimize import least_squares

from autowisp.core.psf import (
    _NODES,
    _WEIGHTS,
    GAUSSIAN,
    MOFFAT,
    _model_jacobian,
    fit_prf_lm,
    fwhm_of,
    model_and_jacobian,
    pixel_integrals,
    shape_from_fwhm,
)


@pytest.mark.parametrize("kind", ["gaussian", "moffat"])
def test_fwhm_and_shape_round_trip(kind):
    major, minor, theta = np.array([2.5, 3.0]), np.array([2.0, 1.5]), np.array([0.3, 2.0])
    s, d, k = shape_from_fwhm(major, minor, theta, kind=kind, beta=3.0)
    back = fwhm_of(s, d, k, kind=kind, beta=3.0)
    assert_allclose(back, (major, minor, theta), rtol=1e-12)


@pytest.mark.parametrize(
    "kind, beta", [(GAUSSIAN, 0.0), (MOFFAT, 3.5), (MOFFAT, None)], ids=["gauss", "moffat", "free"]
)
@pytest.mark.parametrize(
    "cells", [np.array([[-0.5, 0.5, -0.5, 0.5, 4.0]]), np.array([[-0.5, 0.5, -0.5, 0.5, 1.0]])]
)
def test_jacobian_matches_finite_differences(kind, beta, cells):
    yy, xx = np.mgrid[0:14:2, 1:15:2]
    px, py = xx.ravel().astype(float), yy.ravel().astype(float)
    s, d, k = shape_from_fwhm(np.array(2.4), np.array(1.9), np.array(0.7), kind="moffat")
    params = np.array([5000.0, 7.3, 6.6, float(s), float(d), float(k)])
    if beta is None:
        params = np.append(params, 3.2)
    model, jac = model_and_jacobian(kind, params, px, py, cells, beta=beta)
    reference = params[0] * pixel_integrals(kind, 3.2 if beta is None else beta, params[3:6],
                                            px - params[1], py - params[2], cells)  # fmt: skip
    assert_allclose(model, reference, rtol=1e-12)
    for j in range(params.size):
        step = 1e-6 * max(abs(params[j]), 1e-3)
        up, down = params.copy(), params.copy()
        up[j] += step
        down[j] -= step
        numeric = (
            model_and_jacobian(kind, up, px, py, cells, beta=beta)[0]
            - model_and_jacobian(kind, down, px, py, cells, beta=beta)[0]
        ) / (2 * step)
        assert_allclose(jac[:, j], numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max())
    # the numba kernel of the fits computes the same model and Jacobian
    fast_model, fast_jac = np.empty(px.size), np.empty((px.size, params.size))
    assert _model_jacobian(kind, 3.2 if beta is None else beta, params, px, py, cells, _NODES,
                           _WEIGHTS, fast_model, fast_jac)  # fmt: skip
    assert_allclose(fast_model, model, rtol=1e-12)
    assert_allclose(fast_jac, jac, rtol=1e-10, atol=1e-12 * np.abs(jac).max())


def _scaled_residual(params, px, py, values, sigma, cells, beta):
    return (model_and_jacobian(MOFFAT, params, px, py, cells, beta=beta)[0] - values) / sigma


def _scaled_jacobian(params, px, py, values, sigma, cells, beta):
    return model_and_jacobian(MOFFAT, params, px, py, cells, beta=beta)[1] / sigma[:, None]


@pytest.mark.parametrize("free_beta", [False, True], ids=["fixed-beta", "free-beta"])
@pytest.mark.parametrize("weight", [1.0, 4.0], ids=["mono", "bayer"])
def test_levenberg_marquardt_finds_the_scipy_minimum(free_beta, weight):
    """The numba fit and scipy's least_squares (the reference) under the same soft-L1
    loss and bounds reach the same parameters, with a cosmic ray in the stamp."""
    rng = np.random.default_rng(3)
    cells = np.array([[-0.5, 0.5, -0.5, 0.5, weight]])
    step = 2 if weight == 4.0 else 1
    beta = None if free_beta else 3.0
    for trial in range(6):
        s, d, k = shape_from_fwhm(np.array(2.4), np.array(2.0), np.array(0.5), kind="moffat",
                                  beta=3.0)  # fmt: skip
        truth = [5e4, 20.3 + rng.uniform(-0.5, 0.5), 21.7 + rng.uniform(-0.5, 0.5), float(s),
                 float(d), float(k)] + ([3.0] if free_beta else [])  # fmt: skip
        truth_p = np.array(truth)
        yy, xx = np.mgrid[0:42:step, 0:42:step]
        near = (xx - truth_p[1]) ** 2 + (yy - truth_p[2]) ** 2 <= 36
        px, py = xx[near].astype(float), yy[near].astype(float)
        model = model_and_jacobian(MOFFAT, truth_p, px, py, cells, beta=beta)[0]
        sigma = np.sqrt(model + 100.0)
        values = model + rng.normal(0.0, 1.0, model.size) * sigma
        values[trial] += 3000.0
        start = shape_from_fwhm(np.array(2.5), np.array(2.5), np.array(0.0), kind="moffat")
        p0 = np.array([values.sum(), truth_p[1] + 0.3, truth_p[2] - 0.2, float(start[0]), 0, 0]
                      + ([3.5] if free_beta else []))  # fmt: skip
        lower = np.array([0, p0[1] - 1.5, p0[2] - 1.5, 1e-3, -np.inf, -np.inf]
                         + ([1.2] if free_beta else []))  # fmt: skip
        upper = np.array([np.inf, p0[1] + 1.5, p0[2] + 1.5, np.inf, np.inf, np.inf]
                         + ([20.0] if free_beta else []))  # fmt: skip
        fast, residual, converged = fit_prf_lm(
            MOFFAT, 3.0, p0, lower, upper, px, py, values, sigma, cells, _NODES, _WEIGHTS,
            3.0, 100,
        )  # fmt: skip
        reference = least_squares(
            _scaled_residual, p0, jac=_scaled_jacobian, args=(px, py, values, sigma, cells, beta),
            bounds=(lower, upper), x_scale="jac", loss="soft_l1", f_scale=3.0, xtol=1e-12,
            ftol=1e-12, gtol=1e-12, max_nfev=500,
        )  # fmt: skip
        assert converged
        assert_allclose(fast, reference.x, rtol=2e-5, atol=1e-6)
        assert_allclose(residual, reference.fun, rtol=1e-4, atol=1e-5)
