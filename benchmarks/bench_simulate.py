"""Benchmark the night simulator.

Measures, each in a fresh process so that peak memory is its own:
- a 40-frame night at 1024×1024 (plus 10 bias, 10 dark, 10 flat frames);
- one full 5184×3456 Canon frame (object frame only, no calibration frames);
- the star-rendering kernel (numba) against its plain numpy reference on the same
  2,000 stars, as a ratio.

Usage: python benchmarks/bench_simulate.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def _night(frames: int, width: int, height: int, calibration: int) -> dict:
    from autowisp.simulate.night import NightConfig, simulate_night

    config = NightConfig(
        frames=frames,
        width=width,
        height=height,
        seed=1,
        biases=calibration,
        darks=calibration,
        flats=calibration,
    )
    with tempfile.TemporaryDirectory() as outdir:
        # Compile the numba kernel outside the timed region (cached after the first run).
        simulate_night(
            outdir + "/warm",
            NightConfig(frames=1, width=64, height=64, seed=1, biases=0, darks=0, flats=0),
        )
        start = time.perf_counter()
        result = simulate_night(outdir + "/night", config)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "stars": result.cameras[0]["stars"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _kernel_ratio() -> dict:
    import numpy as np

    from autowisp.core.bayer import channel_index_map
    from autowisp.simulate.render import render_stars, render_stars_reference

    rng = np.random.default_rng(0)
    n, shape = 2000, (1024, 1024)
    x, y = rng.uniform(0, 1023, n), rng.uniform(0, 1023, n)
    flux = 10 ** rng.uniform(3, 5.5, (n, 4))
    a, b = rng.uniform(1.0, 2.0, n), rng.uniform(0.8, 1.6, n)
    theta = rng.uniform(0, np.pi, n)
    half = np.full(n, 8)
    cell = channel_index_map("RGGB", (2, 2)).astype(np.int64)
    response = np.ones(shape)
    outputs = [np.zeros((n, 4, 1)), np.zeros((n, 4, 1), np.int64), np.zeros((n, 4, 1))]

    def fast():
        image = np.zeros(shape)
        render_stars(
            image,
            x,
            y,
            flux,
            np.ones(n),
            a,
            b,
            theta,
            3.5,
            half,
            cell,
            2,
            5,
            4.0,
            np.array([3.0]),
            response,
            response,
            *outputs,
        )

    fast()  # compile
    timings = {}
    for name, call in (
        ("numba", fast),
        (
            "numpy",
            lambda: render_stars_reference(
                shape, x, y, flux, a, b, theta, 3.5, half, cell, 5, 4.0, response
            ),
        ),
    ):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return {
        "numba_s": timings["numba"],
        "numpy_s": timings["numpy"],
        "speedup": timings["numpy"] / timings["numba"],
    }


CASES = {
    "night_40x1024": lambda quick: _night(10 if quick else 40, 1024, 1024, 10),
    "full_frame_5184x3456": lambda quick: _night(
        1, 2592 if quick else 5184, 1728 if quick else 3456, 0
    ),
    "render_kernel": lambda quick: _kernel_ratio(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases, for a smoke run")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(CASES[args.case](args.quick)))
        return
    for case in CASES:
        command = [sys.executable, __file__, "--case", case] + (["--quick"] if args.quick else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        print(
            f"{case}: "
            + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
            )
        )


if __name__ == "__main__":
    main()
