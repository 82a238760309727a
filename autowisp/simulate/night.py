"""A simulated observing night: raw calibration and object frames plus their truth.

:func:`simulate_night` writes, for each of ``cameras`` cameras, one upload directory
``OUTDIR/<serial>/<YYYYMMDD>/`` holding ``bias_NNNN.fits``, ``dark_NNNN.fits``,
``flat_NNNN.fits`` and ``object_NNNN.fits`` (uint16 Bayer mosaics, headers as an
observer's camera writes them) and ``truth.h5`` (see :mod:`autowisp.simulate.truth`).
``OUTDIR/night.json`` lists what was written. Everything is drawn from one
``numpy.random.SeedSequence(seed)``, split per camera and per frame, so the same seed
gives the same bytes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from autowisp.core.bayer import channels, colour_of_channels, validate_layout
from autowisp.core.projection import TanSip, angular_separation, sip_from_lens
from autowisp.io.atomic import atomic_path, write_bytes_atomic
from autowisp.simulate import observing
from autowisp.simulate.camera import CameraSpec, Detector, Scene, expose, make_detector
from autowisp.simulate.sky import SkyStars, make_sky
from autowisp.simulate.truth import FrameRecord, ObjectTruth, write_truth

__all__ = ["CameraPlan", "NightConfig", "NightResult", "plan_cameras", "simulate_night"]

#: Default field: KIC 8462852, as in the PANOPTES frames shipped with the tests.
DEFAULT_FIELD = (301.5644, 44.4569)
_CAMERA_MODELS = ("Canon EOS 100D", "Canon EOS Rebel SL1", "Canon EOS 600D", "Canon EOS 700D")
_SKY_RATE = (2.4, 2.7, 1.7)  # e⁻/s/px per colour R, G, B at zenith, dark site


@dataclass(frozen=True)
class NightConfig:
    """Parameters of a simulated night (angles in degrees, times in seconds)."""

    frames: int = 20
    width: int = 1024
    height: int = 1024
    layout: str = "RGGB"
    seed: int = 0
    cameras: int = 1
    ra: float = DEFAULT_FIELD[0]
    dec: float = DEFAULT_FIELD[1]
    date: str = "2024-09-10"  # local date of the evening the night starts
    exptime: float = 120.0
    cadence: float = 135.0
    biases: int = 10
    darks: int = 10
    flats: int = 10  # good twilight flats; two bad ones (clouds, over-exposed) are added
    faint_limit: float = 13.5
    pixel_scale: float = 10.3  # arcsec/px
    seeing: float = 2.0  # on-axis FWHM, px
    cloudy_fraction: float = 0.1
    pointing_error: float = 0.5  # largest error of the header pointing, deg
    overscan_columns: int = 0  # bias-only columns at each row's end (BIASSEC in headers)
    bias_drift: float = 0.0  # ADU rms of the bias level's change from frame to frame
    apertures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0)
    site: observing.Site = field(default_factory=observing.Site)

    def __post_init__(self) -> None:
        validate_layout(self.layout)
        for name in ("frames", "cameras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("biases", "darks", "flats"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.exptime <= 0 or self.cadence < self.exptime:
            raise ValueError(
                f"need exptime > 0 and cadence >= exptime, got exptime={self.exptime!r}, "
                f"cadence={self.cadence!r}"
            )
        try:
            datetime.date.fromisoformat(self.date)
        except ValueError as error:
            raise ValueError(f"date must be YYYY-MM-DD, got {self.date!r}") from error
        if not -90.0 <= self.dec <= 90.0:
            raise ValueError(f"dec must be within [-90, 90] degrees, got {self.dec!r}")


@dataclass(frozen=True)
class CameraPlan:
    """One camera's fixed set-up for the night."""

    spec: CameraSpec
    centre: tuple[float, float]  # sky position of the frame centre at the start, deg
    rotation: float  # deg, at the start of the night
    rotation_rate: float  # deg/hour
    drift: tuple[float, float]  # px over the whole night (x, y)
    pointing_offset: tuple[float, float]  # header pointing error (dRA·cos δ, dDec), deg
    sip: tuple[np.ndarray, np.ndarray]

    @property
    def radius(self) -> float:
        """Radius (deg) of a circle holding the frame and its drift."""
        spec = self.spec
        half_diagonal = np.hypot(spec.width, spec.height) / 2
        return float((half_diagonal * 1.08 + np.hypot(*self.drift) + 20) * spec.pixel_scale / 3600)


