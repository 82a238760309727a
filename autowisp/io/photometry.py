"""A frame's photometry: one HDF5 file per frame, one group per channel.

Layout (written once, atomically, by the photometry step):

``/`` attributes
    provenance (:mod:`autowisp.io.provenance`: RAWFILE, RAWSHA, CALFRAME, ASTROM, ...),
    ``raw_file``, ``date_obs`` (UTC, ISO), ``exptime`` (s), ``apertures`` (px, the
    radii of the ``flux`` columns), ``mode`` (``prf`` or ``plain``), ``layout``,
    ``channels`` (comma-separated group names), ``qc`` (JSON), ``flag_bits`` (JSON:
    name → bit of :class:`autowisp.core.photometry.Flag`), ``field_id`` (the frame's
    field, -1 for none).
``/<channel>`` for each channel ``R``, ``G1``, ``G2``, ``B`` (or ``MONO``), datasets over
    the stars measured (rows in the same order in every channel):
    ``source_id`` (int64, Gaia DR3 id, -1 for a star beyond the catalogue), ``ra``,
    ``dec`` (deg, the star's position in the night's star list or the catalogue),
    ``list_row`` (the star's row in the field's table of the night's star list, the
    ``STARLIST`` product; -1 for a catalogue star the list does not hold),
    ``star_flags`` (the list's :class:`autowisp.vocabulary.StarFlag` bits), ``x``,
    ``y`` (px, 0-based full-frame coordinates, pixel centres at integers: where the
    channel measured the star, the WCS-projected position plus the channel's smooth
    position correction), ``dx``, ``dy`` (px, that correction; the projected position
    is ``x − dx``), ``flux``, ``flux_err`` (stars × apertures, e⁻: the flux an evenly
    sensitive detector would collect within each radius, in the channel's share, so a
    well-sampled star's channel pixels sum to it),
    ``psf_flux``, ``psf_flux_err`` (e⁻, the whole PRF), ``psf_chi2`` (per degree of
    freedom), ``background``, ``background_err`` (e⁻ per channel pixel), ``flags``
    (uint16), ``psf_s``, ``psf_d``, ``psf_k`` (the PSF shape at each star, px⁻²);
    attributes: the PSF map (``psf_profile``, ``psf_beta``, ``psf_order_xy``,
    ``psf_order_mag``, ``psf_centre``, ``psf_half``, ``psf_mag_zero``) and dataset
    ``psf_coefficients`` (3 × terms: S, D, K), and the channel's ``qc`` (JSON; its
    ``psf_model`` says which model gave ``psf_flux``).
    With the bicubic PSF model (``psf_model = bicubic``) also the map of the PSF fluxes
    (:class:`autowisp.core.bicubic.BicubicPSFMap`): datasets ``bicubic_x_bounds``,
    ``bicubic_y_bounds`` (px, cell boundaries about the star), ``bicubic_coefficients``
    (free parameters × terms) and attributes ``bicubic_order_xy``,
    ``bicubic_order_mag``, ``bicubic_frame_shape``, ``bicubic_mag_zero``,
    ``bicubic_mag_scale``, ``bicubic_mag_range``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from autowisp.core.bicubic import BicubicGrid, BicubicPSFMap
from autowisp.core.photometry import ChannelPhotometry, Flag
from autowisp.core.psf import ShapeMap
from autowisp.io.atomic import atomic_path
from autowisp.io.provenance import Provenance, stamp

__all__ = ["FramePhotometry", "read_frame_photometry", "write_frame_photometry"]

#: The group name of each channel (a monochrome channel is 'L' in the code, 'MONO' here).
GROUP_OF = {"L": "MONO"}


@dataclass(frozen=True)
class FramePhotometry:
    """Everything the photometry file holds (see the module docstring)."""

    source_id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    channels: Mapping[str, ChannelPhotometry]
    apertures: tuple[float, ...]
    mode: str
    layout: str
    raw_file: str
    date_obs: str
    exptime: float
    qc: Mapping[str, Any]
    provenance: Provenance
    ra: np.ndarray | None = None
    dec: np.ndarray | None = None
    list_row: np.ndarray | None = None
    star_flags: np.ndarray | None = None
    field_id: int | None = None


def _json(value: Any) -> str:
    return json.dumps(value, default=float, allow_nan=True)


def write_frame_photometry(path: Path, product: FramePhotometry) -> None:
    """Write ``product`` to ``path`` atomically."""
    names = []
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as out:
        stamp(out.attrs, product.provenance)
        out.attrs["raw_file"] = product.raw_file
        out.attrs["date_obs"] = product.date_obs
        out.attrs["exptime"] = float(product.exptime)
        out.attrs["apertures"] = np.asarray(product.apertures, float)
        out.attrs["mode"] = product.mode
        out.attrs["layout"] = product.layout
        out.attrs["qc"] = _json(product.qc)
        out.attrs["flag_bits"] = _json({flag.name: int(flag.value) for flag in Flag})
        out.attrs["field_id"] = -1 if product.field_id is None else int(product.field_id)
        size = np.asarray(product.source_id).size
        star_columns = {
            "ra": (product.ra, np.float64, np.nan),
            "dec": (product.dec, np.float64, np.nan),
            "list_row": (product.list_row, np.int64, -1),
            "star_flags": (product.star_flags, np.int64, 0),
        }
        for name, channel in product.channels.items():
            group_name = GROUP_OF.get(name, name)
            names.append(group_name)
            group = out.create_group(group_name)
            group["source_id"] = np.asarray(product.source_id, np.int64)
            for key, (values, dtype, missing) in star_columns.items():
                column = np.full(size, missing, dtype) if values is None else values
                group[key] = np.asarray(column, dtype)
            x = channel.x if channel.x is not None else product.x
            y = channel.y if channel.y is not None else product.y
            group["x"] = np.asarray(x, float)
            group["y"] = np.asarray(y, float)
            group["dx"] = np.asarray(x, float) - np.asarray(product.x, float)
            group["dy"] = np.asarray(y, float) - np.asarray(product.y, float)
            for key in ("flux", "flux_err", "psf_flux", "psf_flux_err", "psf_chi2",
                        "background", "background_err"):  # fmt: skip
                group.create_dataset(key, data=np.asarray(getattr(channel, key), np.float64))
            group["flags"] = np.asarray(channel.flags, np.uint16)
            for i, key in enumerate(("psf_s", "psf_d", "psf_k")):
                group[key] = np.asarray(channel.shapes[:, i], float)
            group.attrs["qc"] = _json(channel.qc)
            shape_map = channel.shape_map
            if shape_map is not None:
                group.attrs["psf_profile"] = shape_map.kind
                group.attrs["psf_beta"] = float(shape_map.beta)
                group.attrs["psf_order_xy"] = int(shape_map.order_xy)
                group.attrs["psf_order_mag"] = int(shape_map.order_mag)
                group.attrs["psf_centre"] = np.asarray(shape_map.centre, float)
                group.attrs["psf_half"] = np.asarray(shape_map.half, float)
                group.attrs["psf_mag_zero"] = float(shape_map.mag_zero)
                group.attrs["psf_mag_range"] = np.asarray(shape_map.mag_range, float)
                group["psf_coefficients"] = np.asarray(shape_map.coefficients, float)
            bicubic = channel.bicubic_map
            if bicubic is not None:
                group["bicubic_x_bounds"] = np.asarray(bicubic.grid.x_bounds, float)
                group["bicubic_y_bounds"] = np.asarray(bicubic.grid.y_bounds, float)
                group["bicubic_coefficients"] = np.asarray(bicubic.coefficients, float)
                group.attrs["bicubic_order_xy"] = int(bicubic.order_xy)
                group.attrs["bicubic_order_mag"] = int(bicubic.order_mag)
                group.attrs["bicubic_frame_shape"] = np.asarray(bicubic.frame_shape, np.int64)
                group.attrs["bicubic_mag_zero"] = float(bicubic.mag_zero)
                group.attrs["bicubic_mag_scale"] = float(bicubic.mag_scale)
                group.attrs["bicubic_mag_range"] = np.asarray(bicubic.mag_range, float)
        out.attrs["channels"] = ",".join(names)


def _offsets(group: Any, name: str) -> np.ndarray:
    """A channel's position correction (files of step version < 3 have none: zeros)."""
    if name in group:
        return np.asarray(group[name])
    return np.zeros(len(group["x"]))


