"""Product readers and writers: provenance round trips, exact masks, and night_qc reading
frame QC reports through the reader."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
from astropy.io import fits

from autowisp.core.calibration import MaskBit
from autowisp.db.models import ImageType
from autowisp.io.products import (
    CalibratedFrame,
    ChannelQC,
    FrameQCReport,
    read_calibrated_frame,
    read_frame_qc,
    write_calibrated_frame,
    write_frame_qc,
)
from autowisp.io.provenance import Provenance
from autowisp.steps.base import ImageInfo, InputProduct, NightInfo, StepContext
from autowisp.steps.night_qc import NightQC

LONG = (
    "2024-09-10 cfg=0123456789abcdef master_flat/0123456789abcdef/2024-09-10/"
    "a-rather-long-night-name-for-a-camera-with-a-long-serial-number/night-12345.fits"
)


def _provenance(**extra) -> Provenance:
    return Provenance(
        "calibrate", "3", "ab12cd34", raw_file="object_0001.fits", raw_sha256="f" * 64,
        uncalibrated=False, references={"MFLAT": LONG, "MBIAS": "2024-09-10 cfg=x b.fits"},
        **extra,
    )  # fmt: skip


def test_a_long_master_reference_round_trips_through_continue_cards(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    bits = np.random.default_rng(1).integers(0, 64, (64, 64), dtype=np.uint8)
    mask[:32] = bits[:32]  # every MaskBit combination, and zeros
    image = np.random.default_rng(2).normal(300, 20, (64, 64)).astype(np.float32)
    image[5, 5] = 0.0
    frame = CalibratedFrame(
        image=image, mask=mask, gain=1.5, read_noise=6.0, exptime=120.0, layout="RGGB",
        provenance=_provenance(), header={"DATE-OBS": "2024-09-11T01:00:00"},
    )  # fmt: skip
    path = tmp_path / "calibrate" / "c" / "n" / "image-1.fits"
    write_calibrated_frame(path, frame)
    header = fits.getheader(path)
    assert len(LONG) > 68 and "CONTINUE" in repr(header)
    read = read_calibrated_frame(path, with_error=False)
    assert read.provenance == frame.provenance
    np.testing.assert_array_equal(read.mask, mask)
    assert read.image[5, 5] == 0.0
    assert np.max(np.abs(read.image - image)) < 20 / 16  # within a 16th of the noise
    assert read.header == {"DATE-OBS": "2024-09-11T01:00:00"}
    assert (read.mask & MaskBit.NON_FINITE).any()


def test_frame_qc_report_round_trips_with_its_provenance(tmp_path):
    report = FrameQCReport(
        channels={"L": ChannelQC(1000.5, 12.25, 0.001)}, saturation_adu=65535.0,
        image_type="object", jd=2460564.5,
        provenance=Provenance("frame_qc", "1", "cfg", raw_file="a.fits", raw_sha256="0" * 64),
    )  # fmt: skip
    write_frame_qc(tmp_path / "qc.h5", report)
    assert read_frame_qc(tmp_path / "qc.h5") == report


def test_night_qc_reads_the_reports_not_the_task_qc(tmp_path):
    """The upstream tasks' QC JSON is empty: night_qc must take the levels from the
    reports the frame_qc products hold, and flag the bright flat."""
    images, products = [], []
    for index, level in enumerate([5000.0, 5100.0, 4950.0, 5050.0, 15000.0]):
        image = ImageInfo(
            index + 1, tmp_path / f"flat_{index}.fits", ImageType.FLAT, 1.0,
            dt.datetime(2024, 9, 11, 1, index, tzinfo=dt.UTC), 2460564.5 + index / 1440,
            "MONO", "SN1", {}, "a" * 64,
        )  # fmt: skip
        report = FrameQCReport(
            channels={"L": ChannelQC(level, 30.0, 0.0)}, saturation_adu=65535.0,
            image_type="flat", jd=image.jd,
            provenance=Provenance("frame_qc", "1", "cfg", raw_file=image.path.name),
        )  # fmt: skip
        path = tmp_path / f"qc-{index}.h5"
        write_frame_qc(path, report)
        images.append(image)
        products.append(InputProduct(f"image:{index + 1}", image.id, path, {}))
    night = NightInfo(1, dt.date(2024, 9, 10), "SN1", "MONO", tuple(images))
    context = StepContext(
        task_id=9, step="night_qc", target="night:1", config_version="v1",
        parameters={p.name: p.default for p in NightQC.parameters},
        storage_root=tmp_path / "storage", night=night, inputs={"frame_qc": tuple(products)},
    )  # fmt: skip
    result = NightQC().run(context)
    summary = json.loads(Path(result.output_path).read_text())
    assert summary["types"]["flat"]["outliers"] == [str(tmp_path / "flat_4.fits")]
    assert summary["types"]["flat"]["median_level"] == 5050.0
    assert summary["provenance"]["STEP"] == "night_qc"
    assert summary["provenance"]["CONFIG"] == "v1"