@dataclass
class NightResult:
    """What :func:`simulate_night` wrote."""

    outdir: Path
    manifest: Path
    cameras: list[dict] = field(default_factory=list)


def _offset(ra: float, dec: float, east: float, north: float) -> tuple[float, float]:
    """Move ``(ra, dec)`` by small offsets east and north (deg) on the tangent plane."""
    from autowisp.core.projection import tan_deproject

    new_ra, new_dec = tan_deproject(np.array(east), np.array(north), ra, dec)
    return float(new_ra), float(new_dec)


def plan_cameras(config: NightConfig, rng: np.random.Generator) -> list[CameraPlan]:
    """Draw each camera's serial, pointing, rotation, drift and lens distortion."""
    plans = []
    fov = np.hypot(config.width, config.height) * config.pixel_scale / 3600
    for index in range(config.cameras):
        serial = f"{int(rng.integers(10**11, 10**12)):012d}"
        spec = CameraSpec(
            model=_CAMERA_MODELS[index % len(_CAMERA_MODELS)],
            serial=serial,
            layout=config.layout,
            width=config.width,
            height=config.height,
            pixel_scale=config.pixel_scale,
            gain=float(rng.uniform(1.4, 1.8)),
            read_noise=float(rng.uniform(6.0, 8.0)),
            overscan_columns=config.overscan_columns,
            bias_drift=config.bias_drift,
        )
        if index == 0:
            centre = (config.ra, config.dec)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            step = rng.uniform(0.05, 0.15) * fov
            centre = _offset(config.ra, config.dec, step * np.cos(angle), step * np.sin(angle))
        corner = np.hypot(config.width, config.height) / 2
        k1 = spec.distortion / corner**2 * rng.uniform(0.7, 1.3)
        sip = sip_from_lens(
            k1=k1,
            k2=0.3 * k1 / corner**2,
            p1=rng.normal(0, 0.1) / corner**2,
            p2=rng.normal(0, 0.1) / corner**2,
        )
        error_angle = rng.uniform(0, 2 * np.pi)
        error = config.pointing_error * np.sqrt(rng.uniform(0, 1))
        plans.append(
            CameraPlan(
                spec=spec,
                centre=centre,
                rotation=float(rng.uniform(-180, 180)),
                rotation_rate=float(rng.normal(0, 0.05)),
                drift=(float(rng.normal(0, 3)), float(rng.normal(0, 3))),
                pointing_offset=(error * np.cos(error_angle), error * np.sin(error_angle)),
                sip=sip,
            )
        )
    return plans


def _schedule(config: NightConfig) -> dict[str, np.ndarray]:
    """UTC start JDs of each kind of frame, centred on the field's meridian transit."""
    local_midnight = Time(config.date, scale="utc").jd + 1.0 - config.site.longitude / 360.0
    lst = observing.sidereal_time(np.array([local_midnight]), config.site)[0]
    hour_angle = (lst - config.ra + 180.0) % 360.0 - 180.0
    transit = local_midnight - hour_angle / 360.0 / 1.0027379
    day = 1.0 / 86400.0
    first = transit - config.frames * config.cadence / 2 * day
    last = first + config.frames * config.cadence * day
    return {
        "flat": first - 3600 * day + np.arange(_flat_count(config)) * 30 * day,
        "object": first + np.arange(config.frames) * config.cadence * day,
        "bias": last + 600 * day + np.arange(config.biases) * 5 * day,
        "dark": last + 900 * day + np.arange(config.darks) * (config.exptime + 5) * day,
    }


def _flat_count(config: NightConfig) -> int:
    """Flats written: the good ones plus a cloudy and an over-exposed one (if any good)."""
    return config.flats + 2 if config.flats >= 2 else config.flats


