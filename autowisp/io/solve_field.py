"""astrometry.net's ``solve-field`` as a blind (or hinted) solver of a source list.

Used when a frame has no pointing in its header, and by the astrometry benchmark. The
source list goes in as an ``xylist`` (no image is re-extracted), so both solvers see
the same sources. Debian: ``apt-get install astrometry.net astrometry-data-tycho2-10-19``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from autowisp.core.projection import TanSip

__all__ = ["SolveFieldError", "find_solve_field", "solve_field"]


class SolveFieldError(RuntimeError):
    """solve-field is missing, failed, or found no solution (the message says which)."""


def find_solve_field(command: str = "solve-field") -> str | None:
    """Full path of the solve-field executable, or None when it is not installed."""
    return shutil.which(command) if command else None


def solve_field(
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    *,
    pixel_scale: float | None = None,
    scale_tolerance: float = 0.2,
    hint: tuple[float, float] | None = None,
    hint_radius: float = 10.0,
    tweak_order: int = 3,
    cpu_limit: float = 120.0,
    command: str = "solve-field",
    max_sources: int = 300,
) -> TanSip:
    """Solve a source list (0-based positions, brightest first) with solve-field.

    Raises :class:`SolveFieldError` when solve-field is not installed, fails, or finds no
    solution within ``cpu_limit`` seconds.
    """
    executable = find_solve_field(command)
    if executable is None:
        raise SolveFieldError(
            f"{command!r} is not installed (Debian: apt-get install astrometry.net "
            "astrometry-data-tycho2-10-19)"
        )
    ny, nx = shape
    count = min(len(x), max_sources)
    with tempfile.TemporaryDirectory(prefix="autowisp-solve-field-") as scratch:
        directory = Path(scratch)
        xylist = directory / "sources.xyls"
        table = fits.BinTableHDU.from_columns(
            [
                fits.Column("X", "D", array=np.asarray(x[:count], float) + 1.0),
                fits.Column("Y", "D", array=np.asarray(y[:count], float) + 1.0),
            ]
        )
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(xylist)
        arguments = [
            executable,
            str(xylist),
            "--width", str(nx),
            "--height", str(ny),
            "--dir", str(directory),
            "--no-plots",
            "--overwrite",
            "--no-remove-lines",
            "--no-verify-uniformize",
            "--new-fits", "none",
            "--corr", "none",
            "--rdls", "none",
            "--match", "none",
            "--index-xyls", "none",
            "--tweak-order", str(tweak_order),
            "--cpulimit", str(int(cpu_limit)),
        ]  # fmt: skip
        if pixel_scale:
            arguments += [
                "--scale-units", "arcsecperpix",
                "--scale-low", f"{pixel_scale * (1 - scale_tolerance):.4f}",
                "--scale-high", f"{pixel_scale * (1 + scale_tolerance):.4f}",
            ]  # fmt: skip
        if hint is not None:
            arguments += [
                "--ra", f"{hint[0]:.6f}",
                "--dec", f"{hint[1]:.6f}",
                "--radius", f"{hint_radius:.3f}",
            ]  # fmt: skip
        done = subprocess.run(
            arguments, capture_output=True, text=True, timeout=cpu_limit + 60, check=False
        )
        solution = directory / "sources.wcs"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SolveFieldError(f"solve-field failed (exit {done.returncode}): {tail}")
        if not solution.exists():
            raise SolveFieldError(
                f"solve-field found no solution for {count} sources within {cpu_limit:.0f} s"
            )
        return TanSip.from_header(fits.getheader(solution))
