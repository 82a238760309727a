"""A star's light curve: gathered from its shard's generation, written as FITS or CSV.

:func:`star_light_curves` reads the points of some of a shard's stars from the shard
generation a reader was given (:mod:`autowisp.io.shards`: every night it holds, from
the files that hold them), frames in time order, only the frames that measured the star
in some channel; given the field's scale (:func:`read_field_scale`: the night offsets of
the field's light-curve statistics, :mod:`autowisp.steps.lc_statistics`), each night's
fitted magnitudes are moved onto the field's reference night. :func:`light_curve_table`
turns one star's points into the exported columns, and :func:`write_light_curve` writes
them.

**The exported file** (FITS, read by ``lightkurve.LightCurve.read(path, format="tess")``
and, with astropy's FITS time support, by ``TimeSeries.read(path, hdu="LIGHTCURVE",
astropy_native=True, time_column="TIME")``):

* primary header: ``TELESCOP`` (the camera), ``INSTRUME``, ``CREATOR`` ("AutoWISP
  lightcurve export" and the version), ``ORIGIN`` ("AutoWISP"), ``OBJECT``, the star's ids
  (``STARID`` in the database, ``GAIAID``: Gaia DR3 source_id, -1 for none), ``FIELD``,
  ``RA_OBJ``, ``DEC_OBJ`` (deg, ICRS at ``EPOCH``), ``GMAG``, ``BPMAG``, ``RPMAG`` (where
  known), ``FLUXSRC`` (the stage, channel and photometry of ``FLUX``) and
  ``PHOT_<CHANNEL>`` (the photometry of each channel's magnitude columns);
* extension ``LIGHTCURVE``: ``TIME`` (BTJD: BJD_TDB − 2457000, at mid-exposure, for the
  star's own direction; header ``TIMESYS = 'TDB'``, ``TIMEREF = 'SOLARSYSTEM'``,
  ``BJDREFI = 2457000``, ``BJDREFF = 0``, ``JDREF`` the same for FITS-standard readers,
  ``FRAMETIM`` (the median exposure, s), ``NUM_FRM = 1``, ``TSTART``, ``TSTOP``),
  ``FLUX`` and ``FLUX_ERR`` (relative flux of the best stage and channel, median 1:
  ``10^(−0.4 (m − median m))`` of the fitted magnitudes of the channel and photometry
  whose median absolute deviation is the smallest), ``QUALITY`` (bits: 128 the point is
  unusable, for one of the reasons 4096 the photometry's flags spoil it (saturated,
  masked, edge...), 8192 no fitted magnitude (the frame's fit failed), 32768 the channel
  did not measure the star; 2048 the photometry warned (crowded, uncalibrated), 16384
  the night is not on the field's scale yet (its statistics do not hold it) —
  lightkurve's default quality mask drops the points with bit 128 and keeps the others),
  ``JD_UTC``,
  ``EXPTIME``, ``AIRMASS``, ``HA`` (deg), ``RAWFILE``, and per channel ``X_``, ``Y_`` (px),
  ``BKG_`` (e⁻/px), ``PSF_S_``, ``PSF_D_``, ``PSF_K_``, ``PHOTFLAG_``, and per stage and
  channel ``MAG_<STAGE>_<CHANNEL>`` and ``MAGERR_<STAGE>_<CHANNEL>`` (stages ``RAW`` and
  ``MAGFIT``: the fitted magnitude less its night's offset onto the field's reference
  night; a fitted magnitude's error is its measurement's).

The CSV file has the same columns, headed by the primary header's facts as ``#`` lines.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from astropy.io import fits

import autowisp
from autowisp.core.photometry import SPOILING
from autowisp.core.timing import BTJD_REFERENCE
from autowisp.io.atomic import atomic_path
from autowisp.io.shards import read_shard_generation

__all__ = [
    "QUALITY_NOT_FITTED",
    "QUALITY_NOT_MEASURED",
    "QUALITY_NOT_ON_SCALE",
    "QUALITY_SPOILED",
    "QUALITY_UNUSABLE",
    "QUALITY_WARNED",
    "STAGES",
    "FieldScale",
    "LightCurve",
    "StarIdentity",
    "column_names",
    "light_curve_table",
    "read_field_scale",
    "star_light_curves",
    "write_light_curve",
]

#: QUALITY bits (of the channel and photometry FLUX comes from), placed so that
#: lightkurve's default TESS quality mask drops exactly the unusable points: 128 (its
#: "manual exclude") marks them, the reasons and the warnings use bits it keeps.
QUALITY_UNUSABLE = 128
QUALITY_WARNED = 2048
QUALITY_SPOILED = 4096
QUALITY_NOT_FITTED = 8192
QUALITY_NOT_ON_SCALE = 16384
QUALITY_NOT_MEASURED = 32768

#: Stage name in the columns -> the shard's dataset of the magnitudes.
STAGES = {"RAW": "magnitude", "MAGFIT": "fitted"}

#: Per channel: the shard's dataset -> the exported column's prefix.
_CHANNEL_COLUMNS = {
    "x": "X", "y": "Y", "background": "BKG", "psf_s": "PSF_S", "psf_d": "PSF_D",
    "psf_k": "PSF_K", "flags": "PHOTFLAG",
}  # fmt: skip


@dataclass(frozen=True)
class StarIdentity:
    """Who the star is (the database's facts written into the file's header)."""

    star_id: int
    star_index: int
    field_id: int
    field_name: str
    gaia_source_id: int
    ra: float
    dec: float
    epoch: float
    g: float | None = None
    bp: float | None = None
    rp: float | None = None
    telescope: str = ""
    instrument: str = ""


@dataclass(frozen=True)
class LightCurve:
    """One star's exported columns (per point) and header facts."""

    identity: StarIdentity
    columns: Mapping[str, np.ndarray]
    flux_source: str
    photometry_of: Mapping[str, str]
    frame_time: float
    notes: Sequence[str] = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(np.asarray(self.columns["TIME"]).size)


