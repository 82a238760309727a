"""The frame photometry file: the bicubic PSF map survives the round trip."""

from __future__ import annotations

import numpy as np

from autowisp.core.bayer import channels
from autowisp.core.bicubic import BicubicPSFMap, default_grid
from autowisp.core.photometry import ChannelPhotometry
from autowisp.core.subpixel import channel_map
from autowisp.io.photometry import FramePhotometry, read_frame_photometry, write_frame_photometry
from autowisp.io.provenance import Provenance


def test_bicubic_map_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    grid = default_grid(2.5)
    psf_map = BicubicPSFMap(grid, rng.normal(0, 1e-3, (grid.n_free, 6)), 2, 0, (300, 400),
                            11.0, 1.5, (-1.2, 0.8))  # fmt: skip
    n = 3
    channel = channels("RGGB")[2]
    nan = np.full(n, np.nan)
    result = ChannelPhotometry(
        channel=channel.name, flux=np.ones((n, 2)), flux_err=np.ones((n, 2)), psf_flux=nan,
        psf_flux_err=nan, psf_chi2=nan, background=nan, background_err=nan,
        flags=np.zeros(n, np.uint16), shape_map=None, shapes=np.zeros((n, 3)),
        qc={"psf_model": "bicubic"}, bicubic_map=psf_map,
    )  # fmt: skip
    product = FramePhotometry(
        source_id=np.arange(n, dtype=np.int64), x=np.zeros(n), y=np.zeros(n),
        channels={channel.name: result}, apertures=(2.0, 3.0), mode="prf", layout="RGGB",
        raw_file="x.fits", date_obs="2024-01-01T00:00:00", exptime=1.0, qc={},
        provenance=Provenance(step="photometry", step_version="2", config_version="1"),
    )  # fmt: skip
    path = tmp_path / "phot.h5"
    write_frame_photometry(path, product)
    back = read_frame_photometry(path).channels[channel.name]
    assert back.qc["psf_model"] == "bicubic"
    assert back.bicubic_map is not None
    py, px = np.mgrid[100:110, 100:110].astype(float)
    cells = channel_map(channel).cells()
    for mag in (9.0, 11.0, 14.0):
        expected = psf_map.prf(104.3, 105.1, mag, px.ravel(), py.ravel(), cells)
        got = back.bicubic_map.prf(104.3, 105.1, mag, px.ravel(), py.ravel(), cells)
        np.testing.assert_array_equal(got, expected)


def test_measured_positions_and_their_correction_round_trip(tmp_path):
    """Each group's x, y are where the channel measured the stars; dx, dy the correction
    from the projected positions, which the reader gives back as the product's x, y."""
    n = 4
    projected_x, projected_y = np.array([10.0, 20, 30, 40]), np.array([5.0, 6, 7, 8])
    nan = np.full(n, np.nan)
    results = {}
    for shift, channel in zip((0.03, -0.02), channels("RGGB")[:2], strict=True):
        results[channel.name] = ChannelPhotometry(
            channel=channel.name, flux=np.ones((n, 1)), flux_err=np.ones((n, 1)),
            psf_flux=nan, psf_flux_err=nan, psf_chi2=nan, background=nan,
            background_err=nan, flags=np.zeros(n, np.uint16), shape_map=None,
            shapes=np.zeros((n, 3)), x=projected_x + shift, y=projected_y - shift,
        )  # fmt: skip
    product = FramePhotometry(
        source_id=np.arange(n, dtype=np.int64), x=projected_x, y=projected_y,
        channels=results, apertures=(2.0,), mode="prf", layout="RGGB", raw_file="x.fits",
        date_obs="2024-01-01T00:00:00", exptime=1.0, qc={},
        provenance=Provenance(step="photometry", step_version="3", config_version="1"),
    )  # fmt: skip
    path = tmp_path / "phot.h5"
    write_frame_photometry(path, product)
    back = read_frame_photometry(path)
    np.testing.assert_allclose(back.x, projected_x)
    np.testing.assert_allclose(back.y, projected_y)
    for shift, name in zip((0.03, -0.02), ("R", "G1"), strict=True):
        channel = back.channels[name]
        np.testing.assert_allclose(channel.x, projected_x + shift)
        np.testing.assert_allclose(channel.dx, np.full(n, shift))
        np.testing.assert_allclose(channel.dy, np.full(n, -shift))