def read_frame_photometry(path: Path) -> FramePhotometry:
    """Read a photometry file written by :func:`write_frame_photometry`."""
    with h5py.File(path, "r") as source:
        attrs = source.attrs
        names = [n for n in str(attrs["channels"]).split(",") if n]
        channels: dict[str, ChannelPhotometry] = {}
        first = None
        for name in names:
            group = source[name]
            first = first or group
            shape_map = None
            if "psf_coefficients" in group:
                shape_map = ShapeMap(
                    kind=str(group.attrs["psf_profile"]),
                    beta=float(group.attrs["psf_beta"]),
                    order_xy=int(group.attrs["psf_order_xy"]),
                    order_mag=int(group.attrs["psf_order_mag"]),
                    centre=tuple(float(v) for v in group.attrs["psf_centre"]),  # type: ignore[arg-type]
                    half=tuple(float(v) for v in group.attrs["psf_half"]),  # type: ignore[arg-type]
                    mag_zero=float(group.attrs["psf_mag_zero"]),
                    coefficients=np.asarray(group["psf_coefficients"]),
                    used=0,
                    rms=(np.nan, np.nan, np.nan),
                    mag_range=tuple(float(v) for v in group.attrs["psf_mag_range"]),  # type: ignore[arg-type]
                )
            bicubic = None
            if "bicubic_coefficients" in group:
                a = group.attrs
                frame_shape = tuple(int(v) for v in a["bicubic_frame_shape"])
                bicubic = BicubicPSFMap(
                    grid=BicubicGrid(
                        np.asarray(group["bicubic_x_bounds"]),
                        np.asarray(group["bicubic_y_bounds"]),
                    ),
                    coefficients=np.asarray(group["bicubic_coefficients"]),
                    order_xy=int(a["bicubic_order_xy"]),
                    order_mag=int(a["bicubic_order_mag"]),
                    frame_shape=(frame_shape[0], frame_shape[1]),
                    mag_zero=float(a["bicubic_mag_zero"]),
                    mag_scale=float(a["bicubic_mag_scale"]),
                    mag_range=(float(a["bicubic_mag_range"][0]), float(a["bicubic_mag_range"][1])),
                )
            channels[name] = ChannelPhotometry(
                channel=name,
                flux=np.asarray(group["flux"]),
                flux_err=np.asarray(group["flux_err"]),
                psf_flux=np.asarray(group["psf_flux"]),
                psf_flux_err=np.asarray(group["psf_flux_err"]),
                psf_chi2=np.asarray(group["psf_chi2"]),
                background=np.asarray(group["background"]),
                background_err=np.asarray(group["background_err"]),
                flags=np.asarray(group["flags"]),
                shape_map=shape_map,
                shapes=np.column_stack(
                    [np.asarray(group[k]) for k in ("psf_s", "psf_d", "psf_k")]
                ),
                qc=json.loads(str(group.attrs["qc"])),
                bicubic_map=bicubic,
                x=np.asarray(group["x"]),
                y=np.asarray(group["y"]),
                dx=_offsets(group, "dx"),
                dy=_offsets(group, "dy"),
            )
        empty = np.zeros(0)

        def star_column(key: str) -> np.ndarray | None:  # none in files of step version < 5
            return np.asarray(first[key]) if first is not None and key in first else None

        field_id = int(attrs.get("field_id", -1))
        return FramePhotometry(
            source_id=np.asarray(first["source_id"])
            if first is not None
            else empty.astype(np.int64),
            x=np.asarray(first["x"]) - _offsets(first, "dx") if first is not None else empty,
            y=np.asarray(first["y"]) - _offsets(first, "dy") if first is not None else empty,
            channels=channels,
            apertures=tuple(float(v) for v in attrs["apertures"]),
            mode=str(attrs["mode"]),
            layout=str(attrs["layout"]),
            raw_file=str(attrs["raw_file"]),
            date_obs=str(attrs["date_obs"]),
            exptime=float(attrs["exptime"]),
            qc=json.loads(str(attrs["qc"])),
            provenance=Provenance.read(dict(attrs)),
            ra=star_column("ra"),
            dec=star_column("dec"),
            list_row=star_column("list_row"),
            star_flags=star_column("star_flags"),
            field_id=None if field_id < 0 else field_id,
        )
