"""Master bias, dark and flat and calibrated frames from a simulated night, against truth.

The steps run through the local executor on the embedded database; they are not yet in
the package's default pipeline (see the calibration issue), so the test declares them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from autowisp.core.bayer import channels
from autowisp.core.calibration import MaskBit
from autowisp.db.migrate import upgrade
from autowisp.db.models import Configuration, Task, TaskState
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.io.products import read_calibrated_frame, read_master_frame
from autowisp.pipeline.local import run_local
from autowisp.simulate.truth import read_truth
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.registry import Registry
from tests.integration.conftest import process_upload

REGISTRY = Registry([FrameQC, MasterBias, MasterDark, MasterFlat, Calibrate])


@pytest.fixture(scope="module")
def calibrated_night(small_night, tmp_path_factory):
    camera = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    home = tmp_path_factory.mktemp("calibration")
    url = f"sqlite:///{home / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [camera], close=True)
    # The simulated night has 12 flats of which 2 are bad on purpose.
    summary = run_local(url, home / "storage", REGISTRY, jobs=2)
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task.state, Task.output_path, Task.qc, Task.last_error)
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .where(Configuration.active.is_(True))
        ).all()
    truth = read_truth(next(camera.rglob("truth.h5")))
    return summary, rows, truth


def _output(rows, step):
    [row] = [r for r in rows if r[0] == step]
    assert row[1] is TaskState.DONE, row
    return read_master_frame(Path(row[2])), row[3]


def test_every_step_is_done(calibrated_night):
    _summary, rows, _ = calibrated_night
    assert sorted(r[0] for r in rows) == sorted(
        ["master_bias", "master_dark", "master_flat"] + ["calibrate"] * 6 + ["frame_qc"] * 38
    )
    assert all(r[1] is TaskState.DONE for r in rows), [r for r in rows if r[4]]


def test_master_bias_matches_the_true_bias(calibrated_night):
    _, rows, truth = calibrated_night
    master, qc = _output(rows, "master_bias")
    pull = (master.master - truth.calibration["bias"]) / master.error
    assert abs(np.mean(pull)) < 0.05 + 0.5 / np.sqrt(12)  # quantisation of the raw ADU
    assert 0.85 < np.std(pull) < 1.2
    assert qc["frames"] == 10


def test_master_dark_rate_and_hot_pixels(calibrated_night):
    _, rows, truth = calibrated_night
    master, _qc = _output(rows, "master_dark")
    gain = truth.camera["gain"]
    true_rate = truth.calibration["dark_rate"] / gain  # ADU/s
    hot = truth.calibration["hot"]
    pull = ((master.master - true_rate) / master.error)[~hot]
    assert abs(np.mean(pull)) < 0.1 and 0.85 < np.std(pull) < 1.2
    flagged = master.hot
    assert flagged[hot].mean() >= 0.95
    assert flagged[~hot].mean() < 1e-3


def test_master_flat_matches_the_true_flat_and_rejects_bad_flats(calibrated_night):
    _, rows, truth = calibrated_night
    master, qc = _output(rows, "master_flat")
    true_flat = truth.calibration["flat"].astype(np.float64)
    normalised = true_flat.copy()
    for channel in channels("RGGB"):
        channel.view(normalised)[...] /= np.median(channel.view(true_flat))
    good = ~truth.calibration["dead"]
    pull = ((master.master - normalised) / master.error)[good]
    assert 0.9 < np.std(pull) < 1.2
    assert abs(np.mean(pull)) < 0.1
    reasons = {Path(path).name: reason for path, reason in qc["rejected"].items()}
    assert reasons.keys() == {"flat_0011.fits", "flat_0012.fits"}
    assert reasons["flat_0011.fits"].startswith("clouds")
    assert reasons["flat_0012.fits"].startswith("over-exposed")
    assert qc["gain"] == pytest.approx(truth.camera["gain"], rel=0.05)
    assert qc["read_noise"] == pytest.approx(truth.camera["read_noise"], rel=0.1)


def test_calibrated_frames_carry_error_mask_and_provenance(calibrated_night):
    _, rows, truth = calibrated_night
    outputs = [Path(r[2]) for r in rows if r[0] == "calibrate"]
    product = read_calibrated_frame(outputs[0])
    assert product.unit == "electron" and product.layout == "RGGB"
    assert product.provenance.uncalibrated is False
    flat_row = next(r for r in rows if r[0] == "master_flat")
    assert product.provenance.references["MFLAT"].endswith(
        str(Path(flat_row[2]).relative_to(outputs[0].parents[3]))
    )
    assert product.image.shape == product.error.shape == product.mask.shape
    mask = product.mask
    assert np.all(mask[truth.calibration["dead"]] & MaskBit.LOW_RESPONSE)
    assert (mask[truth.calibration["hot"]] & MaskBit.HOT).astype(bool).mean() >= 0.95
    assert np.all(np.isfinite(product.image)) and np.all(product.error > 0)
    # Cosmic-ray hits: every flagged pixel is a true hit of some frame of the night.
    hits = {(int(x), int(y)) for _, x, y, _ in truth.object["cosmic_rays"]}
    flagged = 0
    for path, qc in ((Path(r[2]), r[3]) for r in rows if r[0] == "calibrate"):
        mask = read_calibrated_frame(path, with_error=False).mask
        rows_, cols_ = np.nonzero(mask & MaskBit.COSMIC_RAY)
        assert qc["cosmic_ray_pixels"] == rows_.size
        assert {(int(x), int(y)) for x, y in zip(cols_, rows_, strict=True)} <= hits
        flagged += rows_.size
    assert flagged > 0


def _run_night(tmp_path, files, parameters=None):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    upload = tmp_path / "upload"
    upload.mkdir()
    for path in files:
        (upload / path.name).write_bytes(path.read_bytes())
    ingest_paths(url, [upload], close=True)
    run_local(url, tmp_path / "storage", REGISTRY, jobs=1, step_parameters=parameters or {})
    with session_scope(url) as session:
        return {
            name: (state, error)
            for name, state, error in session.execute(
                select(StepRow.name, Task.state, Task.last_error).join(
                    StepRow, StepRow.id == Task.step_id
                )
            )
        }


def test_too_few_frames_and_cloudy_flats_are_explained(small_night, tmp_path):
    night = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    frames = sorted(night.rglob("*.fits"))
    biases = [f for f in frames if f.name.startswith("bias")][:4]
    outcome = _run_night(tmp_path, biases)
    state, error = outcome["master_bias"]
    assert state is TaskState.DEAD
    assert "too few bias frames" in error and "4 usable, 10 needed" in error


def test_only_bad_flats_give_the_reasons(small_night, tmp_path):
    night = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    frames = sorted(night.rglob("*.fits"))
    chosen = [f for f in frames if f.name.startswith(("bias", "dark"))]
    chosen += [f for f in frames if f.name in ("flat_0011.fits", "flat_0012.fits")]
    outcome = _run_night(tmp_path, chosen, {"master_flat": {"min_frames": 3}})
    state, error = outcome["master_flat"]
    assert state is TaskState.DEAD
    # The cloudy flat alone has nothing to be compared with; the over-exposed one is out.
    assert "1 usable, 3 needed" in error and "flat_0012.fits (over-exposed" in error
    assert outcome["master_bias"][0] is TaskState.DONE


def test_frames_of_different_shapes_are_refused(small_night, tmp_path):
    from astropy.io import fits

    night = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    biases = sorted(night.rglob("bias_*.fits"))
    cropped = tmp_path / "crop"
    cropped.mkdir()
    with fits.open(biases[0]) as hdus:
        header = hdus[0].header.copy()
        header["DATE-OBS"] = "2024-09-11T15:59:00"
        fits.PrimaryHDU(hdus[0].data[:100, :100], header).writeto(cropped / "bias_crop.fits")
    outcome = _run_night(tmp_path, [*biases, cropped / "bias_crop.fits"])
    state, error = outcome["master_bias"]
    assert state is TaskState.DEAD and "different shapes" in error


def test_a_night_without_calibration_waits_then_uses_the_nearest_masters(small_night, tmp_path):
    from astropy.io import fits

    night = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    frames = sorted(night.rglob("*.fits"))
    later = tmp_path / "later"
    later.mkdir()
    for frame in [f for f in frames if f.name.startswith("object")][:2]:
        with fits.open(frame) as hdus:
            header = hdus[0].header.copy()
            header["DATE-OBS"] = header["DATE-OBS"].replace("2024-09-11", "2024-09-14")
            fits.PrimaryHDU(hdus[0].data, header).writeto(later / frame.name)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    parameters = {"master_flat": {"min_frames": 8}}
    ingest_paths(url, [later], close=True)
    run_local(url, tmp_path / "storage", REGISTRY, jobs=1, step_parameters=parameters)
    with session_scope(url) as session:
        waiting = session.execute(
            select(Task.state, Task.wait_reason)
            .join(StepRow, StepRow.id == Task.step_id)
            .where(StepRow.name == "calibrate")
        ).all()
    assert len(waiting) == 2
    assert all(s is TaskState.PENDING and "waiting for a master_bias" in e for s, e in waiting)
    # Calibration frames of another night of the same camera arrive.
    ingest_paths(url, [night], close=True)
    run_local(url, tmp_path / "storage", REGISTRY, jobs=2, step_parameters=parameters)
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task.state, Task.output_path, Task.night_id).join(
                StepRow, StepRow.id == Task.step_id
            )
        ).all()
    assert all(state is TaskState.DONE for _, state, _, _ in rows), rows
    flat_path = next(path for name, _, path, _ in rows if name == "master_flat")
    later_outputs = [
        Path(p) for name, _, p, n in rows if name == "calibrate" and "2024-09-13" in p
    ]
    assert len(later_outputs) == 2
    # The master flat of the other night, named with its night and configuration (a
    # long value continued over CONTINUE cards).
    reference = read_calibrated_frame(later_outputs[0]).provenance.references["MFLAT"]
    storage = tmp_path / "storage"
    assert reference.startswith("2024-09-10 cfg=")
    assert reference.endswith(str(Path(flat_path).relative_to(storage)))


def test_a_monochrome_camera_is_the_one_channel_case(tmp_path):
    from tests.conftest import run_cli

    run_cli(
        "simulate",
        str(tmp_path / "mono"),
        "--frames",
        "2",
        "--size",
        "128x96",
        "--layout",
        "MONO",
        "--seed",
        "4",
    )
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [tmp_path / "mono"], rules={"default_layout": "MONO"}, close=True)
    run_local(url, tmp_path / "storage", REGISTRY, jobs=2)
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task.state, Task.output_path, Task.last_error).join(
                StepRow, StepRow.id == Task.step_id
            )
        ).all()
    assert all(state is TaskState.DONE for _, state, _, _ in rows), rows
    flat = read_master_frame(Path(next(p for n, _, p, _ in rows if n == "master_flat")))
    truth = read_truth(next((tmp_path / "mono").rglob("truth.h5")))
    true_flat = truth.calibration["flat"] / np.median(truth.calibration["flat"])
    good = ~truth.calibration["dead"]
    pull = ((flat.master - true_flat) / flat.error)[good]
    assert 0.9 < np.std(pull) < 1.2
    product = read_calibrated_frame(Path(next(p for n, _, p, _ in rows if n == "calibrate")))
    assert product.layout == "MONO"


def test_a_camera_may_proceed_uncalibrated_and_says_so(small_night, tmp_path):
    from astropy.io import fits

    night = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    objects = sorted(night.rglob("object_*.fits"))[:2]
    serial = fits.getheader(objects[0])["CAMSN"]
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, objects, close=True)
    run_local(
        url,
        tmp_path / "storage",
        REGISTRY,
        jobs=1,
        step_parameters={"calibrate": {"uncalibrated_cameras": [serial]}},
    )
    with session_scope(url) as session:
        rows = session.execute(
            select(Task.state, Task.qc, Task.output_path)
            .join(StepRow, StepRow.id == Task.step_id)
            .where(StepRow.name == "calibrate")
        ).all()
    assert len(rows) == 2
    for state, qc, path in rows:
        assert state is TaskState.DONE and qc["uncalibrated"] is True
        product = read_calibrated_frame(Path(path))
        assert product.provenance.uncalibrated is True
        assert not product.provenance.references  # no masters
        # The bias level is gone: the sky (~300 e-/px here) is what is left, in ADU.
        assert 50 < np.median(product.image) < 400
        # Without masters the error is Poisson and read noise of the image itself.
        expected = np.sqrt(np.maximum(product.image, 0) + product.read_noise**2)
        np.testing.assert_allclose(product.error, expected, rtol=1e-6)


def _with_iso(paths, iso, directory):
    """Copies of ``paths`` whose headers say ``iso``."""
    from astropy.io import fits

    directory.mkdir(exist_ok=True)
    copies = []
    for path in paths:
        with fits.open(path) as hdus:
            header = hdus[0].header.copy()
            header["ISO"] = iso
            fits.PrimaryHDU(hdus[0].data, header).writeto(directory / path.name)
        copies.append(directory / path.name)
    return copies


def test_frames_of_another_iso_are_neither_stacked_nor_calibrated_together(small_night, tmp_path):
    night = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    frames = sorted(night.rglob("*.fits"))
    biases = [f for f in frames if f.name.startswith("bias")]
    objects = [f for f in frames if f.name.startswith("object")]
    others = [f for f in frames if f.name.startswith(("dark", "flat"))]
    upload = tmp_path / "upload"
    _with_iso([*biases[:3], objects[0]], 400, upload)
    for path in [*biases[3:], *others, *objects[1:]]:
        (upload / path.name).write_bytes(path.read_bytes())
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [upload], close=True)
    run_local(url, tmp_path / "storage", REGISTRY, jobs=1,
              step_parameters={"master_bias": {"min_frames": 5}})  # fmt: skip
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task.state, Task.qc, Task.wait_reason, Task.image_id).join(
                StepRow, StepRow.id == Task.step_id
            )
        ).all()
    bias = next(r for r in rows if r.name == "master_bias")
    assert bias.state is TaskState.DONE and bias.qc["frames"] == 7 and bias.qc["iso"] == 100
    assert sorted(Path(p).name for p in bias.qc["rejected"]) == [b.name for b in biases[:3]]
    assert all("ISO 400" in reason for reason in bias.qc["rejected"].values())
    calibrated = [r for r in rows if r.name == "calibrate"]
    # The frame at ISO 400 waits, with the reason, for a master at its ISO.
    waiting = [r for r in calibrated if r.state is TaskState.PENDING]
    assert len(waiting) == 1 and "master_bias" in waiting[0].wait_reason
    assert "at ISO 400" in waiting[0].wait_reason
    assert sum(r.state is TaskState.DONE for r in calibrated) == len(objects) - 1


def test_an_overscan_follows_the_bias_level_from_frame_to_frame(tmp_path):
    """A camera whose bias level drifts by 20 ADU rms from frame to frame, with 16
    overscan columns (BIASSEC/DATASEC in the headers): masters and frames are taken
    relative to their own overscan, and the overscan is cut from the products."""
    from autowisp.simulate.night import NightConfig, simulate_night

    simulate_night(
        tmp_path / "upload",
        NightConfig(frames=4, width=320, height=256, seed=4, overscan_columns=16,
                    bias_drift=20.0, cloudy_fraction=0.0),
    )  # fmt: skip
    # One more flat, unsaturated but at 80 % of the room between the frame's zero level
    # (overscan plus bias) and saturation: it must count as over-exposed.
    from astropy.io import fits

    first = next((tmp_path / "upload").rglob("flat_0001.fits"))
    with fits.open(first) as hdus:
        raw, header = hdus[0].data.astype(float), hdus[0].header.copy()
    zero = float(np.median(raw[:, 320:]))  # the overscan
    signal = raw - zero
    target = 0.8 * (header["SATURATE"] - zero)
    bright = zero + signal * (target / np.median(signal[:, :320]))
    assert bright.max() < header["SATURATE"]
    fits.PrimaryHDU(np.rint(bright).astype(np.uint16), header).writeto(
        first.with_name("flat_0099.fits")
    )
    rows = process_upload(tmp_path, tmp_path / "upload", REGISTRY)
    assert all(r.state is TaskState.DONE for r in rows), [r.last_error for r in rows]
    flat_qc = next(r.qc for r in rows if r.name == "master_flat")
    reasons = {Path(path).name: reason for path, reason in flat_qc["rejected"].items()}
    assert reasons["flat_0099.fits"].startswith("over-exposed"), reasons
    truth = read_truth(next((tmp_path / "upload").rglob("truth.h5")))
    bias = read_master_frame(next(r.output_path for r in rows if r.name == "master_bias"))
    assert bias.master.shape == (256, 320)
    # The master bias is the bias pattern above the overscan level.
    pull = (bias.master - (truth.calibration["bias"] - truth.camera["bias_level"])) / bias.error
    assert abs(np.mean(pull)) < 0.1 and 0.85 < np.std(pull) < 1.2
    # Each frame's sky level, per channel, against the truth: the drift (20 ADU rms, about
    # 30 e-) is gone. (The median of a frame sits ~10 e- above the sky because of its
    # stars, the same with no drift and no overscan; what must not vary is the offset.)
    flat = truth.calibration["flat"]
    offsets = []
    for frame, row in enumerate(r for r in rows if r.name == "calibrate"):
        image = read_calibrated_frame(row.output_path, with_error=False).image
        assert image.shape == (256, 320)
        offsets.append(
            [
                np.median(channel.view(image))
                - truth.object["sky"][frame][index] * np.median(channel.view(flat))
                for index, channel in enumerate(channels("RGGB"))
            ]
        )
    offsets = np.array(offsets)
    assert np.all(np.abs(offsets) < 15.0)
    assert np.all(np.std(offsets, axis=0) < 2.0), offsets


def test_an_overscan_configured_for_calibrate_only_is_refused(small_night, tmp_path):
    from astropy.io import fits

    night = sorted(p for p in small_night.iterdir() if p.is_dir())[0]
    frames = sorted(night.rglob("*.fits"))
    model = fits.getheader(next(f for f in frames if f.name.startswith("object")))["INSTRUME"]
    overscan = {model: {"biassec": "[311:320,1:256]", "datasec": "[1:310,1:256]"}}
    outcome = _run_night(tmp_path, frames, {"calibrate": {"overscan": overscan}})
    state, error = outcome["calibrate"]
    assert state is TaskState.DEAD
    assert "master_bias was made without overscan correction" in error
    assert "set the same overscan parameter" in error


def test_a_12_bit_camera_without_saturate_measures_its_clip_level(tmp_path, monkeypatch):
    """A mono 12-bit camera (bias 256 ADU, clipping at 4095) whose headers give no
    SATURATE: the clip level is measured from the frames, so its flats are judged against
    4095 (a guessed 15,000 rejected every good flat as under-exposed) and saturated
    pixels are masked."""
    import functools

    from astropy.io import fits

    import autowisp.simulate.night as night
    from autowisp.simulate.camera import CameraSpec

    monkeypatch.setattr(
        night, "CameraSpec", functools.partial(CameraSpec, bias_level=256.0, saturation_adu=4095)
    )
    night.simulate_night(
        tmp_path / "sim",
        night.NightConfig(frames=2, width=128, height=96, layout="MONO", seed=4, exptime=30.0),
    )
    for path in (tmp_path / "sim").rglob("*.fits"):
        with fits.open(path, mode="update") as hdus:
            del hdus[0].header["SATURATE"]
            assert int(hdus[0].data.max()) <= 4095
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [tmp_path / "sim"], rules={"default_layout": "MONO"}, close=True)
    run_local(url, tmp_path / "storage", REGISTRY, jobs=2)
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task.state, Task.output_path, Task.qc).join(
                StepRow, StepRow.id == Task.step_id
            )
        ).all()
    assert all(state is TaskState.DONE for _, state, _, _ in rows), rows
    qc = next(q for n, _, _, q in rows if n == "master_flat")
    reasons = {Path(path).name: reason for path, reason in qc["rejected"].items()}
    # Only the bad flats: the cloudy one and the over-exposed one, which clips at 4095.
    assert reasons.keys() == {"flat_0011.fits", "flat_0012.fits"}
    assert reasons["flat_0012.fits"].startswith("over-exposed")
