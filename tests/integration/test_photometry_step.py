"""The photometry step on a simulated night, through the pipeline, against the truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from autowisp.core.bayer import channels, colour_of_channels
from autowisp.core.psf import fwhm_of
from autowisp.io.photometry import read_frame_photometry
from autowisp.simulate.assess import truth_rows
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.simulate.truth import read_truth
from autowisp.steps.astrometry import Astrometry
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.photometry import Photometry
from autowisp.steps.registry import Registry
from autowisp.steps.star_list import StarList
from autowisp.vocabulary import TaskState
from tests.integration.conftest import process_upload
from tests.unit.core.synthetic import enclosed

REGISTRY = Registry([FrameQC, MasterBias, MasterDark, MasterFlat, Calibrate, Astrometry,
                     StarList, Photometry])  # fmt: skip


@pytest.fixture(scope="module")
def measured_night(tmp_path_factory):
    home = tmp_path_factory.mktemp("photometry")
    simulate_night(home / "upload", NightConfig(frames=3, width=640, height=512, seed=7,
                                                cloudy_fraction=0.0))  # fmt: skip
    rows = [r for r in process_upload(home, home / "upload", REGISTRY) if r.name == "photometry"]
    truth = read_truth(next((home / "upload").rglob("truth.h5")))
    return rows, truth


def test_every_frame_is_measured_and_the_file_is_as_documented(measured_night):
    rows, _ = measured_night
    assert [row.state for row in rows] == [TaskState.DONE] * 3, [r.last_error for r in rows]
    with h5py.File(rows[0].output_path, "r") as f:
        assert f.attrs["channels"] == "R,G1,G2,B"
        assert list(f.attrs["apertures"]) == [2.0, 3.0, 4.0, 5.0]
        assert f.attrs["STEP"] == "photometry" and "ASTROM" in f.attrs and "CALFRAME" in f.attrs
        assert "STARLIST" in f.attrs and f.attrs["field_id"] >= 0
        for name in ("R", "G1", "G2", "B"):
            group = f[name]
            n = group["source_id"].shape[0]
            assert group["source_id"].dtype == np.int64 and n > 20
            assert group["flux"].shape == group["flux_err"].shape == (n, 4)
            for key in ("x", "y", "psf_flux", "psf_flux_err", "background", "background_err",
                        "flags", "ra", "dec", "list_row", "star_flags"):  # fmt: skip
                assert group[key].shape == (n,)
            assert "psf_coefficients" in group
    for row in rows:
        assert row.qc["G1"]["measured"] > 20 and 1.0 < row.qc["G1"]["fwhm"] < 4.0


def _contamination(truth, frame, star, colour, radius):
    """Light of the truth's other stars within ``radius`` px of ``star``, as a fraction of
    the star's own (the offline catalogue stops at G = 10, the sky does not)."""
    x, y = truth.object["x"][frame], truth.object["y"][frame]
    flux = truth.object["flux"][frame, :, colour]
    distance = np.hypot(x - x[star], y - y[star])
    total = 0.0
    for j in np.flatnonzero((distance > 0) & (distance < radius + 12) & np.isfinite(flux)):
        total += flux[j] * enclosed(
            truth.object["fwhm_major"][frame, j], truth.object["fwhm_minor"][frame, j],
            truth.object["theta"][frame, j], radius, dx=x[star] - x[j], dy=y[star] - y[j],
            nodes=40, angles=120,
        )  # fmt: skip
    own = flux[star] * enclosed(truth.object["fwhm_major"][frame, star],
                                truth.object["fwhm_minor"][frame, star],
                                truth.object["theta"][frame, star], radius)  # fmt: skip
    return total / own


_FIGURES: dict[int, dict] = {}


def _unblended_figures(rows, truth):
    """Per channel over the night: (stars, median flux / truth, median FWHM / truth),
    computed once per night."""
    if id(truth) not in _FIGURES:
        _FIGURES[id(truth)] = _measure_unblended(rows, truth)
    return _FIGURES[id(truth)]


