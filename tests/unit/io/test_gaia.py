import numpy as np
import pytest

from autowisp.io.gaia import cone_search, load_catalogue


def test_whole_catalogue_is_read():
    records = load_catalogue()
    assert records.size == 482_176
    assert records["phot_g_mean_mag"].max() <= 10.0
    assert records["ra"].min() >= 0 and records["ra"].max() < 360
    assert np.unique(records["source_id"]).size == records.size


def test_cone_matches_brute_force_and_is_sorted():
    stars = cone_search(301.56, 44.46, 3.0)
    records = load_catalogue()
    ra, dec = np.radians(records["ra"]), np.radians(records["dec"])
    cos_d = np.sin(np.radians(44.46)) * np.sin(dec) + np.cos(np.radians(44.46)) * np.cos(
        dec
    ) * np.cos(ra - np.radians(301.56))
    expected = set(records["source_id"][np.degrees(np.arccos(np.clip(cos_d, -1, 1))) <= 3.0])
    assert set(stars.source_id.tolist()) == expected
    assert len(stars) > 200  # Cygnus, near the Galactic plane
    assert np.all(np.diff(stars.gmag) >= 0)
    known = np.isfinite(stars.bp_rp)
    assert known.mean() > 0.95
    assert 0.3 < np.median(stars.bp_rp[known]) < 2.0


def test_cone_across_ra_zero_and_bad_radius():
    stars = cone_search(0.2, 10.0, 2.0)
    assert np.any(stars.ra > 359) and np.any(stars.ra < 1)
    with pytest.raises(ValueError, match="radius"):
        cone_search(0.0, 0.0, 0.0)
