"""Where a frame's overscan is: header sections or the camera type's configuration."""

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from autowisp.core.calibration import overscan_levels, parse_section, robust_level
from autowisp.errors import PermanentError
from autowisp.steps.base import ImageInfo
from autowisp.steps.masters import frame_sections
from autowisp.vocabulary import ImageType


def _image(header, layout="RGGB"):
    return ImageInfo(1, Path("bias_0001.fits"), ImageType.BIAS, 0.0,
                     dt.datetime(2024, 9, 10, tzinfo=dt.UTC), 2460564.0, layout,
                     "1", header)  # fmt: skip


def test_sections_are_fits_one_based_and_inclusive():
    assert parse_section("[101:116,1:50]") == (slice(0, 50), slice(100, 116))
    for bad in ("101:116,1:50", "[116:101,1:50]", "[a:b,1:2]", "[0:5,1:2]"):
        with pytest.raises(ValueError, match="section"):
            parse_section(bad)


def test_sections_from_the_header_or_the_camera_configuration():
    header = {"BIASSEC": "[101:116,1:50]", "DATASEC": "[1:100,1:50]", "INSTRUME": "X"}
    assert frame_sections(_image(header), {}) == ((slice(0, 50), slice(0, 100)),
                                                   (slice(0, 50), slice(100, 116)))  # fmt: skip
    configured = {"overscan": {"ZWO ASI": {"biassec": "[1:8,1:50]", "datasec": "[9:108,1:50]"}}}
    data, bias = frame_sections(_image({"INSTRUME": "ZWO ASI"}), configured)
    assert bias == (slice(0, 50), slice(0, 8)) and data == (slice(0, 50), slice(8, 108))
    assert frame_sections(_image({"INSTRUME": "Canon"}), configured) == (None, None)


def test_bad_sections_are_refused_with_the_reason():
    with pytest.raises(PermanentError, match="needs the light-sensitive section"):
        frame_sections(_image({"BIASSEC": "[101:116,1:50]"}), {})
    with pytest.raises(PermanentError, match="odd row or column"):
        frame_sections(_image({"BIASSEC": "[1:8,1:50]", "DATASEC": "[10:100,1:50]"}), {})
    with pytest.raises(PermanentError, match="not a FITS section"):
        frame_sections(_image({"BIASSEC": "left", "DATASEC": "[1:100,1:50]"}), {})


def test_overscan_levels_per_channel_ignore_hits():
    rng = np.random.default_rng(1)
    raw = np.zeros((40, 60)) + rng.normal(0, 3, (40, 60))
    raw[0::2, 0::2] += 2000  # R
    raw[0::2, 1::2] += 2010  # G1
    raw[1::2, 0::2] += 2020  # G2
    raw[1::2, 1::2] += 2030  # B
    raw[5, 55] += 5000  # a hit in the overscan
    levels = overscan_levels(raw, (slice(0, 40), slice(50, 60)), "RGGB")
    assert levels[0, 0] == pytest.approx(2000, abs=1.0)
    assert levels[1, 1] == pytest.approx(2030, abs=1.0)
    assert levels[0, 1] == pytest.approx(2010, abs=1.0)
    assert robust_level(np.array([1, 2, 3, 2, 1000.0])) == pytest.approx(2.0)
