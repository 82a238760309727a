"""``autowisp simulate`` end to end: files, headers, truth, determinism, geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from autowisp.core.bayer import channel_index_map, colour_of_channels
from autowisp.simulate.render import fwhm_to_alpha, render_stars_reference
from autowisp.simulate.truth import read_truth
from tests.conftest import run_cli


def _cameras(outdir: Path) -> list[dict]:
    return json.loads((outdir / "night.json").read_text())["cameras"]


def test_night_layout_and_headers(small_night):
    cameras = _cameras(small_night)
    assert len(cameras) == 2 and cameras[0]["serial"] != cameras[1]["serial"]
    for camera in cameras:
        directory = small_night / camera["directory"]
        names = sorted(p.name for p in directory.glob("*.fits"))
        assert [n.split("_")[0] for n in names].count("object") == 6
        for kind, count in (("bias", 10), ("dark", 10), ("flat", 12)):
            assert sum(n.startswith(kind) for n in names) == count
        truth = read_truth(small_night / camera["truth"])
        for name in names:
            with fits.open(directory / name) as hdus:
                header, data = hdus[0].header, hdus[0].data
            assert data.dtype == np.uint16 and data.shape == (256, 320)
            assert header["IMAGETYP"] == name.split("_")[0]
            assert header["CAMSN"] == camera["serial"]
            assert header["BAYERPAT"] == "RGGB"
            for key in ("EXPTIME", "DATE-OBS", "INSTRUME", "ISO", "LAT-OBS", "LONG-OBS"):
                assert key in header
        for i, name in enumerate(truth.object["filename"]):
            header = fits.getheader(directory / name)
            wcs = truth.wcs(i)
            centre = wcs.all_pix2world([[159.5, 127.5]], 0)[0]
            error = np.hypot(
                (header["RA-MNT"] - centre[0]) * np.cos(np.radians(centre[1])),
                header["DEC-MNT"] - centre[1],
            )
            assert error <= 0.5 + 1e-3  # the mount pointing is off by up to 0.5 deg
        # Two of the twelve flats are bad on purpose, and say why.
        reasons = sorted(r for r in truth.frames["bad_reason"] if r)
        assert reasons == ["clouds", "overexposed"]


def test_truth_wcs_maps_stars_to_their_true_pixels(small_night):
    for camera in _cameras(small_night):
        truth = read_truth(small_night / camera["truth"])
        for i in range(len(truth.object["filename"])):
            x, y = truth.wcs(i).all_world2pix(
                truth.stars["ra"], truth.stars["dec"], 0, tolerance=1e-8, quiet=True
            )
            on = truth.object["rendered"][i]
            assert on.sum() > 100
            error = np.hypot(x[on] - truth.object["x"][i, on], y[on] - truth.object["y"][i, on])
            assert error.max() < 0.01


def _centroid_errors(directory: Path, truth, frame: int, count: int = 15) -> np.ndarray:
    """Light-weighted centroids of the brightest unsaturated stars minus truth (px).

    The raw frame is calibrated with the true bias, dark and flat; neighbours are
    removed with a noiseless rendering by the plain numpy reference renderer; the sky
    is removed per colour from an annulus; each pixel is divided by its colour's share
    of the star's flux so that every pixel samples the same PSF.
    """
    raw = fits.getdata(directory / truth.object["filename"][frame]).astype(float)
    camera = truth.camera
    exptime = json.loads(truth.attrs["config"])["exptime"]
    cal = truth.calibration
    electrons = ((raw - cal["bias"]) * camera["gain"] - cal["dark_rate"] * exptime) / cal["flat"]
    obj = truth.object
    x, y = obj["x"][frame], obj["y"][frame]
    flux = obj["flux"][frame] * np.nan_to_num(obj["scintillation_factor"][frame])[:, None]
    total = flux.sum(axis=1)
    saturated = obj["saturated"][frame].any(axis=1)
    bad = cal["dead"] | cal["hot"]
    hits = obj["cosmic_rays"]
    hits = hits[hits[:, 0] == frame]
    bad[hits[:, 2].astype(int), hits[:, 1].astype(int)] = True
    layout = camera["layout"]
    index = channel_index_map(layout, raw.shape)
    colour = colour_of_channels(layout)[index]
    cell = channel_index_map(layout, (2, 2)).astype(np.int64)
    ny, nx = raw.shape
    errors = []
    for star in np.argsort(-np.nan_to_num(total)):
        if len(errors) == count:
            break
        if saturated[star] or not (12 <= x[star] < nx - 13 and 12 <= y[star] < ny - 13):
            continue
        if flux[star].min() < 0.1 * total[star]:
            continue  # so red or blue that one colour's pixels are mostly noise
        near = np.flatnonzero(np.hypot(x - x[star], y - y[star]) < 30)
        if saturated[near].any():
            continue
        cx, cy = round(x[star]), round(y[star])
        window = np.s_[cy - 11 : cy + 12, cx - 11 : cx + 12]
        if bad[window].any():
            continue  # a dead or hot pixel or a cosmic ray near the star
        others = near[near != star]
        neighbours = render_stars_reference(
            raw.shape,
            x[others],
            y[others],
            flux[others][:, colour_of_channels(layout)],
            fwhm_to_alpha(obj["fwhm_major"][frame, others].astype(float), 3.5),
            fwhm_to_alpha(obj["fwhm_minor"][frame, others].astype(float), 3.5),
            obj["theta"][frame, others].astype(float),
            3.5,
            np.full(others.size, 30),
            cell,
            5,
            4.0,
            np.ones(raw.shape),
        )
        yy, xx = np.mgrid[window]
        r = np.hypot(xx - x[star], yy - y[star])
        pixels = electrons[window] - neighbours[window]
        for c in range(3):
            in_colour = colour[window] == c
            pixels[in_colour] -= np.median(pixels[in_colour & (r > 8)])
        share = flux[star][colour[window]] / total[star]
        light = np.where(r <= 6, pixels / share, 0.0)
        errors.append(
            (
                np.sum(light * xx) / light.sum() - x[star],
                np.sum(light * yy) / light.sum() - y[star],
            )
        )
    return np.array(errors)


def test_brightest_stars_light_lands_where_truth_says(small_night):
    for camera in _cameras(small_night):
        truth = read_truth(small_night / camera["truth"])
        errors = _centroid_errors(small_night / camera["directory"], truth, 0)
        assert len(errors) >= 8
        distance = np.hypot(errors[:, 0], errors[:, 1])
        assert np.median(distance) < 0.04, errors
        assert distance.max() < 0.15, errors


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    args = ["--frames", "2", "--size", "96x64", "--calibration-frames", "4", "--cameras", "2"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        run_cli("simulate", str(tmp_path / name), "--seed", seed, *args)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) == 2 * (2 + 4 + 4 + 6 + 1) + 1  # objects, calibration, truth
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    other = sorted(p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*.fits"))
    first = sorted(p for p in files if p.suffix == ".fits")
    differ = [
        fits.getdata(tmp_path / "a" / p).tobytes() != fits.getdata(tmp_path / "c" / q).tobytes()
        for p, q in zip(first, other, strict=True)
    ]
    assert all(differ)


def test_truth_contents_are_consistent(small_night):
    camera = _cameras(small_night)[0]
    truth = read_truth(small_night / camera["truth"])
    obj = truth.object
    assert obj["x"].shape == (6, truth.stars["star_id"].size)
    assert np.all(
        (obj["fwhm_major"][obj["rendered"]] >= 1.5) & (obj["fwhm_major"][obj["rendered"]] <= 3.5)
    )
    airmass = obj["airmass"][obj["rendered"]]
    assert np.all((airmass >= 1.0) & (airmass < 3.0))
    kinds = sorted(v["kind"] for v in truth.variables)
    assert kinds == ["sinusoid", "transit"]
    transit = next(v for v in truth.variables if v["kind"] == "transit")
    assert transit["depth"] == 0.01 and transit["star_id"] >= 0  # a Gaia star
    # The variables are drawn (inside the frame) and the transit dims its flux by 1 %.
    star = transit["star_index"]
    assert obj["rendered"][:, star].all()
    dimming = obj["flux"][:, star, 1] / (obj["flux"][:, star, 1].max())
    assert dimming.min() < 0.995
    # Theoretical noise is at least the photon noise of the signal.
    on = obj["rendered"]
    signal = obj["aperture_signal"][on]
    assert np.all(obj["aperture_sigma"][on] >= np.sqrt(signal) - 1e-3)


def test_bad_arguments_are_explained(tmp_path):
    result = run_cli("simulate", str(tmp_path), "--layout", "RGBX", check=False)
    assert result.returncode == 2 and "RGBX" in result.stderr
    result = run_cli("simulate", str(tmp_path), "--size", "100by20", check=False)
    assert result.returncode == 2 and "WIDTHxHEIGHT" in result.stderr


@pytest.mark.parametrize("layout", ["BGGR", "MONO"])
def test_other_layouts_simulate(tmp_path, layout):
    run_cli(
        "simulate",
        str(tmp_path),
        "--frames",
        "1",
        "--size",
        "64x64",
        "--calibration-frames",
        "0",
        "--layout",
        layout,
    )
    camera = _cameras(tmp_path)[0]
    header = fits.getheader(next((tmp_path / camera["directory"]).glob("object_*.fits")))
    assert header.get("BAYERPAT") == (None if layout == "MONO" else layout)


def test_bad_date_and_dec_are_explained(tmp_path):
    result = run_cli("simulate", str(tmp_path), "--date", "2024-13-01", check=False)
    assert result.returncode == 2 and "YYYY-MM-DD" in result.stderr
    result = run_cli("simulate", str(tmp_path), "--dec", "95", check=False)
    assert result.returncode == 2 and "dec must be within" in result.stderr


@pytest.mark.parametrize(
    ("ra", "dec", "date"), [(0.1, 89.95, "2024-09-10"), (359.9, -5.0, "2035-06-01")]
)
def test_pole_ra_wrap_and_nights_beyond_the_iers_tables(tmp_path, ra, dec, date):
    run_cli(
        "simulate",
        str(tmp_path),
        "--frames",
        "1",
        "--size",
        "128x128",
        "--calibration-frames",
        "0",
        "--ra",
        str(ra),
        "--dec",
        str(dec),
        "--date",
        date,
    )
    truth = read_truth(next(tmp_path.rglob("truth.h5")))
    x, y = truth.wcs(0).all_world2pix(truth.stars["ra"], truth.stars["dec"], 0, quiet=True)
    on = truth.object["rendered"][0]
    assert on.sum() > 5
    assert (
        np.max(np.hypot(x[on] - truth.object["x"][0, on], y[on] - truth.object["y"][0, on])) < 0.01
    )
