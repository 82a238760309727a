"""A night's magnitude fitting: one HDF5 file per night (the ``magfit`` step's product).

Written once, atomically, by the step (which fills it while it iterates, in the
temporary file, so the night never has to fit in memory). Layout:

``/`` attributes
    provenance (:mod:`autowisp.io.provenance`), ``expression`` (the correction's terms as
    given), ``qc`` (JSON: the step's figures), ``fields`` (comma-separated group names).
``/FIELD<id>`` for each field the night's frames belong to; attributes ``field_id``,
    ``reference_frame`` (raw file name), ``reference_reason``, ``channels``
    (comma-separated), ``photometries`` (comma-separated: ``ap<radius>`` per aperture,
    then ``psf``), ``terms`` (comma-separated, each term as ``mag^2*x``: the expression's,
    then ``extra_terms`` finer spatial ones tried per frame), ``iterations``,
    ``changes`` (mean-square master change per iteration, mag²), ``notes`` (JSON list:
    terms left out and why), ``photometry_files`` (JSON list: each frame's photometry
    product, ``'<night> cfg=<version> <path>'``), ``star_list`` (the star list the frames
    were measured with, the same reference: ``list_row`` are its rows), ``site`` (JSON:
    ``latitude``, ``longitude`` (deg, east positive), ``height`` (m); null where the
    headers give none). Datasets over the frames (in time
    order): ``raw_file``, ``jd_mid`` (UTC), ``exptime`` (s); over the stars (the union
    of the frames' stars, in the field's star order where the database knows it, so a
    light-curve shard's stars are neighbouring columns; the others after):
    ``source_id`` (Gaia DR3, -1 beyond the catalogue),
    ``list_row`` (row in the night's star list, -1 for none), ``ra``, ``dec`` (deg).
``/FIELD<id>/<channel>`` (``R``, ``G1``, ``G2``, ``B`` or ``MONO``): frames × stars
    datasets ``x``, ``y`` (px), ``flags`` (the photometry's flag bits), ``airmass``,
    ``background`` (e⁻/px), ``psf_s``, ``psf_d``, ``psf_k`` (the PSF's shape at the star);
    frames × stars × photometries ``magnitude`` (raw, ``−2.5 log10(e⁻/s)``),
    ``magnitude_err``, ``fitted`` (the magnitude after the correction, on the master's
    scale; NaN where the frame's fit failed or the point is unusable); stars ×
    photometries ``master`` (the master reference, NaN for stars left out),
    ``master_scatter``, ``master_count``, ``variable`` (bool: excluded by its excess
    scatter); frames × photometries ``fit_stars``, ``fit_rms`` (mag),
    ``fit_rejected`` (fraction), ``fit_extended`` (how many of the finer spatial terms were kept),
    ``fit_reason`` (frames: "" or why the fit failed),
    frames × photometries × terms ``fit_coefficients``.

Frames × stars datasets are chunked in blocks of 8 frames × 2048 stars, so reading a
frame's row and a block of stars over the night are both cheap (the light-curve step
reads star blocks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "CHUNK_FRAMES",
    "CHUNK_STARS",
    "FieldMagfit",
    "MasterReference",
    "create_channel",
    "create_field",
    "photometry_names",
    "read_fitted_block",
    "read_magfit",
    "read_master_reference",
]

CHUNK_FRAMES = 8
CHUNK_STARS = 2048
#: The chunk cache of an open file: a band of chunks over every star of a large field.
CACHE_BYTES = 128 * 1024**2

_STRING = h5py.string_dtype()


def photometry_names(apertures: Sequence[float]) -> list[str]:
    """``ap<radius>`` per aperture (px, as ``%g``), then ``psf``."""
    return [f"ap{radius:g}" for radius in apertures] + ["psf"]


def create_field(
    out: h5py.File,
    field_id: int,
    *,
    frames: Mapping[str, Sequence[Any] | np.ndarray],
    stars: Mapping[str, np.ndarray],
) -> h5py.Group:
    """The group of a field with its frame and star tables (see the module docstring)."""
    group = out.create_group(f"FIELD{field_id}")
    group.attrs["field_id"] = int(field_id)
    group.create_dataset("raw_file", data=np.asarray(frames["raw_file"], object), dtype=_STRING)
    # Where each frame's photometry came from (its path holds a database id, so it is
    # provenance, an attribute, not data: the same night in another database gives the
    # same datasets).
    group.attrs["photometry_files"] = json.dumps([str(p) for p in frames["photometry_file"]])
    group["jd_mid"] = np.asarray(frames["jd_mid"], np.float64)
    group["exptime"] = np.asarray(frames["exptime"], np.float64)
    group["source_id"] = np.asarray(stars["source_id"], np.int64)
    group["list_row"] = np.asarray(stars["list_row"], np.int64)
    group["ra"] = np.asarray(stars["ra"], np.float64)
    group["dec"] = np.asarray(stars["dec"], np.float64)
    return group


def create_channel(
    group: h5py.Group, channel: str, n_frames: int, n_stars: int, n_phot: int, n_terms: int
) -> h5py.Group:
    """A channel's datasets, empty (NaN), to be filled frame by frame and block by block."""
    channel_group = group.create_group(channel)
    chunk2 = (max(1, min(CHUNK_FRAMES, n_frames)), max(1, min(CHUNK_STARS, n_stars)))
    chunk3 = (*chunk2, n_phot)
    shape2, shape3 = (n_frames, n_stars), (n_frames, n_stars, n_phot)
    for key in ("x", "y", "airmass", "background", "psf_s", "psf_d", "psf_k"):
        channel_group.create_dataset(
            key, shape2, np.float32, chunks=chunk2, fillvalue=np.nan, compression="lzf"
        )
    channel_group.create_dataset("flags", shape2, np.uint16, chunks=chunk2, compression="lzf")
    for key in ("magnitude", "magnitude_err", "fitted"):
        channel_group.create_dataset(
            key, shape3, np.float32, chunks=chunk3, fillvalue=np.nan, compression="lzf"
        )
    for key, dtype in (("master", np.float64), ("master_scatter", np.float64)):
        channel_group.create_dataset(key, (n_stars, n_phot), dtype, fillvalue=np.nan)
    channel_group.create_dataset("master_count", (n_stars, n_phot), np.int32)
    channel_group.create_dataset("variable", (n_stars, n_phot), bool)
    channel_group.create_dataset("fit_stars", (n_frames, n_phot), np.int32)
    channel_group.create_dataset("fit_extended", (n_frames, n_phot), np.int32)
    for key in ("fit_rms", "fit_rejected"):
        channel_group.create_dataset(key, (n_frames, n_phot), np.float64, fillvalue=np.nan)
    channel_group.create_dataset("fit_reason", (n_frames, n_phot), dtype=_STRING)
    channel_group.create_dataset(
        "fit_coefficients", (n_frames, n_phot, n_terms), np.float64, fillvalue=np.nan
    )
    return channel_group


