"""Benchmark the master stack: 20 full-size 5184×3456 frames read from FITS files.

Each case runs in its own process (peak RSS is its own), on the same files:
- ours: ``autowisp.io.stacks.read_bands`` + ``autowisp.core.calibration.clipped_stack``
  (5σ, 3 iterations) reading row bands under the master steps' default memory limit, including reading;
- numpy: ``numpy.median(stack, axis=0)`` over the stack preloaded in memory (reading
  not timed), no clipping;
- ccdproc: ``ccdproc.combine`` (median, 5σ clipping) on the files, as in its docs.

Usage (from the repository root): python -m benchmarks.bench_calibration [--frames N]
ccdproc is not a dependency of AutoWISP: ``pip install ccdproc`` for that case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

SHAPE = (3456, 5184)


def _write(directory: Path, frames: int) -> list[Path]:
    rng = np.random.default_rng(0)
    pattern = 2048 + rng.normal(0, 1.5, SHAPE[0])[:, None] + rng.normal(0, 0.8, SHAPE[1])
    paths = []
    for index in range(frames):
        data = pattern + rng.normal(0, 4.4, SHAPE)
        hits = rng.integers(0, SHAPE[0] * SHAPE[1], 300)
        data.flat[hits] += rng.uniform(200, 3000, hits.size)
        path = directory / f"bias_{index:03d}.fits"
        fits.PrimaryHDU(np.clip(np.rint(data), 0, 65535).astype(np.uint16)).writeto(path)
        paths.append(path)
    return paths


def _ours(paths: list[Path]) -> dict:
    from autowisp.core.calibration import clipped_stack
    from autowisp.io.stacks import band_rows, read_bands
    from autowisp.steps.masters import MasterBias

    limit = next(p.default for p in MasterBias.parameters if p.name == "memory_limit_mb")

    clipped_stack(np.zeros((3, 2, 2), np.float32))  # compile outside the timing
    start = time.perf_counter()
    master = np.empty(SHAPE, np.float32)
    for band, data in read_bands(paths, band_rows(len(paths), SHAPE[1], limit)):
        master[band] = clipped_stack(data).value
    return {"seconds": time.perf_counter() - start, "median": float(np.median(master))}


def _numpy(paths: list[Path]) -> dict:
    stack = np.empty((len(paths), *SHAPE), np.float32)
    for index, path in enumerate(paths):
        stack[index] = fits.getdata(path)
    start = time.perf_counter()
    master = np.median(stack, axis=0)
    return {"seconds": time.perf_counter() - start, "median": float(np.median(master))}


def _ccdproc(paths: list[Path]) -> dict:
    import ccdproc
    from astropy.stats import mad_std

    start = time.perf_counter()
    master = ccdproc.combine(
        [str(p) for p in paths],
        method="median",
        unit="adu",
        sigma_clip=True,
        sigma_clip_low_thresh=5,
        sigma_clip_high_thresh=5,
        sigma_clip_func=np.ma.median,
        sigma_clip_dev_func=mad_std,
        mem_limit=500e6,
    )
    return {"seconds": time.perf_counter() - start, "median": float(np.median(master.data))}


CASES = {"ours": _ours, "numpy": _numpy, "ccdproc": _ccdproc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        _write(Path(args.write), args.frames)
        return
    if args.case:
        paths = sorted(Path(args.dir).glob("*.fits"))
        result = CASES[args.case](paths)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        # The frames are written by a child process: Linux keeps a process's peak RSS
        # across fork and exec, so a parent that had held the frames would lend its
        # peak to every case measured after it.
        subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_calibration", "--write", scratch,
             "--frames", str(args.frames)],
            check=True,
        )  # fmt: skip
        for case in CASES:
            command = [
                sys.executable,
                "-m",
                "benchmarks.bench_calibration",
                "--case",
                case,
                "--dir",
                scratch,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{case}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[case]
            print(f"{case}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    if {"ours", "numpy"} <= results.keys():
        print(
            f"ours vs np.median time: {results['ours']['seconds'] / results['numpy']['seconds']:.2f}x"
        )
    if {"ours", "ccdproc"} <= results.keys():
        print(
            f"ccdproc vs ours time: {results['ccdproc']['seconds'] / results['ours']['seconds']:.1f}x faster"
        )


if __name__ == "__main__":
    main()
