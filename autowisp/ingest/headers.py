"""Reading what ingest needs from a raw file: checksum, header, and integrity.

Nothing here reads the pixel data: a file is checked for truncation by comparing its
size with where its header says the data ends, so ingesting thousands of frames stays
fast. A file that fails raises :class:`~autowisp.errors.IngestError` with the reason to
record.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from astropy.utils.exceptions import AstropyUserWarning

from autowisp.errors import IngestError
from autowisp.io.fits import image_hdu_index

__all__ = ["RawFile", "read_raw_file", "sha256_of"]

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fit.fz", ".fz")


@dataclass(frozen=True)
class RawFile:
    """A raw file's identity and header (as a plain dict of keyword → value)."""

    path: Path
    sha256: str
    size: int
    header: dict
    width: int
    height: int


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _plain(header: fits.Header) -> dict:
    """Header as JSON-able keyword → value (COMMENT/HISTORY joined)."""
    result: dict = {}
    for card in header.cards:
        key = card.keyword
        if not key:
            continue
        value = card.value
        if key in ("COMMENT", "HISTORY"):
            result[key] = (result.get(key, "") + "\n" + str(value)).strip()
            continue
        if isinstance(value, bool | int | float | str):
            result[key] = value
        else:
            result[key] = str(value)
    return result


def read_raw_file(path: Path, sha256: str | None = None) -> RawFile:
    """Checksum (unless given), size, header and shape of a raw frame.

    Raises IngestError with the reason if the file is not a usable image.
    """
    size = path.stat().st_size
    if size == 0:
        raise IngestError("empty file (0 bytes)")
    sha = sha256 or sha256_of(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (AstropyUserWarning, VerifyWarning))
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdus:
                index = image_hdu_index(hdus)
                hdu = hdus[index]
                header = hdu.header
                info = hdu.fileinfo()
                width, height = int(header["NAXIS1"]), int(header["NAXIS2"])
                if isinstance(hdu, fits.CompImageHDU):
                    # The compressed table's size, less the padding that may be missing.
                    data_bytes = int(info["datSpan"]) - 2879
                else:
                    data_bytes = width * height * abs(int(header["BITPIX"])) // 8
                plain = _plain(header)
    except IngestError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise IngestError(f"not a readable FITS image: {error}") from error
    end = int(info["datLoc"]) + data_bytes
    if end > size:
        raise IngestError(
            f"truncated: the header promises {end} bytes of header and data, the file has {size}"
        )
    if width < 2 or height < 2:
        raise IngestError(f"not a 2-D image: shape {width}×{height}")
    return RawFile(path, sha, size, plain, width, height)
