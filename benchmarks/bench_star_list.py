"""Benchmark the night's star list: deep stack and detection of a night of full-size frames.

A simulated 5184×3456 RGGB night (``--frames`` object frames, 40 by default) is ingested
into a scratch SQLite database and run up to the star list with the local executor (one
job): masters, calibration, astrometry and the star list once, not timed. Then the
``star_list`` step runs again in its own process on one core, the way the runner runs it
(:func:`autowisp.pipeline.runner.build_context`, then ``step.run``), once per frame count
in ``--stack`` (``max_frames``; 10, 20 and 40 by default): wall clock, CPU time and the
peak resident memory the run added to the process (``VmHWM`` reset just before it, minus
the resident size then, MB), against the issue's targets (under a minute on one core for
40 frames; memory bounded, independent of the number of frames).

The peer, on the same frames in the same run: combining the frames' registered channel
planes in memory, the way a stacking script does with numpy (every plane in one cube,
``np.sort`` along the frames, the mean without the lowest and highest): time and the
cube's memory, against our streaming combine (:class:`autowisp.core.stacking.MinMaxStack`)
of the same planes; the two combined planes must agree.

And the science: the stars of the list per G magnitude bin against the truth's stars on
the reference frame (a list star is a true star when it lies within 1 px of one, the
brightest such; the truth's G of synthetic stars is its own), with the completeness per
bin.

Usage (from the repository root): python -m benchmarks.bench_star_list [--frames N]
[--stack N ...] [--home DIR] [--width W --height H] (a smaller frame for a quick look).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.bench_frame import _reset_peak, _status_mb

TARGET_SECONDS = 60.0
MASTER_FRAMES = 5
BINS = (6.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0)


def _registry():  # type: ignore[no-untyped-def]
    from autowisp.steps.astrometry import Astrometry
    from autowisp.steps.calibrate import Calibrate
    from autowisp.steps.frame_qc import FrameQC
    from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
    from autowisp.steps.registry import Registry
    from autowisp.steps.star_list import StarList

    return Registry([FrameQC, MasterBias, MasterDark, MasterFlat, Calibrate, Astrometry,
                     StarList])  # fmt: skip


def _setup(home: Path, frames: int, width: int, height: int) -> str:
    from sqlalchemy import select

    from autowisp.db.migrate import upgrade
    from autowisp.db.models import Step as StepRow
    from autowisp.db.models import Task
    from autowisp.db.session import session_scope
    from autowisp.ingest.ingest import ingest_paths
    from autowisp.pipeline.local import run_local
    from autowisp.simulate.night import NightConfig, simulate_night

    upload = home / "upload"
    simulate_night(
        upload,
        NightConfig(width=width, height=height, frames=frames, seed=5, biases=MASTER_FRAMES,
                    darks=MASTER_FRAMES, flats=MASTER_FRAMES, cloudy_fraction=0.0),
    )  # fmt: skip
    url = f"sqlite:///{home / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [upload], close=True)
    minimum = {"min_frames": MASTER_FRAMES}
    parameters = {"master_bias": minimum, "master_dark": minimum, "master_flat": minimum}
    run_local(url, home / "storage", _registry(), jobs=1, step_parameters=parameters)
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task.state, Task.last_error)
            .join(StepRow, StepRow.id == Task.step_id)
            .where(StepRow.name.in_(["calibrate", "astrometry", "star_list"]))
        ).all()  # fmt: skip
    failed = [(n, str(s), e) for n, s, e in rows if str(getattr(s, "value", s)) != "done"]
    if failed:
        raise SystemExit(f"setup: tasks not done: {failed[:5]}")
    return url


def _context(url: str, storage: Path, max_frames: int):  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from autowisp.db.models import Step as StepRow
    from autowisp.db.models import Task
    from autowisp.db.session import session_scope
    from autowisp.pipeline.runner import build_context

    with session_scope(url) as session:
        task = session.scalars(
            select(Task).join(StepRow, StepRow.id == Task.step_id)
            .where(StepRow.name == "star_list").order_by(Task.id).limit(1)
        ).one()  # fmt: skip
        context = build_context(session, task, _registry(), storage)
    parameters = {**context.parameters, "max_frames": max_frames}
    return replace(context, parameters=parameters)


def _measure(url: str, storage: Path, max_frames: int) -> dict:
    """Run the step once with ``max_frames`` in this process; its figures."""
    from autowisp.steps.star_list import StarList

    # its own output file, beside the setup's (which stays as the setup wrote it)
    context = replace(_context(url, storage, max_frames), config_version=f"bench-{max_frames}")
    step = StarList()
    before = _status_mb("VmRSS")
    _reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = step.run(context)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {
        "seconds": seconds,
        "cpu": cpu,
        "peak_mb": _status_mb("VmHWM") - before,
        "output": str(result.output_path),
        "qc": result.qc,
    }


def _peer(url: str, storage: Path, frames: int) -> dict:
    """In-memory numpy combine of the same registered planes (one channel) against the
    streaming MinMaxStack."""
    from autowisp.core.bayer import channels
    from autowisp.core.stacking import (
        MinMaxStack,
        channel_mapping,
        frame_mapping,
        resample_channel,
    )
    from autowisp.io.solution import read_astrometric_solution
    from autowisp.steps.star_list import _by_image, _choose, _Frame, _residual

    context = _context(url, storage, frames)
    images = {image.id: image for image in context.night.images}
    calibrated = _by_image(context.inputs["calibrate"])
    chosen = []
    for image_id, product in sorted(_by_image(context.inputs["astrometry"]).items()):
        solution = read_astrometric_solution(Path(str(product.output_path)))
        chosen.append(_Frame(images[image_id], Path(str(calibrated[image_id].output_path)),
                             solution, solution.wcs, float(solution.qc.get("fwhm_px") or 2.5)))  # fmt: skip
    chosen, scales, _ = _choose(chosen, frames, 0.7)
    reference = chosen[0]
    channel = channels(reference.image.layout)[0]
    planes = []
    for frame, scale in zip(chosen, scales, strict=True):
        image = _residual(frame, storage, scale)
        mapping = frame_mapping(reference.wcs, frame.wcs, image.shape)
        coordinates = channel_mapping(mapping, image.shape, channel)
        planes.append(resample_channel(channel.view(image), coordinates))
    start = time.perf_counter()
    stack = MinMaxStack(planes[0].shape)
    for plane in planes:
        stack.add(plane)
    ours, _ = stack.result()
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cube = np.stack(planes)
    ordered = np.sort(np.where(np.isfinite(cube), cube, np.inf), axis=0)
    count = np.isfinite(cube).sum(axis=0)
    # NaN sort last as +inf: the lowest is index 0, the highest index count - 1
    finite = np.where(np.isfinite(ordered), ordered, 0.0).sum(axis=0, dtype=np.float64)
    low = ordered[0]
    high = np.take_along_axis(ordered, np.maximum(count - 1, 0)[None], axis=0)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        theirs = np.where(count >= 3, (finite - low - high) / (count - 2), finite / count)
    theirs[count == 0] = np.nan
    peer_seconds = time.perf_counter() - start
    agree = np.allclose(ours, theirs, rtol=1e-4, atol=1e-3, equal_nan=True)
    return {
        "frames": len(planes),
        "ours_s": ours_seconds,
        "peer_s": peer_seconds,
        "ours_mb": 20 * planes[0].size / 2**20,  # float64 sum, int32 count, 2 float32
        "peer_mb": (cube.nbytes + ordered.nbytes) / 2**20,
        "agree": bool(agree),
    }


def _per_bin(home: Path, output: str) -> list[tuple[str, int, int, int]]:
    """(bin, true stars on the reference, of them listed, list stars matching no true
    star) per G bin."""
    from scipy.spatial import cKDTree

    from autowisp.io.night_star_list import read_star_list
    from autowisp.simulate.truth import read_truth

    truth = read_truth(next((home / "upload").rglob("truth.h5")))
    star_list = read_star_list(Path(output))
    candidates = star_list.fields[0]
    names = [str(n) for n in truth.object["filename"]]
    frame = names.index(candidates.reference_frame)
    tx, ty = truth.object["x"][frame], truth.object["y"][frame]
    rendered = np.asarray(truth.object["rendered"][frame], bool)
    gmag = np.asarray(truth.stars["gmag"], float)
    on = np.flatnonzero(rendered & np.isfinite(tx))
    lx = np.asarray(candidates.columns["x"], float)
    ly = np.asarray(candidates.columns["y"], float)
    tree = cKDTree(np.column_stack([tx[on], ty[on]]))
    found = np.zeros(on.size, bool)
    unmatched = np.zeros(lx.size, bool)
    for i, near in enumerate(tree.query_ball_point(np.column_stack([lx, ly]), 1.0)):
        if near:
            found[near[int(np.argmin(gmag[on][near]))]] = True
        else:
            unmatched[i] = True
    # A list star matching nothing is put in the bin of its catalogue G, else unbinned.
    list_g = np.asarray(candidates.columns["g"], float)
    rows = []
    for low, high in itertools.pairwise(BINS):
        in_bin = (gmag[on] >= low) & (gmag[on] < high)
        spurious = unmatched & (list_g >= low) & (list_g < high)
        rows.append((f"{low:g}-{high:g}", int(in_bin.sum()), int((found & in_bin).sum()),
                     int(spurious.sum())))  # fmt: skip
    rows.append(("all", int(on.size), int(found.sum()), int(unmatched.sum())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--stack", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--width", type=int, default=5184)
    parser.add_argument("--height", type=int, default=3456)
    parser.add_argument("--home", default="", help="reuse (or keep) the scratch directory")
    parser.add_argument("--measure", nargs=3, metavar=("URL", "STORAGE", "FRAMES"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--peer", nargs=3, metavar=("URL", "STORAGE", "FRAMES"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.measure:
        url, storage, frames = args.measure
        print(json.dumps(_measure(url, Path(storage), int(frames))))
        return
    if args.peer:
        url, storage, frames = args.peer
        print(json.dumps(_peer(url, Path(storage), int(frames))))
        return
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(args.home or scratch)
        home.mkdir(parents=True, exist_ok=True)
        marker = home / "setup.json"
        if marker.exists():
            url = json.loads(marker.read_text())
        else:
            start = time.perf_counter()
            url = _setup(home, args.frames, args.width, args.height)
            marker.write_text(json.dumps(url))
            print(f"setup (simulate, ingest, run to the star list): "
                  f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        one_core = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                    "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
        prefix: list[str] = []
        if hasattr(os, "sched_setaffinity"):
            prefix = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
        module = [sys.executable, "-m", "benchmarks.bench_star_list"]

        def child(*extra: str) -> dict:
            done = subprocess.run([*prefix, *module, *extra], env=one_core,
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode:
                raise SystemExit(f"{' '.join(extra[:1])} failed:\n{done.stderr}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        storage = str(home / "storage")
        print(f"{'frames':>7}{'wall s':>9}{'cpu s':>9}{'peak MB':>9}{'stars':>8}{'deep':>7}")
        last = None
        for frames in args.stack:
            figures = child("--measure", url, storage, str(frames))
            qc = figures["qc"]
            stacked = sum(f["frames_stacked"] for f in qc["fields"].values())
            print(f"{stacked:>7}{figures['seconds']:>9.1f}{figures['cpu']:>9.1f}"
                  f"{figures['peak_mb']:>9.0f}{qc['stars']:>8}{qc['deep_only']:>7}")  # fmt: skip
            last = (figures, stacked)
        assert last is not None
        verdict = "within" if last[0]["seconds"] <= TARGET_SECONDS else "over"
        print(f"{last[1]} frames: {last[0]['seconds']:.1f} s ({verdict} the "
              f"{TARGET_SECONDS:g} s target)")  # fmt: skip
        peer = child("--peer", url, storage, str(max(args.stack)))
        print(f"combine of {peer['frames']} registered planes (one channel): streaming "
              f"{peer['ours_s']:.2f} s, {peer['ours_mb']:.0f} MB; numpy in memory "
              f"{peer['peer_s']:.2f} s, {peer['peer_mb']:.0f} MB; time ratio ours/numpy "
              f"{peer['ours_s'] / peer['peer_s']:.2f}, memory ratio "
              f"{peer['ours_mb'] / peer['peer_mb']:.3f}; same result: {peer['agree']}")  # fmt: skip
        print(f"{'G bin':>8}{'truth':>8}{'listed':>8}{'complete':>10}{'spurious':>10}")
        for name, true, listed, spurious in _per_bin(home, last[0]["output"]):
            fraction = listed / true if true else float("nan")
            print(f"{name:>8}{true:>8}{listed:>8}{fraction:>10.1%}{spurious:>10}")


if __name__ == "__main__":
    main()
