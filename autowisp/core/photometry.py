"""Photometry of one channel of a calibrated frame at given star positions.

:func:`measure_channel` runs, for the stars of the field that fall on the frame:

1. the annulus background of every star (other stars' discs excluded);
2. per-source PSF fits of the brightest isolated, unsaturated stars and the smooth PSF
   map over the frame (:mod:`autowisp.core.psf`); with ``profile='auto'`` the radial
   profile is a Moffat with β the median of the brightest stars' own fits (a Gaussian
   past β 10); the fits' centres correct every star's position by a smooth polynomial
   over the frame (:mod:`autowisp.core.positions`; ``refine_positions``);
3. PSF-fitting fluxes with the mapped PRF (:func:`autowisp.core.aperture.psf_photometry`);
4. aperture photometry in each radius, PRF-weighted (``mode='prf'``) or exact-area
   (``mode='plain'``).

Fluxes are the channel's collected flux in e⁻ (the sensitivity map has mean 1), the
aperture fluxes those of an evenly sensitive detector within each radius. Problems with
single stars become :class:`Flag` bits, never dropped rows.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from autowisp.core.aperture import (
    BAD_MASKED,
    BAD_SATURATED,
    TOUCH_EDGE,
    TOUCH_MASKED,
    TOUCH_SATURATED,
    annulus_background,
    aperture_photometry,
    clear_owners,
    paint_owners,
    psf_photometry,
)
from autowisp.core.bayer import Channel
from autowisp.core.bicubic import (
    BAD_PIXEL,
    FAILED,
    BicubicPSFMap,
    bicubic_psf_photometry,
    fit_bicubic_map,
)
from autowisp.core.calibration import MaskBit
from autowisp.core.positions import NONE, PositionCorrection, fit_pooled_correction
from autowisp.core.psf import (
    _NODES,
    _WEIGHTS,
    PROFILES,
    ShapeMap,
    SourceShapes,
    fit_shape_map,
    fit_source_shapes,
    shape_from_fwhm,
)
from autowisp.core.subpixel import channel_map

__all__ = [
    "SPOILING",
    "ChannelPhotometry",
    "Flag",
    "PhotometryConfig",
    "PreparedChannel",
    "bad_codes",
    "finish_channel",
    "measure_channel",
    "measure_mosaic",
    "prepare_channel",
]


#: How much fainter (mag) a neighbour must be for a star to shape the PSF map: a
#: neighbour whose core falls in the star's fit box (5: 1 % of the star's flux), one
#: within twice the fit radius whose wings alone reach it (2.5: 10 %). The first is also
#: how much fainter a neighbour within the largest aperture + 2 FWHM must be for the star
#: not to be flagged CROWDED.
NEIGHBOUR_DMAG = (5.0, 2.5)
#: Fewest shape stars wanted before the neighbours' contrasts asked of them are relaxed.
MIN_SHAPE_STARS = 60
#: The contrasts (mag) asked of a shape star's neighbours, core and wing, strictest first:
#: NEIGHBOUR_DMAG, then half that, then only that they are fainter. On the demo's crowded
#: 512x512 frames (1,100 listed stars) the strict levels leave 11-31 shape stars and the
#: PSF fits of the bright stars scatter 12-28 mmag; the loosest 10-19 mmag (expected
#: 9-22); on fields of 70 stars the strict level is enough and stays.
SHAPE_CONTRASTS = ((5.0, 2.5), (2.5, 1.25), (0.0, 0.0))


class Flag(enum.IntFlag):
    """Why a star's measurement should be used with care (bits of ``flags``)."""

    SATURATED = 1  # a saturated pixel in the largest aperture (measured from the rest)
    MASKED = 2  # hot, dead or cosmic-ray pixels in the largest aperture
    EDGE = 4  # the largest aperture crosses the frame's edge
    OFF_FRAME = 8  # the centre is off the frame: no measurement
    CROWDED = 16  # a star not 5 mag fainter within the largest aperture + 2 FWHM
    NO_BACKGROUND = 32  # too few annulus pixels: no background, no fluxes
    PSF_FAILED = 64  # no PSF flux (no usable pixels)
    UNCALIBRATED = 128  # the frame was not calibrated with masters
    LOST_WEIGHT = 256  # over 10 % of the largest aperture's weight was on unusable pixels


#: Flags that make a measurement unusable for a light curve (CROWDED and UNCALIBRATED
#: only warn: a crowded star's neighbours are fitted with it).
SPOILING = (Flag.SATURATED | Flag.MASKED | Flag.EDGE | Flag.OFF_FRAME | Flag.NO_BACKGROUND
            | Flag.PSF_FAILED | Flag.LOST_WEIGHT)  # fmt: skip


