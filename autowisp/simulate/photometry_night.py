"""Synthetic photometry files of a night, with truth: for the magnitude fit and the
light curves, at sizes no image simulation reaches in a test or a benchmark.

Each frame's file is what the photometry step writes (:mod:`autowisp.io.photometry`).
A star's measured magnitude in a channel is its true magnitude, plus the frame's
transparency, the extinction at the star's own airmass, a colour term growing with
airmass, a smooth pattern over the frame (vignetting, the PSF's change), a star's
variability where it has one, and noise from its photons and the sky; the truth keeps
each term and each point's theoretical error.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autowisp.core.magfit import star_airmass
from autowisp.core.photometry import ChannelPhotometry, Flag
from autowisp.io.photometry import FramePhotometry, write_frame_photometry
from autowisp.io.provenance import Provenance

__all__ = ["PhotometryNight", "SyntheticPhotometry", "write_photometry_night"]

#: A site (deg, deg): the header keywords the magnitude fit reads.
SITE = (19.53, -155.58)

#: Per-channel extinction (mag/airmass) and colour term (mag per unit colour per airmass).
EXTINCTION = {"R": 0.09, "G1": 0.13, "G2": 0.13, "B": 0.21, "L": 0.13}
COLOUR_TERM = {"R": -0.02, "G1": 0.01, "G2": 0.01, "B": 0.04, "L": 0.0}


@dataclass(frozen=True)
class PhotometryNight:
    """What to simulate."""

    frames: int = 60
    stars: int = 2000
    channels: tuple[str, ...] = ("R", "G1", "G2", "B")
    apertures: tuple[float, ...] = (2.0, 3.0, 4.0)
    seed: int = 0
    width: int = 2000
    height: int = 1500
    exptime: float = 60.0
    cadence_s: float = 90.0
    jd_start: float = 2460563.65  # 2024-09-10 17:36 at the site; the field transits
    ra: float = 300.0  # field centre, deg; 3.5 h later, a 300-frame night's middle
    dec: float = 20.0
    radius: float = 6.0  # deg
    bright: float = 7.0  # magnitude range of the stars
    faint: float = 14.0
    zero_point: float = 21.0  # mag of 1 e⁻/s
    sky: float = 400.0  # e⁻ per pixel per exposure
    read_noise: float = 5.0
    variables: int = 3  # stars with a 5 % sinusoid
    cloudy: tuple[int, ...] = ()  # frames with a blob of cloud
    field_id: int = 1
    pattern: float = 0.02  # mag amplitude of the smooth pattern over the frame
    star_seed: int | None = None  # the stars' own seed (the same stars on several nights)
    star_list: str = ""  # the STARLIST reference the files name (list_row are its rows)


@dataclass
class SyntheticPhotometry:
    """The files written and the truth behind them."""

    paths: list[Path]
    jd_mid: np.ndarray  # (frames,)
    true_mag: dict[str, np.ndarray]  # channel -> (stars,) mag of 1 e⁻/s at airmass 0
    variable_mag: np.ndarray  # (frames, stars) the variability added (0 for most)
    variables: np.ndarray  # star indices of the variables
    sigma: dict[str, np.ndarray]  # channel -> (frames, stars, apertures+1) theoretical σ, mag
    ra: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dec: np.ndarray = field(default_factory=lambda: np.zeros(0))
    source_id: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    header: dict = field(default_factory=dict)


def _provenance(name: str, star_list: str = "") -> Provenance:
    return Provenance(step="photometry", step_version="synthetic", config_version="synthetic",
                      raw_file=name,
                      references={"STARLIST": star_list} if star_list else {})  # fmt: skip


def write_photometry_night(directory: Path, night: PhotometryNight) -> SyntheticPhotometry:
    """Write one photometry file per frame under ``directory``; return the truth."""
    rng = np.random.default_rng(night.seed)
    directory.mkdir(parents=True, exist_ok=True)
    n = night.stars
    # Stars: magnitudes with more faint than bright ones, colours, positions.
    stars_rng = rng if night.star_seed is None else np.random.default_rng(night.star_seed)
    u = stars_rng.uniform(0, 1, n)
    base = night.bright + (night.faint - night.bright) * u ** (1 / 2.2)
    colour = stars_rng.normal(0.8, 0.4, n)
    true_mag = {
        "R": base - 0.3 * colour,
        "G1": base,
        "G2": base + 0.002,
        "B": base + 0.7 * colour,
        "L": base,
    }
    x0 = stars_rng.uniform(10, night.width - 10, n)
    y0 = stars_rng.uniform(10, night.height - 10, n)
    scale = 2 * night.radius / np.hypot(night.width, night.height)  # deg / px
    dec = night.dec + (y0 - night.height / 2) * scale
    ra = night.ra + (x0 - night.width / 2) * scale / np.cos(np.radians(dec))
    source_id = np.where(base < 10, np.arange(n, dtype=np.int64) + 10**15, -1)
    list_row = np.arange(n, dtype=np.int64)
    variables = rng.choice(np.flatnonzero((base > 8.5) & (base < 11)), night.variables,
                           replace=False)  # fmt: skip
    frames = night.frames
    jd_mid = night.jd_start + np.arange(frames) * night.cadence_s / 86400.0
    phase = rng.uniform(0, 2 * np.pi, variables.size)
    period = rng.uniform(0.05, 0.2, variables.size)
    variable_mag = np.zeros((frames, n))
    variable_mag[:, variables] = 0.05 * np.sin(
        2 * np.pi * (jd_mid[:, None] - jd_mid[0]) / period + phase
    )
    transparency = 0.03 * np.abs(rng.standard_normal(frames))
    sigma = {c: np.zeros((frames, n, len(night.apertures) + 1)) for c in night.channels}
    paths = []
    header = {"LAT-OBS": SITE[0], "LONG-OBS": SITE[1]}
    start = dt.datetime(2024, 9, 11, 5, 0, tzinfo=dt.UTC)
    coefficients = rng.normal(0, night.pattern, (frames, 6))
    for i in range(frames):
        x = x0 + rng.normal(0, 2.0)
        y = y0 + rng.normal(0, 2.0)
        air = star_airmass(ra, dec, jd_mid[i], *SITE)
        u_x, u_y = 2 * x / night.width - 1, 2 * y / night.height - 1
        c = coefficients[i]
        pattern = c[0] * u_x + c[1] * u_y + c[2] * u_x**2 + c[3] * u_x * u_y + c[4] * u_y**2
        cloud = np.zeros(n)
        if i in night.cloudy:
            cx, cy = rng.uniform(-0.5, 0.5, 2)
            cloud = 0.4 * np.exp(-0.5 * ((u_x - cx) ** 2 + (u_y - cy) ** 2) / 0.35**2)
        channels: dict[str, ChannelPhotometry] = {}
        for name in night.channels:
            observed = (true_mag[name] + transparency[i] + EXTINCTION[name] * air
                        + COLOUR_TERM[name] * (colour - 0.8) * air + pattern + cloud
                        + variable_mag[i])  # fmt: skip
            total = night.exptime * 10 ** (-0.4 * (observed - night.zero_point))
            fluxes, errors = [], []
            for k, radius in enumerate((*night.apertures, None)):
                if radius is None:  # the PSF flux: the whole star, an effective area of 4 px²
                    fraction, area = 1.0, 12.0
                else:
                    fraction, area = 1 - np.exp(-0.5 * (radius / 1.0) ** 2), np.pi * radius**2
                signal = total * fraction
                variance = signal + area * (night.sky + night.read_noise**2)
                error = np.sqrt(variance)
                fluxes.append(signal + rng.standard_normal(n) * error)
                errors.append(error)
                sigma[name][i, :, k] = 1.0857 * error / signal
            flux = np.column_stack(fluxes[:-1]) / np.array(
                [1 - np.exp(-0.5 * r**2) for r in night.apertures]
            )
            flux_err = np.column_stack(errors[:-1]) / np.array(
                [1 - np.exp(-0.5 * r**2) for r in night.apertures]
            )
            flags = np.where(base < night.bright + 0.3, Flag.SATURATED, 0).astype(np.uint16)
            off = (x < 0) | (y < 0) | (x > night.width) | (y > night.height)
            flags[off] |= np.uint16(Flag.OFF_FRAME)
            zeros = np.zeros(n)
            channels[name] = ChannelPhotometry(
                channel=name, flux=flux, flux_err=flux_err, psf_flux=fluxes[-1],
                psf_flux_err=errors[-1], psf_chi2=np.ones(n), background=np.full(n, night.sky),
                background_err=np.full(n, np.sqrt(night.sky)), flags=flags, shape_map=None,
                shapes=np.zeros((n, 3)), qc={"fwhm": 2.0 + 0.01 * i}, x=x, y=y, dx=zeros,
                dy=zeros,
            )  # fmt: skip
        name = f"synthetic_{i:05d}.fits"
        product = FramePhotometry(
            source_id=source_id, x=x, y=y, channels=channels, apertures=night.apertures,
            mode="prf", layout="RGGB" if "R" in night.channels else "MONO", raw_file=name,
            date_obs=(start + dt.timedelta(seconds=float(i * night.cadence_s))).isoformat(),
            exptime=night.exptime, qc={}, provenance=_provenance(name, night.star_list), ra=ra,
            dec=dec, list_row=list_row, star_flags=np.zeros(n, np.int64), field_id=night.field_id,
        )  # fmt: skip
        path = directory / f"{name[:-5]}.h5"
        write_frame_photometry(path, product)
        paths.append(path)
    return SyntheticPhotometry(
        paths=paths, jd_mid=jd_mid,
        true_mag={c: true_mag[c] for c in night.channels}, variable_mag=variable_mag,
        variables=variables, sigma=sigma, ra=ra, dec=dec, source_id=source_id,
        header=header,
    )  # fmt: skip
