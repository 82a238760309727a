"""The magfit step against the truth: synthetic photometry files (every term known) and a
simulated night through the whole pipeline."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import h5py
import numpy as np
import pytest

from autowisp.errors import PermanentError
from autowisp.io.magfit import read_fitted_block, read_magfit, read_master_reference
from autowisp.io.provenance import reference_path
from autowisp.simulate.assess import magfit_precision
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.simulate.photometry_night import PhotometryNight, write_photometry_night
from autowisp.steps.base import ImageInfo, InputProduct, NightInfo, StepContext
from autowisp.steps.magfit import Magfit
from autowisp.steps.registry import default_registry
from autowisp.vocabulary import ImageType, TaskState
from tests.integration.conftest import process_upload
from tests.products import magfit_by_star

DEFAULTS = {p.name: p.default for p in Magfit.parameters}


def _context(directory: Path, synthetic, night: PhotometryNight, **parameters) -> StepContext:
    header = dict(synthetic.header)
    if parameters.pop("no_site", False):
        header = {}
    images = tuple(
        ImageInfo(
            id=i + 1,
            path=Path(path.name.replace(".h5", ".fits")),
            image_type=ImageType.OBJECT,
            exptime=night.exptime,
            date_obs=dt.datetime(2024, 9, 11, tzinfo=dt.UTC),
            jd=float(synthetic.jd_mid[i]),
            layout="RGGB",
            camera_serial="X",
            header=header,
            field_id=night.field_id,
            field_name="f1",
        )
        for i, path in enumerate(synthetic.paths)
    )
    products = tuple(
        InputProduct(target=f"image:{i + 1}", image_id=i + 1, output_path=path, qc={})
        for i, path in enumerate(synthetic.paths)
    )
    return StepContext(
        task_id=1, step="magfit", target="night:1", config_version="test",
        parameters={**DEFAULTS, **parameters}, storage_root=directory / "storage",
        night=NightInfo(id=1, local_date=dt.date(2024, 9, 10), camera_serial="X",
                        layout="RGGB", images=images),
        inputs={"photometry": products},
    )  # fmt: skip


NIGHT = PhotometryNight(frames=60, stars=1500, cloudy=(7, 33), seed=4)


@pytest.fixture(scope="module")
def synthetic_night(tmp_path_factory):
    directory = tmp_path_factory.mktemp("magfit_synthetic")
    synthetic = write_photometry_night(directory / "photometry", NIGHT)
    result = Magfit().run(_context(directory, synthetic, NIGHT))
    return directory, synthetic, result


def _ratio(path: Path, synthetic, channel: str, photometry: int, stars: np.ndarray,
           truth_channel: str = ""):  # fmt: skip
    """Per star: the RMS of its fitted light curve over its theoretical noise (the
    variables' own signal counted in the theory)."""
    fitted = read_fitted_block(path, 1, channel, slice(None))["fitted"][:, stars, photometry]
    seen = np.isfinite(fitted).sum(axis=0) >= 2
    rms = np.full(stars.size, np.nan)
    rms[seen] = np.nanstd(fitted[:, seen], axis=0, ddof=1)
    sigma = synthetic.sigma[truth_channel or channel]
    theory = np.sqrt(np.mean(sigma[:, stars, photometry] ** 2, axis=0)
                     + np.var(synthetic.variable_mag[:, stars], axis=0, ddof=1))  # fmt: skip
    return rms / theory


def test_synthetic_night_reaches_the_noise(synthetic_night):
    _directory, synthetic, result = synthetic_night
    _root, fields = read_magfit(result.output_path)
    field = fields[0]
    assert field.channels == ("R", "G1", "G2", "B")
    assert field.photometries == ("ap2", "ap3", "ap4", "psf")
    assert field.notes == ()  # site and colour known: every term fitted
    # Unsaturated stars whose noise is below 5 %: the light curves' scatter is the noise.
    stars = np.flatnonzero(
        (synthetic.sigma["G1"][:, :, 1].mean(axis=0) < 0.05) & (synthetic.true_mag["G1"] > 7.5)
    )
    assert stars.size > 500
    for channel in field.channels:
        for p in range(len(field.photometries)):
            ratio = np.nanmedian(_ratio(result.output_path, synthetic, channel, p, stars))
            # Measured 0.993-1.002 (clouds on 2 of 60 frames included).
            assert ratio < 1.03, (channel, field.photometries[p], ratio)
    # The fitted magnitudes follow the truth (variables included) to within the noise,
    # up to each star's constant.
    fitted = read_fitted_block(result.output_path, 1, "G1", slice(None))["fitted"][:, stars, 1]
    error = fitted - (synthetic.true_mag["G1"] + synthetic.variable_mag)[:, stars]
    error -= np.nanmedian(error, axis=0)
    pull = error / synthetic.sigma["G1"][:, stars, 1]
    assert 0.95 < np.nanstd(pull) < 1.05


def test_master_converges_and_leaves_out_the_variables(synthetic_night):
    _, synthetic, result = synthetic_night
    _, fields = read_magfit(result.output_path)
    field = fields[0]
    assert field.changes[-1] <= 1e-4 and field.iterations <= 5
    assert field.iterations >= 2  # the first master has no predecessor
    assert result.qc["fields"]["1"]["converged"] is True
    for channel in field.channels:
        master = read_master_reference(result.output_path, 1, channel)
        assert master.variable[synthetic.variables].all(), channel
        # Quiet stars flagged by the one-sided cut: measured 3.6-4.3 % of them.
        assert master.variable.mean() < 0.07
    # A variable keeps its signal: its fitted light curve follows the truth.
    fitted = read_fitted_block(result.output_path, 1, "G1", slice(None))["fitted"][:, :, 1]
    for star in synthetic.variables:
        light = fitted[:, star] - np.nanmedian(fitted[:, star])
        truth = synthetic.variable_mag[:, star] - np.median(synthetic.variable_mag[:, star])
        assert np.corrcoef(light, truth)[0, 1] > 0.95


def test_cloudy_frames_get_the_finer_terms(synthetic_night):
    _, _, result = synthetic_night
    with h5py.File(result.output_path) as source:
        extended = np.asarray(source["FIELD1/G1/fit_extended"][:, 1])
        rms = np.asarray(source["FIELD1/G1/fit_rms"][:, 1])
    assert set(np.flatnonzero(extended)) == set(NIGHT.cloudy)
    clear = np.delete(rms, list(NIGHT.cloudy))
    assert np.all(rms[list(NIGHT.cloudy)] < 1.1 * np.median(clear))  # measured 0.95-1.00


def test_reference_frame_and_figures_are_recorded(synthetic_night):
    _, _synthetic, result = synthetic_night
    figures = result.qc["fields"]["1"]
    assert figures["frames"] == NIGHT.frames and figures["stars"] == NIGHT.stars
    assert figures["reference_frame"] in figures["reference_reason"]
    assert "FWHM" in figures["reference_reason"] and "airmass" in figures["reference_reason"]
    # The synthetic FWHM grows through the night while the field rises: the reference
    # is neither the sharpest frame (the first, the highest airmass) nor the lowest
    # (the last, the broadest) but between (measured: frame 29 of 60).
    chosen = int(figures["reference_frame"][10:15])
    assert 10 <= chosen <= 50
    per_frame = result.qc["frames"]["synthetic_00010.fits"]["G1"]
    assert per_frame["stars"] > 1000 and per_frame["rms_mmag"] > 0
    assert 0 <= per_frame["rejected"] < 0.05


def test_small_blocks_give_the_same_night_and_reruns_are_identical(synthetic_night, tmp_path):
    _directory, synthetic, result = synthetic_night
    again = Magfit().run(_context(tmp_path, synthetic, NIGHT, block_mb=1))
    for channel in ("R", "B"):
        a = read_fitted_block(result.output_path, 1, channel, slice(None))["fitted"]
        b = read_fitted_block(again.output_path, 1, channel, slice(None))["fitted"]
        np.testing.assert_array_equal(a, b)


def test_the_fit_does_not_depend_on_the_fields_star_order(tmp_path):
    """The columns follow the field's star indices, which depend on the order in which
    nights registered their stars (a reopened night, another night first): the fitted
    night is the same, to the last bit, star by star."""
    night = PhotometryNight(
        frames=16,
        stars=500,
        cloudy=(5,),
        seed=8,
        variables=2,
        star_list="2024-09-10 cfg=t star_list/t/2024-09-10/night-1.fits",
    )
    synthetic = write_photometry_night(tmp_path / "photometry", night)
    plain = Magfit().run(_context(tmp_path / "plain", synthetic, night))
    context = _context(tmp_path / "ordered", synthetic, night)
    index = np.random.default_rng(5).permutation(night.stars)
    rows = {1: {reference_path(night.star_list): (np.arange(night.stars), index)}}
    ordered = Magfit().run(
        dataclasses.replace(context, night=dataclasses.replace(context.night, star_rows=rows))
    )
    with h5py.File(ordered.output_path, "r") as hdf5:
        list_row = hdf5["FIELD1/list_row"][()]
    # The columns are in the field's star order ...
    assert np.all(np.diff(index[list_row]) > 0)
    # ... and hold what the fit in the list's order holds.
    a, b = magfit_by_star(plain.output_path), magfit_by_star(ordered.output_path)
    assert sorted(a) == sorted(b)
    assert "FIELD1/R/fitted" in a and "FIELD1/G1/master" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_mono_camera_without_site(tmp_path):
    night = PhotometryNight(frames=12, stars=600, channels=("L",), seed=2)
    synthetic = write_photometry_night(tmp_path / "photometry", night)
    result = Magfit().run(_context(tmp_path, synthetic, night, no_site=True))
    _, fields = read_magfit(result.output_path)
    notes = " ".join(fields[0].notes)
    assert "airmass left out" in notes and "colour left out" in notes
    assert fields[0].channels == ("MONO",)
    assert not any("colour" in t or "airmass" in t for t in fields[0].terms)
    # Without airmass terms the frame's polynomial in x, y follows the extinction's
    # change across the field: measured 0.97 (12 frames).
    stars = np.flatnonzero(synthetic.sigma["L"][:, :, 1].mean(0) < 0.05)
    ratio = np.nanmedian(_ratio(result.output_path, synthetic, "MONO", 1, stars, "L"))
    assert ratio < 1.1


def test_a_bad_expression_is_a_permanent_error(tmp_path):
    night = PhotometryNight(frames=3, stars=100, seed=1)
    synthetic = write_photometry_night(tmp_path / "photometry", night)
    with pytest.raises(PermanentError, match=r"uses \['seeing'\]: the variables are airmass"):
        Magfit().run(_context(tmp_path, synthetic, night, expression="O2{mag, seeing}"))
    with pytest.raises(PermanentError, match="cannot read"):
        Magfit().run(_context(tmp_path, synthetic, night, expression="mag; import os"))


#: A simulated night through the whole pipeline (60 frames, 4 channels; partial clouds
#: on 7 of the frames, the simulator's default tenth).
PIPELINE_NIGHT = {"frames": 60, "width": 512, "height": 384, "seed": 21}


@pytest.fixture(scope="module")
def pipeline_night(tmp_path_factory):
    home = tmp_path_factory.mktemp("magfit_pipeline")
    upload = home / "upload"
    simulate_night(upload, NightConfig(**PIPELINE_NIGHT))
    rows = process_upload(home, upload, default_registry())
    (magfit,) = [row for row in rows if row[0] == "magfit"]
    assert magfit[2] is TaskState.DONE, magfit[5]
    precision = magfit_precision(Path(magfit[3]), next(upload.rglob("truth.h5")))
    best = {}
    for row in precision:  # the best aperture of each channel
        if row.channel not in best or row.ratio < best[row.channel].ratio:
            best[row.channel] = row
    return magfit, best


def test_pipeline_night_is_fitted_beyond_a_true_zero_point(pipeline_night):
    """Unsaturated G 7–11 stars (70–85 per channel): the light curves after the fit
    against a per-frame zero point taken from the truth itself."""
    magfit, best = pipeline_night
    figures = magfit[4]["fields"]["1"]
    assert figures["frames"] == 60 and figures["converged"] is True
    assert set(best) == {"R", "G1", "G2", "B"}
    for _channel, row in best.items():
        assert row.stars >= 50, row
        # Measured: 1.11-1.31 after the fit, 1.40-2.00 with the true zero points (the
        # ratio 0.62-0.79).
        assert row.ratio < 0.85 * row.zero_point_ratio, row


@pytest.mark.parametrize(
    "channel",
    [
        pytest.param("R", marks=pytest.mark.xfail(
            strict=True, reason="measured 1.31 (ap3): a few stars wander by 4-12 σ through "
            "the night, and a per-star fit of their sub-pixel phase would take the median to "
            "1.24: the PRF of the undersampled R channel (issue 12)")),
        "G1",
        "G2",
        "B",
    ],
)  # fmt: skip
def test_pipeline_night_reaches_the_target_precision(pipeline_night, channel):
    """The issue's target: median RMS / theory ≤ 1.3 for unsaturated G 7–11 stars
    (measured G1 1.22, G2 1.18, B 1.11; 70-85 stars per channel, so ±0.04)."""
    _, best = pipeline_night
    assert best[channel].ratio <= 1.3, best[channel]