#: The default annulus's area in units of the largest aperture's. The background's
#: error is the sky's noise over the annulus's pixels, and it enters each aperture scaled
#: by the aperture's pixel count: the former 6 px wide annulus (6 times the area of a
#: 5 px aperture at FWHM 2.2 px) added 8 % to that aperture's sky noise. On the simulated
#: 60-frame night (512x384, RGGB) the median RMS/theory after magnitude fitting went, with
#: annuli of 6, 16 and 32 times the area: R 1.33, 1.31, 1.39; G1 1.24, 1.21, 1.17; G2 1.33,
#: 1.23, 1.17; B 1.13, 1.14, 1.09 (±0.04 per figure: 70-85 stars). Wider costs
#: background pixels (0.2 to 0.4 s per channel and pass for 20,000 stars of a full
#: frame) and gathers more of the unlisted stars' and the clouds' light.
ANNULUS_AREA = 16.0


@dataclass(frozen=True)
class PhotometryConfig:
    """Settings of :func:`measure_channel` (radii in px, of the full frame)."""

    apertures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0)
    mode: str = "prf"  # or 'plain'
    profile: str = "auto"  # 'gaussian', 'moffat' or 'auto'
    beta: float = 3.5
    annulus: tuple[float, float] = (0.0, 0.0)  # (inner, outer); 0: from the apertures
    # (inner: 2 FWHM beyond the largest; outer: ANNULUS_AREA times its area)
    shape_stars: int = 150
    shape_order_xy: int = 3
    shape_order_mag: int = 1
    psf_radius: float = 0.0  # 0: 2 FWHM + one channel pixel
    iterations: int = 4
    clip: float = 3.0
    psf_model: str = "analytic"  # PSF fluxes from the analytic map, or 'bicubic'
    refine_positions: bool = True  # correct the given positions from the PSF fits' centres

    def __post_init__(self) -> None:
        if not self.apertures or min(self.apertures) <= 0:
            raise ValueError(f"apertures must be positive radii (px), got {self.apertures!r}")
        if self.mode not in ("prf", "plain"):
            raise ValueError(f"photometry mode must be 'prf' or 'plain', got {self.mode!r}")
        if self.psf_model not in ("analytic", "bicubic"):
            raise ValueError(f"PSF model must be 'analytic' or 'bicubic', got {self.psf_model!r}")
        if self.profile not in ("auto", *PROFILES):
            raise ValueError(
                f"PSF profile must be 'auto', 'gaussian' or 'moffat', got {self.profile!r}"
            )


@dataclass(frozen=True)
class ChannelPhotometry:
    """One channel's measurements: rows follow the stars given, columns the apertures."""

    channel: str
    flux: np.ndarray  # (n, n_ap) e⁻
    flux_err: np.ndarray
    psf_flux: np.ndarray  # (n,) e⁻
    psf_flux_err: np.ndarray
    psf_chi2: np.ndarray
    background: np.ndarray  # (n,) e⁻ per channel pixel
    background_err: np.ndarray
    flags: np.ndarray  # (n,) uint16 Flag bits
    shape_map: ShapeMap | None
    shapes: np.ndarray  # (n, 3) S, D, K used for each star
    qc: dict[str, float | str] = field(default_factory=dict)
    bicubic_map: BicubicPSFMap | None = None  # with psf_model 'bicubic': the PSF fluxes' map
    # where the stars were measured (px): the given positions plus ``correction``'s offsets
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    dx: np.ndarray | None = None  # the offsets applied (px)
    dy: np.ndarray | None = None
    correction: PositionCorrection = NONE


#: Shape stars whose own fit has a larger χ²/dof do not correct the positions: on the demo
#: night (a G < 10 catalogue on a field of stars to G 13.5) those fits' centres were
#: 0.02–0.5 px off the truth, those of χ²/dof < 2 mostly within 0.03 px.
POSITION_CHI2 = 3.0


