"""BJD_TDB, hour angle and airmass per star against astropy (offline: no IERS download)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import TETE, AltAz, EarthLocation, SkyCoord
from astropy.time import Time
from astropy.utils import iers

from autowisp.core.timing import BTJD_REFERENCE, barycentric_jd, hour_angle_airmass

#: Mauna Loa-like site, deg, deg, m.
SITE = (19.54, -155.58, 3400.0)

#: A night of 2024 September (inside the IERS tables astropy ships) and stars over the sky.
JD = 2460563.65 + np.linspace(0.0, 0.3, 7)
RA = np.array([0.0, 45.2, 123.4, 250.0, 300.0, 359.9])
DEC = np.array([-60.0, -10.0, 0.0, 30.5, 20.0, 85.0])


@pytest.fixture(autouse=True)
def _offline():
    with iers.conf.set_temp("auto_download", False):
        yield


def _astropy_bjd(location: EarthLocation) -> np.ndarray:
    times = Time(np.repeat(JD[:, None], RA.size, axis=1), format="jd", scale="utc",
                 location=location)  # fmt: skip
    stars = SkyCoord(RA * u.deg, DEC * u.deg)[None, :]
    return (times.tdb + times.light_travel_time(stars, "barycentric")).jd


def test_barycentric_jd_matches_astropy_at_a_site():
    latitude, longitude, height = SITE
    ours = barycentric_jd(JD, RA, DEC, latitude=latitude, longitude=longitude, height=height)
    theirs = _astropy_bjd(EarthLocation.from_geodetic(longitude * u.deg, latitude * u.deg,
                                                      height * u.m))  # fmt: skip
    assert ours.shape == (JD.size, RA.size)
    # Both are float64 Julian dates (one unit of the last place: 40 µs); measured 40 µs.
    assert np.max(np.abs(ours - theirs)) * 86400 < 1e-4
    # The delays span the Rømer range: a star's BJD differs from the frame's by minutes.
    delay = (ours - JD[:, None]) * 86400
    assert 100 < np.ptp(delay) < 1000


def test_barycentric_jd_without_site_is_geocentric():
    geocentre = EarthLocation.from_geocentric(0 * u.m, 0 * u.m, 0 * u.m)
    ours = barycentric_jd(JD, RA, DEC)
    assert np.max(np.abs(ours - _astropy_bjd(geocentre))) * 86400 < 1e-4
    # The site moves it by less than the Earth's radius in light travel time (21.3 ms).
    at_site = barycentric_jd(JD, RA, DEC, latitude=SITE[0], longitude=SITE[1], height=SITE[2])
    assert 1e-3 < np.max(np.abs(ours - at_site)) * 86400 < 0.0214


def test_btjd_reference_is_tess():
    assert BTJD_REFERENCE == 2457000.0


def test_hour_angle_and_airmass_match_astropy():
    latitude, longitude, _ = SITE
    hour_angle, airmass = hour_angle_airmass(JD, RA, DEC, latitude, longitude)
    location = EarthLocation.from_geodetic(longitude * u.deg, latitude * u.deg, 0 * u.m)
    times = Time(JD, format="jd", scale="utc", location=location)
    sidereal = times.sidereal_time("apparent").deg
    for i, when in enumerate(times):
        true = SkyCoord(RA * u.deg, DEC * u.deg).transform_to(TETE(obstime=when))
        expected = np.mod(sidereal[i] - true.ra.deg + 180.0, 360.0) - 180.0
        # Aberration (up to 20.5″ = 0.0057° on the sky) and UT1 − UTC left out: the
        # difference on the sky (the hour angle's times cos δ) measured 0.0052° at most.
        on_sky = np.abs(hour_angle[i] - expected) * np.cos(np.radians(DEC))
        assert np.max(on_sky) < 0.0065
        altaz = SkyCoord(RA * u.deg, DEC * u.deg).transform_to(
            AltAz(obstime=when, location=location, pressure=0 * u.hPa)
        )
        altitude = altaz.alt.deg
        assert np.all(np.isnan(airmass[i][altitude < -0.1]))
        up = altitude > 5
        kasten_young = 1 / (
            np.sin(altaz.alt.rad[up]) + 0.50572 * (altitude[up] + 6.07995) ** -1.6364
        )
        # Aberration left out moves the altitude by < 0.006°: measured 0.03 % at most.
        assert np.max(np.abs(airmass[i][up] / kasten_young - 1)) < 0.003
