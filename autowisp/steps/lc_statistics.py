"""Per-star statistics of a field's light curves, and its nights on one scale (the
``lc_statistics`` field step).

Once every shard of the field holds the field's latest generation, two passes over every
star's points over every night, star block by star block in bounded memory (the
light-curve step itself keeps appending at the cost of the night):

1. Each star's median fitted magnitude per night, channel and photometry, with its error
   and the star's median position; then each night's *offsets* onto the field's
   reference night (its first by date), a smooth function of position, magnitude and
   colour fitted over the stars both nights measured (:mod:`autowisp.core.night_scale`):
   each night's magnitude fit is on its own reference frame's scale.
2. Per stage (``RAW``: the measured magnitudes; ``MAGFIT``: after the magnitude fit and
   the night's offset), channel and photometry: the points used (finite magnitudes: the
   fit and the photometry leave spoiled points out), the median, the RMS about the mean
   and the median absolute deviation about the median, mag.

The product (HDF5): datasets ``star_index``, ``nights`` (night ids, in date order),
``night_dates`` and, per channel group, ``median``, ``rms``, ``mad`` (stars × stages ×
photometries, NaN with fewer than two points), ``points``, and ``night_offset`` (stars ×
nights × photometries, mag, to subtract from the night's fitted magnitudes; 0 on the
reference night, NaN for a star the night did not place); attributes ``stages``,
``photometries``, ``channels`` (comma-separated), ``reference_night``, ``night_fits``
(JSON: per channel, photometry and night, the stars used, the residual RMS and why a
night got only a zero point), provenance and ``shards`` (JSON: each shard's file read).
The per-night medians are held in memory while the offsets are fitted (float32: about 8
MB a night for 20,000 stars in 4 channels and 4 photometries, 0.8 GB over 100 nights):
unlike the points, they grow with the field's history.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from autowisp.core.night_scale import fit_night_offsets, night_medians
from autowisp.io.atomic import atomic_path
from autowisp.io.lightcurves import STAGES, column_names
from autowisp.io.provenance import Provenance, product_reference, stamp
from autowisp.io.shards import NightBlock, read_shard_generation
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
from autowisp.vocabulary import Scope

__all__ = ["LightCurveStatistics", "shard_night_medians", "shard_statistics"]

#: Fewest points of a star for the QC's median MAD.
QC_POINTS = 10
#: Fewest points of a star in a night for its night median.
NIGHT_POINTS = 3


def _outline(
    path: Path,
) -> tuple[int, int, list[str], list[str], int, list[tuple[str, int]]]:
    """A shard generation's star range, channels, photometries, frames over the nights
    (from one star's columns) and its nights' (date, id) in date order."""
    outline = read_shard_generation(path, columns=False)
    n_stars = outline.star_hi - outline.star_lo
    first = read_shard_generation(path, stars=np.zeros(1, np.int64) if n_stars else None)
    channels: list[str] = []
    photometries: list[str] = []
    frames = 0
    for block in first.nights.values():
        frames += int(np.asarray(block.columns["jd_utc"]).size)
        for name in column_names(block.columns.get("channels", [])):
            if name not in channels:
                channels.append(name)
        for name in column_names(block.columns.get("photometries", [])):
            if name not in photometries:
                photometries.append(name)
    nights = sorted((b.local_date, b.night_id) for b in outline.nights.values())
    return outline.star_lo, outline.star_hi, channels, photometries, frames, nights


def _star_blocks(
    path: Path, n_stars: int, frames: int, n_phot: int, block_bytes: int
) -> Iterator[tuple[np.ndarray, list[NightBlock]]]:
    """(positions, the nights' blocks in date order) per block of the shard's stars."""
    per_star = max(frames, 1) * max(n_phot, 1) * 8 * 3  # values and temporaries
    step = max(1, min(n_stars, block_bytes // per_star)) if n_stars else 1
    for lo in range(0, n_stars, step):
        positions = np.arange(lo, min(n_stars, lo + step))
        generation = read_shard_generation(path, stars=positions)
        blocks = sorted(generation.nights.values(), key=lambda b: (b.local_date, b.night_id))
        yield positions, blocks


def _magnitudes(block: NightBlock, name: str, photometries: list[str], stars: int) -> np.ndarray:
    """A night's magnitudes ``name`` (``<channel>.fitted``, ...; frames × stars × the
    ``photometries``, NaN for those the night lacks)."""
    c = block.columns
    n = int(np.asarray(c["jd_utc"]).size)
    values = np.full((n, stars, len(photometries)), np.nan)
    if name in c:
        for j, phot in enumerate(column_names(c["photometries"])):
            values[:, :, photometries.index(phot)] = c[name][:, :, j]
    return values


def shard_night_medians(path: Path, *, block_bytes: int) -> dict[str, Any]:
    """Per star of the shard generation at ``path``, night (``nights``: ids in date
    order, ``dates``), channel and photometry: the median fitted magnitude, its error
    (:func:`autowisp.core.night_scale.night_medians`), and the star's median x, y."""
    star_lo, star_hi, channels, photometries, frames, nights = _outline(path)
    n_stars = star_hi - star_lo
    column = {night_id: k for k, (_, night_id) in enumerate(nights)}
    shape = (n_stars, len(nights), len(photometries))
    result: dict[str, Any] = {
        "star_index": np.arange(star_lo, star_hi, dtype=np.int64),
        "nights": [n for _, n in nights], "dates": [str(d) for d, _ in nights],
        "channels": channels, "photometries": photometries,
    }  # fmt: skip
    for channel in channels:
        result[channel] = {
            key: np.full(shape if key in ("median", "error") else shape[:2], np.nan, np.float32)
            for key in ("median", "error", "x", "y")
        }
    for positions, blocks in _star_blocks(path, n_stars, frames, len(photometries), block_bytes):
        for block in blocks:
            k = column[block.night_id]
            for channel in channels:
                if f"{channel}.fitted" not in block.columns:
                    continue
                out = result[channel]
                values = _magnitudes(block, f"{channel}.fitted", photometries, positions.size)
                median, error = night_medians(values, min_points=NIGHT_POINTS)
                out["median"][positions, k] = median
                out["error"][positions, k] = error
                for key in ("x", "y"):
                    place = np.asarray(block.columns[f"{channel}.{key}"], float)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # stars not placed
                        out[key][positions, k] = np.nanmedian(place, axis=0)
    return result


def shard_statistics(
    path: Path,
    *,
    block_bytes: int,
    offsets: Mapping[str, Mapping[int, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """The statistics of every star of the shard generation at ``path``; the MAGFIT
    stage less ``offsets`` (per channel, per night id: shard stars × the shard's
    photometries, NaN taken as 0) where given."""
    star_lo, star_hi, channels, photometries, frames, _ = _outline(path)
    n_stars = star_hi - star_lo
    shape = (n_stars, len(STAGES), len(photometries))
    result: dict[str, Any] = {
        "star_index": np.arange(star_lo, star_hi, dtype=np.int64),
        "channels": channels,
        "photometries": photometries,
    }
    for channel in channels:
        result[channel] = {
            "median": np.full(shape, np.nan, np.float32),
            "rms": np.full(shape, np.nan, np.float32),
            "mad": np.full(shape, np.nan, np.float32),
            "points": np.zeros(shape, np.int32),
        }
    for positions, blocks in _star_blocks(path, n_stars, frames, len(photometries), block_bytes):
        for channel in channels:
            for s, (stage, key) in enumerate(STAGES.items()):
                parts = []
                for block in blocks:
                    night = _magnitudes(block, f"{channel}.{key}", photometries, positions.size)
                    offset = (offsets or {}).get(channel, {}).get(block.night_id)
                    if stage == "MAGFIT" and offset is not None:
                        night -= np.nan_to_num(offset[positions])[None]
                    parts.append(night)
                values = (
                    np.concatenate(parts)
                    if parts
                    else np.full((0, positions.size, len(photometries)), np.nan)
                )
                out = result[channel]
                count = np.isfinite(values).sum(axis=0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # stars without points
                    median = np.nanmedian(values, axis=0)
                    mad = np.nanmedian(np.abs(values - median), axis=0)
                    rms = np.nanstd(values, axis=0, ddof=1)
                few = count < 2
                out["median"][positions, s] = median
                out["mad"][positions, s] = np.where(few, np.nan, mad)
                out["rms"][positions, s] = np.where(few, np.nan, rms)
                out["points"][positions, s] = count
    return result


class LightCurveStatistics(Step):
    name = "lc_statistics"
    scope = Scope.FIELD
    inputs = ("lightcurves",)
    outputs = ("light_curve_statistics",)
    queue = "heavy"
    parameters = (
        Parameter("block_mb", 128, "MB", "Memory of one block of stars read over the history."),
    )
    version = "2"

    def run(self, context: StepContext) -> StepResult:
        field = context.require_field()
        block_bytes = max(int(float(context.parameters["block_mb"]) * 1024**2), 1024**2)
        products = sorted(
            (p for p in context.inputs.get("lightcurves", ()) if p.output_path is not None),
            key=lambda p: p.target,
        )
        paths = [Path(str(p.output_path)) for p in products]
        scale = _NightScale(
            [shard_night_medians(path, block_bytes=block_bytes) for path in paths]
        ).fit()
        shards = [shard_statistics(path, block_bytes=block_bytes, offsets=offsets)
                  for path, offsets in zip(paths, scale.shard_offsets, strict=True)]  # fmt: skip
        channels: list[str] = []
        photometries: list[str] = []
        for shard in shards:
            channels += [c for c in shard["channels"] if c not in channels]
            photometries += [p for p in shard["photometries"] if p not in photometries]
        index = np.concatenate([s["star_index"] for s in shards]) if shards else np.zeros(0)
        order = np.argsort(index, kind="stable")
        path = context.output_path("h5")
        qc: dict[str, Any] = {"stars": int(index.size), "shards": len(shards), "channels": {}}
        qc["night_scale"] = scale.qc()
        with atomic_path(path) as temporary, h5py.File(temporary, "w") as out:
            stamp(out.attrs, Provenance.of(context, version=self.version))
            out.attrs["field"] = field.name
            out.attrs["stages"] = ",".join(STAGES)
            out.attrs["photometries"] = ",".join(photometries)
            out.attrs["channels"] = ",".join(channels)
            out.attrs["shards"] = json.dumps(
                [product_reference(p, context.storage_root) for p in products]
            )
            out["star_index"] = index[order].astype(np.int64)
            out["nights"] = np.asarray(scale.nights, np.int64)
            out["night_dates"] = np.asarray(scale.dates, object)
            out.attrs["reference_night"] = scale.nights[0] if scale.nights else -1
            out.attrs["night_fits"] = json.dumps(scale.fits)
            for channel in channels:
                group = out.create_group(channel)
                offsets = np.full((index.size, len(scale.nights), len(photometries)), np.nan)
                if channel in scale.offsets:
                    for j, phot in enumerate(scale.photometries):
                        offsets[:, :, photometries.index(phot)] = scale.offsets[channel][:, :, j]
                group.create_dataset("night_offset", data=offsets[order].astype(np.float32))
                for key, dtype in (("median", np.float32), ("rms", np.float32),
                                   ("mad", np.float32), ("points", np.int32)):  # fmt: skip
                    fill = 0 if key == "points" else np.nan
                    parts = []
                    for shard in shards:
                        size = shard["star_index"].size
                        part = np.full((size, len(STAGES), len(photometries)), fill, dtype)
                        if channel in shard:
                            for j, phot in enumerate(shard["photometries"]):
                                part[:, :, photometries.index(phot)] = shard[channel][key][:, :, j]
                        parts.append(part)
                    values = np.concatenate(parts)[order] if parts else np.zeros((0, 2, 0))
                    group.create_dataset(key, data=values)
                    if key == "mad":
                        mad = values
                    if key == "points":
                        points = values
                figures = {}
                for s, stage in enumerate(STAGES):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        enough = points[:, s, :] >= QC_POINTS
                        best = np.where(enough, mad[:, s, :], np.nan)
                        per_star = np.nanmin(best, axis=1) if best.size else best
                        used = np.isfinite(per_star)
                        figures[stage] = {
                            "stars": int(used.sum()),
                            "median_best_mad": float(np.median(per_star[used]))
                            if used.any()
                            else None,
                        }
                qc["channels"][channel] = figures
        return StepResult(path, qc)


class _NightScale:
    """The field's nights on its reference night's scale (see the module docstring):
    ``offsets`` per channel (the field's stars in the shards' order × nights ×
    ``photometries``), and per shard the offsets its statistics subtract."""

    def __init__(self, shards: list[dict[str, Any]]) -> None:
        nights = sorted({(d, n) for s in shards for d, n in zip(s["dates"], s["nights"],
                                                                  strict=True)})  # fmt: skip
        self.dates = [d for d, _ in nights]
        self.nights = [n for _, n in nights]
        self.channels: list[str] = []
        self.photometries: list[str] = []
        for shard in shards:
            self.channels += [c for c in shard["channels"] if c not in self.channels]
            self.photometries += [p for p in shard["photometries"] if p not in self.photometries]
        self.shards = shards
        self.offsets: dict[str, np.ndarray] = {}
        self.fits: dict[str, dict[str, dict[str, Any]]] = {}
        self.shard_offsets: list[dict[str, dict[int, np.ndarray]]] = [{} for _ in shards]

    def _field(self, channel: str, key: str) -> np.ndarray:
        """A channel's per-star, per-night array over the field (stars in shard order)."""
        parts = []
        for shard in self.shards:
            size = shard["star_index"].size
            shape = (size, len(self.nights)) + ((len(self.photometries),) if key in
                                                ("median", "error") else ())  # fmt: skip
            part = np.full(shape, np.nan, np.float32)
            if channel in shard:
                columns = np.asarray([self.nights.index(n) for n in shard["nights"]], int)
                values = shard[channel][key]
                if values.ndim == 3:
                    phot = np.asarray([self.photometries.index(p) for p in shard["photometries"]],
                                      int)  # fmt: skip
                    part[np.ix_(np.arange(size), columns, phot)] = values
                else:
                    part[:, columns] = values
            parts.append(part)
        return np.concatenate(parts) if parts else np.zeros((0, len(self.nights)))

    def fit(self) -> _NightScale:
        median = {c: self._field(c, "median") for c in self.channels}
        colour = None
        if {"R", "B"} <= set(self.channels):
            colour = median["R"] - median["B"]  # stars × nights × photometries
        for channel in self.channels:
            error = self._field(channel, "error")
            x, y = self._field(channel, "x"), self._field(channel, "y")
            offsets = np.full(median[channel].shape, np.nan, np.float32)
            if self.nights:  # the reference night: on its own scale
                offsets[np.isfinite(x[:, 0]), 0] = 0.0
            figures: dict[str, dict[str, Any]] = {}
            for j, phot in enumerate(self.photometries):
                per_night: dict[str, Any] = {}
                for k in range(1, len(self.nights)):
                    star_colour = None
                    if colour is not None:
                        star_colour = np.where(np.isfinite(colour[:, 0, j]), colour[:, 0, j],
                                               colour[:, k, j])  # fmt: skip
                    result = fit_night_offsets(
                        median[channel][:, k, j], error[:, k, j], median[channel][:, 0, j],
                        error[:, 0, j], x[:, k], y[:, k], star_colour,
                    )  # fmt: skip
                    offsets[:, k, j] = result.offset
                    per_night[str(self.nights[k])] = {
                        "stars": result.used,
                        "rms_mmag": round(1e3 * result.rms, 3)
                        if np.isfinite(result.rms)
                        else None,
                        "terms": result.terms, "reason": result.reason,
                    }  # fmt: skip
                figures[phot] = per_night
            self.offsets[channel] = offsets
            self.fits[channel] = figures
        start = 0
        for s, shard in enumerate(self.shards):
            size = shard["star_index"].size
            columns = np.asarray([self.photometries.index(p) for p in shard["photometries"]], int)
            for channel in shard["channels"]:
                rows = self.offsets[channel][start : start + size]
                self.shard_offsets[s][channel] = {
                    night: rows[:, k][:, columns] for k, night in enumerate(self.nights)
                }
            start += size
        return self

    def qc(self) -> dict[str, Any]:
        zero_points = sum(
            1 for figures in self.fits.values() for per_night in figures.values()
            for fit in per_night.values() if fit["reason"]
        )  # fmt: skip
        return {
            "nights": len(self.nights),
            "reference_night": self.nights[0] if self.nights else None,
            "zero_point_only": zero_points,
        }