@dataclass
class PreparedChannel:
    """One channel after :func:`prepare_channel`: backgrounds, flags, the shape stars'
    fits and the PSF map at the given positions; :func:`finish_channel` measures it."""

    image: np.ndarray
    error: np.ndarray
    bad: np.ndarray
    channel: Channel
    x: np.ndarray
    y: np.ndarray
    mag: np.ndarray
    config: PhotometryConfig
    fwhm_guess: float
    on: np.ndarray
    flags: np.ndarray
    level: np.ndarray
    level_err: np.ndarray
    good: np.ndarray  # bad == 0
    chosen: np.ndarray  # indices of the shape stars
    shape_map: ShapeMap | None
    fits: SourceShapes | None
    qc: dict[str, float | str]

    def offsets(self) -> tuple[np.ndarray, ...]:
        """The shape stars' x, y (px), the offsets of their fitted centres (dx, dy px)
        and each offset's expected error (px per axis): empty if the map failed."""
        if self.shape_map is None or self.fits is None:
            return tuple(np.zeros(0) for _ in range(5))
        x, y = self.x[self.chosen], self.y[self.chosen]
        fwhm = _map_fwhm(self.shape_map, self.x, self.y, self.mag, self.chosen,
                         self.fwhm_guess)  # fmt: skip
        dx, dy, sigma = _shape_offsets(self.image, self.error, self.channel, x, y, self.fits,
                                       fwhm)  # fmt: skip
        # A fit the PSF does not describe (χ²/dof > POSITION_CHI2: a neighbour the
        # catalogue does not list, a cosmic ray) has a centre off by more than its S/N says.
        sigma = np.where(self.fits.chi2 <= POSITION_CHI2, sigma, np.nan)
        return x, y, dx, dy, sigma


def bad_codes(mask: np.ndarray) -> np.ndarray:
    """Kernel codes (0 good, saturated, masked) from a calibrated frame's MaskBit mask."""
    mask = np.asarray(mask)
    if mask.dtype != np.uint8:
        if mask.dtype.kind not in "iu" or (mask.size and (mask.min() < 0 or mask.max() > 255)):
            raise ValueError(
                f"a calibrated frame's mask holds MaskBit bits (0–255), got {mask.dtype} values"
            )
        mask = mask.astype(np.uint8)
    # one table lookup per pixel (four full-frame boolean passes cost 0.4 s a frame)
    bits = np.arange(256, dtype=np.uint8)
    table = np.zeros(256, np.uint8)
    table[(bits & (MaskBit.HOT | MaskBit.LOW_RESPONSE | MaskBit.COSMIC_RAY)) != 0] = BAD_MASKED
    table[(bits & (MaskBit.SATURATED | MaskBit.BLEED)) != 0] = BAD_SATURATED
    table[(bits & MaskBit.NON_FINITE) != 0] = BAD_MASKED
    return table[mask]


def wing_radius(flux: np.ndarray, fwhm: float, threshold: np.ndarray) -> np.ndarray:
    """Radius (px) beyond which a star of ``flux`` e⁻ puts less than ``threshold`` e⁻ per
    px, for a Moffat profile of index 2.5 (wider wings than most PSFs: conservative)."""
    beta = 2.5
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    peak = np.maximum(flux, 0.0) * (beta - 1) / (np.pi * alpha**2)
    ratio = np.maximum(peak / np.maximum(threshold, 1e-9), 1.0)
    return alpha * np.sqrt(ratio ** (1 / beta) - 1)


def _map_fwhm(shape_map, x, y, mag, chosen, default) -> float:
    """The median FWHM (px, geometric mean of the axes) of the map at the chosen stars."""
    if chosen.size == 0:
        return float(default)
    major, minor, _ = shape_map.fwhm(x[chosen], y[chosen], mag[chosen])
    value = float(np.nanmedian(np.sqrt(major * minor)))
    return value if np.isfinite(value) and value > 0 else float(default)


def _fit_shapes(image, error, good, x, y, background, mag, channel, cells, fwhm, config, shape):
    """Per-source fits of the chosen stars and the map; the profile chosen by χ²."""
    best = (config.profile, config.beta)
    if config.profile == "auto":
        # β from the brightest stars, each fitting its own; the median resists the few a
        # faint neighbour or a cosmic ray pulls. Past β ≈ 10 a Moffat is a Gaussian.
        trial = slice(0, min(len(x), 40))
        fits = fit_source_shapes(
            image, error, good, x[trial], y[trial], background[trial], cells=cells,
            step=channel.step, y0=channel.y0, x0=channel.x0, fwhm_guess=fwhm, kind="moffat",
            beta=3.5, fit_beta=True,
        )  # fmt: skip
        betas = fits.beta[fits.ok] if fits.beta is not None else np.zeros(0)
        if betas.size >= 3:
            index = float(np.median(betas))
            best = ("gaussian", 0.0) if index > 10 else ("moffat", round(index, 2))
        else:
            best = ("moffat", config.beta)
    kind, beta = best
    fits = fit_source_shapes(
        image, error, good, x, y, background, cells=cells, step=channel.step,
        y0=channel.y0, x0=channel.x0, fwhm_guess=fwhm, kind=kind, beta=beta,
    )  # fmt: skip
    shape_map = fit_shape_map(fits, mag, shape, kind=kind, beta=beta,
                              order_xy=config.shape_order_xy,
                              order_mag=config.shape_order_mag)  # fmt: skip
    return shape_map, fits


