"""Ground truth of a simulated night, written beside the frames as ``truth.h5``.

Layout (HDF5; pixel positions 0-based with pixel centres at integers, see
:mod:`autowisp.core.bayer`; fluxes in electrons per exposure):

``/`` attributes
    ``config`` and ``camera`` (JSON), ``channels`` (e.g. ``R,G1,G2,B``), ``colours``
    (``R,G,B``), ``apertures`` (px), ``notes``.
``/stars``
    ``star_id`` (Gaia DR3 source_id, negative for synthetic stars), ``ra``, ``dec``
    (deg, ICRS), ``gmag``, ``bp_rp``, ``mag`` (n, 3: camera R, G, B magnitudes).
``/frames``
    Every raw file: ``filename``, ``imagetyp``, ``jd_start`` (UTC), ``exptime`` (s),
    ``bad_reason`` (empty for good frames; flats can be ``clouds`` or ``overexposed``).
``/object`` (object frames × stars)
    ``filename``, ``jd_mid``, ``wcs_header`` (FITS header text of the true TAN-SIP
    WCS), ``centre_airmass``, ``cloudy``, ``sky`` (mean sky e⁻/px per channel, before
    the flat), ``x``, ``y``, ``airmass`` (per star), ``transparency`` (clouds, per
    star), ``flux`` (frames, stars, 3 colours: expected e⁻ over the whole PSF before
    the flat, with extinction, clouds and variability, without scintillation),
    ``fwhm_major``, ``fwhm_minor`` (px), ``theta`` (rad), ``scintillation`` (rms
    fraction), ``scintillation_factor`` (the realised factor), ``rendered`` (star
    drawn on the frame), ``saturated`` (frames, stars, channels),
    ``aperture_signal``, ``aperture_npix``, ``aperture_background``,
    ``aperture_sigma`` (frames, stars, channels, apertures: expected e⁻ after the
    flat in the channel's pixels whose centre is within the radius, their count,
    expected sky + dark e⁻ there, theoretical noise e⁻), ``clouds`` (frame, x, y,
    radius, depth of each cloud blob) and ``cosmic_rays`` (frame, x, y, e⁻).
``/calibration``
    ``bias`` (ADU), ``dark_rate`` (e⁻/s), ``flat`` (response), ``hot``, ``dead``.
``/variables``
    JSON list of the variable stars with their parameters (attribute ``list``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from autowisp.core.bayer import COLOURS, channels
from autowisp.io.atomic import atomic_path

__all__ = ["FrameRecord", "ObjectTruth", "Truth", "read_truth", "write_truth"]


@dataclass(frozen=True)
class FrameRecord:
    """One raw file of the night."""

    filename: str
    kind: str
    jd_start: float
    exptime: float
    bad_reason: str = ""


@dataclass
class ObjectTruth:
    """Per-frame, per-star truth of the object frames, filled frame by frame."""

    star_index: np.ndarray
    arrays: dict[str, np.ndarray]
    names: list[str] = field(default_factory=list)
    wcs_headers: list[str] = field(default_factory=list)
    clouds: list[np.ndarray] = field(default_factory=list)
    cosmic_rays: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def empty(cls, frames: int, star_index: np.ndarray, n_channels: int, n_apertures: int):
        stars = star_index.size
        nan = np.nan
        arrays = {
            "jd_mid": np.full(frames, nan),
            "centre_airmass": np.full(frames, nan),
            "cloudy": np.zeros(frames, bool),
            "sky": np.full((frames, n_channels), nan),
            "x": np.full((frames, stars), nan),
            "y": np.full((frames, stars), nan),
            "airmass": np.full((frames, stars), nan, np.float32),
            "transparency": np.full((frames, stars), nan, np.float32),
            "flux": np.full((frames, stars, 3), nan),
            "fwhm_major": np.full((frames, stars), nan, np.float32),
            "fwhm_minor": np.full((frames, stars), nan, np.float32),
            "theta": np.full((frames, stars), nan, np.float32),
            "scintillation": np.full((frames, stars), nan, np.float32),
            "scintillation_factor": np.full((frames, stars), nan, np.float32),
            "rendered": np.zeros((frames, stars), bool),
            "saturated": np.zeros((frames, stars, n_channels), bool),
            "aperture_signal": np.full((frames, stars, n_channels, n_apertures), nan, np.float32),
            "aperture_npix": np.zeros((frames, stars, n_channels, n_apertures), np.int16),
            "aperture_background": np.full(
                (frames, stars, n_channels, n_apertures), nan, np.float32
            ),
            "aperture_sigma": np.full((frames, stars, n_channels, n_apertures), nan, np.float32),
        }
        return cls(star_index, arrays)

    def record(
        self,
        i: int,
        *,
        name,
        jd_mid,
        wcs,
        shape,
        x,
        y,
        airmass,
        centre_airmass,
        transparency,
        flux,
        fwhm,
        scintillation,
        inside,
        exposure,
        sky,
        cloudy,
        clouds,
        detector,
    ) -> None:
        """Store frame ``i``; arrays over stars are over all the camera's stars, except
        ``exposure`` (rendered stars only, selected by ``inside``)."""
        a = self.arrays
        self.names.append(name)
        self.wcs_headers.append(wcs.to_header(shape=shape).tostring(sep="\n"))
        a["jd_mid"][i] = jd_mid
        a["centre_airmass"][i] = centre_airmass
        a["cloudy"][i] = cloudy
        a["sky"][i] = sky
        a["x"][i], a["y"][i] = x, y
        a["airmass"][i] = airmass
        a["transparency"][i] = transparency
        a["flux"][i] = flux
        a["fwhm_major"][i], a["fwhm_minor"][i], a["theta"][i] = fwhm
        a["scintillation"][i] = scintillation
        a["scintillation_factor"][i, inside] = exposure.scintillation_factor
        a["rendered"][i] = inside
        stats = exposure.apertures
        a["aperture_signal"][i, inside] = stats.signal
        a["aperture_npix"][i, inside] = stats.npix
        a["aperture_background"][i, inside] = stats.background
        a["aperture_sigma"][i, inside] = stats.sigma
        a["saturated"][i, inside] = _saturated(detector, exposure.mean, x[inside], y[inside])
        self.clouds.append(np.column_stack([np.full(len(clouds), i), clouds]))
        self.cosmic_rays.append(
            np.column_stack([np.full(len(exposure.cosmic_rays), i), exposure.cosmic_rays])
        )


def _saturated(detector, mean_electrons: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per star and channel: does the expected signal reach saturation within ±2 px?"""
    spec = detector.spec
    ny, nx = spec.shape
    offsets = np.arange(-2, 3)
    cx = np.clip(np.rint(x).astype(int)[:, None, None] + offsets[None, None, :], 0, nx - 1)
    cy = np.clip(np.rint(y).astype(int)[:, None, None] + offsets[None, :, None], 0, ny - 1)
    adu = detector.bias[cy, cx] + mean_electrons[cy, cx] / spec.gain
    channel = detector.channel_map[cy, cx]
    flags = np.zeros((x.size, detector.n_channels), bool)
    for c in range(detector.n_channels):
        flags[:, c] = np.any((channel == c) & (adu >= spec.saturation_adu), axis=(1, 2))
    return flags


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=lambda o: np.asarray(o).tolist())


