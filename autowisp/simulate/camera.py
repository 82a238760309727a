"""The simulated camera: sensor, calibration patterns, noise and read-out to raw ADU.

Electrons become ADU as ``ADU = round(bias + e⁻ / gain)``, clipped to
``[0, saturation_adu]`` and stored as uint16, like a DSLR raw file.

A :class:`Scene` holds what reaches the sensor during one exposure (stars and sky, in
electrons before the pixel response); :func:`predict` gives its noiseless
image and :func:`expose` one noisy raw frame of it. :func:`predict` also gives
each star's expected aperture signal and theoretical noise (Poisson, sky, dark, read
noise and quantisation, scintillation), the limit against which photometry is judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autowisp.core.bayer import channel_index_map, channels, colour_of_channels, validate_layout
from autowisp.simulate.render import fwhm_to_alpha, render_stars, stamp_half_sizes

__all__ = [
    "ApertureStats",
    "CameraSpec",
    "Detector",
    "Exposure",
    "Scene",
    "expose",
    "make_detector",
    "predict",
]


@dataclass(frozen=True)
class CameraSpec:
    """Fixed properties of a camera body and lens (units in the field names' docs).

    ``zero_point`` gives, per colour R, G, B, the magnitude of a star that yields
    1 e⁻/s over the whole PSF in that colour (as if every pixel had that filter).
    """

    model: str = "Canon EOS 100D"
    serial: str = "000000000001"
    layout: str = "RGGB"
    width: int = 1024
    height: int = 1024
    pixel_scale: float = 10.3  # arcsec/px
    pixel_size: float = 4.3  # µm
    gain: float = 1.6  # e⁻/ADU
    read_noise: float = 7.0  # e⁻
    bias_level: float = 2048.0  # ADU
    saturation_adu: int = 15000
    iso: int = 100
    overscan_columns: int = 0  # columns of bias-only pixels read out after each row
    bias_drift: float = 0.0  # ADU rms of the bias level's change from frame to frame
    dark_current: float = 0.04  # e⁻/s/px
    hot_pixel_fraction: float = 5e-4
    dead_pixel_fraction: float = 2e-5
    vignetting: float = 0.35  # fractional light loss at the frame corner
    prnu: float = 0.01  # pixel-to-pixel response scatter (fraction)
    aperture_cm: float = 6.1  # lens entrance pupil, for scintillation
    zero_point: tuple[float, float, float] = (17.2, 17.6, 16.9)
    extinction: tuple[float, float, float] = (0.09, 0.13, 0.21)  # mag/airmass
    distortion: float = 0.004  # radial displacement at the corner / corner radius

    def __post_init__(self) -> None:
        validate_layout(self.layout)
        for name in ("width", "height"):
            if getattr(self, name) < 8:
                raise ValueError(
                    f"camera {name} must be at least 8 px, got {getattr(self, name)!r}"
                )
        if self.gain <= 0 or self.read_noise < 0:
            raise ValueError(
                f"gain must be > 0 and read noise >= 0, got gain={self.gain!r}, "
                f"read_noise={self.read_noise!r}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape (rows, columns)."""
        return (self.height, self.width)


@dataclass(frozen=True)
class Detector:
    """A camera with its fixed calibration patterns.

    Attributes
    ----------
    spec : CameraSpec
    bias : (ny, nx) float64
        Bias level with row and column pattern, ADU.
    dark_rate : (ny, nx) float64
        Dark current including hot pixels, e⁻/s.
    flat : (ny, nx) float64
        Pixel response: vignetting × pixel-to-pixel variation (dead pixels near 0).
    hot, dead : (ny, nx) bool
        Truth masks of hot and dead pixels.
    """

    spec: CameraSpec
    bias: np.ndarray
    dark_rate: np.ndarray
    flat: np.ndarray
    hot: np.ndarray
    dead: np.ndarray
    channel_map: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "channel_map", channel_index_map(self.spec.layout, self.spec.shape)
        )

    @property
    def n_channels(self) -> int:
        """Number of mosaic channels (4 for Bayer, 1 for monochrome)."""
        return len(channels(self.spec.layout))

    @property
    def channel_of_cell(self) -> np.ndarray:
        """Channel index of each pixel of the super-pixel, (step, step) int64."""
        step = channels(self.spec.layout)[0].step
        return self.channel_map[:step, :step].astype(np.int64)


