"""Light curves: each field shard's stars over every night, appended night by night.

A shard (a range of the field's star indices, :func:`autowisp.db.fields.define_shards`)
gets one task per generation: the nights placed in it since the generation it appends
to (``ShardInfo.appended``), each read from that night's magnitude fit (the ``magfit``
step's product) and written as the night's block of the new generation's file
(:mod:`autowisp.io.shards`: the earlier nights stay in the files that hold them, so
appending a night costs that night, and a night that closed again replaces its block).

**Which star is which.** A measured star is a star of the night's star list (its row,
``list_row``) or a catalogue star the list does not hold (its Gaia id). The database
records which field star each row of each star list is (the ``stars`` recorder); the
runner gives the task the rows of its shard's stars (``ShardInfo.stars``), and the
magnitude fit names the star list its frames were measured with, so a star beyond the
catalogue, which has no other identity, is found exactly. A star the shard does not hold
(another shard's) is left for that shard's task.

**Per point** (a frame × star of the night block): the frame's UTC Julian date at
mid-exposure (``jd_utc``), exposure time and raw file; per star its BJD_TDB
(:func:`autowisp.core.timing.barycentric_jd`, from the star's registered position and the
site the headers give), hour angle and airmass; per channel the position, photometry
flags, background and PSF shape; per channel and photometry (apertures, then the PSF
fit) the raw and fitted magnitudes with the raw magnitude's error. Stars the night did not
measure have NaN.

The night's magnitude fit is read in blocks of frames and in runs of the star columns
the shard needs (never a night's photometry of every star at once); the block is the
shard's, its size frames × shard stars.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from autowisp.core.timing import barycentric_jd, hour_angle_airmass
from autowisp.errors import PermanentError
from autowisp.io.magfit import CACHE_BYTES, CHUNK_STARS, FieldMagfit, read_magfit
from autowisp.io.night_star_list import field_star_indices
from autowisp.io.provenance import Provenance, product_reference, reference_path
from autowisp.io.shards import NightBlock, write_shard_generation
from autowisp.steps.base import (
    InputProduct,
    Parameter,
    PlacedNight,
    ShardStars,
    Step,
    StepContext,
    StepResult,
)
from autowisp.vocabulary import Scope

__all__ = ["LightCurves", "map_stars", "night_block"]

#: Per channel: frames × stars datasets of the magnitude fit carried into the light
#: curves, and their type there.
STAR_COLUMNS = (
    ("x", np.float32), ("y", np.float32), ("flags", np.uint16), ("background", np.float32),
    ("psf_s", np.float32), ("psf_d", np.float32), ("psf_k", np.float32),
)  # fmt: skip

#: Per channel: frames × stars × photometries datasets (raw and fitted magnitudes).
PHOTOMETRY_COLUMNS = ("magnitude", "magnitude_err", "fitted")


def map_stars(field: FieldMagfit, stars: ShardStars, star_lo: int, star_hi: int) -> np.ndarray:
    """Each of the magnitude fit's stars' position in the shard (``star index − star_lo``;
    -1: not a star of this shard): by its row in the star list the night was measured
    with, else (a catalogue star the list does not hold) by its Gaia id."""
    rows = stars.list_rows.get(reference_path(field.star_list)) if field.star_list else None
    target = field_star_indices(field.list_row, rows)
    gaia = np.asarray(stars.gaia_source_id, np.int64)
    by_gaia = np.flatnonzero((target < 0) & (field.list_row < 0) & (field.source_id >= 0))
    has_gaia = np.flatnonzero(gaia >= 0)
    if by_gaia.size and has_gaia.size:
        order = has_gaia[np.argsort(gaia[has_gaia], kind="stable")]
        where = np.searchsorted(gaia[order], field.source_id[by_gaia])
        where = np.clip(where, 0, order.size - 1)
        hit = gaia[order][where] == field.source_id[by_gaia]
        target[by_gaia[hit]] = np.asarray(stars.star_index, np.int64)[order[where[hit]]]
    inside = (target >= star_lo) & (target < star_hi)
    return np.where(inside, target - star_lo, -1)


def _runs(columns: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` covering the increasing ``columns``, split where two are more than
    ``gap`` apart (a chunk of columns between them need not be read)."""
    if columns.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(columns) > gap)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [columns.size - 1]])
    return [(int(columns[a]), int(columns[b]) + 1) for a, b in zip(starts, ends, strict=True)]