def write_truth(
    path: Path, *, config, plan, detector, stars, truth: ObjectTruth, frames, variables
) -> None:
    """Write ``truth.h5`` atomically; ``stars`` are the camera's stars (``SkyStars``)."""
    strings = h5py.string_dtype()
    with atomic_path(path) as temporary, h5py.File(temporary, "w", track_order=False) as out:
        out.attrs["config"] = _json({k: v for k, v in asdict(config).items()})
        out.attrs["camera"] = _json(asdict(plan.spec))
        out.attrs["channels"] = ",".join(ch.name for ch in channels(config.layout))
        out.attrs["colours"] = ",".join(COLOURS)
        out.attrs["apertures"] = np.asarray(config.apertures, dtype=float)
        out.attrs["notes"] = __doc__ or ""
        stars_group = out.create_group("stars")
        index = truth.star_index
        for name in ("star_id", "ra", "dec", "gmag", "bp_rp", "mag"):
            stars_group.create_dataset(name, data=getattr(stars, name))
        table = out.create_group("frames")
        table.create_dataset("filename", data=[f.filename for f in frames], dtype=strings)
        table.create_dataset("imagetyp", data=[f.kind for f in frames], dtype=strings)
        table.create_dataset("jd_start", data=np.array([f.jd_start for f in frames]))
        table.create_dataset("exptime", data=np.array([f.exptime for f in frames]))
        table.create_dataset("bad_reason", data=[f.bad_reason for f in frames], dtype=strings)
        objects = out.create_group("object")
        objects.create_dataset("filename", data=truth.names, dtype=strings)
        objects.create_dataset("wcs_header", data=truth.wcs_headers, dtype=strings)
        for name, values in truth.arrays.items():
            objects.create_dataset(name, data=values)
        objects.create_dataset("clouds", data=np.concatenate(truth.clouds).reshape(-1, 5))
        objects.create_dataset(
            "cosmic_rays", data=np.concatenate(truth.cosmic_rays).reshape(-1, 4)
        )
        calibration = out.create_group("calibration")
        calibration.create_dataset("bias", data=detector.bias.astype(np.float32))
        calibration.create_dataset("dark_rate", data=detector.dark_rate.astype(np.float32))
        calibration.create_dataset("flat", data=detector.flat.astype(np.float32))
        calibration.create_dataset("hot", data=detector.hot)
        calibration.create_dataset("dead", data=detector.dead)
        out.create_group("variables").attrs["list"] = _json(
            [
                asdict(v) | {"star_index": int(np.searchsorted(index, v.star_index))}
                for v in variables
                if v.star_index in set(index.tolist())
            ]
        )


