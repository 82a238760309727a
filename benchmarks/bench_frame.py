"""Benchmark the per-frame chain on a full-size frame: calibrate → astrometry → photometry.

A simulated 5184×3456 RGGB night (the simulator's default Canon DSLR) is ingested into a
scratch SQLite database and run once with the local executor (one job): that makes the
masters and every task row, and is not timed. Then each frame step runs again in its own
process, on one core, the way the runner runs it: the task row's
:class:`~autowisp.steps.base.StepContext` from :func:`autowisp.pipeline.runner.build_context`
and ``step.run(context)``, so the time is the step's own (reading its inputs and writing
its product included; claiming, heartbeat and recording the row left out).

Per step: the first run in a fresh process (numba caches loaded, the catalogue opened)
and the best of ``--repeats`` after it (wall clock, and the process's CPU time, which a
machine shared with other work inflates less), and the peak resident memory the step added to
the process (the peak resident size, ``VmHWM``, reset just before the first run,
minus the resident size then, MB); the
total is the sum of the steps' best times, against the 5 s per frame target. The local
executor's own task durations (``finished_at − started_at``, two steps sharing the
machine) are printed beside them as a cross-check.

Usage (from the repository root): python -m benchmarks.bench_frame [--frames N]
[--repeats N] [--profile DIR] (``--profile`` writes one cProfile file per step).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("calibrate", "astrometry", "photometry")
TARGET_SECONDS = 5.0
#: Masters from a few frames: the benchmark is about the object frames.
MASTER_FRAMES = 5


def _status_mb(key: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process, MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    """Start the peak resident size (VmHWM) over from the current size: a child process
    inherits its parent's ``ru_maxrss`` across fork and exec."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def _setup(home: Path, frames: int) -> tuple[str, dict[str, float]]:
    """Simulate, ingest and run the night once; the database URL and the executor's task
    durations (s, the first frame's) per step."""
    from sqlalchemy import select

    from autowisp.db.migrate import upgrade
    from autowisp.db.models import Step as StepRow
    from autowisp.db.models import Task
    from autowisp.db.session import session_scope
    from autowisp.ingest.ingest import ingest_paths
    from autowisp.pipeline.local import run_local
    from autowisp.simulate.night import NightConfig, simulate_night
    from autowisp.steps.registry import default_registry

    upload = home / "upload"
    simulate_night(
        upload,
        NightConfig(width=5184, height=3456, frames=frames, seed=2, biases=MASTER_FRAMES,
                    darks=MASTER_FRAMES, flats=MASTER_FRAMES, cloudy_fraction=0.0),
    )  # fmt: skip
    url = f"sqlite:///{home / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [upload], close=True)
    minimum = {"min_frames": MASTER_FRAMES}
    parameters = {"master_bias": minimum, "master_dark": minimum, "master_flat": minimum}
    run_local(url, home / "storage", default_registry(), jobs=1, step_parameters=parameters)
    durations: dict[str, float] = {}
    with session_scope(url) as session:
        rows = session.execute(
            select(StepRow.name, Task.state, Task.started_at, Task.finished_at, Task.last_error)
            .join(StepRow, StepRow.id == Task.step_id)
            .where(StepRow.name.in_(STEPS))
            .order_by(Task.id)
        ).all()  # fmt: skip
    for name, state, started, finished, error in rows:
        if str(getattr(state, "value", state)) != "done":
            raise SystemExit(f"setup: a {name} task is {state}: {error}")
        if name not in durations and started and finished:
            durations[name] = (finished - started).total_seconds()
    return url, durations


def _measure(url: str, storage: Path, step_name: str, repeats: int, profile: str) -> dict:
    """Run one step's first task ``1 + repeats`` times in this process (see the module
    docstring); figures as a dict."""
    from sqlalchemy import select

    from autowisp.db.models import Step as StepRow
    from autowisp.db.models import Task
    from autowisp.db.session import session_scope
    from autowisp.pipeline.runner import build_context
    from autowisp.steps.registry import default_registry

    registry = default_registry()
    with session_scope(url) as session:
        task = session.scalars(
            select(Task).join(StepRow, StepRow.id == Task.step_id)
            .where(StepRow.name == step_name).order_by(Task.id).limit(1)
        ).one()  # fmt: skip
        context = build_context(session, task, registry, storage)
    step = registry[step_name]()
    before = _status_mb("VmRSS")
    _reset_peak()
    times, cpu = [], []
    for index in range(1 + repeats):
        if profile and index == 1:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        start, start_cpu = time.perf_counter(), time.process_time()
        step.run(context)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        if profile and index == 1:
            profiler.disable()
            profiler.dump_stats(str(Path(profile) / f"{step_name}.prof"))
    peak = _status_mb("VmHWM")
    return {
        "first": times[0],
        "best": min(times[1:]) if repeats else times[0],
        "cpu": min(cpu[1:]) if repeats else cpu[0],
        "peak_mb": peak - before,
        "base_mb": before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", default="", help="directory for per-step cProfile files")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--home", default="", help="reuse (or keep) the scratch directory")
    parser.add_argument("--measure", nargs=3, metavar=("URL", "STORAGE", "STEP"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.measure:
        url, storage, step = args.measure
        print(json.dumps(_measure(url, Path(storage), step, args.repeats, args.profile)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(args.home or scratch)
        home.mkdir(parents=True, exist_ok=True)
        marker = home / "setup.json"
        if marker.exists():
            url, durations = json.loads(marker.read_text())
        else:
            start = time.perf_counter()
            url, durations = _setup(home, args.frames)
            marker.write_text(json.dumps([url, durations]))
            print(f"setup (simulate, ingest, run the night): {time.perf_counter() - start:.0f} s")
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        one_core = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                    "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
        print(f"{'step':<12}{'first s':>9}{'best s':>9}{'cpu s':>9}{'peak MB':>9}"
              f"{'executor s':>12}")  # fmt: skip
        total = total_cpu = 0.0
        for step in args.steps:
            command = [sys.executable, "-m", "benchmarks.bench_frame", "--repeats",
                       str(args.repeats), "--profile", args.profile,
                       "--measure", url, str(home / "storage"), step]  # fmt: skip
            if hasattr(os, "sched_setaffinity"):
                command = ["taskset", "-c", str(min(os.sched_getaffinity(0))), *command]
            out = subprocess.run(command, env=one_core, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{step} failed:\n{out.stderr}")
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            total += figures["best"]
            total_cpu += figures["cpu"]
            print(f"{step:<12}{figures['first']:>9.2f}{figures['best']:>9.2f}"
                  f"{figures['cpu']:>9.2f}{figures['peak_mb']:>9.0f}{durations.get(step, float('nan')):>12.2f}")  # fmt: skip
        verdict = "within" if total <= TARGET_SECONDS else "over"
        print(f"{'total':<12}{'':>9}{total:>9.2f}{total_cpu:>9.2f}   ({verdict} the "
              f"{TARGET_SECONDS:g} s target)")  # fmt: skip


if __name__ == "__main__":
    main()
