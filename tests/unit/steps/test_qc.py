import numpy as np

from autowisp.core.bayer import channels
from autowisp.steps.frame_qc import channel_statistics
from autowisp.steps.night_qc import flag_outliers


def test_channel_statistics_against_known_noise():
    rng = np.random.default_rng(0)
    image = np.empty((400, 400))
    truth = {"R": (1000, 5), "G1": (2000, 8), "G2": (2100, 8), "B": (800, 4)}
    for channel in channels("RGGB"):
        level, sigma = truth[channel.name]
        channel.view(image)[...] = rng.normal(level, sigma, (200, 200))
    channel_of = {c.name: c for c in channels("RGGB")}
    channel_of["B"].view(image)[:2, :50] = 16383
    stats = channel_statistics(image, "RGGB", saturation=16383)
    for name, (level, sigma) in truth.items():
        assert abs(stats[name]["median"] - level) < 0.2
        assert abs(stats[name]["noise"] / sigma - 1) < 0.03
    assert stats["B"]["saturated_fraction"] == 100 / 40000
    assert stats["R"]["saturated_fraction"] == 0


def test_flag_outliers():
    levels = np.array([5000, 5100, 4900, 5050, 15000, 4950.0])
    assert flag_outliers(levels, sigma=5, floor=250).tolist() == [0, 0, 0, 0, 1, 0]
    assert not flag_outliers(levels[:2], sigma=5, floor=1).any()