@dataclass(frozen=True)
class Truth:
    """A ``truth.h5`` read into memory (see the module docstring for the fields)."""

    attrs: dict[str, Any]
    stars: dict[str, np.ndarray]
    frames: dict[str, np.ndarray]
    object: dict[str, np.ndarray]
    calibration: dict[str, np.ndarray]
    variables: list[dict[str, Any]]

    def wcs(self, frame: int) -> WCS:
        """The true WCS of object frame ``frame`` as an astropy WCS."""
        header = fits.Header.fromstring(self.object["wcs_header"][frame], sep="\n")
        return WCS(header)

    @property
    def camera(self) -> dict[str, Any]:
        return dict(json.loads(self.attrs["camera"]))

    @property
    def channels(self) -> list[str]:
        return str(self.attrs["channels"]).split(",")


def read_truth(path: str | Path) -> Truth:
    """Load a ``truth.h5`` written by :func:`write_truth`."""

    def load(group: h5py.Group) -> dict[str, np.ndarray]:
        result = {}
        for name, dataset in group.items():
            if h5py.check_string_dtype(dataset.dtype) is not None:
                result[name] = np.array(dataset.asstr()[()], dtype=object)
            else:
                result[name] = dataset[()]
        return result

    with h5py.File(path, "r") as stream:
        attrs = {key: stream.attrs[key] for key in stream.attrs}
        return Truth(
            attrs=attrs,
            stars=load(stream["stars"]),
            frames=load(stream["frames"]),
            object=load(stream["object"]),
            calibration=load(stream["calibration"]),
            variables=json.loads(stream["variables"].attrs["list"]),
        )
