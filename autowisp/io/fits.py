"""Reading raw FITS frames (plain or tile-compressed ``.fits.fz``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = ["image_hdu_index", "read_image"]


def image_hdu_index(hdus: fits.HDUList) -> int:
    """Index of the first HDU holding a 2-D image (the compressed one in a .fz file)."""
    for index, hdu in enumerate(hdus):
        if isinstance(hdu, fits.CompImageHDU | fits.PrimaryHDU | fits.ImageHDU):
            if hdu.header.get("NAXIS", 0) == 2 or (
                isinstance(hdu, fits.CompImageHDU) and hdu.header.get("ZNAXIS", 2) == 2
            ):
                return index
    raise ValueError("no 2-D image HDU in the file")


def read_image(path: str | Path) -> tuple[np.ndarray, fits.Header]:
    """The raw image (native byte order, as stored) and its header."""
    with fits.open(path, memmap=False) as hdus:
        hdu = hdus[image_hdu_index(hdus)]
        data = np.asarray(hdu.data)
        header = hdu.header.copy()
    return data.astype(data.dtype.newbyteorder("=")), header