@dataclass(frozen=True)
class FieldMagfit:
    """A field's part of a night's magnitude fitting (tables; the big arrays are read
    with :func:`read_fitted_block`)."""

    field_id: int
    reference_frame: str
    reference_reason: str
    channels: tuple[str, ...]
    photometries: tuple[str, ...]
    terms: tuple[str, ...]
    iterations: int
    changes: tuple[float, ...]
    notes: tuple[str, ...]
    raw_file: tuple[str, ...]
    photometry_files: tuple[str, ...]
    jd_mid: np.ndarray
    exptime: np.ndarray
    source_id: np.ndarray
    list_row: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    star_list: str = ""
    site: Mapping[str, float | None] | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _split(value: Any) -> tuple[str, ...]:
    return tuple(v for v in _text(value).split(",") if v)


def read_magfit(path: Path) -> tuple[dict[str, Any], list[FieldMagfit]]:
    """The file's root figures (``qc``, ``expression``) and its fields."""
    with h5py.File(path, "r") as source:
        root = {
            "qc": json.loads(_text(source.attrs["qc"])),
            "expression": _text(source.attrs["expression"]),
        }
        fields = []
        for name in _split(source.attrs["fields"]):
            g = source[name]
            a = g.attrs
            fields.append(
                FieldMagfit(
                    field_id=int(a["field_id"]),
                    reference_frame=_text(a["reference_frame"]),
                    reference_reason=_text(a["reference_reason"]),
                    channels=_split(a["channels"]),
                    photometries=_split(a["photometries"]),
                    terms=_split(a["terms"]),
                    iterations=int(a["iterations"]),
                    changes=tuple(float(v) for v in json.loads(_text(a["changes"]))),
                    notes=tuple(json.loads(_text(a["notes"]))),
                    raw_file=tuple(_text(v) for v in g["raw_file"][()]),
                    photometry_files=tuple(json.loads(_text(a["photometry_files"]))),
                    jd_mid=np.asarray(g["jd_mid"]),
                    exptime=np.asarray(g["exptime"]),
                    source_id=np.asarray(g["source_id"]),
                    list_row=np.asarray(g["list_row"]),
                    ra=np.asarray(g["ra"]),
                    dec=np.asarray(g["dec"]),
                    star_list=_text(a.get("star_list", "")),
                    site=json.loads(_text(a["site"])) if "site" in a else None,
                )
            )
    return root, fields


def read_fitted_block(
    path: Path, field_id: int, channel: str, stars: slice, keys: Sequence[str] = ("fitted",)
) -> dict[str, np.ndarray]:
    """Frames × ``stars`` (× photometries) of the named datasets of a field's channel."""
    with h5py.File(path, "r", rdcc_nbytes=CACHE_BYTES) as source:
        group = source[f"FIELD{field_id}/{channel}"]
        return {key: np.asarray(group[key][:, stars]) for key in keys}


@dataclass(frozen=True)
class MasterReference:
    """A field's master reference in one channel: per star and photometry."""

    magnitude: np.ndarray
    scatter: np.ndarray
    count: np.ndarray
    variable: np.ndarray


def read_master_reference(path: Path, field_id: int, channel: str) -> MasterReference:
    """The master reference the night's fit converged to, for a field and channel."""
    with h5py.File(path, "r") as source:
        group = source[f"FIELD{field_id}/{channel}"]
        return MasterReference(
            magnitude=np.asarray(group["master"]),
            scatter=np.asarray(group["master_scatter"]),
            count=np.asarray(group["master_count"]),
            variable=np.asarray(group["variable"]),
        )
