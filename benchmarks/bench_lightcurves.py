"""Benchmark the light-curve transpose: time, peak memory, and the cost of appending.

Two synthetic nights' magnitude fits (:mod:`autowisp.io.magfit` files, written once, not
timed): ``--frames`` 1,000 frames and then ``--append-frames`` 250 of ``--stars`` 20,000
stars, 4 channels, 3 apertures and the PSF flux. The first night's star list is in the
field's star order; the second's rows are a random permutation of it (a later night's
list is in its own order). The files' columns are in the field's star order, as the
``magfit`` step writes them; with ``--unordered`` the second night is also appended from
a file in its list's order (each shard's stars scattered over every column: the layout
before the fit knew the star order).

Ours: the ``lightcurves`` step, run on one core the way the runner runs it (in a process
of its own per pass), over every shard (``--stars-per-shard`` 1,000): generation 1 from the first night,
then generation 2 appending the second. Per pass: wall-clock time, CPU time, the peak
resident memory it added (``VmHWM`` reset before the pass, minus the resident size then,
MB: a lower bound, as the pass reuses memory its process already held) and the peak
resident size of its process (``peak_rss_mb``), and the cost per frame of the appended
night against the first's.

The peer, on the same file in the same run: the transpose a numpy script does — every
dataset of the night read into memory at once, each shard's columns sliced and written
to its own HDF5 file (the first night only: in the star order, its best case).

Usage (from the repository root): python -m benchmarks.bench_lightcurves [--frames N]
[--append-frames N] [--stars N] [--stars-per-shard N] [--home DIR] [--no-peer]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_frame import _reset_peak, _status_mb  # noqa: E402

CHANNELS = ("R", "G1", "G2", "B")
APERTURES = (2.0, 3.0, 4.0)
SITE = {"latitude": 19.53, "longitude": -155.58, "height": 3400.0}


def _write_night(path: Path, frames: int, stars: int, rows: np.ndarray, night: int,
                 ordered: bool = True) -> None:  # fmt: skip
    """A magnitude fit's file of ``frames`` × ``stars`` whose list row ``r`` is the star
    of field index ``rows[r]`` (values: the index and frame, so a check can tell them):
    its columns in the field's star order as the ``magfit`` step writes them, or with
    ``ordered`` false in the list's order (the layout before it knew the star order)."""
    from autowisp.io.magfit import CACHE_BYTES, create_channel, create_field, photometry_names

    rng = np.random.default_rng(night)
    n_phot = len(APERTURES) + 1
    jd = 2460563.65 + night + np.arange(frames) * 90.0 / 86400.0
    ra = 300.0 + rng.uniform(-6, 6, stars)
    dec = 20.0 + rng.uniform(-6, 6, stars)
    column_rows = (np.argsort(rows) if ordered else np.arange(stars)).astype(np.int64)
    column_index = rows[column_rows]  # the star index of each column
    with h5py.File(path, "w", rdcc_nbytes=CACHE_BYTES) as out:
        group = create_field(
            out, 1,
            frames={"raw_file": [f"n{night}_{i:05d}.fits" for i in range(frames)],
                    "photometry_file": [""] * frames, "jd_mid": jd,
                    "exptime": np.full(frames, 60.0)},
            stars={"source_id": np.full(stars, -1, np.int64), "list_row": column_rows,
                   "ra": ra, "dec": dec},
        )  # fmt: skip
        group.attrs.update(
            reference_frame="", reference_reason="", channels=",".join(CHANNELS),
            photometries=",".join(photometry_names(APERTURES)), terms="", iterations=1,
            changes="[]", notes="[]", star_list=f"2024-09-1{night} cfg=b list-{night}.fits",
            site=json.dumps(SITE),
        )  # fmt: skip
        for channel in CHANNELS:
            datasets = create_channel(group, channel, frames, stars, n_phot, 1)
            for lo in range(0, frames, 64):
                hi = min(frames, lo + 64)
                frame = np.arange(lo, hi, dtype=np.float32)[:, None]
                value = column_index[None, :].astype(np.float32) * 1e-3 + frame * 1e-6
                for key in ("x", "y", "airmass", "background", "psf_s", "psf_d", "psf_k"):
                    datasets[key][lo:hi] = value
                datasets["flags"][lo:hi] = 0
                noise = rng.standard_normal((hi - lo, stars, n_phot)).astype(np.float32)
                for key in ("magnitude", "magnitude_err", "fitted"):
                    datasets[key][lo:hi] = value[:, :, None] + 0.01 * noise
    out_attrs = {"qc": "{}", "expression": "", "fields": "FIELD1"}
    with h5py.File(path, "a") as out:
        out.attrs.update(out_attrs)