@dataclass(frozen=True)
class FieldScale:
    """Night offsets onto a field's reference night for some of its stars (from its
    light-curve statistics): ``offsets`` per channel, stars (``star_index``, increasing)
    × ``nights`` (ids) × ``photometries``, mag to subtract from the fitted magnitudes."""

    nights: tuple[int, ...]
    photometries: tuple[str, ...]
    star_index: np.ndarray
    offsets: Mapping[str, np.ndarray]

    def offset(
        self, star_index: int, channel: str, night_id: int, photometries: Sequence[str]
    ) -> np.ndarray:
        """The star's offsets in one night and channel, per photometry (NaN where the
        scale does not hold the star, night, channel or photometry)."""
        found = np.full(len(photometries), np.nan)
        where = int(np.searchsorted(self.star_index, star_index))
        values = self.offsets.get(channel)
        if (
            values is None
            or night_id not in self.nights
            or where >= self.star_index.size
            or self.star_index[where] != star_index
        ):
            return found
        k = self.nights.index(night_id)
        for j, name in enumerate(photometries):
            if name in self.photometries:
                found[j] = values[where, k, self.photometries.index(name)]
        return found


def read_field_scale(path: Path, star_index: Sequence[int]) -> FieldScale:
    """The night offsets of stars ``star_index`` from a field's light-curve statistics
    product (:mod:`autowisp.steps.lc_statistics`)."""
    wanted = np.unique(np.asarray(star_index, np.int64))
    with h5py.File(path, "r") as product:
        held = np.asarray(product["star_index"][()], np.int64)
        rows = np.searchsorted(held, wanted)
        rows = rows[(rows < held.size) & (held[np.minimum(rows, held.size - 1)] == wanted)]
        nights = tuple(int(n) for n in product["nights"][()]) if "nights" in product else ()
        photometries = tuple(n for n in str(product.attrs["photometries"]).split(",") if n)
        channels = [n for n in str(product.attrs["channels"]).split(",") if n]
        offsets = {}
        for channel in channels:
            name = f"{channel}/night_offset"
            if name in product and rows.size:
                offsets[channel] = np.asarray(product[name][np.sort(rows)], float)
    return FieldScale(nights, photometries, held[np.sort(rows)], offsets)