def make_detector(spec: CameraSpec, rng: np.random.Generator) -> Detector:
    """Draw a camera's bias pattern, dark current, hot/dead pixels and flat field."""
    ny, nx = spec.shape
    rows = rng.normal(0.0, 1.5, ny)
    columns = rng.normal(0.0, 0.8, nx)
    slope = np.linspace(-1.0, 1.0, nx) * rng.normal(0.0, 1.0)
    bias = spec.bias_level + rows[:, None] + (columns + slope)[None, :]
    dark_rate = spec.dark_current * rng.gamma(4.0, 0.25, (ny, nx))
    hot = rng.random((ny, nx)) < spec.hot_pixel_fraction
    dark_rate[hot] = rng.uniform(2.0, 60.0, int(hot.sum()))
    yy, xx = np.mgrid[0:ny, 0:nx]
    centre_x = (nx - 1) / 2 + rng.normal(0.0, 0.02) * nx
    centre_y = (ny - 1) / 2 + rng.normal(0.0, 0.02) * ny
    corner = np.hypot((nx - 1) / 2, (ny - 1) / 2)
    rho2 = ((xx - centre_x) ** 2 + (yy - centre_y) ** 2) / corner**2
    # (1 + c rho²)^-2 with c chosen to lose `vignetting` at the corner.
    c = (1.0 - spec.vignetting) ** -0.5 - 1.0
    flat = (1.0 + c * rho2) ** -2.0
    flat *= 1.0 + spec.prnu * rng.standard_normal((ny, nx))
    dead = rng.random((ny, nx)) < spec.dead_pixel_fraction
    flat[dead] = rng.uniform(0.0, 0.1, int(dead.sum()))
    return Detector(spec, bias, dark_rate, flat, hot, dead)


@dataclass(frozen=True)
class Scene:
    """What reaches the sensor during one exposure.

    Attributes
    ----------
    exptime : float
        Exposure time, s.
    x, y : (n,) float64
        Star positions, px.
    flux : (n, 3) float64
        Expected electrons per exposure in each colour R, G, B over the whole PSF,
        before the pixel response (extinction, transparency and variability applied;
        scintillation not).
    fwhm_major, fwhm_minor, theta : (n,) float64
        PSF at each star: FWHMs (px) and position angle of the major axis (rad).
    scintillation : (n,) float64
        Fractional scintillation noise (rms) of each star's flux.
    sky : (ny, nx) float64
        Sky electrons per pixel before the pixel response.
    beta : float
        Moffat index of the PSF.
    """

    exptime: float
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm_major: np.ndarray
    fwhm_minor: np.ndarray
    theta: np.ndarray
    scintillation: np.ndarray
    sky: np.ndarray
    beta: float = 3.5

    @property
    def n_stars(self) -> int:
        """Number of stars."""
        return int(self.x.size)


@dataclass(frozen=True)
class ApertureStats:
    """Expected aperture quantities, each (n_stars, n_channels, n_apertures).

    ``signal`` is the star's expected electrons in the aperture's pixels of each
    channel (after the pixel response); ``npix`` the number of those pixels (centre
    within the radius); ``background`` the expected sky + dark electrons there;
    ``sigma`` the theoretical noise of the background-subtracted aperture sum, e⁻.
    """

    radii: np.ndarray
    signal: np.ndarray
    npix: np.ndarray
    background: np.ndarray
    sigma: np.ndarray


@dataclass(frozen=True)
class Exposure:
    """One noisy raw frame and what was drawn to make it."""

    raw: np.ndarray  # (ny, nx) uint16 ADU
    scintillation_factor: np.ndarray  # (n,) realised flux factor of each star
    cosmic_rays: np.ndarray  # (k, 3): x, y, electrons of each hit pixel
    mean: np.ndarray  # (ny, nx) mean electrons given the scintillation draw
    apertures: ApertureStats  # prediction for the radii asked
    bias_offset: float = 0.0  # ADU added to the whole frame's bias level (drift)


def _channel_flux(detector: Detector, flux: np.ndarray) -> np.ndarray:
    """Flux per mosaic channel (n, n_channels) from flux per colour (n, 3)."""
    return np.ascontiguousarray(flux[:, colour_of_channels(detector.spec.layout)], dtype=float)


#: Sub-pixel samples per axis near a star's centre.
OVERSAMPLE = 5

#: Pixels within this distance (px) of a star are integrated with sub-pixel sampling.
FINE_RADIUS = 4.0


