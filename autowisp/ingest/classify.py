"""Classifying a raw frame: its type, camera, site, time and night, from header and rules.

The frame type comes from IMAGETYP (or FRAME, OBSTYPE) when the camera writes one;
otherwise from the configured rules (keyword values and path globs, first match wins),
then from a per-camera default. The night is the local date, at the observatory's
longitude, of the evening the night began: ``(UTC + longitude/15 h − 12 h).date()``.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astropy.time import Time

from autowisp.core.bayer import LAYOUTS
from autowisp.errors import ConfigurationError, IngestError
from autowisp.io.keywords import header_pointing, header_serial, header_value
from autowisp.vocabulary import ImageType

__all__ = ["FrameFacts", "classify", "night_date"]

UNIX_EPOCH_JD = 2440587.5  # JD of 1970-01-01T00:00 UTC (UTC Julian date, no leap seconds)
TYPE_KEYWORDS = ("IMAGETYP", "FRAME", "OBSTYPE", "FRAMETYP")
SYNONYMS = {
    ImageType.BIAS: ("bias", "zero", "bias frame", "offset"),
    ImageType.DARK: ("dark", "dark frame", "dark current"),
    ImageType.FLAT: (
        "flat",
        "flat field",
        "flatfield",
        "flat frame",
        "skyflat",
        "sky flat",
        "domeflat",
        "dome flat",
        "twilight flat",
        "twflat",
    ),
    ImageType.OBJECT: ("object", "light", "light frame", "science", "sci", "target"),
}
MODEL_KEYWORDS = ("CAMMODEL", "INSTRUME", "CAMERA")
LAYOUT_KEYWORDS = ("BAYERPAT", "COLORTYP", "FILTER")


def _number(header: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    value = header_value(header, keys)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class FrameFacts:
    """What ingest records about an accepted frame."""

    image_type: ImageType
    serial: str
    model: str
    make: str
    layout: str
    exptime: float
    date_obs: dt.datetime
    jd_mid: float
    night: dt.date
    latitude: float | None
    longitude: float | None
    height: float | None
    ra: float | None
    dec: float | None


def _type_from_keyword(value: Any) -> ImageType | None:
    text = str(value).strip().lower()
    for image_type, names in SYNONYMS.items():
        if text in names:
            return image_type
    return None


def _rule_matches(rule: Mapping[str, Any], header: Mapping[str, Any], path: Path) -> bool:
    for key, pattern in dict(rule.get("header", {})).items():
        value = header.get(str(key).upper())
        if value is None or not fnmatch.fnmatch(str(value).strip().lower(), str(pattern).lower()):
            return False
    if "path" in rule and not fnmatch.fnmatch(str(path), str(rule["path"])):
        return False
    return "header" in rule or "path" in rule


def _image_type(
    header: Mapping[str, Any], path: Path, serial: str, rules: Mapping[str, Any]
) -> ImageType:
    keyword = header_value(header, TYPE_KEYWORDS)
    if keyword is not None:
        found = _type_from_keyword(keyword)
        if found is not None:
            return found
    for number, rule in enumerate(rules.get("rules", []), start=1):
        if not isinstance(rule, Mapping) or "type" not in rule:
            raise ConfigurationError(f"[[ingest.rules]] #{number} needs a 'type': {rule!r}")
        if _rule_matches(rule, header, path):
            found = _type_from_keyword(rule["type"])
            if found is None:
                raise ConfigurationError(
                    f"[[ingest.rules]] #{number} has type {rule['type']!r}: "
                    "use bias, dark, flat or object"
                )
            return found
    default = dict(rules.get("camera_defaults", {})).get(serial)
    if default is not None:
        found = _type_from_keyword(default)
        if found is None:
            raise ConfigurationError(
                f"[ingest.camera_defaults] gives camera {serial!r} type {default!r}: "
                "use bias, dark, flat or object"
            )
        return found
    if keyword is not None:
        raise IngestError(
            f"unknown image type {keyword!r} in the header, and no ingest rule matched"
        )
    raise IngestError(
        "unknown image type: no IMAGETYP/FRAME/OBSTYPE keyword, no [[ingest.rules]] matched "
        f"and camera {serial!r} has no entry in [ingest.camera_defaults]"
    )


def night_date(moment: dt.datetime, longitude: float) -> dt.date:
    """Local date of the evening starting the night that contains ``moment`` (UTC)."""
    return (moment + dt.timedelta(hours=longitude / 15.0 - 12.0)).date()


def _date_obs(header: Mapping[str, Any]) -> dt.datetime:
    value = header_value(header, ("DATE-OBS", "DATE_OBS"))
    if value is None:
        raise IngestError("missing DATE-OBS: the exposure start time is needed")
    text = str(value)
    if "T" not in text and header_value(header, ("TIME-OBS", "UT")) is not None:
        text = f"{text}T{header_value(header, ('TIME-OBS', 'UT'))}"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        try:  # astropy reads the FITS variants Python does not (e.g. 'YYYY-MM-DD' only)
            moment = Time(text, format="fits", scale="utc").to_datetime()
        except ValueError as error:
            raise IngestError(
                f"DATE-OBS {value!r} is not an ISO date and time: {error}"
            ) from error
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment.replace(tzinfo=dt.UTC)


def classify(
    header: Mapping[str, Any],
    path: Path,
    rules: Mapping[str, Any],
    known_layouts: Mapping[str, str] | None = None,
) -> FrameFacts:
    """Everything ingest decides from a header; IngestError with the reason otherwise."""
    serial = header_serial(header) or "unknown"
    model = str(header_value(header, MODEL_KEYWORDS) or "unknown camera")
    date_obs = _date_obs(header)
    exptime = _number(header, ("EXPTIME", "EXPOSURE"))
    if exptime is None:
        raise IngestError("missing EXPTIME: the exposure time is needed")
    if exptime < 0:
        raise IngestError(f"EXPTIME {exptime!r} is negative")
    layout_value = header_value(header, LAYOUT_KEYWORDS)
    if layout_value is not None and str(layout_value).upper() in LAYOUTS:
        layout = str(layout_value).upper()
    elif header.get("BAYERPAT") not in (None, ""):
        raise IngestError(
            f"unknown Bayer layout BAYERPAT={header['BAYERPAT']!r}: expected one of {LAYOUTS}"
        )
    else:
        layout = (known_layouts or {}).get(serial) or str(rules.get("default_layout", "RGGB"))
    longitude = _number(header, ("LONG-OBS", "SITELONG", "OBSGEO-L", "LONGITUD"))
    latitude = _number(header, ("LAT-OBS", "SITELAT", "OBSGEO-B", "LATITUDE"))
    height = _number(header, ("ELEV-OBS", "SITEELEV", "OBSGEO-H", "ALTITUDE"))
    night_longitude = longitude if longitude is not None else float(rules.get("longitude", 0.0))
    pointing = header_pointing(header)
    jd_mid = UNIX_EPOCH_JD + (date_obs.timestamp() + exptime / 2) / 86400.0
    return FrameFacts(
        image_type=_image_type(header, path, serial, rules),
        serial=serial,
        model=model,
        make=model.split()[0] if model.split() else "unknown",
        layout=layout,
        exptime=exptime,
        date_obs=date_obs,
        jd_mid=float(jd_mid),
        night=night_date(date_obs, night_longitude),
        latitude=latitude,
        longitude=longitude,
        height=height,
        ra=pointing[0] if pointing else None,
        dec=pointing[1] if pointing else None,
    )