def _shape_offsets(image, error, channel, x, y, fits, fwhm):
    """The per-source fits' offsets from the given positions (dx, dy px) and each
    offset's expected error per axis (px; NaN where the fit failed).

    The expected error is the centroid error of a star of the fitted flux on the
    channel's sky noise, ≈ √2 σ_PSF / (S/N) per axis.
    """
    dx, dy = fits.x - x, fits.y - y
    step = channel.step
    sample = error[channel.y0 :: step * 4, channel.x0 :: step * 4]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return dx, dy, np.full(x.size, np.nan)
    sky_var = float(np.median(np.square(sample)))
    sigma_psf = float(fwhm) / 2.3548
    area = 4 * np.pi * sigma_psf**2 / step**2  # the PSF's noise area in channel pixels
    flux = np.where(fits.ok, fits.flux, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = flux / np.sqrt(np.maximum(flux, 0) + area * sky_var)
        sigma = np.sqrt(2.0) * sigma_psf / snr
    return dx, dy, np.where(fits.ok & (snr > 0), sigma, np.nan)


def _bicubic_fluxes(image, error, good, x, y, mag, bg, bg_err, on, chosen, channel, fwhm,
                    psf_flux, psf_err, psf_chi2, qc) -> BicubicPSFMap | None:  # fmt: skip
    """PSF fluxes (in place) from a piecewise bicubic map fitted to the ``chosen`` stars.

    The map is fitted to this channel alone: on a Bayer channel its cells are the
    super-pixel unless the stars' phases and the lattice allow finer ones (see
    :func:`autowisp.core.bicubic.fit_bicubic_map`). Too few stars or a singular fit
    leave the analytic fluxes and say so in ``qc['psf_model']``.
    """
    variance = np.square(error)
    if chosen.size < 10:
        qc["psf_model"] = "analytic: too few stars for a bicubic map"
        return None
    try:
        fit = fit_bicubic_map(image, variance, good, x[chosen], y[chosen], mag[chosen],
                              bg[chosen], channels=(channel,), fwhm_guess=float(fwhm))  # fmt: skip
    except (ValueError, np.linalg.LinAlgError) as failure:
        qc["psf_model"] = f"analytic: the bicubic fit failed ({failure})"
        return None
    if fit.psf_map is None or fit.used.sum() < 10:
        qc["psf_model"] = "analytic: the bicubic fit kept too few stars"
        return None
    index = np.flatnonzero(on)
    result = bicubic_psf_photometry(image, variance, good, x[index], y[index], mag[index],
                                    bg[index], bg_err[index], fit.psf_map, channel)  # fmt: skip
    usable = (result.flags & FAILED) == 0
    psf_flux[index] = np.where(usable, result.flux, np.nan)
    psf_err[index] = np.where(usable, result.flux_err, np.nan)
    psf_chi2[index] = np.where(usable, result.chi2, np.nan)
    qc["psf_model"] = "bicubic"
    qc["bicubic_cell"] = float(fit.diagnostics.get("cell", np.nan))
    qc["bicubic_stars"] = float(fit.used.sum())
    qc["bicubic_bad_pixel_stars"] = float(np.sum((result.flags & BAD_PIXEL) != 0))
    return fit.psf_map


def measure_channel(
    image: np.ndarray,
    error: np.ndarray,
    bad: np.ndarray,
    channel: Channel,
    x: np.ndarray,
    y: np.ndarray,
    mag: np.ndarray,
    *,
    config: PhotometryConfig,
    fwhm_guess: float = 2.5,
    uncalibrated: bool = False,
    others: tuple[np.ndarray, np.ndarray] | None = None,
) -> ChannelPhotometry:
    """Measure every star (x, y px; ``mag`` a catalogue magnitude, brightest smallest)
    in one channel of ``image`` (e⁻) with its ``error`` (e⁻) and ``bad`` codes
    (:func:`bad_codes`), the position correction from this channel's stars alone
    (:func:`measure_mosaic` of one channel; a mosaic's channels are pooled there).

    ``others`` (x, y px) are sources that are not measured (detections without a
    catalogue star): their pixels are kept out of the backgrounds, and stars with one
    near them do not shape the PSF.
    """
    (result,) = measure_mosaic(image, error, bad, (channel,), x, y, mag, config=config,
                               fwhm_guess=fwhm_guess, uncalibrated=uncalibrated,
                               others=others)  # fmt: skip
    return result


def measure_mosaic(
    image: np.ndarray,
    error: np.ndarray,
    bad: np.ndarray,
    mosaic: Sequence[Channel],
    x: np.ndarray,
    y: np.ndarray,
    mag: np.ndarray,
    *,
    config: PhotometryConfig,
    fwhm_guess: float = 2.5,
    uncalibrated: bool = False,
    others: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[ChannelPhotometry]:
    """:func:`measure_channel` for each channel of a frame, the position correction
    fitted to the shape stars of all channels together
    (:func:`autowisp.core.positions.fit_pooled_correction`: one smooth field, the WCS
    error the channels share, and a constant shift per channel where the offsets call
    for one, as a lens's lateral colour does). A mosaic's channels each have a quarter of
    the frame's bright isolated stars, too few on a small frame for a correction of
    their own."""
    prepared = [
        prepare_channel(image, error, bad, channel, x, y, mag, config=config,
                        fwhm_guess=fwhm_guess, uncalibrated=uncalibrated, others=others)
        for channel in mosaic
    ]  # fmt: skip
    corrections = [NONE] * len(prepared)
    if config.refine_positions and prepared:
        parts = [p.offsets() for p in prepared]
        group = np.concatenate([np.full(part[0].size, g) for g, part in enumerate(parts)])
        sx, sy, dx, dy, sigma = (np.concatenate([part[k] for part in parts]) for k in range(5))
        corrections = fit_pooled_correction(sx, sy, dx, dy, sigma, group, len(prepared),
                                            prepared[0].image.shape)  # fmt: skip
    return [finish_channel(p, c) for p, c in zip(prepared, corrections, strict=True)]


def prepare_channel(
    image: np.ndarray,
    error: np.ndarray,
    bad: np.ndarray,
    channel: Channel,
    x: np.ndarray,
    y: np.ndarray,
    mag: np.ndarray,
    *,
    config: PhotometryConfig,
    fwhm_guess: float = 2.5,
    uncalibrated: bool = False,
    others: tuple[np.ndarray, np.ndarray] | None = None,
) -> PreparedChannel:
    """Steps 1 and 2 of :func:`measure_channel` (its arguments): every star's background
    and flags, the shape stars' own fits and the PSF map, at the given positions."""
    image = np.asarray(image, dtype=float)
    error = np.asarray(error, dtype=float)
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    mag = np.asarray(mag, dtype=float)
    n = x.size
    ny, nx = image.shape
    sensitivity = channel_map(channel)
    cells = sensitivity.cells()
    extent = sensitivity.extent()
    step = channel.step
    radii = np.asarray(sorted(config.apertures), dtype=float)
    r_max = float(radii.max())
    flags = np.zeros(n, np.uint16)
    if uncalibrated:
        flags |= np.uint16(Flag.UNCALIBRATED)
    on = np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < nx - 0.5) & (y > -0.5)
    on &= y < ny - 0.5
    flags[~on] |= np.uint16(Flag.OFF_FRAME)

    # 1. backgrounds
    inner, outer = config.annulus
    if inner <= 0:
        inner = r_max + max(2.0 * fwhm_guess, 2.0)
    if outer <= inner:
        # An annulus of ANNULUS_AREA times the largest aperture's area (and at least 6 px
        # or three channel pixels wide): its mean's error then adds 1/ANNULUS_AREA of the
        # sky's variance to that aperture, less to the smaller ones.
        outer = max(inner + max(6.0, 3.0 * step), np.sqrt(inner**2 + ANNULUS_AREA * r_max**2))
    level = np.full(n, np.nan)
    level_err = np.full(n, np.nan)
    count = np.zeros(n, np.int64)

    other_x, other_y = (np.asarray(v, float) for v in (others or (np.zeros(0), np.zeros(0))))

    # Full-frame maps of the discs: zero pages cost nothing until painted, and each pass
    # clears what it painted (``owner`` is written wherever ``cover`` is painted, so its
    # initial contents are never read).
    cover = np.zeros(image.shape, np.int32)
    owner = np.empty(image.shape, np.int32)
    other_radius = np.full(other_x.size, max(fwhm_guess * 1.5, 2.0))

    def background(radius: np.ndarray) -> None:
        own = np.where(on, radius, 0.0)
        # measured stars own their discs; unmeasured sources' discs only exclude pixels
        paint_owners(cover, owner, x, y, own, True, step, channel.y0, channel.x0)
        paint_owners(cover, owner, other_x, other_y, other_radius, False, step, channel.y0,
                     channel.x0)  # fmt: skip
        annulus_background(image, bad, cover, owner, x, y, step, channel.y0, channel.x0, inner,
                           outer, config.clip, level, level_err, count)  # fmt: skip
        clear_owners(cover, x, y, own, step, channel.y0, channel.x0)
        clear_owners(cover, other_x, other_y, other_radius, step, channel.y0, channel.x0)

    background(np.full(n, r_max + fwhm_guess))
    first = (level.copy(), level_err.copy(), count.copy())
    # Again, with each star's disc out to where its wings fall below 5 % of the sky's
    # noise per pixel (bright neighbours' wings otherwise raise the faint stars' sky);
    # where that leaves too few pixels, the first estimate stays and the star is crowded.
    sums = np.full((n, 1), np.nan)
    _v, _l, _t = np.zeros((n, 1)), np.zeros((n, 1)), np.zeros((n, 1), np.uint8)
    sky = np.where(
        np.isfinite(level), level, np.nanmedian(level) if np.isfinite(level).any() else 0
    )
    aperture_photometry(image, error, bad, x, y, sky, np.zeros(n), np.zeros(n), np.zeros((n, 3)),
                        0, 0.0, True, np.array([r_max]), step, channel.y0, channel.x0, cells,
                        extent, _NODES, _WEIGHTS, sums, _v, _l, _t)  # fmt: skip
    noise = np.sqrt(np.maximum(sky, 1.0)) * 0.05
    wing = wing_radius(np.nan_to_num(sums[:, 0]), fwhm_guess, noise)
    background(np.clip(wing, r_max + fwhm_guess, 3 * outer))
    sparse = (count < np.maximum(20, 0.3 * first[2])) & np.isfinite(first[0])
    level[sparse], level_err[sparse], count[sparse] = (v[sparse] for v in first)
    flags[sparse & on] |= np.uint16(Flag.CROWDED)
    flags[~np.isfinite(level)] |= np.uint16(Flag.NO_BACKGROUND)

    # Neighbours: crowding flag, and who may shape the PSF.
    positions = np.column_stack([np.where(on, x, 1e9), np.where(on, y, 1e9)])
    tree = cKDTree(positions)
    crowd_radius = r_max + 2.0 * fwhm_guess
    pairs = tree.query_pairs(crowd_radius, output_type="ndarray")
    crowded = np.zeros(n, bool)
    brightness = np.nan_to_num(np.asarray(mag, float), nan=-np.inf)  # unknown: bright
    if pairs.size:  # a neighbour 5 mag fainter (1 % of the flux) does not crowd a star
        a, b = pairs[:, 0], pairs[:, 1]
        crowded[a[brightness[b] < brightness[a] + NEIGHBOUR_DMAG[0]]] = True
        crowded[b[brightness[a] < brightness[b] + NEIGHBOUR_DMAG[0]]] = True
    flags[crowded] |= np.uint16(Flag.CROWDED)

    # 2. the PSF map from bright, isolated, clean, unsaturated stars
    good = bad == 0
    fit_radius = max(3.0, 2.0 * fwhm_guess) + step
    margin = fit_radius + 1
    # A neighbour spoils a star's shape fit when it is not much fainter: one whose core
    # is in the fit box unless NEIGHBOUR_DMAG[0] magnitudes fainter, one beyond it (within
    # twice the fit radius, only its wings reach the box) unless NEIGHBOUR_DMAG[1]. With
    # the deep star list every star has faint neighbours: a plain distance cut left 8 to
    # 18 shape stars on a 640x512 frame, and the G2 map 11 % too wide. Where even that
    # leaves fewer than MIN_SHAPE_STARS, the contrasts asked are halved, then ignored
    # (as they were when the faint neighbours were not known).
    contrast_core = np.full(n, np.inf)  # magnitudes to the brightest neighbour
    contrast_wing = np.full(n, np.inf)
    near_pairs = tree.query_pairs(2 * fit_radius, output_type="ndarray")
    if near_pairs.size:
        a, b = near_pairs[:, 0], near_pairs[:, 1]
        core = np.hypot(x[a] - x[b], y[a] - y[b]) < fit_radius + fwhm_guess
        for one, other in ((a, b), (b, a)):
            difference = brightness[other] - brightness[one]
            np.minimum.at(contrast_core, one[core], difference[core])
            np.minimum.at(contrast_wing, one[~core], difference[~core])
    isolated = np.ones(n, bool)
    if other_x.size:  # a detection near a star that is not the star itself
        near = cKDTree(np.column_stack([other_x, other_y])).query_ball_point(
            positions, fit_radius + 1.0
        )
        for i, found in enumerate(near):
            if any(np.hypot(other_x[j] - x[i], other_y[j] - y[i]) > 1.0 for j in found):
                isolated[i] = False
    clean = np.zeros(n, bool)
    usable = np.flatnonzero(on & isolated & np.isfinite(level) & np.isfinite(mag))
    usable = usable[
        (x[usable] > margin) & (x[usable] < nx - 1 - margin)
        & (y[usable] > margin) & (y[usable] < ny - 1 - margin)
    ]  # fmt: skip
    for i in usable:  # no saturated or masked pixel near the star
        lo_y, hi_y = int(y[i] - fit_radius), int(y[i] + fit_radius) + 2
        lo_x, hi_x = int(x[i] - fit_radius), int(x[i] + fit_radius) + 2
        clean[i] = not np.any(bad[max(lo_y, 0) : hi_y, max(lo_x, 0) : hi_x])
    candidates = usable[clean[usable]]
    # enough: MIN_SHAPE_STARS, or half the candidates on a frame with few stars
    enough = min(MIN_SHAPE_STARS, candidates.size // 2)
    for core_dmag, wing_dmag in SHAPE_CONTRASTS:
        alone = (contrast_core[candidates] >= core_dmag) & (contrast_wing[candidates] >= wing_dmag)
        chosen = candidates[alone]
        if chosen.size >= enough:
            break
    chosen = chosen[np.argsort(mag[chosen], kind="stable")][: config.shape_stars]
    shape_map = None
    qc: dict[str, float | str] = {"stars": float(on.sum()), "shape_stars": float(chosen.size)}
    # the map is fitted in plain mode too: its FWHM and ellipticity are QC figures
    try:
        shape_map, fits = _fit_shapes(
            image, error, good, x[chosen], y[chosen], level[chosen], mag[chosen], channel,
            cells, fwhm_guess, config, image.shape,
        )  # fmt: skip
    except ValueError:
        shape_map, fits = None, None
    return PreparedChannel(
        image=image, error=error, bad=bad, channel=channel, x=x, y=y, mag=mag,
        config=config, fwhm_guess=fwhm_guess, on=on, flags=flags, level=level,
        level_err=level_err, good=good, chosen=chosen, shape_map=shape_map, fits=fits,
        qc=qc,
    )  # fmt: skip


def finish_channel(
    prepared: PreparedChannel, correction: PositionCorrection = NONE
) -> ChannelPhotometry:
    """Steps 2 (the correction applied) to 4 of :func:`measure_channel`: the positions
    corrected by ``correction``, the PSF fluxes and the apertures."""
    p = prepared
    image, error, bad, good, channel = p.image, p.error, p.bad, p.good, p.channel
    config, fwhm_guess, on, level, level_err = p.config, p.fwhm_guess, p.on, p.level, p.level_err
    chosen, shape_map, fits, mag, x, y = p.chosen, p.shape_map, p.fits, p.mag, p.x, p.y
    flags, qc = p.flags.copy(), dict(p.qc)
    n = x.size
    sensitivity = channel_map(channel)
    cells = sensitivity.cells()
    extent = sensitivity.extent()
    step = channel.step
    radii = np.asarray(sorted(config.apertures), dtype=float)
    shapes = np.zeros((n, 3))
    kind_code, beta = PROFILES["gaussian"], 0.0
    dx, dy = correction.offsets(x, y)
    dx = np.where(on, dx, 0.0)
    dy = np.where(on, dy, 0.0)
    x = x + dx
    y = y + dy
    qc.update(
        position_order=float(correction.order),
        position_stars=float(correction.used),
        position_shift_rms=correction.shift_rms,
        position_residual_rms=correction.residual_rms,
    )
    if shape_map is not None:
        shapes = shape_map.shapes(x, y, np.where(np.isfinite(mag), mag, shape_map.mag_zero))
        kind_code, beta = PROFILES[shape_map.kind], shape_map.beta
        ok = np.isfinite(shapes).all(axis=1) & (
            shapes[:, 0] > np.hypot(shapes[:, 1], shapes[:, 2])
        )
        fallback = np.array(shape_from_fwhm(np.array(fwhm_guess), np.array(fwhm_guess),
                                            np.array(0.0), kind=shape_map.kind,
                                            beta=beta))  # fmt: skip
        shapes[~ok] = fallback
        major, minor, _ = shape_map.fwhm(x[chosen], y[chosen], mag[chosen])
        qc.update(
            fwhm=float(np.median(np.sqrt(major * minor))),
            ellipticity=float(np.median(1 - minor / major)),
            shape_map_stars=float(shape_map.used),
            shape_chi2=(
                float(np.nanmedian(fits.chi2[fits.ok]))
                if fits is not None and fits.ok.any()
                else np.nan
            ),
            profile_beta=float(beta) if shape_map.kind == "moffat" else 0.0,
        )
    if shape_map is None:
        shapes[:] = np.array(shape_from_fwhm(np.array(fwhm_guess), np.array(fwhm_guess),
                                             np.array(0.0)))  # fmt: skip

    # 3. PSF fluxes, started from exact-area sums at ~1.5 FWHM
    bg = np.where(np.isfinite(level), level, 0.0)
    bg_err = np.where(np.isfinite(level_err), level_err, 0.0)
    start = np.full((n, 1), np.nan)
    var0 = np.full((n, 1), np.nan)
    lost0 = np.zeros((n, 1))
    touch0 = np.zeros((n, 1), np.uint8)
    aperture_photometry(image, error, bad, x, y, bg, bg_err, np.zeros(n), shapes, kind_code,
                        beta, True, np.array([max(1.5 * fwhm_guess, 1.5)]), step, channel.y0,
                        channel.x0, cells, extent, _NODES, _WEIGHTS, start, var0, lost0,
                        touch0)  # fmt: skip
    psf_radius = config.psf_radius or (2.0 * fwhm_guess + step)
    psf_flux = np.full(n, np.nan)
    psf_err = np.full(n, np.nan)
    psf_chi2 = np.full(n, np.nan)
    npix = np.zeros(n, np.int64)
    bicubic_map = None
    qc["psf_model"] = "analytic"
    if config.psf_model == "bicubic":
        bicubic_map = _bicubic_fluxes(
            image, error, good, x, y, mag, bg, bg_err, on, chosen, channel,
            qc.get("fwhm", fwhm_guess), psf_flux, psf_err, psf_chi2, qc,
        )  # fmt: skip
    if bicubic_map is None:  # the analytic fluxes: the default, or the bicubic fit failed
        psf_photometry(image, error, bad, x, y, bg, bg_err, shapes, kind_code, beta, step,
                       channel.y0, channel.x0, cells, psf_radius, start[:, 0],
                       config.iterations, _NODES, _WEIGHTS, psf_flux, psf_err, psf_chi2,
                       npix)  # fmt: skip
    flags[on & ~np.isfinite(psf_flux)] |= np.uint16(Flag.PSF_FAILED)

    # 4. apertures
    flux = np.full((n, radii.size), np.nan)
    variance = np.full((n, radii.size), np.nan)
    lost = np.zeros((n, radii.size))
    touch = np.zeros((n, radii.size), np.uint8)
    guess = np.where(np.isfinite(psf_flux) & (psf_flux > 0), psf_flux, start[:, 0])
    aperture_photometry(image, error, bad, x, y, bg, bg_err, guess, shapes, kind_code, beta,
                        config.mode == "plain", radii, step, channel.y0, channel.x0, cells,
                        extent, _NODES, _WEIGHTS, flux, variance, lost, touch)  # fmt: skip
    last = touch[:, -1]
    flags[(last & TOUCH_SATURATED) != 0] |= np.uint16(Flag.SATURATED)
    flags[(last & TOUCH_MASKED) != 0] |= np.uint16(Flag.MASKED)
    flags[(last & TOUCH_EDGE) != 0] |= np.uint16(Flag.EDGE)
    flags[lost[:, -1] > 0.1] |= np.uint16(Flag.LOST_WEIGHT)
    no_measure = ~on | ~np.isfinite(level)
    flux[no_measure] = np.nan
    variance[no_measure] = np.nan
    psf_flux[no_measure] = np.nan
    psf_err[no_measure] = np.nan
    fitted = np.isfinite(psf_chi2)
    qc["psf_chi2"] = float(np.median(psf_chi2[fitted])) if fitted.any() else np.nan
    qc["measured"] = float(np.isfinite(flux[:, 0]).sum())
    return ChannelPhotometry(
        channel=channel.name,
        flux=flux,
        flux_err=np.sqrt(variance),
        psf_flux=psf_flux,
        psf_flux_err=psf_err,
        psf_chi2=psf_chi2,
        background=level,
        background_err=level_err,
        flags=flags,
        shape_map=shape_map,
        shapes=shapes,
        qc=qc,
        bicubic_map=bicubic_map,
        x=x,
        y=y,
        dx=dx,
        dy=dy,
        correction=correction,
    )