def star_light_curves(
    path: Path, positions: Sequence[int], scale: FieldScale | None = None
) -> dict[int, dict[str, np.ndarray]]:
    """Per position in the shard (``star index − star_lo``), the star's points over every
    night the generation at ``path`` holds: frame columns (``jd_utc``, ``exptime``,
    ``raw_file``), the star's (``bjd_tdb``, ``hour_angle``, ``airmass``), and per channel
    ``<channel>.<dataset>`` (magnitudes: points × photometries), with the attributes
    ``channels`` and ``photometries`` (the names, as a 1-element object array each) —
    frames in time order, those that measured it in no channel left out. With the
    field's ``scale``, the fitted magnitudes less their night's offsets, and per channel
    ``<channel>.on_scale`` (per point: its night's offset was known; the others are left
    as fitted)."""
    wanted = np.unique(np.asarray(positions, np.int64))
    generation = read_shard_generation(path, stars=wanted)
    blocks = sorted(generation.nights.values(), key=lambda b: (b.local_date, b.night_id))
    channels: list[str] = []
    photometries: list[str] = []
    for block in blocks:
        for name in column_names(block.columns.get("channels")):
            if name not in channels:
                channels.append(name)
        for name in column_names(block.columns.get("photometries")):
            if name not in photometries:
                photometries.append(name)
    result: dict[int, dict[str, np.ndarray]] = {}
    for column, position in enumerate(wanted):
        parts: dict[str, list[np.ndarray]] = {}
        for block in blocks:
            c = block.columns
            night_channels = column_names(c.get("channels"))
            night_phot = column_names(c.get("photometries"))
            n = int(np.asarray(c["jd_utc"]).size)
            seen = np.zeros(n, bool)
            for channel in night_channels:
                seen |= np.isfinite(np.asarray(c[f"{channel}.magnitude"])[:, column]).any(axis=1)
            keep = np.flatnonzero(seen)
            pieces = {
                "jd_utc": np.asarray(c["jd_utc"])[keep],
                "exptime": np.asarray(c["exptime"])[keep],
                "raw_file": np.asarray(c["raw_file"])[keep],
                "bjd_tdb": np.asarray(c["bjd_tdb"])[keep, column],
                "hour_angle": np.asarray(c["hour_angle"])[keep, column],
                "airmass": np.asarray(c["airmass"])[keep, column],
            }
            for channel in channels:
                present = channel in night_channels
                for key in _CHANNEL_COLUMNS:
                    name = f"{channel}.{key}"
                    if present and name in c:
                        pieces[name] = np.asarray(c[name])[keep, column]
                    else:
                        pieces[name] = np.full(keep.size, 0 if key == "flags" else np.nan)
                for key in (*STAGES.values(), "magnitude_err"):
                    name = f"{channel}.{key}"
                    values = np.full((keep.size, len(photometries)), np.nan, np.float32)
                    if present and name in c:
                        got = np.asarray(c[name])[keep, column]
                        for j, phot in enumerate(night_phot):
                            values[:, photometries.index(phot)] = got[:, j]
                    if key == "fitted" and scale is not None:
                        offset = scale.offset(
                            generation.star_lo + int(position), channel, block.night_id,
                            photometries,
                        )  # fmt: skip
                        known = np.isfinite(offset)
                        values[:, known] -= offset[known].astype(np.float32)
                        measured = np.isfinite(values).any(axis=1)
                        pieces[f"{channel}.on_scale"] = ~measured | bool(known.all())
                    pieces[name] = values
            for key, value in pieces.items():
                parts.setdefault(key, []).append(value)
        joined = {key: np.concatenate(values) for key, values in parts.items()}
        if joined:
            order = np.argsort(joined["jd_utc"], kind="stable")
            joined = {key: value[order] for key, value in joined.items()}
        joined["channels"] = np.array([tuple(channels)], dtype=object)
        joined["photometries"] = np.array([tuple(photometries)], dtype=object)
        result[int(position)] = joined
    return result


def column_names(values: Any) -> list[str]:
    """The names a shard's night block lists (``channels``, ``photometries``)."""
    if values is None:
        return []
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values)]


