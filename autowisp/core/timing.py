"""Times and sky geometry of each star at each exposure: BJD_TDB, hour angle, airmass.

A wide field spans hours of right ascension and tens of degrees of altitude, and a
star's light reaches the Solar System's barycentre up to 8.3 minutes before or after
it reaches the Earth depending on where it lies: light curves carry these per star,
not per frame.

:func:`barycentric_jd` gives the barycentric Julian date in TDB at the observer for each
(exposure, star): the UTC Julian date taken to TT through TAI (erfa's leap-second
table), to TDB by erfa's ``dtdb`` series at the site, plus the light travel time along
the star's direction from the observer to the barycentre, ``r · n / c`` — the plane-wave
(Rømer) delay astropy's ``Time.light_travel_time`` computes, with the same ephemeris
(erfa's ``epv00``, astropy's "builtin"). The observer's place is the Earth's centre plus
the site turned into the celestial frame by the Earth rotation angle and the IAU 2006/2000A
celestial-to-intermediate matrix, with UT1 taken as UTC and polar motion left out: no
IERS table is read, so nothing is downloaded and no date is out of range; the error this
leaves is below 2 µs (0.9 s of UT1 − UTC turns the site by 420 m). Without a site the
Earth's centre is the observer (up to 21 ms off).

:func:`hour_angle_airmass` gives each star's hour angle and airmass (Kasten & Young 1989)
from the apparent place (IAU 2006/2000A precession–nutation and sidereal time, erfa),
aberration and refraction left out.
"""

from __future__ import annotations

import erfa
import numpy as np

__all__ = [
    "BTJD_REFERENCE",
    "SPEED_OF_LIGHT",
    "barycentric_jd",
    "hour_angle_airmass",
    "unit_vectors",
]

#: Speed of light, m/s.
SPEED_OF_LIGHT = 299_792_458.0

#: The astronomical unit, m (IAU 2012).
ASTRONOMICAL_UNIT = 149_597_870_700.0

#: BTJD = BJD_TDB − 2457000 (TESS's convention, BJDREFI).
BTJD_REFERENCE = 2457000.0


def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """(n, 3) unit vectors of ICRS directions ``ra``, ``dec`` (deg)."""
    ra_r, dec_r = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.stack(
        [np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)], axis=-1
    )


def _site(latitude: float, longitude: float, height: float) -> np.ndarray:
    """The site's terrestrial (ITRS) position on WGS84, m."""
    return np.asarray(erfa.gd2gc(1, np.radians(longitude), np.radians(latitude), height))


def barycentric_jd(
    jd_utc: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    *,
    latitude: float | None = None,
    longitude: float | None = None,
    height: float = 0.0,
) -> np.ndarray:
    """BJD_TDB of each exposure (rows, from its UTC Julian date ``jd_utc``) and star
    (columns, ICRS ``ra``, ``dec`` in deg), observed from the site (deg east, deg north,
    m above the ellipsoid; the Earth's centre when latitude or longitude is None)."""
    jd = np.atleast_1d(np.asarray(jd_utc, float))
    directions = unit_vectors(np.atleast_1d(ra), np.atleast_1d(dec))
    day = np.floor(jd - 0.5) + 0.5  # two-part dates keep erfa's full precision
    tai1, tai2 = erfa.utctai(day, jd - day)
    tt1, tt2 = erfa.taitt(tai1, tai2)
    site = None
    if latitude is not None and longitude is not None:
        site = _site(latitude, longitude, height)
        spin_km, north_km = float(np.hypot(site[0], site[1])) / 1e3, float(site[2]) / 1e3
        fraction = np.mod(jd - 0.5, 1.0)  # of the UT day (UT1 taken as UTC)
        offset = erfa.dtdb(tt1, tt2, fraction, np.radians(longitude), spin_km, north_km)
    else:
        offset = erfa.dtdb(tt1, tt2, np.mod(jd - 0.5, 1.0), 0.0, 0.0, 0.0)
    tdb2 = tt2 + offset / 86400.0
    _, barycentric = erfa.epv00(tt1, tdb2)
    observer = barycentric["p"] * ASTRONOMICAL_UNIT  # the Earth's centre, m
    if site is not None:
        angle = erfa.era00(day, jd - day)
        cos, sin = np.cos(angle), np.sin(angle)
        intermediate = np.stack(
            [cos * site[0] - sin * site[1], sin * site[0] + cos * site[1],
             np.full_like(angle, site[2])], axis=-1,
        )  # fmt: skip
        to_intermediate = erfa.c2i06a(tt1, tt2)  # GCRS -> CIRS; its transpose back
        observer = observer + np.einsum("fji,fj->fi", to_intermediate, intermediate)
    delay = observer @ directions.T / SPEED_OF_LIGHT  # (frames, stars), s
    return (tt1 + tdb2)[:, None] + delay / 86400.0


def hour_angle_airmass(
    jd_utc: np.ndarray, ra: np.ndarray, dec: np.ndarray, latitude: float, longitude: float
) -> tuple[np.ndarray, np.ndarray]:
    """Each (exposure, star)'s hour angle (deg, in [−180, 180), west positive) and
    airmass (NaN below the horizon) from a site at ``latitude``, ``longitude`` (deg, east
    positive), UT1 and TT taken as UTC (a minute of time moves the precession by 0.01″)."""
    jd = np.atleast_1d(np.asarray(jd_utc, float))
    directions = unit_vectors(np.atleast_1d(ra), np.atleast_1d(dec))
    hour_angle = np.empty((jd.size, directions.shape[0]))
    airmass = np.empty_like(hour_angle)
    phi = np.radians(latitude)
    for i, when in enumerate(jd):
        of_date = directions @ erfa.pnm06a(when, 0.0).T
        ra_t = np.arctan2(of_date[:, 1], of_date[:, 0])
        dec_t = np.arcsin(np.clip(of_date[:, 2], -1.0, 1.0))
        angle = erfa.gst06a(when, 0.0, when, 0.0) + np.radians(longitude) - ra_t
        sin_alt = np.sin(phi) * np.sin(dec_t) + np.cos(phi) * np.cos(dec_t) * np.cos(angle)
        altitude = np.degrees(np.arcsin(np.clip(sin_alt, -1.0, 1.0)))
        with np.errstate(invalid="ignore"):
            mass = 1.0 / (np.sin(np.radians(altitude)) + 0.50572 * (altitude + 6.07995) ** -1.6364)
        airmass[i] = np.where(altitude > 0, mass, np.nan)
        hour_angle[i] = np.mod(np.degrees(angle) + 180.0, 360.0) - 180.0
    return hour_angle, airmass