def _measure_unblended(rows, truth):
    names = list(truth.object["filename"])
    layout = "RGGB"
    colours = colour_of_channels(layout)
    flat = truth.calibration["flat"]
    ratios: dict[str, list[float]] = {c.name: [] for c in channels(layout)}
    widths: dict[str, list[float]] = {c.name: [] for c in channels(layout)}
    for row in rows:
        product = read_frame_photometry(row.output_path)
        frame = names.index(product.raw_file)
        stars = truth_rows(product, truth, frame)
        for c, channel in enumerate(channels(layout)):
            phot = product.channels[channel.name]
            scale = np.median(channel.view(flat)) / 4  # calibration normalises the flat
            clean = np.flatnonzero(
                (phot.flags == 0) & (phot.flux[:, 1] / phot.flux_err[:, 1] > 50)
            )
            for i in clean[stars[clean] >= 0]:
                s = stars[i]
                if _contamination(truth, frame, s, colours[c], 3.0) > 0.002:
                    continue
                true = truth.object["flux"][frame, s, colours[c]] * np.nan_to_num(
                    truth.object["scintillation_factor"][frame, s], nan=1.0
                )
                fraction = enclosed(truth.object["fwhm_major"][frame, s],
                                    truth.object["fwhm_minor"][frame, s],
                                    truth.object["theta"][frame, s], 3.0)  # fmt: skip
                ratios[channel.name].append(phot.flux[i, 1] / (true * scale * fraction))
                # The map's shape at the star (its position and magnitude), as measured.
                major, _, _ = fwhm_of(*phot.shapes[i : i + 1].T, kind=phot.shape_map.kind,
                                      beta=phot.shape_map.beta)  # fmt: skip
                widths[channel.name].append(float(major[0]) / truth.object["fwhm_major"][frame, s])
    return {name: (len(v), float(np.median(v)), float(np.median(widths[name])))
            for name, v in ratios.items()}  # fmt: skip


def test_mapped_psf_against_the_truth(measured_night):
    """Unblended clean stars (the truth's fainter stars add < 0.2 % in their aperture):
    the mapped PSF's FWHM within 10 % of the truth (median per channel over the night)."""
    rows, truth = measured_night
    figures = _unblended_figures(rows, truth)
    for count, _, width_ratio in figures.values():
        assert count >= 15, figures
        assert width_ratio == pytest.approx(1.0, abs=0.1), figures


def test_fluxes_against_the_truth(measured_night):
    """The same stars' median aperture flux per channel within 1 % of the truth's light
    (measured R +0.82 %, G1 -0.42 %, G2 +0.43 %, B +0.87 %; with the former 6 px wide
    annulus R +0.8 %, G1 -0.4 %, G2 +0.3 %, B +1.1 %)."""
    rows, truth = measured_night
    figures = _unblended_figures(rows, truth)
    print("unblended stars per channel (count, flux / truth, FWHM / truth):", figures)
    for _, flux_ratio, _ in figures.values():
        assert flux_ratio == pytest.approx(1.0, abs=0.01), figures


def test_night_precision_against_the_truth(measured_night):
    """The demo's precision figures: every channel reported, the scatter of the brightest
    stars about the truth no better than their reported errors allow (a figure below the
    errors would mean the comparison is wrong) and within a few times them."""
    from pathlib import Path

    from autowisp.simulate.assess import night_precision

    rows, _ = measured_night
    upload = Path(rows[0].output_path).parents[4] / "upload"
    results = night_precision([r.output_path for r in rows], next(upload.rglob("truth.h5")))
    assert [r.channel for r in results] == ["R", "G1", "G2", "B"]
    for r in results:
        assert r.frames == 3 and r.stars >= 5, r
        assert 0.5 * r.expected_mmag < r.measured_mmag < 4 * r.expected_mmag, r
