"""Bytes of product per raw byte for a full-size 5184×3456 simulated frame.

Simulates a night (3 biases, 3 darks, 3 + 2 bad flats, ``--frames`` object frames),
ingests it into a throwaway SQLite database and runs frame_qc, the masters, calibrate
and astrometry with the local executor. Prints, per object frame, the bytes of its
calibrated frame, astrometric solution and frame QC report against its raw file, and
the round-trip figures of the stored image against a fresh calibration in memory.

Usage (from the repository root): python -m benchmarks.bench_storage [--frames N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from autowisp.core.calibration import calibrate_frame
from autowisp.io.fits import read_image
from autowisp.io.products import master_path, read_calibrated_frame, read_master_frame
from autowisp.simulate.night import NightConfig, simulate_night
from autowisp.steps.astrometry import Astrometry
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.registry import Registry
from tests.integration.conftest import process_upload

WIDTH, HEIGHT = 5184, 3456
PER_FRAME = ("calibrate", "astrometry", "frame_qc")


def _round_trip(home: Path, path: Path) -> dict:
    """Largest and mean |stored − original| / ERROR, and the derived ERROR's worst
    relative error, against the frame calibrated again in memory."""
    stored = read_calibrated_frame(path)
    storage = home / "storage"
    raw, header = read_image(next((home / "upload").rglob(stored.provenance.raw_file)))
    bias, dark, flat = (
        read_master_frame(master_path(stored.provenance.references[k], storage))
        for k in ("MBIAS", "MDARK", "MFLAT")
    )
    image, error, _ = calibrate_frame(
        raw, exptime=stored.exptime, bias=bias.master, dark_rate=dark.master,
        flat=flat.master, gain=stored.gain, read_noise=stored.read_noise,
        saturation=float(header["SATURATE"]), bias_error=bias.error,
        dark_error=dark.error, flat_error=flat.error, hot=dark.hot,
    )  # fmt: skip
    finite = np.isfinite(error)
    pull = (stored.image.astype(np.float64) - image)[finite] / error[finite]
    relative = np.abs(stored.error[finite] / error[finite] - 1)
    return {
        "max_pull": float(np.max(np.abs(pull))),
        "mean_pull": float(np.mean(pull)),
        "error_max_relative": float(np.max(relative)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1, help="object frames")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as directory:
        home = Path(directory)
        start = time.perf_counter()
        simulate_night(
            home / "upload",
            NightConfig(frames=arguments.frames, width=WIDTH, height=HEIGHT, seed=1,
                        biases=3, darks=3, flats=3),
        )  # fmt: skip
        simulated = time.perf_counter()
        minimum = {"min_frames": 3}
        rows = process_upload(
            home, home / "upload",
            Registry([FrameQC, MasterBias, MasterDark, MasterFlat, Calibrate, Astrometry]),
            {step: minimum for step in ("master_bias", "master_dark", "master_flat")},
        )  # fmt: skip
        print(f"simulated in {simulated - start:.0f} s, processed in "
              f"{time.perf_counter() - simulated:.0f} s")  # fmt: skip
        failed = [(r.name, r.target, r.last_error) for r in rows if r.output_path is None]
        if failed:
            raise SystemExit(f"steps failed: {failed}")
        sizes: dict[str, dict[str, int]] = {}
        for row in rows:
            if row.name in PER_FRAME:
                sizes.setdefault(row.target, {})[row.name] = Path(row.output_path).stat().st_size
        for row in (r for r in rows if r.name == "calibrate"):
            frame = read_calibrated_frame(Path(row.output_path), with_error=False)
            raw = next((home / "upload").rglob(frame.provenance.raw_file)).stat().st_size
            parts = sizes[row.target]
            total = sum(parts.values())
            shown = ", ".join(f"{name} {parts[name] / 2**20:.2f} MiB" for name in PER_FRAME)
            print(f"{frame.provenance.raw_file}: raw {raw / 2**20:.2f} MiB; {shown}")
            print(f"  bytes of product per raw byte: {total / raw:.3f}")
            print(f"  round trip: {_round_trip(home, Path(row.output_path))}")


if __name__ == "__main__":
    main()
