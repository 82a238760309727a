import numpy as np
import pytest

from autowisp.io.gaia import cone_search
from autowisp.simulate.sky import COLOUR_TERMS, camera_magnitudes, make_sky

FIELD = (301.5644, 44.4569, 2.0)


@pytest.fixture(scope="module")
def sky():
    return make_sky(*FIELD, rng=np.random.default_rng(5), faint_limit=13.5)


def test_catalogue_stars_kept_and_synthetic_ids_negative(sky):
    catalogue = cone_search(*FIELD)
    assert np.array_equal(sky.star_id[: len(catalogue)], catalogue.source_id)
    assert np.all(sky.star_id[len(catalogue) :] < 0)
    assert np.unique(sky.star_id).size == len(sky)
    assert sky.gmag.max() <= 13.5
    assert np.all(sky.gmag[~sky.is_gaia] > 10.0)


def test_faint_counts_follow_the_field_own_count_law(sky):
    """The synthetic extension continues the catalogue's counts at the same slope."""
    catalogue = cone_search(*FIELD)
    # The real catalogue's cumulative slope between G = 8 and 10 in this field.
    real_slope = np.log10(np.sum(catalogue.gmag <= 10) / np.sum(catalogue.gmag <= 8)) / 2
    assert 0.3 < real_slope < 0.5
    counts = [np.sum(sky.gmag <= m) for m in (10.0, 11.5, 13.5)]
    fitted = np.polyfit([10.0, 11.5, 13.5], np.log10(counts), 1)[0]
    assert fitted == pytest.approx(0.38, abs=0.02)
    # A realistic density for Cygnus near the Galactic plane at G < 13.5 (per deg²).
    area = 2 * np.pi * (1 - np.cos(np.radians(FIELD[2]))) * (180 / np.pi) ** 2
    assert 500 < counts[-1] / area < 5000


def test_synthetic_positions_fill_the_cone_uniformly(sky):
    synthetic = ~sky.is_gaia
    ra0, dec0 = np.radians(FIELD[0]), np.radians(FIELD[1])
    cos_d = np.sin(dec0) * np.sin(np.radians(sky.dec[synthetic])) + np.cos(dec0) * np.cos(
        np.radians(sky.dec[synthetic])
    ) * np.cos(np.radians(sky.ra[synthetic]) - ra0)
    distance = np.degrees(np.arccos(np.clip(cos_d, -1, 1)))
    assert distance.max() <= FIELD[2] + 1e-9
    # Uniform on the sphere: the fraction within half the radius is about a quarter.
    assert np.mean(distance <= FIELD[2] / 2) == pytest.approx(0.25, abs=0.02)


def test_colour_terms():
    mags = camera_magnitudes(np.array([10.0, 10.0]), np.array([0.8, 1.8]))
    np.testing.assert_allclose(mags[0], [10 + offset for offset, _ in COLOUR_TERMS])
    # A redder star is brighter in R and fainter in B.
    assert mags[1, 0] < mags[0, 0] and mags[1, 2] > mags[0, 2]