def _mad(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    if finite.size < 3:
        return np.inf
    return float(np.median(np.abs(finite - np.median(finite))))


#: The exported channel name of a shard channel.
_CHANNEL_NAME = {"L": "MONO"}


def light_curve_table(identity: StarIdentity, points: Mapping[str, np.ndarray]) -> LightCurve:
    """One star's exported columns (see the module docstring) from its points
    (:func:`star_light_curves`)."""
    channels = list(points["channels"][0]) if "channels" in points else []
    photometries = list(points["photometries"][0]) if "photometries" in points else []
    n = int(np.asarray(points.get("jd_utc", np.zeros(0))).size)
    columns: dict[str, np.ndarray] = {
        "TIME": np.asarray(points.get("bjd_tdb", np.zeros(0)), np.float64) - BTJD_REFERENCE,
    }
    notes: list[str] = []
    # Per channel its best photometry: the smallest median absolute deviation of the
    # fitted magnitudes (the middle aperture when too few points).
    best: dict[str, int] = {}
    for channel in channels:
        fitted = np.asarray(points[f"{channel}.fitted"], float)
        spreads = [_mad(fitted[:, j]) for j in range(len(photometries))]
        middle = max(0, (len(photometries) - 1) // 2)
        best[channel] = (
            int(np.argmin(spreads)) if np.isfinite(min(spreads, default=np.inf)) else middle
        )
    spread_of = {
        c: _mad(np.asarray(points[f"{c}.fitted"], float)[:, best[c]]) if photometries else np.inf
        for c in channels
    }
    source = min(channels, key=lambda c: spread_of[c]) if channels else ""
    flux = np.full(n, np.nan)
    flux_err = np.full(n, np.nan)
    quality = np.zeros(n, np.int32)
    if source and photometries:
        j = best[source]
        fitted = np.asarray(points[f"{source}.fitted"], float)[:, j]
        raw = np.asarray(points[f"{source}.magnitude"], float)[:, j]
        error = np.asarray(points[f"{source}.magnitude_err"], float)[:, j]
        finite = np.isfinite(fitted)
        if finite.any():
            flux = 10.0 ** (-0.4 * (fitted - np.median(fitted[finite])))
            flux_err = flux * error * np.log(10.0) / 2.5
        flags = np.nan_to_num(np.asarray(points[f"{source}.flags"], float), nan=0).astype(int)
        if f"{source}.on_scale" in points:
            off_scale = ~np.asarray(points[f"{source}.on_scale"], bool)
            quality |= np.where(off_scale, QUALITY_NOT_ON_SCALE, 0).astype(np.int32)
            if off_scale.any():
                notes.append(
                    f"{int(off_scale.sum())} points of nights not yet on the field's scale"
                )
        spoiled = (flags & int(SPOILING)) != 0
        warned = (flags & ~int(SPOILING)) != 0
        unusable = spoiled | ~finite | ~np.isfinite(raw)
        for mask, bit in ((unusable, QUALITY_UNUSABLE), (warned, QUALITY_WARNED),
                          (spoiled, QUALITY_SPOILED), (~finite, QUALITY_NOT_FITTED),
                          (~np.isfinite(raw), QUALITY_NOT_MEASURED)):  # fmt: skip
            quality |= np.where(mask, bit, 0).astype(np.int32)
    else:
        notes.append("no channel measured the star")
    columns["FLUX"] = flux
    columns["FLUX_ERR"] = flux_err
    columns["QUALITY"] = quality
    columns["JD_UTC"] = np.asarray(points.get("jd_utc", np.zeros(0)), np.float64)
    columns["EXPTIME"] = np.asarray(points.get("exptime", np.zeros(0)), np.float64)
    columns["AIRMASS"] = np.asarray(points.get("airmass", np.zeros(0)), np.float64)
    columns["HA"] = np.asarray(points.get("hour_angle", np.zeros(0)), np.float64)
    columns["RAWFILE"] = np.array(
        [v.decode() if isinstance(v, bytes) else str(v) for v in points.get("raw_file", [])],
        dtype=str,
    )
    photometry_of: dict[str, str] = {}
    for channel in channels:
        name = _CHANNEL_NAME.get(channel, channel)
        j = best[channel]
        photometry_of[name] = photometries[j] if photometries else ""
        for key, prefix in _CHANNEL_COLUMNS.items():
            values = np.asarray(points[f"{channel}.{key}"])
            columns[f"{prefix}_{name}"] = (
                np.nan_to_num(values, nan=0).astype(np.int32) if key == "flags"
                else values.astype(np.float64)
            )  # fmt: skip
        error = np.asarray(points[f"{channel}.magnitude_err"], float)[:, j]
        for stage, key in STAGES.items():
            columns[f"MAG_{stage}_{name}"] = np.asarray(points[f"{channel}.{key}"], float)[:, j]
            columns[f"MAGERR_{stage}_{name}"] = np.where(
                np.isfinite(columns[f"MAG_{stage}_{name}"]), error, np.nan
            )
    exposure = np.asarray(columns["EXPTIME"], float)
    frame_time = float(np.median(exposure)) if exposure.size else 0.0
    flux_source = (
        f"MAGFIT {_CHANNEL_NAME.get(source, source)} {photometries[best[source]]}"
        if source and photometries
        else ""
    )
    return LightCurve(identity, columns, flux_source, photometry_of, frame_time, tuple(notes))


def _header_facts(curve: LightCurve) -> list[tuple[str, Any, str]]:
    who = curve.identity
    name = (
        f"Gaia DR3 {who.gaia_source_id}" if who.gaia_source_id >= 0 else f"AutoWISP {who.star_id}"
    )
    facts: list[tuple[str, Any, str]] = [
        ("TELESCOP", who.telescope or "unknown", "camera that took the frames"),
        ("INSTRUME", who.instrument or "unknown", "camera model"),
        ("CREATOR", f"AutoWISP lightcurve export {autowisp.__version__}", "software"),
        ("ORIGIN", "AutoWISP", "pipeline that made this file"),
        ("OBJECT", name, "the star"),
        ("STARID", int(who.star_id), "star id in the AutoWISP database"),
        ("GAIAID", int(who.gaia_source_id), "Gaia DR3 source_id (-1: none)"),
        ("FIELD", who.field_name, "AutoWISP field"),
        ("FIELDIDX", int(who.star_index), "the star's index in the field"),
        ("RA_OBJ", float(who.ra), "[deg] right ascension (ICRS)"),
        ("DEC_OBJ", float(who.dec), "[deg] declination (ICRS)"),
        ("EPOCH", float(who.epoch), "[yr] epoch of the position"),
        ("RADESYS", "ICRS", "reference frame of the position"),
    ]
    for key, value, what in (("GMAG", who.g, "G"), ("BPMAG", who.bp, "BP"),
                             ("RPMAG", who.rp, "RP")):  # fmt: skip
        if value is not None and np.isfinite(value):
            facts.append((key, float(value), f"[mag] Gaia {what}"))
    facts.append(("FLUXSRC", curve.flux_source, "stage, channel and photometry of FLUX"))
    for channel, photometry in curve.photometry_of.items():
        facts.append((f"PHOT_{channel}"[:8], photometry, f"photometry of the {channel} columns"))
    return facts


#: The ``LIGHTCURVE`` table's header text (without the per-star cards) per column layout:
#: astropy builds it once per layout; each star's file then costs its rows, not the
#: header machinery (70 ms a star before).
_TABLE_HEADERS: dict[tuple[tuple[str, str, str], ...], str] = {}

#: The table's fixed keywords.
_TIME_CARDS = (
    ("TIMESYS", "TDB", "time scale of TIME"),
    ("TIMEREF", "SOLARSYSTEM", "TIME is at the Solar System's barycentre"),
    ("TREFPOS", "BARYCENTER", "reference position of TIME"),
    ("TIMEUNIT", "d", "unit of TIME"),
    ("BJDREFI", int(BTJD_REFERENCE), "integer part of BTJD's zero (BJD_TDB)"),
    ("BJDREFF", 0.0, "fraction of BTJD's zero"),
    ("JDREF", BTJD_REFERENCE, "zero of TIME, JD (FITS time standard)"),
    ("NUM_FRM", 1, "frames per point"),
)


def _padded(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 2880)


def _fits_bytes(curve: LightCurve) -> bytes:
    """The FITS file of ``curve``: primary header and the ``LIGHTCURVE`` binary table."""
    primary = fits.Header()
    primary["SIMPLE"] = (True, "conforms to FITS standard")
    primary["BITPIX"] = (8, "array data type")
    primary["NAXIS"] = (0, "number of array dimensions")
    primary["EXTEND"] = True
    for key, value, comment in _header_facts(curve):
        primary[key] = (value, comment)
    fields: list[tuple[str, str]] = []
    layout: list[tuple[str, str, str]] = []
    arrays = []
    for key, values in curve.columns.items():
        array = np.asarray(values)
        if array.dtype.kind in "US":
            width = max(1, max((len(str(v)) for v in array), default=1))
            fields.append((key, f"S{width}"))
            layout.append((key, f"{width}A", ""))
            array = np.char.encode(array.astype(str), "ascii", "replace")
        elif array.dtype.kind in "iub":
            fields.append((key, ">i4"))
            layout.append((key, "J", ""))
        else:
            unit = {"TIME": "d", "JD_UTC": "d", "EXPTIME": "s", "HA": "deg"}.get(key, "")
            if key.startswith(("MAG_", "MAGERR_")):
                unit = "mag"
            fields.append((key, ">f8"))
            layout.append((key, "D", unit))
        arrays.append(array)
    rows = np.zeros(len(curve), dtype=fields)
    for (key, _), array in zip(fields, arrays, strict=True):
        rows[key] = array
    key_layout = tuple(layout)
    template = _TABLE_HEADERS.get(key_layout)
    if template is None:
        columns = [
            fits.Column(name, form, unit=unit or None, array=np.zeros(0, dtype))
            for (name, form, unit), (_, dtype) in zip(layout, fields, strict=True)
        ]
        header = fits.BinTableHDU.from_columns(columns, name="LIGHTCURVE").header
        for key, value, comment in _TIME_CARDS:
            header[key] = (value, comment)
        template = header.tostring(endcard=False, padding=False)
        if template[320:328] != "NAXIS2  " or int(header["NAXIS1"]) != rows.dtype.itemsize:
            raise RuntimeError("astropy's binary-table header is not laid out as expected")
        _TABLE_HEADERS[key_layout] = template
    time = np.asarray(curve.columns["TIME"], float)
    finite = time[np.isfinite(time)]
    cards = [
        fits.Card("NAXIS2", len(curve), "number of table rows").image,
        *(
            fits.Card(key, value, comment).image
            for key, value, comment in (
                ("TSTART", float(finite.min()) if finite.size else 0.0, "[d] first TIME"),
                ("TSTOP", float(finite.max()) if finite.size else 0.0, "[d] last TIME"),
                ("FRAMETIM", float(curve.frame_time), "[s] median exposure of a frame"),
            )
        ),
    ]
    table = template[:320] + cards[0] + template[400:] + "".join(cards[1:]) + "END".ljust(80)
    return (
        primary.tostring().encode("ascii")
        + _padded(table.encode("ascii"), b" ")
        + _padded(rows.tobytes(), b"\0")
    )


def write_light_curve(path: Path, curve: LightCurve, *, file_format: str = "fits") -> Path:
    """Write ``curve`` to ``path`` atomically as ``fits`` or ``csv``; returns the path."""
    if file_format == "fits":
        with atomic_path(path) as temporary:
            Path(temporary).write_bytes(_fits_bytes(curve))
        return path
    if file_format == "csv":
        text = io.StringIO()
        for key, value, _ in _header_facts(curve):
            shown = " ".join(str(value).splitlines())  # one line per fact, whatever the text
            text.write(f"# {key} = {shown}\n")
        writer = csv.writer(text, lineterminator="\n")
        names = list(curve.columns)
        writer.writerow(names)
        arrays = [np.asarray(curve.columns[k]) for k in names]
        for i in range(len(curve)):
            writer.writerow(
                [repr(float(a[i])) if a.dtype.kind == "f" else str(a[i]) for a in arrays]
            )
        with atomic_path(path) as temporary:
            Path(temporary).write_text(text.getvalue())
        return path
    raise ValueError(f"unknown light-curve format {file_format!r}: fits or csv")
