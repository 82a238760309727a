"""Observing conditions: site, time, airmass, extinction, scintillation, clouds, PSF, variables.

Airmass is computed per star (a DSLR field spans tens of degrees of sky, so it differs
across the frame): star positions are moved once to the true equator and equinox of the
night (astropy TETE, with the IERS tables of the installed ``astropy-iers-data`` package
and downloads switched off), then the hour angle from Greenwich apparent sidereal time
gives the altitude, and the Kasten & Young (1989) formula the airmass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.coordinates import TETE, SkyCoord
from astropy.time import Time
from astropy.utils import iers

__all__ = [
    "Site",
    "Variable",
    "airmass",
    "cloud_at",
    "draw_clouds",
    "psf_field",
    "scintillation_sigma",
    "sidereal_time",
    "to_true_equator",
    "variability_factor",
]


@contextmanager
def _offline_iers() -> Iterator[None]:
    """Never download Earth-rotation tables: use the installed astropy-iers-data.

    Beyond the tables' measured and predicted range (a simulated night years ahead),
    astropy then extrapolates UT1−UTC instead of failing; the error (under a second of
    time) moves the airmass by less than 1e-4, which does not matter to a simulation.
    """
    with (
        iers.conf.set_temp("auto_download", False),
        iers.conf.set_temp("auto_max_age", None),
        iers.conf.set_temp("iers_degraded_accuracy", "ignore"),
    ):
        yield


@dataclass(frozen=True)
class Site:
    """An observatory: latitude and longitude (deg, east positive), height (m)."""

    name: str = "Mauna Loa"
    latitude: float = 19.54
    longitude: float = -155.58
    height: float = 3400.0


def sidereal_time(jd_utc: np.ndarray, site: Site) -> np.ndarray:
    """Local apparent sidereal time (degrees) at UTC Julian dates."""
    times = Time(np.asarray(jd_utc, dtype=float), format="jd", scale="utc")
    with _offline_iers():
        lst = times.sidereal_time("apparent", longitude=site.longitude * u.deg)
    return np.asarray(lst.deg)


def to_true_equator(
    ra: np.ndarray, dec: np.ndarray, jd_utc: float
) -> tuple[np.ndarray, np.ndarray]:
    """ICRS positions (deg) to the true equator and equinox of ``jd_utc`` (geocentric)."""
    coords = SkyCoord(ra=np.asarray(ra) * u.deg, dec=np.asarray(dec) * u.deg, frame="icrs")
    with _offline_iers():
        true = coords.transform_to(TETE(obstime=Time(jd_utc, format="jd", scale="utc")))
    return np.asarray(true.ra.deg), np.asarray(true.dec.deg)


def airmass(
    ra_true: np.ndarray, dec_true: np.ndarray, lst: np.ndarray | float, site: Site
) -> tuple[np.ndarray, np.ndarray]:
    """Airmass and altitude (deg) of positions on the true equator at local sidereal time.

    Broadcasts ``lst`` against the positions; below the horizon the airmass is NaN.
    """
    hour_angle = np.radians(np.asarray(lst) - np.asarray(ra_true))
    lat, dec = np.radians(site.latitude), np.radians(np.asarray(dec_true))
    sin_alt = np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(hour_angle)
    altitude = np.degrees(np.arcsin(np.clip(sin_alt, -1.0, 1.0)))
    with np.errstate(invalid="ignore"):
        mass = 1.0 / (sin_alt + 0.50572 * (altitude + 6.07995) ** -1.6364)
    return np.where(altitude > 0, mass, np.nan), altitude


def scintillation_sigma(
    aperture_cm: float, air_mass: np.ndarray, exptime: float, height: float
) -> np.ndarray:
    """Fractional scintillation noise: Young (1967) with Osborn et al. (2015)'s 1.5 factor.

    ``σ = 1.5 × 0.09 D^(-2/3) X^1.75 exp(-h / 8000 m) / sqrt(2 t)``, D in cm, t in s.
    """
    return (
        1.5
        * 0.09
        * aperture_cm ** (-2.0 / 3.0)
        * np.asarray(air_mass) ** 1.75
        * np.exp(-height / 8000.0)
        / np.sqrt(2.0 * exptime)
    )


def draw_clouds(rng: np.random.Generator, *, depth: float) -> np.ndarray:
    """Parameters of a partial-cloud pattern: 1–3 Gaussian blobs of absorption.

    Returns (k, 4): centre x, y (fraction of width, height), radius (fraction of the
    diagonal) and peak absorption (fraction, up to ``depth``).
    """
    count = int(rng.integers(1, 4))
    return np.column_stack(
        [
            rng.uniform(-0.2, 1.2, count),
            rng.uniform(-0.2, 1.2, count),
            rng.uniform(0.15, 0.45, count),
            depth * rng.uniform(0.5, 1.0, count),
        ]
    )


def cloud_at(
    blobs: np.ndarray, shape: tuple[int, int], x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Transparency of the cloud ``blobs`` at positions ``(x, y)`` (px)."""
    ny, nx = shape
    diagonal = np.hypot(nx, ny)
    absorbed = np.zeros(np.shape(x))
    for cx, cy, radius, depth in blobs:
        r2 = ((x - cx * nx) ** 2 + (y - cy * ny) ** 2) / (radius * diagonal) ** 2
        absorbed = 1.0 - (1.0 - absorbed) * (1.0 - depth * np.exp(-0.5 * r2))
    return 1.0 - absorbed


