import numpy as np
import pytest

from autowisp.core.bayer import LAYOUTS, channel_index_map, channels, validate_layout


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("RGGB", {"R": (0, 0), "G1": (0, 1), "G2": (1, 0), "B": (1, 1)}),
        ("BGGR", {"B": (0, 0), "G1": (0, 1), "G2": (1, 0), "R": (1, 1)}),
        ("GRBG", {"G1": (0, 0), "R": (0, 1), "B": (1, 0), "G2": (1, 1)}),
        ("GBRG", {"G1": (0, 0), "B": (0, 1), "R": (1, 0), "G2": (1, 1)}),
    ],
)
def test_channel_offsets(layout, expected):
    found = {ch.name: (ch.y0, ch.x0) for ch in channels(layout)}
    assert found == expected
    assert [ch.name for ch in channels(layout)] == ["R", "G1", "G2", "B"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_index_map_matches_views(layout):
    index = channel_index_map(layout, (6, 8))
    for number, channel in enumerate(channels(layout)):
        assert np.all(channel.view(index) == number)
    assert sum(channel.view(index).size for channel in channels(layout)) == 48


def test_bad_layout_is_named():
    with pytest.raises(ValueError, match="'RGBX'"):
        validate_layout("RGBX")
    assert validate_layout(" rggb ") == "RGGB"