def _wcs(plan: CameraPlan, fraction: float, hours: float, jitter: np.ndarray) -> TanSip:
    """The true WCS a ``fraction`` of the way (``hours`` after the start) through the night.

    The mount drifts linearly by ``plan.drift`` px over the night plus a small jitter,
    and the field rotates at ``plan.rotation_rate``.
    """
    spec = plan.spec
    crpix = np.array([(spec.width - 1) / 2, (spec.height - 1) / 2])
    scale = spec.pixel_scale / 3600
    start = TanSip(crpix, np.array(plan.centre), _cd(scale, plan.rotation), *plan.sip)
    moved = crpix + fraction * np.array(plan.drift) + jitter
    centre = start.pixel_to_sky(np.array(moved[0]), np.array(moved[1]))
    return TanSip(
        crpix,
        np.array([float(centre[0]), float(centre[1])]),
        _cd(scale, plan.rotation + plan.rotation_rate * hours),
        *plan.sip,
    )


def _cd(scale: float, rotation: float) -> np.ndarray:
    """CD matrix (deg/px) for a pixel scale and rotation (deg), east to the left."""
    theta = np.radians(rotation)
    return scale * np.array([[-np.cos(theta), np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def _header(config: NightConfig, plan: CameraPlan, kind: str, jd_start: float, exptime: float):
    spec = plan.spec
    header = fits.Header()
    header["IMAGETYP"] = (kind, "bias, dark, flat or object")
    header["EXPTIME"] = (round(exptime, 4), "[s] exposure time")
    header["DATE-OBS"] = (
        Time(jd_start, format="jd", scale="utc").isot,
        "UTC start of exposure",
    )
    header["INSTRUME"] = (spec.model, "camera model")
    header["CAMSN"] = (spec.serial, "camera serial number")
    if config.layout != "MONO":
        header["BAYERPAT"] = (config.layout, "Bayer layout of image[0:2, 0:2]")
    header["ISO"] = spec.iso
    if spec.overscan_columns:
        # IRAF convention: 1-based, inclusive, [columns,rows].
        columns = f"{spec.width + 1}:{spec.width + spec.overscan_columns}"
        header["BIASSEC"] = (f"[{columns},1:{spec.height}]", "overscan region")
        header["DATASEC"] = (f"[1:{spec.width},1:{spec.height}]", "light-sensitive region")
    # What the lens says, as EXIF would: its nominal focal length (a multiple of 5 mm),
    # so the pixel scale it implies is a few per cent off the true one.
    focal = 206.265 * spec.pixel_size / spec.pixel_scale
    header["FOCALLEN"] = (float(max(5, 5 * round(focal / 5))), "[mm] nominal focal length")
    header["XPIXSZ"] = (spec.pixel_size, "[um] pixel size")
    header["SATURATE"] = (spec.saturation_adu, "[ADU] raw level of saturation")
    header["LAT-OBS"] = (config.site.latitude, "[deg] observatory latitude")
    header["LONG-OBS"] = (config.site.longitude, "[deg] observatory longitude, east +")
    header["ELEV-OBS"] = (config.site.height, "[m] observatory height")
    header["OBSERVER"] = "AutoWISP simulator"
    header["ORIGIN"] = "AutoWISP simulate"
    header["SIMSEED"] = (config.seed, "seed of the simulated night")
    return header


def _write_fits(path: Path, data: np.ndarray, header: fits.Header) -> None:
    with atomic_path(path) as temporary:
        fits.PrimaryHDU(data=data, header=header).writeto(temporary)


def _sky_image(detector: Detector, rates: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Sky electrons per pixel (before the response) from per-colour totals."""
    ny, nx = detector.spec.shape
    colour = colour_of_channels(detector.spec.layout)[detector.channel_map]
    yy, xx = np.mgrid[0:ny, 0:nx]
    tilt = 1.0 + gradient[0] * (xx / nx - 0.5) + gradient[1] * (yy / ny - 0.5)
    return rates[colour] * tilt


def _variables(
    sky: SkyStars, jd: np.ndarray, rng: np.random.Generator, *, central: np.ndarray
) -> list[observing.Variable]:
    """A 1 % transit on a bright unsaturated catalogue star and a 3 % sinusoidal variable.

    The transit host is a Gaia star of 9.5 < G ≤ 10 (brighter ones saturate in 120 s),
    the sinusoid any star of 10 < G < 11.5, both among the ``central`` stars (mask) so
    that every camera sees them; with too few stars fewer variables are made.
    """
    length = jd[-1] - jd[0] if jd.size > 1 else 0.1
    middle = (jd[0] + jd[-1]) / 2
    result = []
    hosts = np.flatnonzero(central & sky.is_gaia & (sky.gmag > 9.5) & (sky.gmag <= 10.0))
    if hosts.size:
        star = int(rng.choice(hosts))
        result.append(
            observing.Variable(
                star,
                int(sky.star_id[star]),
                "transit",
                t0=float(middle + 0.1 * length * rng.uniform(-1, 1)),
                depth=0.01,
                duration=0.4 * length + 1e-3,
                ingress=0.06 * length + 1e-4,
            )
        )
    pulsators = np.flatnonzero(central & (sky.gmag > 10.0) & (sky.gmag < 11.5))
    if pulsators.size:
        star = int(rng.choice(pulsators))
        result.append(
            observing.Variable(
                star,
                int(sky.star_id[star]),
                "sinusoid",
                t0=float(jd[0]),
                amplitude=0.03,
                period=0.6 * length + 1e-3,
            )
        )
    return result


def simulate_night(
    outdir: str | Path,
    config: NightConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> NightResult:
    """Simulate and write a night; see the module docstring for the layout.

    ``progress(label, done, total)`` is called after every frame written.
    """
    outdir = Path(outdir)
    root = np.random.SeedSequence(config.seed)
    sky_seed, plan_seed, *camera_seeds = root.spawn(2 + config.cameras)
    plans = plan_cameras(config, np.random.default_rng(plan_seed))
    schedule = _schedule(config)
    night_rng = np.random.default_rng(sky_seed)
    radius = max(
        float(
            angular_separation(np.array(p.centre[0]), np.array(p.centre[1]), config.ra, config.dec)
        )
        + p.radius
        for p in plans
    )
    sky = make_sky(config.ra, config.dec, radius, rng=night_rng, faint_limit=config.faint_limit)
    mid_jd = schedule["object"] + config.exptime / 2 / 86400
    inner = 0.3 * min(config.width, config.height) * config.pixel_scale / 3600
    variables = _variables(
        sky,
        mid_jd,
        night_rng,
        central=angular_separation(sky.ra, sky.dec, config.ra, config.dec) <= inner,
    )
    weather = {
        "cloudy": night_rng.random(config.frames) < config.cloudy_fraction,
        "seeing_phase": night_rng.uniform(0, 2 * np.pi),
        "gradient": night_rng.normal(0, 0.05, 2),
    }
    total = config.cameras * (config.frames + config.biases + config.darks + _flat_count(config))
    done = 0
    result = NightResult(outdir, outdir / "night.json")
    night_name = config.date.replace("-", "")
    for plan, camera_seed in zip(plans, camera_seeds, strict=True):
        detector_seed, *frame_seeds = camera_seed.spawn(1 + config.frames + 3)
        detector = make_detector(plan.spec, np.random.default_rng(detector_seed))
        directory = outdir / plan.spec.serial / night_name
        records: list[FrameRecord] = []

        def advance(label: str) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(label, done, total)

        cal_rngs = [np.random.default_rng(s) for s in frame_seeds[config.frames :]]
        records += _calibration_frames(
            config, plan, detector, schedule, cal_rngs, directory, advance
        )
        stars, truth = _object_frames(
            config,
            plan,
            detector,
            sky,
            variables,
            weather,
            schedule,
            [np.random.default_rng(s) for s in frame_seeds[: config.frames]],
            directory,
            records,
            advance,
        )
        truth_path = directory / "truth.h5"
        write_truth(
            truth_path,
            config=config,
            plan=plan,
            detector=detector,
            stars=stars,
            truth=truth,
            frames=records,
            variables=variables,
        )
        result.cameras.append(
            {
                "serial": plan.spec.serial,
                "model": plan.spec.model,
                "directory": str(directory.relative_to(outdir)),
                "truth": str(truth_path.relative_to(outdir)),
                "frames": {
                    kind: sum(r.kind == kind for r in records)
                    for kind in ("bias", "dark", "flat", "object")
                },
                "stars": int(truth.star_index.size),
            }
        )
    manifest = {
        "generator": "autowisp simulate",
        "config": {k: v for k, v in asdict(config).items() if k != "site"}
        | {"site": asdict(config.site)},
        "cameras": result.cameras,
        "variables": [asdict(v) for v in variables],
    }
    write_bytes_atomic(result.manifest, (json.dumps(manifest, indent=2) + "\n").encode())
    return result


def _calibration_frames(config, plan, detector, schedule, rngs, directory, advance):
    """Bias, dark and twilight flat frames; two flats are deliberately bad."""
    spec = plan.spec
    records = []
    bias_rng, dark_rng, flat_rng = rngs
    empty = np.zeros(0)
    ny, nx = spec.shape

    def scene(exptime, sky):
        return Scene(exptime, empty, empty, np.zeros((0, 3)), empty, empty, empty, empty, sky)

    zero_sky = np.zeros(spec.shape)
    for kind, count, exptime, rng in (
        ("bias", config.biases, 0.0, bias_rng),
        ("dark", config.darks, config.exptime, dark_rng),
    ):
        for index in range(count):
            exposure = expose(detector, scene(exptime, zero_sky), rng, cosmic_rays=exptime > 0)
            name = f"{kind}_{index + 1:04d}.fits"
            _write_fits(
                directory / name,
                exposure.raw,
                _header(config, plan, kind, schedule[kind][index], exptime),
            )
            records.append(FrameRecord(name, kind, float(schedule[kind][index]), exptime))
            advance(name)
    full_well = (spec.saturation_adu - spec.bias_level) * spec.gain
    count = _flat_count(config)
    bad = {}
    if count > config.flats:
        bad = {count - 2: "clouds", count - 1: "overexposed"}
    for index in range(count):
        level = full_well * 0.4 * flat_rng.uniform(0.8, 1.2)
        gradient = flat_rng.normal(0, 0.01, 2)
        sky = _sky_image(detector, np.full(3, level), gradient)
        reason = bad.get(index, "")
        if reason == "overexposed":
            sky *= 3.0
        elif reason == "clouds":
            blobs = observing.draw_clouds(flat_rng, depth=0.5)
            yy, xx = np.mgrid[0:ny, 0:nx]
            sky *= observing.cloud_at(blobs, spec.shape, xx, yy)
        exposure = expose(detector, scene(2.0, sky), flat_rng, cosmic_rays=False)
        name = f"flat_{index + 1:04d}.fits"
        _write_fits(
            directory / name,
            exposure.raw,
            _header(config, plan, "flat", schedule["flat"][index], 2.0),
        )
        records.append(FrameRecord(name, "flat", float(schedule["flat"][index]), 2.0, reason))
        advance(name)
    return records


def _object_frames(
    config, plan, detector, sky, variables, weather, schedule, rngs, directory, records, advance
) -> tuple[SkyStars, ObjectTruth]:
    """Object frames and the per-frame, per-star truth."""
    spec = plan.spec
    starts = schedule["object"]
    mid = starts + config.exptime / 2 / 86400
    lst = observing.sidereal_time(mid, config.site)
    true_ra, true_dec = observing.to_true_equator(sky.ra, sky.dec, float(mid[len(mid) // 2]))
    # Stars that can fall on this camera's frames.
    star_index = np.flatnonzero(angular_separation(sky.ra, sky.dec, *plan.centre) <= plan.radius)
    stars = sky.subset(star_index)
    truth = ObjectTruth.empty(
        config.frames, star_index, len(channels(config.layout)), len(config.apertures)
    )
    margin = 10.0
    length = max(config.frames - 1, 1)
    zero_points = np.array(spec.zero_point)
    extinction = np.array(spec.extinction)
    for i in range(config.frames):
        rng = rngs[i]
        fraction = i / length
        hours = (mid[i] - mid[0]) * 24
        jitter = rng.normal(0, 0.15, 2)
        wcs = _wcs(plan, fraction, hours, jitter)
        x, y = wcs.sky_to_pixel(stars.ra, stars.dec)
        air, _ = observing.airmass(true_ra[star_index], true_dec[star_index], lst[i], config.site)
        air = np.where(np.isfinite(air), air, 40.0)
        blobs = observing.draw_clouds(rng, depth=0.7) if weather["cloudy"][i] else np.zeros((0, 4))
        transparency = observing.cloud_at(blobs, spec.shape, np.nan_to_num(x), np.nan_to_num(y))
        factor = np.ones(len(stars))
        for variable in variables:
            match = np.flatnonzero(star_index == variable.star_index)
            if match.size:
                factor[match[0]] = observing.variability_factor(variable, mid[i])
        flux = (
            10.0 ** (-0.4 * (stars.mag - zero_points))
            * config.exptime
            * 10.0 ** (-0.4 * extinction * air[:, None])
            * (transparency * factor)[:, None]
        )
        seeing = config.seeing * (
            1.0 + 0.12 * np.sin(2 * np.pi * fraction + weather["seeing_phase"])
        )
        major, minor, theta = observing.psf_field(
            x, y, spec.shape, phase=2 * np.pi * fraction, seeing=seeing
        )
        scint = observing.scintillation_sigma(
            spec.aperture_cm, air, config.exptime, config.site.height
        )
        ny, nx = spec.shape
        with np.errstate(invalid="ignore"):
            inside = (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)
        centre_air, _ = observing.airmass(
            *observing.to_true_equator(wcs.crval[0:1], wcs.crval[1:2], float(mid[i])),
            lst[i],
            config.site,
        )
        sky_rate = np.array(_SKY_RATE) * float(centre_air[0]) ** 0.5
        sky_image = _sky_image(detector, sky_rate * config.exptime, weather["gradient"])
        if len(blobs):  # clouds brighten the sky where they absorb (clear frames: no grid)
            yy, xx = np.mgrid[0:ny, 0:nx]
            sky_image *= 1.0 + 0.6 * (1.0 - observing.cloud_at(blobs, spec.shape, xx, yy))
        scene = Scene(
            config.exptime,
            x[inside],
            y[inside],
            flux[inside],
            major[inside],
            minor[inside],
            theta[inside],
            scint[inside],
            sky_image,
        )
        exposure = expose(detector, scene, rng, radii=config.apertures)
        name = f"object_{i + 1:04d}.fits"
        header = _header(config, plan, "object", starts[i], config.exptime)
        pointing = _offset(float(wcs.crval[0]), float(wcs.crval[1]), *plan.pointing_offset)
        header["RA-MNT"] = (round(pointing[0], 5), "[deg] approximate mount pointing")
        header["DEC-MNT"] = (round(pointing[1], 5), "[deg] approximate mount pointing")
        header["FIELD"] = "simulated field"
        _write_fits(directory / name, exposure.raw, header)
        records.append(FrameRecord(name, "object", float(starts[i]), config.exptime))
        truth.record(
            i,
            name=name,
            jd_mid=float(mid[i]),
            wcs=wcs,
            shape=spec.shape,
            x=x,
            y=y,
            airmass=air,
            centre_airmass=float(centre_air[0]),
            transparency=transparency,
            flux=flux,
            fwhm=(major, minor, theta),
            scintillation=scint,
            inside=inside,
            exposure=exposure,
            sky=np.array(
                [
                    float(np.mean(sky_image[ch.y0 :: ch.step, ch.x0 :: ch.step]))
                    for ch in channels(config.layout)
                ]
            ),
            cloudy=bool(weather["cloudy"][i]),
            clouds=blobs,
            detector=detector,
        )
        advance(name)
    return stars, truth
