"""The products of a simulated 1024×1024 night: compression within stated bounds of the
errors, the products of a frame smaller than its raw file, provenance in every one."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from autowisp.core.calibration import MaskBit, calibrate_frame
from autowisp.core.cosmics import cosmic_ray_mask
from autowisp.db.models import TaskState
from autowisp.io.fits import read_image
from autowisp.io.products import (
    CalibratedFrame,
    background_noise,
    master_path,
    read_calibrated_frame,
    read_frame_qc,
    read_master_frame,
    write_calibrated_frame,
)
from autowisp.io.solution import read_astrometric_solution
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.steps.astrometry import Astrometry
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.registry import Registry
from tests.integration.conftest import process_upload

REGISTRY = Registry([FrameQC, MasterBias, MasterDark, MasterFlat, Calibrate, Astrometry])
MASTERS = ("MBIAS", "MDARK", "MFLAT")

#: The bounds the product layer states (autowisp/io/products.py).
IMAGE_BOUND = 0.1  # |stored − original| < IMAGE_BOUND · ERROR, every pixel
BIAS_BOUND = 0.01  # |mean(stored − original)| < BIAS_BOUND · ERROR
ERROR_BOUND = 0.01  # |derived ERROR / original − 1|, every pixel


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    home = tmp_path_factory.mktemp("products")
    simulate_night(
        home / "upload",
        NightConfig(frames=2, width=1024, height=1024, seed=3, biases=5, darks=5, flats=5),
    )
    minimum = {"min_frames": 5}
    parameters = {step: minimum for step in ("master_bias", "master_dark", "master_flat")}
    rows = process_upload(home, home / "upload", REGISTRY, parameters)
    assert all(r.state is TaskState.DONE for r in rows), [r.last_error for r in rows]
    return home, rows


def _outputs(rows, step):
    return [Path(r.output_path) for r in rows if r.name == step]


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _recalibrated(home, frame: CalibratedFrame):
    """The frame calibrated again, in memory, from its raw file and the masters it names:
    the image, error and mask before they were stored."""
    storage = home / "storage"
    raw_path = next((home / "upload").rglob(frame.provenance.raw_file))
    raw, header = read_image(raw_path)
    bias, dark, flat = (
        read_master_frame(master_path(frame.provenance.references[key], storage))
        for key in MASTERS
    )
    image, error, mask = calibrate_frame(
        raw, exptime=frame.exptime, bias=bias.master, dark_rate=dark.master,
        flat=flat.master, gain=frame.gain, read_noise=frame.read_noise,
        saturation=float(header["SATURATE"]), bias_error=bias.error,
        dark_error=dark.error, flat_error=flat.error, hot=dark.hot,
    )  # fmt: skip
    hits = cosmic_ray_mask(image, frame.layout, bad=mask != 0, threshold=12.0)
    mask[hits] |= np.uint8(MaskBit.COSMIC_RAY)
    return image, error, mask


def test_image_mask_and_error_survive_storage_within_the_stated_bounds(night):
    home, rows = night
    for path in _outputs(rows, "calibrate"):
        stored = read_calibrated_frame(path)
        image, error, mask = _recalibrated(home, stored)
        # (ii) the mask is exact
        np.testing.assert_array_equal(stored.mask, mask)
        finite = np.isfinite(error)
        assert finite.mean() > 0.99
        difference = stored.image.astype(np.float64) - image
        pull = difference[finite] / error[finite]
        # (i) every pixel within a tenth of its error; no bias, on the sky or on stars
        assert np.max(np.abs(pull)) < IMAGE_BOUND, np.max(np.abs(pull))
        assert 0.005 < np.std(pull) < 0.04  # quantised (not lossless), finely
        assert abs(np.mean(pull)) < BIAS_BOUND / 10
        stars = finite & (image > np.median(image) + 5 * error)
        assert stars.sum() > 2000
        assert abs(np.mean(difference[stars] / error[stars])) < BIAS_BOUND
        assert abs(np.mean(difference[finite])) < BIAS_BOUND * np.median(error[finite])
        # exact zeros stay zero (SUBTRACTIVE_DITHER_2)
        assert np.all(stored.image[image == 0] == 0)
        # (iii) the derived error matches the original
        assert np.array_equal(np.isfinite(stored.error), finite)
        relative = np.abs(stored.error[finite] / error[finite] - 1)
        assert np.max(relative) < ERROR_BOUND, np.max(relative)
        header = fits.getheader(path)
        assert header["QLEVEL"] == 16.0 and header["ERRORHDU"] == "derived"
        assert header["QSTEP"] == pytest.approx(background_noise(stored.image) / 16, rel=0.02)


def test_a_frames_products_take_less_room_than_its_raw_file(night):
    """(iv) calibrated frame + astrometric solution + frame QC per raw byte."""
    home, rows = night
    by_target: dict[str, int] = {}
    for row in rows:
        if row.name in ("calibrate", "astrometry", "frame_qc"):
            by_target[row.target] = (
                by_target.get(row.target, 0) + Path(row.output_path).stat().st_size
            )
    for path in _outputs(rows, "calibrate"):
        frame = read_calibrated_frame(path, with_error=False)
        raw = next((home / "upload").rglob(frame.provenance.raw_file))
        target = next(
            r.target for r in rows if r.name == "calibrate" and Path(r.output_path) == path
        )
        ratio = by_target[target] / raw.stat().st_size
        print(
            f"{raw.name}: {by_target[target]} bytes of product per "
            f"{raw.stat().st_size} raw bytes: {ratio:.3f}"
        )
        assert ratio <= 1.0


def test_every_product_names_its_raw_frame_and_masters(night):
    home, rows = night
    storage = home / "storage"
    bias, dark, flat = (
        _outputs(rows, s)[0] for s in ("master_bias", "master_dark", "master_flat")
    )

    def named(reference: str) -> Path:
        date, config, relative = reference.split(" ", 2)
        assert date == "2024-09-10" and config.startswith("cfg=") and len(config) > 4
        assert not Path(relative).is_absolute()
        return storage / relative

    # masters: the chain below them, and the frames stacked with their sha256
    assert set(read_master_frame(bias).provenance.references) == set()
    dark_master = read_master_frame(dark)
    assert named(dark_master.provenance.references["MBIAS"]) == bias
    flat_master = read_master_frame(flat)
    assert {k: named(v) for k, v in flat_master.provenance.references.items()} == {
        "MBIAS": bias, "MDARK": dark,
    }  # fmt: skip
    for master in (dark_master, flat_master):
        assert len(master.frames_used) == 5
        for frame, sha in master.frames_used:
            assert _sha256(frame) == sha
    # the simulator's two bad flats are rejected, with reasons, in the table and HISTORY
    reasons = {Path(p).name: r for p, r in flat_master.rejected}
    assert sorted(reasons) == ["flat_0006.fits", "flat_0007.fits"], reasons
    history = "".join(fits.getheader(flat)["HISTORY"])
    assert history.count("rejected ") == 2 and "clouds" in history
    # a calibrated frame: its raw frame by name and sha256, versions, all three masters
    uploads = {p.name: p for p in (home / "upload").rglob("*.fits")}
    for path in _outputs(rows, "calibrate"):
        provenance = read_calibrated_frame(path, with_error=False).provenance
        assert _sha256(uploads[provenance.raw_file]) == provenance.raw_sha256
        assert provenance.step == "calibrate" and provenance.step_version == Calibrate.version
        assert provenance.code_version and provenance.config_version == path.parts[-3]
        assert provenance.uncalibrated is False
        assert [named(provenance.references[k]) for k in MASTERS] == [bias, dark, flat]
    # the solution names the raw frame and the calibrated frame it solved
    for path in _outputs(rows, "astrometry"):
        solution = read_astrometric_solution(path)
        calibrated = named(solution.provenance.references["CALFRAME"])
        frame = read_calibrated_frame(calibrated, with_error=False)
        assert solution.provenance.raw_sha256 == frame.provenance.raw_sha256
        assert solution.provenance.step == "astrometry"
        assert solution.qc["matched"] >= 30
    # frame QC: every frame's report names it
    for path in _outputs(rows, "frame_qc"):
        report = read_frame_qc(path)
        assert _sha256(uploads[report.provenance.raw_file]) == report.provenance.raw_sha256
        assert report.provenance.step == "frame_qc" and set(report.channels) == {
            "R", "G1", "G2", "B",
        }  # fmt: skip


def test_the_same_frame_gives_the_same_bytes(night, tmp_path):
    _, rows = night
    frame = read_calibrated_frame(_outputs(rows, "calibrate")[0], with_error=False)
    write_calibrated_frame(tmp_path / "a.fits", frame)
    write_calibrated_frame(tmp_path / "b.fits", frame)
    assert _sha256(tmp_path / "a.fits") == _sha256(tmp_path / "b.fits")


def test_a_frame_whose_masters_are_gone_says_so(night, tmp_path):
    _, rows = night
    moved = tmp_path / "calibrate" / "cfg" / "night" / "image.fits"
    moved.parent.mkdir(parents=True)
    shutil.copy(_outputs(rows, "calibrate")[0], moved)
    with pytest.raises(FileNotFoundError, match=r"master_bias.* is gone: its ERROR cannot"):
        read_calibrated_frame(moved)
    assert read_calibrated_frame(moved, with_error=False).image.shape == (1024, 1024)