def _render(
    detector: Detector, scene: Scene, radii: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, ApertureStats]:
    """Mean electron image (stars scaled by ``scale``) and unscaled aperture statistics."""
    spec = detector.spec
    alpha_a = fwhm_to_alpha(scene.fwhm_major, scene.beta)
    alpha_b = fwhm_to_alpha(scene.fwhm_minor, scene.beta)
    channel_flux = _channel_flux(detector, scene.flux)
    half = stamp_half_sizes(
        channel_flux.max(axis=1, initial=0.0),
        alpha_a,
        beta=scene.beta,
        minimum=int(np.ceil(radii.max(initial=0.0))) + 2,
    )
    background = detector.flat * scene.sky + detector.dark_rate * scene.exptime
    image = np.zeros(spec.shape)
    shape = (scene.n_stars, detector.n_channels, radii.size)
    signal = np.zeros(shape)
    npix = np.zeros(shape, dtype=np.int64)
    ap_background = np.zeros(shape)
    render_stars(
        image,
        np.asarray(scene.x, dtype=float),
        np.asarray(scene.y, dtype=float),
        channel_flux,
        np.asarray(scale, dtype=float),
        alpha_a,
        alpha_b,
        np.asarray(scene.theta, dtype=float),
        float(scene.beta),
        half,
        detector.channel_of_cell,
        detector.channel_of_cell.shape[0],
        OVERSAMPLE,
        FINE_RADIUS,
        radii,
        detector.flat,
        background,
        signal,
        npix,
        ap_background,
    )
    image += background
    variance = (
        signal
        + ap_background
        + npix * (spec.read_noise**2 + spec.gain**2 / 12.0)
        + (scene.scintillation[:, None, None] * signal) ** 2
    )
    return image, ApertureStats(radii, signal, npix, ap_background, np.sqrt(variance))


def predict(
    detector: Detector, scene: Scene, radii: np.ndarray | list[float] = ()
) -> tuple[np.ndarray, ApertureStats]:
    """Noiseless image (e⁻: stars and sky after the response, plus dark) and each star's
    expected signal and theoretical noise in circular apertures of ``radii`` px."""
    return _render(detector, scene, np.asarray(radii, dtype=float), np.ones(scene.n_stars))


def cosmic_ray_hits(
    rng: np.random.Generator, shape: tuple[int, int], exptime: float, *, rate: float = 0.08
) -> np.ndarray:
    """Cosmic-ray hits of one exposure: rows of (x, y, electrons).

    ``rate`` is hits per megapixel per second (about 5 cm⁻² min⁻¹ at 3,400 m for 4.3 µm
    pixels); each hit is a short straight track of 1–4 pixels.
    """
    ny, nx = shape
    count = int(rng.poisson(rate * ny * nx / 1e6 * exptime))
    hits = []
    for _ in range(count):
        length = int(rng.integers(1, 5))
        angle = rng.uniform(0.0, np.pi)
        x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        energy = rng.uniform(300.0, 6000.0)
        for k in range(length):
            x = int(np.clip(round(x0 + k * np.cos(angle)), 0, nx - 1))
            y = int(np.clip(round(y0 + k * np.sin(angle)), 0, ny - 1))
            hits.append((x, y, energy / length))
    return np.array(hits, dtype=float).reshape(-1, 3)


def read_out(
    detector: Detector, electrons: np.ndarray, rng: np.random.Generator, offset: float = 0.0
) -> np.ndarray:
    """Add read noise, convert to ADU with the bias (plus ``offset``), quantise and clip:
    uint16 raw, with the camera's overscan columns (bias and read noise only) appended."""
    spec = detector.spec
    adu = (
        detector.bias
        + offset
        + (electrons + rng.normal(0.0, spec.read_noise, electrons.shape)) / spec.gain
    )
    if spec.overscan_columns:
        ny = electrons.shape[0]
        overscan = (
            spec.bias_level
            + offset
            + rng.normal(0.0, spec.read_noise, (ny, spec.overscan_columns)) / spec.gain
        )
        adu = np.hstack([adu, overscan])
    return np.clip(np.rint(adu), 0, spec.saturation_adu).astype(np.uint16)


def expose(
    detector: Detector,
    scene: Scene,
    rng: np.random.Generator,
    *,
    radii: np.ndarray | list[float] = (),
    cosmic_rays: bool = True,
) -> Exposure:
    """One raw frame of ``scene``: scintillation, Poisson, cosmic rays, read noise, ADC.

    The returned :class:`Exposure` also carries the aperture prediction for ``radii``
    (computed in the same rendering pass, from the mean fluxes).
    """
    factor = np.maximum(1.0 + scene.scintillation * rng.standard_normal(scene.n_stars), 0.0)
    mean, stats = _render(detector, scene, np.asarray(radii, dtype=float), factor)
    electrons = rng.poisson(mean).astype(float)
    if cosmic_rays:
        hits = cosmic_ray_hits(rng, detector.spec.shape, scene.exptime)
        np.add.at(electrons, (hits[:, 1].astype(int), hits[:, 0].astype(int)), hits[:, 2])
    else:
        hits = np.zeros((0, 3))
    offset = float(rng.normal(0.0, detector.spec.bias_drift)) if detector.spec.bias_drift else 0.0
    return Exposure(read_out(detector, electrons, rng, offset), factor, hits, mean, stats, offset)