def night_block(
    path: Path,
    field_id: int,
    stars: ShardStars,
    star_lo: int,
    star_hi: int,
    *,
    block_bytes: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The shard's columns of one night's magnitude fit (see the module docstring) and
    figures; None when the night has no frame of the field."""
    _, fields = read_magfit(path)
    found = [f for f in fields if f.field_id == field_id]
    if not found:
        return None
    field = found[0]
    position = map_stars(field, stars, star_lo, star_hi)
    mine = np.flatnonzero(position >= 0)
    # One column per shard star: a star twice in the fit (cannot happen with the
    # photometry's star lists; guarded) keeps its first.
    _, first = np.unique(position[mine], return_index=True)
    duplicates = int(mine.size - first.size)
    mine = mine[np.sort(first)]
    target = position[mine]
    n_frames, n_stars = field.jd_mid.size, star_hi - star_lo
    n_phot = len(field.photometries)
    site = dict(field.site or {})
    latitude, longitude = site.get("latitude"), site.get("longitude")
    height = site.get("height") or 0.0
    ra = np.asarray(stars.ra, float)
    dec = np.asarray(stars.dec, float)
    index = np.asarray(stars.star_index, np.int64) - star_lo
    columns: dict[str, np.ndarray] = {
        "jd_utc": np.asarray(field.jd_mid, np.float64),
        "exptime": np.asarray(field.exptime, np.float64),
        "raw_file": np.array([name.encode() for name in field.raw_file], dtype="S"),
        "channels": np.array([c.encode() for c in field.channels], dtype="S"),
        "photometries": np.array([p.encode() for p in field.photometries], dtype="S"),
        "star_index": np.arange(star_lo, star_hi, dtype=np.int64),
    }
    # Times and geometry at the registered positions of the shard's stars.
    bjd = np.full((n_frames, n_stars), np.nan)
    hour_angle = np.full((n_frames, n_stars), np.nan, np.float32)
    airmass = np.full((n_frames, n_stars), np.nan, np.float32)
    known = (index >= 0) & (index < n_stars) & np.isfinite(ra) & np.isfinite(dec)
    if known.any() and n_frames:
        bjd[:, index[known]] = barycentric_jd(
            field.jd_mid, ra[known], dec[known], latitude=latitude, longitude=longitude,
            height=float(height),
        )  # fmt: skip
        if latitude is not None and longitude is not None:
            angle, mass = hour_angle_airmass(
                field.jd_mid, ra[known], dec[known], float(latitude), float(longitude)
            )
            hour_angle[:, index[known]] = angle
            airmass[:, index[known]] = mass
    columns["bjd_tdb"] = bjd
    columns["hour_angle"] = hour_angle
    columns["airmass"] = airmass
    # The night's measurements of the shard's stars, in frame blocks and column runs.
    order = np.argsort(mine)
    mine, target = mine[order], target[order]
    runs = _runs(mine, CHUNK_STARS)
    span = max((b - a for a, b in runs), default=1)
    frames_per_block = max(1, int(block_bytes // max(span * n_phot * 4 * 4, 1)))
    with h5py.File(path, "r", rdcc_nbytes=CACHE_BYTES) as source:
        for channel in field.channels:
            group = source[f"FIELD{field_id}/{channel}"]
            out: dict[str, np.ndarray] = {}
            for key, dtype in STAR_COLUMNS:
                fill = 0 if np.issubdtype(dtype, np.integer) else np.nan
                out[key] = np.full((n_frames, n_stars), fill, dtype)
            for key in PHOTOMETRY_COLUMNS:
                out[key] = np.full((n_frames, n_stars, n_phot), np.nan, np.float32)
            for f0 in range(0, n_frames, frames_per_block):
                f1 = min(n_frames, f0 + frames_per_block)
                for a, b in runs:
                    pick = (mine >= a) & (mine < b)
                    local, into = mine[pick] - a, target[pick]
                    for key in out:
                        if key not in group:  # a fit made before the column existed
                            continue
                        values = np.asarray(group[key][f0:f1, a:b])
                        out[key][f0:f1, into] = values[:, local]
            for key, values in out.items():
                columns[f"{channel}.{key}"] = values
    figures = {
        "frames": int(n_frames),
        "stars_measured": int(mine.size),
        "duplicates": duplicates,
        "points": int(
            sum(np.isfinite(columns[f"{c}.magnitude"][:, :, 0]).sum() for c in field.channels)
        ),
        "star_list": field.star_list,
    }
    return columns, figures


class LightCurves(Step):
    name = "lightcurves"
    scope = Scope.SHARD
    inputs = ("magfit", "lightcurves")
    outputs = ("light_curve_shard",)
    queue = "heavy"
    shard_stars = True
    parameters = (
        Parameter("block_mb", 128, "MB", "Memory of one block of frames read from a night's fit."),
    )
    version = "1"

    def run(self, context: StepContext) -> StepResult:
        shard = context.require_shard()
        stars = shard.stars
        if stars is None:
            raise PermanentError(f"{self.name}: the runner gave no stars for shard {shard.name}")
        previous = context.inputs.get(self.name, ())
        previous_path = previous[0].output_path if previous else None
        fits: Mapping[int, InputProduct] = {
            int(p.target.split(":")[1]): p
            for p in context.inputs.get("magfit", ())
            if p.output_path is not None
        }
        block_bytes = max(int(float(context.parameters["block_mb"]) * 1024**2), 1024**2)
        written: list[NightBlock] = []
        dropped: list[int] = []
        nights: dict[str, Any] = {}
        for placed in shard.appended:
            product = fits.get(placed.night_id)
            block = None
            if product is not None and product.output_path is not None:
                block = night_block(
                    Path(product.output_path), shard.field_id, stars, shard.star_lo,
                    shard.star_hi, block_bytes=block_bytes,
                )  # fmt: skip
            if block is None:
                dropped.append(placed.night_id)
                nights[str(placed.night_id)] = {
                    "written": False,
                    "why": "no magnitude fit" if product is None else "no frame of the field",
                }
                continue
            columns, figures = block
            written.append(_block(placed, product, columns, context))
            nights[str(placed.night_id)] = {"written": True, **figures}
        path = context.output_path("h5")
        write_shard_generation(
            path,
            shard=shard.name,
            field_name=shard.field_name,
            star_lo=shard.star_lo,
            star_hi=shard.star_hi,
            generation=shard.generation,
            provenance=Provenance.of(context, version=self.version),
            previous=Path(previous_path) if previous_path is not None else None,
            written=written,
            dropped=dropped,
        )
        qc = {
            "nights_written": len(written),
            "nights_dropped": len(dropped),
            "nights_held": len(shard.nights) - len(dropped),
            "points": int(sum(n.get("points", 0) for n in nights.values())),
            "stars": int(shard.star_hi - shard.star_lo),
            "nights": nights,
        }
        return StepResult(path, qc)


def _block(
    placed: PlacedNight,
    product: InputProduct | None,
    columns: dict[str, np.ndarray],
    context: StepContext,
) -> NightBlock:
    return NightBlock(
        placed.night_id,
        placed.local_date.isoformat(),
        placed.night_generation,
        columns,
        source=product_reference(product, context.storage_root) if product else "",
    )