def psf_field(
    x: np.ndarray, y: np.ndarray, shape: tuple[int, int], *, phase: float, seeing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF FWHMs (px) and angle (rad) over the field at one moment of the night.

    ``seeing`` is the on-axis FWHM (px); the lens blurs the PSF towards the corners
    (+45 %) and elongates it tangentially (axis ratio down to 0.75). ``phase`` (rad)
    rotates a small astigmatic term through the night. FWHMs stay within 1.5–3.5 px.
    """
    ny, nx = shape
    dx = (np.asarray(x) - (nx - 1) / 2) / (np.hypot(nx, ny) / 2)
    dy = (np.asarray(y) - (ny - 1) / 2) / (np.hypot(nx, ny) / 2)
    rho2 = dx**2 + dy**2
    major = seeing * (1.0 + 0.45 * rho2) * (1.0 + 0.04 * np.cos(phase))
    ratio = 1.0 - 0.25 * rho2 - 0.04 * (1 + np.sin(phase)) / 2
    theta = np.arctan2(dy, dx) + np.pi / 2 + 0.2 * np.sin(phase)
    major = np.clip(major, 1.5, 3.5)
    minor = np.clip(major * ratio, 1.5, 3.5)
    return major, minor, np.mod(theta, np.pi)


@dataclass(frozen=True)
class Variable:
    """An astrophysical variable: a transit (box with linear ingress) or a sinusoid.

    ``kind`` is ``"transit"`` (``depth``, ``t0`` mid-time JD, ``duration`` d,
    ``ingress`` d) or ``"sinusoid"`` (``amplitude`` fraction, ``t0`` JD, ``period`` d).
    """

    star_index: int
    star_id: int
    kind: str
    t0: float
    depth: float = 0.0
    duration: float = 0.0
    ingress: float = 0.0
    amplitude: float = 0.0
    period: float = 1.0


def variability_factor(variable: Variable, jd: np.ndarray) -> np.ndarray:
    """Relative flux (1 = mean out of transit) of a variable at times ``jd``."""
    jd = np.asarray(jd, dtype=float)
    if variable.kind == "transit":
        distance = np.abs(jd - variable.t0)
        half = variable.duration / 2
        fraction = np.clip((half - distance) / variable.ingress, 0.0, 1.0)
        return 1.0 - variable.depth * fraction
    if variable.kind == "sinusoid":
        return 1.0 + variable.amplitude * np.sin(2 * np.pi * (jd - variable.t0) / variable.period)
    raise ValueError(f"unknown variable kind {variable.kind!r}: expected transit or sinusoid")
