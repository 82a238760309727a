"""What raw-frame header keywords mean: camera serial, pointing, ISO setting, pixel scale.

One reading of each shared by ingest (:mod:`autowisp.ingest.classify`) and the steps, so
both interpret a header alike. Headers are anything with ``get`` and ``[]`` by keyword
(an :class:`astropy.io.fits.Header` or the ``dict`` stored with an image).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ISO_KEYWORDS",
    "POINTING_KEYS",
    "SERIAL_KEYWORDS",
    "header_iso",
    "header_pixel_scale",
    "header_pointing",
    "header_serial",
    "header_value",
]

#: Keywords that give the camera's serial number, in the order they are tried.
SERIAL_KEYWORDS = ("CAMSN", "SERIALNO", "CAMERASN", "SERIAL", "CAM-SN")
#: Pairs of keywords giving the pointing (RA, Dec in deg), in the order they are tried.
POINTING_KEYS = (("RA-MNT", "DEC-MNT"), ("RA", "DEC"), ("OBJCTRA_DEG", "OBJCTDEC_DEG"))
#: Header keywords that give a DSLR's ISO setting, in the order they are tried.
ISO_KEYWORDS = ("ISO", "ISOSPEED", "ISO_SPEED")
#: Keywords that give the pixel scale directly, arcsec/px, in the order they are tried.
PIXEL_SCALE_KEYWORDS = ("PIXSCALE", "SECPIX", "SCALE")


def header_value(header: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """The first value among ``keys`` that is present and not blank (strings stripped)."""
    for key in keys:
        value = header.get(key)
        if value is not None and not (isinstance(value, str) and not value.strip()):
            return value.strip() if isinstance(value, str) else value
    return None


def header_serial(header: Mapping[str, Any]) -> str | None:
    """The camera serial number a header gives, if any."""
    value = header_value(header, SERIAL_KEYWORDS)
    return str(value) if value is not None else None


def header_pointing(header: Mapping[str, Any]) -> tuple[float, float] | None:
    """Pointing (deg) from the first pair of header keywords that holds two numbers
    (RA and Dec always from the same pair)."""
    for ra_key, dec_key in POINTING_KEYS:
        try:
            ra, dec = float(header[ra_key]), float(header[dec_key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(ra) and math.isfinite(dec) and -90 <= dec <= 90:
            return ra % 360.0, dec
    return None


def header_iso(header: Mapping[str, Any] | None) -> int | None:
    """The ISO setting a header gives (ISO, ISOSPEED...), or None."""
    if header is None or not hasattr(header, "get"):
        return None
    for key in ISO_KEYWORDS:
        value = header.get(key)
        try:
            if value is not None and float(value) > 0:
                return round(float(value))
        except (TypeError, ValueError):
            continue
    return None


def header_pixel_scale(header: Mapping[str, Any]) -> float | None:
    """Pixel scale (arcsec/px) from PIXSCALE/SECPIX, or from FOCALLEN (mm) and XPIXSZ (µm)."""
    for key in PIXEL_SCALE_KEYWORDS:
        try:
            value = float(header[key])
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0:
            return value
    try:
        focal, pixel = float(header["FOCALLEN"]), float(header["XPIXSZ"])
    except (KeyError, TypeError, ValueError):
        return None
    return 206.265 * pixel / focal if focal > 0 and pixel > 0 else None
