"""Reading many frames band by band (products are written by :mod:`autowisp.io.products`).

Master stacks never hold all frames at once: each file is opened once
and read in row bands sized to a memory limit, the lesson of ccdproc's combine, which
re-reads files per tile and overshoots its memory limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from astropy.io import fits

from autowisp.io.fits import image_hdu_index

__all__ = ["band_rows", "read_bands"]

#: Bytes per frame value that the clipped stack needs (sorted float32 copy, two float64
#: prefix sums, and temporaries).
BYTES_PER_VALUE = 48


def band_rows(frames: int, width: int, memory_limit_mb: float) -> int:
    """Rows per band so that a band of ``frames`` frames fits in the memory limit."""
    rows = int(memory_limit_mb * 2**20 / (frames * width * BYTES_PER_VALUE))
    return max(rows, 2)


def read_bands(
    paths: Sequence[Path],
    rows: int,
    transform: Callable[[int, np.ndarray, slice], np.ndarray] | None = None,
    window: tuple[slice, slice] | None = None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(row slice, stack)`` with stack (frames, band rows, columns) in float32.

    ``transform(frame_index, band, rows)`` may calibrate each band (e.g. subtract a
    master bias) before it is stacked. Bands start on even rows so that a Bayer
    super-pixel is never split. With ``window`` (rows, columns of the frames, e.g. the
    light-sensitive region without the overscan), only that is read, and row slices
    count from the window's first row.
    """
    rows = max(rows - rows % 2, 2)
    with ExitStack() as stack:
        hdus = []
        for path in paths:
            # memmap=False: astropy cannot memory-map scaled (BZERO) integers; .section then
            # reads only the rows asked for from the open file.
            opened = stack.enter_context(fits.open(path, memmap=False, lazy_load_hdus=False))
            hdus.append(opened[image_hdu_index(opened)])
        full = (int(hdus[0].header["NAXIS2"]), int(hdus[0].header["NAXIS1"]))
        if window is None:
            window = (slice(0, full[0]), slice(0, full[1]))
        y0, y1, _ = window[0].indices(full[0])
        x0, x1, _ = window[1].indices(full[1])
        for start in range(0, y1 - y0, rows):
            band = slice(start, min(start + rows, y1 - y0))
            data = np.empty((len(hdus), band.stop - band.start, x1 - x0), dtype=np.float32)
            for index, hdu in enumerate(hdus):
                values = np.asarray(
                    hdu.section[y0 + band.start : y0 + band.stop, x0:x1], dtype=np.float32
                )
                data[index] = transform(index, values, band) if transform else values
            yield band, data
