import numpy as np
import pytest
from astropy.wcs import WCS

from autowisp.core.projection import TanSip, sip_from_lens, tan_deproject, tan_project


def _wcs(rotation=25.0, order=5):
    theta = np.radians(rotation)
    scale = 10.3 / 3600
    cd = scale * np.array([[-np.cos(theta), np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    a, b = sip_from_lens(k1=4e-9, k2=3e-16, p1=2e-7, p2=-3e-7, order=order)
    return TanSip(np.array([511.5, 383.5]), np.array([301.56, 44.46]), cd, a, b)


def test_tan_round_trip_and_tangent_point():
    rng = np.random.default_rng(0)
    ra = 100 + rng.uniform(-5, 5, 1000)
    dec = -30 + rng.uniform(-5, 5, 1000)
    xi, eta, _ = tan_project(ra, dec, 100.0, -30.0)
    back_ra, back_dec = tan_deproject(xi, eta, 100.0, -30.0)
    np.testing.assert_allclose(back_ra, ra, atol=1e-10)
    np.testing.assert_allclose(back_dec, dec, atol=1e-10)
    xi0, eta0, _ = tan_project(np.array([100.0]), np.array([-30.0]), 100.0, -30.0)
    assert abs(xi0[0]) < 1e-12 and abs(eta0[0]) < 1e-12


def test_far_hemisphere_is_nan():
    xi, eta, cos_c = tan_project(np.array([280.0]), np.array([30.0]), 100.0, -30.0)
    assert cos_c[0] < 0 and np.isnan(xi[0]) and np.isnan(eta[0])


def test_agrees_with_astropy_both_ways():
    model = _wcs()
    astropy_wcs = WCS(model.to_header(shape=(768, 1024)))
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1023, 2000), rng.uniform(0, 767, 2000)
    ra, dec = model.pixel_to_sky(x, y)
    ra2, dec2 = astropy_wcs.all_pix2world(x, y, 0)
    # 1e-9 deg is 3.5e-7 px at 10.3"/px.
    np.testing.assert_allclose(ra, ra2, atol=1e-9)
    np.testing.assert_allclose(dec, dec2, atol=1e-9)
    x2, y2 = model.sky_to_pixel(ra, dec)
    np.testing.assert_allclose(x2, x, atol=1e-8)
    np.testing.assert_allclose(y2, y, atol=1e-8)


def test_inverse_sip_header_is_accurate():
    model = _wcs()
    header = model.to_header(shape=(768, 1024))
    assert header["AP_ORDER"] == 6
    astropy_wcs = WCS(header)
    rng = np.random.default_rng(2)
    x, y = rng.uniform(0, 1023, 500), rng.uniform(0, 767, 500)
    u, v = astropy_wcs.sip_pix2foc(x, y, 0)
    back_x, back_y = astropy_wcs.sip_foc2pix(u, v, 0)
    assert np.max(np.hypot(back_x - x, back_y - y)) < 0.01


def test_lens_distortion_is_radial_with_expected_size():
    a, b = sip_from_lens(k1=1e-8)
    model = TanSip(np.zeros(2), np.array([0.0, 0.0]), np.eye(2) * 1e-3, a, b)
    u = np.array([100.0, 0.0, 300.0])
    v = np.array([0.0, 200.0, 400.0])
    r2 = u**2 + v**2
    ra, dec = model.pixel_to_sky(u, v)
    undistorted = TanSip(np.zeros(2), np.array([0.0, 0.0]), np.eye(2) * 1e-3)
    up, vp = undistorted.sky_to_pixel(ra, dec)
    np.testing.assert_allclose(up, u * (1 + 1e-8 * r2), rtol=1e-10)
    np.testing.assert_allclose(vp, v * (1 + 1e-8 * r2), rtol=1e-10)


def test_sip_orders_are_checked():
    with pytest.raises(ValueError, match="order 5"):
        sip_from_lens(k1=1e-9, k2=1e-16, order=3)


def test_uninvertible_positions_are_nan():
    model = _wcs()
    x, y = model.sky_to_pixel(np.array([301.56, 301.56 + 180]), np.array([44.46, -44.46]))
    assert np.isfinite(x[0]) and np.isnan(x[1]) and np.isnan(y[1])
