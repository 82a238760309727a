"""Per-star statistics of a field's light curves (the ``lc_statistics`` field step).

Once every shard of the field holds the field's latest generation, each star's points
over every night, per stage (``RAW``: the measured magnitudes; ``MAGFIT``: after the
magnitude fit), channel and photometry: the points used (finite magnitudes: the fit and
the photometry leave spoiled points out), the median, the RMS about the mean and the
median absolute deviation about the median, mag. Statistics summarise the whole history,
so this task reads it all, star block by star block in bounded memory; the light-curve
step itself keeps appending at the cost of the night.

The product (HDF5): datasets ``star_index`` and, per channel group, ``median``, ``rms``,
``mad`` (stars × stages × photometries, NaN with fewer than two points) and ``points``;
attributes ``stages``, ``photometries``, ``channels`` (comma-separated), provenance and
``shards`` (JSON: each shard's file read).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from autowisp.io.atomic import atomic_path
from autowisp.io.lightcurves import STAGES, column_names
from autowisp.io.provenance import Provenance, product_reference, stamp
from autowisp.io.shards import read_shard_generation
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
from autowisp.vocabulary import Scope

__all__ = ["LightCurveStatistics", "shard_statistics"]

#: Fewest points of a star for the QC's median MAD.
QC_POINTS = 10


def shard_statistics(path: Path, *, block_bytes: int) -> dict[str, Any]:
    """The statistics of every star of the shard generation at ``path``."""
    outline = read_shard_generation(path, columns=False)
    n_stars = outline.star_hi - outline.star_lo
    # The channels, photometries and frames over the nights: one star's columns first.
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
    shape = (n_stars, len(STAGES), len(photometries))
    result: dict[str, Any] = {
        "star_index": np.arange(outline.star_lo, outline.star_hi, dtype=np.int64),
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
    per_star = max(frames, 1) * max(len(photometries), 1) * 8 * 3  # values and temporaries
    step = max(1, min(n_stars, block_bytes // per_star)) if n_stars else 1
    for lo in range(0, n_stars, step):
        positions = np.arange(lo, min(n_stars, lo + step))
        generation = read_shard_generation(path, stars=positions)
        for channel in channels:
            for s, key in enumerate(STAGES.values()):
                values = np.full((frames, positions.size, len(photometries)), np.nan)
                row = 0
                for block in generation.nights.values():
                    c = block.columns
                    n = int(np.asarray(c["jd_utc"]).size)
                    name = f"{channel}.{key}"
                    if name in c:
                        for j, phot in enumerate(column_names(c["photometries"])):
                            values[row : row + n, :, photometries.index(phot)] = c[name][:, :, j]
                    row += n
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
    version = "1"

    def run(self, context: StepContext) -> StepResult:
        field = context.require_field()
        block_bytes = max(int(float(context.parameters["block_mb"]) * 1024**2), 1024**2)
        products = sorted(
            (p for p in context.inputs.get("lightcurves", ()) if p.output_path is not None),
            key=lambda p: p.target,
        )
        shards = [shard_statistics(Path(str(p.output_path)), block_bytes=block_bytes)
                  for p in products]  # fmt: skip
        channels: list[str] = []
        photometries: list[str] = []
        for shard in shards:
            channels += [c for c in shard["channels"] if c not in channels]
            photometries += [p for p in shard["photometries"] if p not in photometries]
        index = np.concatenate([s["star_index"] for s in shards]) if shards else np.zeros(0)
        order = np.argsort(index, kind="stable")
        path = context.output_path("h5")
        qc: dict[str, Any] = {"stars": int(index.size), "shards": len(shards), "channels": {}}
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
            for channel in channels:
                group = out.create_group(channel)
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
