import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.time import Time
from astropy.utils import iers

from autowisp.simulate import observing


def test_airmass_agrees_with_astropy_altaz():
    iers.conf.auto_download = False
    site = observing.Site()
    jd = Time("2024-09-11T08:00:00", scale="utc").jd
    ra = np.array([301.56, 280.0, 330.0, 250.0])
    dec = np.array([44.46, 10.0, 60.0, -20.0])
    true_ra, true_dec = observing.to_true_equator(ra, dec, jd)
    lst = observing.sidereal_time(np.array([jd]), site)[0]
    mass, altitude = observing.airmass(true_ra, true_dec, lst, site)
    location = EarthLocation(
        lat=site.latitude * u.deg, lon=site.longitude * u.deg, height=site.height * u.m
    )
    altaz = SkyCoord(ra=ra * u.deg, dec=dec * u.deg).transform_to(
        AltAz(obstime=Time(jd, format="jd"), location=location)
    )
    # Topocentric vs geocentric aberration/parallax differ by arcseconds only.
    np.testing.assert_allclose(altitude, altaz.alt.deg, atol=0.01)
    up = altaz.alt.deg > 20
    np.testing.assert_allclose(mass[up], altaz.secz[up], rtol=0.01)


def test_scintillation_value():
    # 6.1 cm lens, airmass 1, 120 s, 3400 m: 1.5 * 0.09 * 6.1^(-2/3) * e^-0.425 / sqrt(240)
    value = observing.scintillation_sigma(6.1, np.array(1.0), 120.0, 3400.0)
    assert float(value) == pytest.approx(1.5 * 0.09 * 6.1 ** (-2 / 3) * np.exp(-0.425) / 240**0.5)
    assert observing.scintillation_sigma(6.1, np.array(2.0), 120.0, 3400.0) > value * 3


def test_transit_shape():
    transit = observing.Variable(0, 1, "transit", t0=10.0, depth=0.01, duration=0.1, ingress=0.01)
    jd = np.array([9.8, 9.95, 9.955, 10.0, 10.05])
    np.testing.assert_allclose(
        observing.variability_factor(transit, jd), [1.0, 1.0, 0.995, 0.99, 1.0]
    )
    with pytest.raises(ValueError, match="'flare'"):
        observing.variability_factor(observing.Variable(0, 1, "flare", t0=0.0), jd)


def test_psf_stays_in_range_and_grows_to_corners():
    x, y = np.array([511.5, 0.0]), np.array([511.5, 0.0])
    major, minor, _ = observing.psf_field(x, y, (1024, 1024), phase=0.0, seeing=2.0)
    assert np.all((major >= 1.5) & (major <= 3.5) & (minor >= 1.5) & (minor <= major))
    assert major[1] > major[0]
