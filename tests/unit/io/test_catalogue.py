"""Catalogue adapters: the offline Gaia package and the cached online TAP answer."""

import json

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.time import Time

from autowisp.io.catalogue import TAP_COLUMNS, OfflineGaia, OnlineGaia, propagate

# An answer of the Gaia archive for three high proper-motion stars (Barnard's star, van
# Maanen 2, Lalande 21185), written down from Gaia DR3: the tests have no network.
RECORDED = {
    "source_id": [4472832130942575872, 2552928187080872832, 762815470562110464],
    "ra": [269.44850252543836, 12.29024474418093, 165.83414166259824],
    "dec": [4.739420051112412, 4.0949451019614, 35.96988531294568],
    "pmra": [-801.5509783684709, 1231.4530380232117, -580.0569998007813],
    "pmdec": [10362.394206546573, -2711.1893015565795, -4776.588832581304],
    "phot_g_mean_mag": [8.193973, 11.743027, 6.6763606],
    "phot_bp_mean_mag": [9.787375, 12.21558, 7.5948396],
    "phot_rp_mean_mag": [6.9636025, 11.148689, 5.7380085],
}
PARALLAX = np.array([546.9759, 231.7, 392.75])  # mas, for astropy's rigorous propagation


def test_offline_adapter_gives_g_bp_rp_of_known_stars():
    table = OfflineGaia().cone(269.4485, 4.7394, 0.05, epoch=2024.7, gmax=10.0)
    barnard = np.flatnonzero(table.source_id == 4472832130942575872)
    assert barnard.size == 1
    i = barnard[0]
    assert (table.g[i], table.bp[i], table.rp[i]) == pytest.approx((8.19, 9.79, 6.96), abs=0.01)
    # No proper motions offline: the position stays at 2016.0 and the table says so.
    assert table.epoch == 2016.0 and not table.propagated
    assert table.ra[i] == pytest.approx(269.4485, abs=1e-3)


def test_proper_motion_propagation_agrees_with_astropy():
    ra, dec = np.array(RECORDED["ra"]), np.array(RECORDED["dec"])
    pmra, pmdec = np.array(RECORDED["pmra"]), np.array(RECORDED["pmdec"])
    new_ra, new_dec = propagate(ra, dec, pmra, pmdec, from_epoch=2016.0, to_epoch=2026.9)
    start = SkyCoord(
        ra * u.deg, dec * u.deg, pm_ra_cosdec=pmra * u.mas / u.yr, pm_dec=pmdec * u.mas / u.yr,
        distance=(1000.0 / PARALLAX) * u.pc, radial_velocity=np.zeros(3) * u.km / u.s,
        obstime=Time(2016.0, format="jyear"), frame="icrs",
    )  # fmt: skip
    moved = start.apply_space_motion(new_obstime=Time(2026.9, format="jyear"))
    ours = SkyCoord(new_ra * u.deg, new_dec * u.deg)
    separation = ours.separation(SkyCoord(moved.ra, moved.dec)).to(u.mas).value
    assert np.all(separation < 1.0)
    # Barnard's star moved about 113 arcsec in those 10.9 years.
    travel = SkyCoord(ra * u.deg, dec * u.deg).separation(ours).to(u.arcsec).value
    assert travel[0] == pytest.approx(10.39 * 10.9, rel=0.01)


def test_online_adapter_caches_and_propagates(tmp_path):
    calls = []

    def fetch(query):
        calls.append(query)
        return RECORDED

    catalogue = OnlineGaia(tmp_path / "cache", fetch=fetch)
    first = catalogue.cone(269.4, 4.7, 0.5, epoch=2026.9, gmax=12.0)
    second = catalogue.cone(269.4, 4.7, 0.5, epoch=2026.9, gmax=12.0)
    assert len(calls) == 1 and "gaiadr3.gaia_source" in calls[0] and "12.000" in calls[0]
    cached = list((tmp_path / "cache").glob("gaia-*.json"))
    assert len(cached) == 1 and set(TAP_COLUMNS) <= json.loads(cached[0].read_text()).keys()
    assert first.propagated and first.epoch == 2026.9
    np.testing.assert_array_equal(first.ra, second.ra)
    assert np.all(np.diff(first.g) >= 0)  # brightest first
    i = int(np.flatnonzero(first.source_id == 4472832130942575872)[0])
    assert first.dec[i] - RECORDED["dec"][0] == pytest.approx(10.362 * 10.9 / 3600, rel=0.01)


def test_online_adapter_refuses_an_incomplete_answer(tmp_path):
    catalogue = OnlineGaia(tmp_path, fetch=lambda query: {"source_id": [1]})
    with pytest.raises(RuntimeError, match="lacks columns"):
        catalogue.cone(10.0, 10.0, 1.0, epoch=2020.0)
    assert not list(tmp_path.glob("gaia-*.json"))
