"""The simulated sky: Gaia DR3 stars (G ≤ 10) plus synthetic fainter stars.

The offline catalogue stops at G = 10, while a DSLR night reaches G ≈ 13.5. Fainter
stars are drawn with the cumulative count law ``N(<G) ∝ 10^(slope·G)``, normalised to the
catalogue's own density of 9 < G ≤ 10 stars around the field (within at least 5°), so a
field in the Galactic plane gets more of them than one at the pole. Their colours are
drawn from the field's catalogue colours. Synthetic stars have negative ids
(``-1, -2, ...``); Gaia stars keep their ``source_id``.

Camera colour magnitudes follow linear colour terms in Gaia BP−RP (mag)::

    m_R = G − 0.25 − 0.35 (BP−RP − 0.8)
    m_G = G + 0.10 + 0.25 (BP−RP − 0.8)
    m_B = G + 0.40 + 0.70 (BP−RP − 0.8)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autowisp.io.gaia import cone_search

__all__ = ["COLOUR_TERMS", "SkyStars", "camera_magnitudes", "make_sky"]

#: (offset, slope) of each camera colour R, G, B relative to G at BP−RP = 0.8.
COLOUR_TERMS: tuple[tuple[float, float], ...] = ((-0.25, -0.35), (0.10, 0.25), (0.40, 0.70))
_DEFAULT_COLOUR = 0.8
_CATALOGUE_LIMIT = 10.0
_REFERENCE_RADIUS = 5.0  # deg


def _cone_area(radius: float) -> float:
    """Solid angle of a cone of ``radius`` degrees, in square degrees."""
    return float(2.0 * np.pi * (1.0 - np.cos(np.radians(radius))) * (180.0 / np.pi) ** 2)


@dataclass(frozen=True)
class SkyStars:
    """Stars of the simulated sky.

    Attributes
    ----------
    star_id : (n,) int64
        Gaia DR3 ``source_id``, or a negative id for a synthetic star.
    ra, dec : (n,) float64
        ICRS position, degrees.
    gmag : (n,) float64
        Gaia G magnitude.
    bp_rp : (n,) float64
        Gaia BP−RP colour, mag (0.8 where the catalogue has none).
    mag : (n, 3) float64
        Magnitudes in the camera colours R, G, B (see module docstring).
    """

    star_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    gmag: np.ndarray
    bp_rp: np.ndarray
    mag: np.ndarray

    def __len__(self) -> int:
        return int(self.star_id.size)

    @property
    def is_gaia(self) -> np.ndarray:
        """True for catalogue stars, False for synthetic ones."""
        return self.star_id >= 0

    def subset(self, index: np.ndarray) -> SkyStars:
        """The stars selected by a boolean mask or an index array."""
        return SkyStars(
            self.star_id[index],
            self.ra[index],
            self.dec[index],
            self.gmag[index],
            self.bp_rp[index],
            self.mag[index],
        )


def camera_magnitudes(gmag: np.ndarray, bp_rp: np.ndarray) -> np.ndarray:
    """R, G, B camera magnitudes (n, 3) from Gaia G and BP−RP."""
    colour = np.asarray(bp_rp, dtype=float) - _DEFAULT_COLOUR
    return np.stack(
        [
            np.asarray(gmag, dtype=float) + offset + slope * colour
            for offset, slope in COLOUR_TERMS
        ],
        axis=1,
    )


def _uniform_in_cone(
    rng: np.random.Generator, count: int, ra: float, dec: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` positions uniform on the sphere within ``radius`` deg of ``(ra, dec)``."""
    cos_theta = rng.uniform(np.cos(np.radians(radius)), 1.0, count)
    phi = rng.uniform(0.0, 2.0 * np.pi, count)
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    # Around the pole, then rotate the pole onto (ra, dec).
    local = np.stack([sin_theta * np.cos(phi), sin_theta * np.sin(phi), cos_theta])
    a, d = np.radians(ra), np.radians(dec)
    tilt = np.array([[np.sin(d), 0.0, np.cos(d)], [0.0, 1.0, 0.0], [-np.cos(d), 0.0, np.sin(d)]])
    spin = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0, 0, 1.0]])
    xyz = spin @ tilt @ local
    return (
        np.mod(np.degrees(np.arctan2(xyz[1], xyz[0])), 360.0),
        np.degrees(np.arcsin(np.clip(xyz[2], -1.0, 1.0))),
    )


def make_sky(
    ra: float,
    dec: float,
    radius: float,
    *,
    rng: np.random.Generator,
    faint_limit: float = 13.5,
    slope: float = 0.38,
) -> SkyStars:
    """Stars within ``radius`` degrees of ``(ra, dec)`` down to G = ``faint_limit``.

    Parameters
    ----------
    ra, dec, radius : float
        Cone centre and radius, degrees.
    rng : numpy.random.Generator
        Source of the synthetic stars (positions, magnitudes, colours).
    faint_limit : float
        Faintest G magnitude simulated.
    slope : float
        Logarithmic slope of the cumulative star counts, dex per magnitude.
    """
    catalogue = cone_search(ra, dec, radius)
    colour = np.where(np.isfinite(catalogue.bp_rp), catalogue.bp_rp, _DEFAULT_COLOUR)
    # Star density from a cone of at least 5 deg, so that a small field is not left
    # without faint stars because it happens to hold no 9 < G <= 10 star.
    reference = cone_search(ra, dec, max(radius, _REFERENCE_RADIUS))
    density = np.count_nonzero(reference.gmag > _CATALOGUE_LIMIT - 1.0) / _cone_area(
        max(radius, _REFERENCE_RADIUS)
    )
    # Stars between 9 and 10 are a fraction 1 - 10^-slope of those brighter than 10.
    bright_count = density * _cone_area(radius) / (1.0 - 10.0**-slope)
    span = max(faint_limit - _CATALOGUE_LIMIT, 0.0)
    count = int(rng.poisson(bright_count * (10.0 ** (slope * span) - 1.0)))
    syn_ra, syn_dec = _uniform_in_cone(rng, count, ra, dec, radius)
    uniform = rng.uniform(0.0, 1.0, count)
    syn_g = _CATALOGUE_LIMIT + np.log10(1.0 + uniform * (10.0 ** (slope * span) - 1.0)) / slope
    known = colour[np.isfinite(catalogue.bp_rp)]
    if known.size == 0:
        known = np.array([_DEFAULT_COLOUR])
    syn_colour = rng.choice(known, count) + rng.normal(0.0, 0.1, count)
    order = np.argsort(syn_g, kind="stable")
    gmag = np.concatenate([catalogue.gmag, syn_g[order]])
    bp_rp = np.concatenate([colour, syn_colour[order]])
    return SkyStars(
        star_id=np.concatenate([catalogue.source_id, -np.arange(1, count + 1, dtype=np.int64)]),
        ra=np.concatenate([catalogue.ra, syn_ra[order]]),
        dec=np.concatenate([catalogue.dec, syn_dec[order]]),
        gmag=gmag,
        bp_rp=bp_rp,
        mag=camera_magnitudes(gmag, bp_rp),
    )
