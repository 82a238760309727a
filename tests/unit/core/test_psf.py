"""The analytic PSF: shapes, PRF integrals and the fits' analytic Jacobian."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from autowisp.core.psf import (
    GAUSSIAN,
    MOFFAT,
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