def _pass(home: Path, magfit: dict[int, Path], rows: dict[int, np.ndarray], stars: int,
          per_shard: int, generation: int, previous: dict[int, Path]):  # fmt: skip
    """Every shard's task of one generation; (files, figures)."""
    from autowisp.steps.base import (
        InputProduct,
        PlacedNight,
        ShardInfo,
        ShardStars,
        StepContext,
    )
    from autowisp.steps.lightcurves import LightCurves

    night = generation  # generation g appends night g
    rng = np.random.default_rng(0)
    ra = 300.0 + rng.uniform(-6, 6, stars)
    dec = 20.0 + rng.uniform(-6, 6, stars)
    files = {}
    _reset_peak()
    base = _status_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    for index, lo in enumerate(range(0, stars, per_shard)):
        hi = min(stars, lo + per_shard)
        list_rows = {}
        for n in magfit:
            inverse = np.argsort(rows[n])  # star index -> list row
            list_rows[f"list-{n}.fits"] = (inverse[lo:hi].astype(np.int64),
                                          np.arange(lo, hi, dtype=np.int64))  # fmt: skip
        date = dt.date(2024, 9, 10 + night)
        placed = PlacedNight(night, date, 1, generation)
        shard = ShardInfo(
            id=index + 1, name=f"bench-s{index}", field_id=1, field_name="bench", index=index,
            star_lo=lo, star_hi=hi, generation=generation, field_generation=generation,
            nights=(placed,), appended=(placed,), previous_generation=generation - 1,
            stars=ShardStars(
                star_index=np.arange(lo, hi), star_id=np.arange(lo, hi),
                gaia_source_id=np.full(hi - lo, -1), ra=ra[lo:hi], dec=dec[lo:hi],
                g=np.full(hi - lo, np.nan), bp=np.full(hi - lo, np.nan),
                rp=np.full(hi - lo, np.nan), list_rows=list_rows,
            ),
        )  # fmt: skip
        fit = InputProduct(f"night:{night}", None, magfit[night], {}, task_id=night,
                           config_version="b", night_date=date)  # fmt: skip
        before = (
            (InputProduct(f"shard:{index + 1}", None, previous[index], {}),)
            if index in previous
            else ()
        )
        inputs = {"magfit": (fit,), "lightcurves": before}
        context = StepContext(
            task_id=generation * 1000 + index, step="lightcurves", target=f"shard:{index + 1}",
            config_version="bench", parameters={"block_mb": 128}, storage_root=home,
            inputs=inputs, generation=generation, shard=shard,
        )  # fmt: skip
        files[index] = Path(LightCurves().run(context).output_path)
    figures = {
        "seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "peak_mb": round(_status_mb("VmHWM") - base, 1),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "shards": len(files),
    }
    return files, figures


def _peer(path: Path, home: Path, stars: int, per_shard: int) -> dict:
    """Every dataset in memory, each shard's columns sliced and written."""
    _reset_peak()
    base = _status_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    with h5py.File(path, "r") as source:
        group = source["FIELD1"]
        data = {f"{c}.{k}": group[c][k][()] for c in CHANNELS for k in group[c]
                if group[c][k].ndim >= 2 and group[c][k].shape[0] == group["jd_mid"].shape[0]}  # fmt: skip
        data["jd_mid"] = group["jd_mid"][()]
    for index, lo in enumerate(range(0, stars, per_shard)):
        hi = min(stars, lo + per_shard)
        with h5py.File(home / f"peer-s{index}.h5", "w") as out:
            for key, values in data.items():
                out[key] = values if values.ndim == 1 else values[:, lo:hi]
    return {
        "seconds": round(time.perf_counter() - wall, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "peak_mb": round(_status_mb("VmHWM") - base, 1),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
    }


def _in_child(function, *args):  # type: ignore[no-untyped-def]
    """``function(*args)`` in a forked process (its own peak memory, as a task's)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(function, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--append-frames", type=int, default=250)
    parser.add_argument("--stars", type=int, default=20000)
    parser.add_argument("--stars-per-shard", type=int, default=1000)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument(
        "--unordered", action="store_true",
        help="also append the second night with its columns in its list's order",
    )  # fmt: skip
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench_lightcurves_"))
    home.mkdir(parents=True, exist_ok=True)
    rows = {
        1: np.arange(args.stars),
        2: np.random.default_rng(2).permutation(args.stars),
    }
    frames = {1: args.frames, 2: args.append_frames}
    magfit = {}
    start = time.perf_counter()
    for night in (1, 2):
        magfit[night] = home / f"magfit-{night}.h5"
        _write_night(magfit[night], frames[night], args.stars, rows[night], night)
    report: dict = {
        "frames": frames, "stars": args.stars, "channels": len(CHANNELS),
        "photometries": len(APERTURES) + 1, "stars_per_shard": args.stars_per_shard,
        "write_seconds": round(time.perf_counter() - start, 1),
        "magfit_file_mb": {n: round(p.stat().st_size / 1024**2) for n, p in magfit.items()},
    }  # fmt: skip
    first, report["first_night"] = _in_child(
        _pass, home, {1: magfit[1]}, rows, args.stars, args.stars_per_shard, 1, {}
    )
    second, report["appended_night"] = _in_child(
        _pass, home, magfit, rows, args.stars, args.stars_per_shard, 2, first
    )
    per_frame = {
        key: report[key]["seconds"] / frames[n]
        for key, n in (("first_night", 1), ("appended_night", 2))
    }
    report["append_cost_per_frame_ratio"] = round(
        per_frame["appended_night"] / per_frame["first_night"], 3
    )
    report["append_cost_ratio"] = round(
        report["appended_night"]["seconds"] / report["first_night"]["seconds"], 3
    )
    report["frames_ratio"] = round(frames[2] / frames[1], 3)
    if args.unordered:
        scattered = home / "unordered"
        scattered.mkdir(exist_ok=True)
        magfit_unordered = scattered / "magfit-2.h5"
        _write_night(magfit_unordered, frames[2], args.stars, rows[2], 2, ordered=False)
        # The first generation beside it (a generation appends to its own directory).
        shutil.copytree(home / "lightcurves", scattered / "lightcurves")
        copied = {i: scattered / p.relative_to(home) for i, p in first.items()}
        _, report["appended_night_unordered"] = _in_child(
            _pass, scattered, {1: magfit[1], 2: magfit_unordered}, rows, args.stars,
            args.stars_per_shard, 2, copied,
        )  # fmt: skip
        magfit_unordered.unlink()
    # A check: star 12345's fitted magnitudes carry its index in both nights.
    from autowisp.io.lightcurves import star_light_curves

    star = min(12345, args.stars - 1)
    shard, position = divmod(star, args.stars_per_shard)
    curve = star_light_curves(second[shard], [position])[position]
    level = np.nanmedian(curve["G1.fitted"][:, 1])
    report["check_star_level"] = round(float(level) / 1e-3, 2)
    report["check_points"] = int(curve["jd_utc"].size)
    if not args.no_peer:
        report["peer"] = _in_child(_peer, magfit[1], home, args.stars, args.stars_per_shard)
        ours = report["first_night"]
        report["time_ratio"] = round(ours["seconds"] / report["peer"]["seconds"], 3)
        report["memory_ratio"] = round(ours["peak_mb"] / report["peer"]["peak_mb"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
