"""Night-level master calibration frames: bias, dark (as a rate) and flat.

Each is a sigma-clipped median (:func:`autowisp.core.calibration.clipped_stack`) of the
night's frames of its type, each frame first calibrated with the masters below it,
read in row bands under ``memory_limit_mb``. Written as
:class:`autowisp.io.products.MasterFrame` (``MASTER``, ``ERROR``, ``USED`` and for darks
``HOT``) with provenance: the frames used and the ones rejected and why, and the masters
below it (MBIAS, MDARK). The flat step also measures the gain and read noise by photon
transfer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from autowisp.core.bayer import channel_index_map, channels
from autowisp.core.calibration import (
    clipped_stack,
    measured_saturation,
    overscan_levels,
    parse_section,
    photon_transfer,
    robust_level,
)
from autowisp.errors import PermanentError
from autowisp.io.fits import image_hdu_index, read_image
from autowisp.io.keywords import header_iso
from autowisp.io.products import MasterFrame, read_master_frame, write_master_frame
from autowisp.io.provenance import Provenance
from autowisp.io.stacks import band_rows, read_bands
from autowisp.steps.base import (
    ImageInfo,
    InputProduct,
    Parameter,
    Step,
    StepContext,
    StepResult,
)
from autowisp.vocabulary import ImageType, Scope

__all__ = ["MasterBias", "MasterDark", "MasterFlat", "master_product"]

COMMON: tuple[Parameter, ...] = (
    Parameter("min_frames", 10, "", "Fewest frames a master may be made of."),
    Parameter("sigma", 5.0, "σ", "Clipping threshold."),
    Parameter("memory_limit_mb", 150.0, "MiB", "Memory for the frames being stacked."),
)

#: Shared by the master steps and calibrate: where a camera type's overscan is.
OVERSCAN = Parameter(
    "overscan",
    {},
    "",
    "Camera model (INSTRUME) -> {biassec = '[x1:x2,y1:y2]', datasec = '[...]'} for "
    "cameras whose headers lack BIASSEC and DATASEC; without either, no overscan.",
)
COMMON = (*COMMON, OVERSCAN)

#: Shared by master_flat and calibrate: the raw level of saturation.
SATURATION = Parameter(
    "saturation_adu", 0, "ADU", "0: the header's SATURATE, else measured from the frame."
)


def saturation_level(parameters, header, raw: np.ndarray) -> float:
    """Raw saturation level (ADU): the parameter, else the header's SATURATE, else
    measured from the raw frame (:func:`autowisp.core.calibration.measured_saturation`)."""
    configured = float(parameters["saturation_adu"])
    if configured:
        return configured
    if header.get("SATURATE") is not None:
        return float(header["SATURATE"])
    return measured_saturation(raw)


def frame_sections(
    image: ImageInfo, parameters
) -> tuple[tuple[slice, slice] | None, tuple[slice, slice] | None]:
    """(light-sensitive section, overscan section) of a raw frame, as numpy slices, from
    its header's DATASEC/BIASSEC or the ``overscan`` parameter for its camera model."""
    header = image.header
    configured = dict(parameters.get("overscan") or {}).get(str(header.get("INSTRUME", "")), {})
    biassec = header.get("BIASSEC") or configured.get("biassec")
    datasec = header.get("DATASEC") or configured.get("datasec")
    try:
        data = parse_section(datasec) if datasec else None
        bias = parse_section(biassec) if biassec else None
    except ValueError as error:
        raise PermanentError(f"{image.path.name}: {error}") from error
    if bias is not None and data is None:
        raise PermanentError(
            f"{image.path.name}: an overscan section (BIASSEC) needs the light-sensitive "
            "section too (DATASEC, or datasec in the overscan parameter)"
        )
    if data is not None and image.layout != "MONO" and (data[0].start % 2 or data[1].start % 2):
        raise PermanentError(
            f"{image.path.name}: DATASEC {datasec} starts on an odd row or column, which "
            "would shift the Bayer pattern"
        )
    return data, bias


def overscan_of(
    image: ImageInfo, raw: np.ndarray, parameters
) -> tuple[np.ndarray, np.ndarray | None]:
    """The light-sensitive part of ``raw`` and its overscan level there (ADU), or None
    when the frame has no overscan."""
    data, bias = frame_sections(image, parameters)
    if bias is None:
        return (raw if data is None else raw[data]), None
    levels = overscan_levels(raw, bias, image.layout)
    return raw[data], levels[data]


def _frames(context: StepContext, kind: ImageType) -> list[ImageInfo]:
    """The night generation's frames of ``kind`` whose frame QC is done (the barrier's
    inputs: a frame that could not even be read is left out)."""
    checked = {product.image_id for product in context.inputs.get("frame_qc", ())}
    return [
        image
        for image in context.require_night().images
        if image.image_type is kind and (image.id in checked or "frame_qc" not in context.inputs)
    ]


def _one_iso(
    frames: list[ImageInfo], kind: str
) -> tuple[list[ImageInfo], list[tuple[ImageInfo, str]], int | None]:
    """The frames at the night's most common ISO, the others with the reason, the ISO.

    A DSLR's bias level, noise and gain change with ISO: frames at different ISOs are
    never stacked together. Frames whose header gives no ISO go with any.
    """
    isos = [header_iso(image.header) for image in frames]
    known = [iso for iso in isos if iso is not None]
    if not known:
        return frames, [], None
    counts = {iso: known.count(iso) for iso in set(known)}
    chosen = min(counts, key=lambda iso: (-counts[iso], iso))
    kept = [f for f, iso in zip(frames, isos, strict=True) if iso in (None, chosen)]
    rejected = [
        (f, f"ISO {iso}: the night's {kind} frames are mostly ISO {chosen}")
        for f, iso in zip(frames, isos, strict=True)
        if iso not in (None, chosen)
    ]
    return kept, rejected, chosen


def _check_count(
    context: StepContext, frames: list, kind: str, rejected: list | None = None
) -> None:
    needed = int(context.parameters["min_frames"])
    if len(frames) < needed:
        night = context.night.local_date if context.night else "?"
        why = (
            "; rejected: " + ", ".join(f"{i.path.name} ({r})" for i, r in rejected)
            if (rejected)
            else ""
        )
        raise PermanentError(
            f"too few {kind} frames in night {night}: {len(frames)} usable, {needed} needed "
            f"(parameter min_frames){why}"
        )


def _check_shapes(frames: list[ImageInfo]) -> tuple[int, int]:
    shapes: dict[tuple[int, int], list[ImageInfo]] = {}
    for image in frames:
        with fits.open(image.path) as hdus:
            header = hdus[image_hdu_index(hdus)].header
        shapes.setdefault((int(header["NAXIS2"]), int(header["NAXIS1"])), []).append(image)
    if len(shapes) > 1:
        summary = ", ".join(f"{len(v)} of {k[1]}x{k[0]}" for k, v in shapes.items())
        raise PermanentError(f"frames of different shapes cannot be stacked: {summary}")
    return next(iter(shapes))


def master_product(context: StepContext, step: str) -> InputProduct | None:
    """The master ``step`` this task was given, or None when the camera has none."""
    products = context.inputs.get(step, ())
    if not products or products[0].output_path is None:
        return None
    return products[0]


def _upstream(context: StepContext, step: str) -> tuple[InputProduct, MasterFrame]:
    product = master_product(context, step)
    if product is None or product.output_path is None:
        raise PermanentError(f"{context.step} found no {step} of this camera")
    master = read_master_frame(product.output_path)
    frames = context.require_night().images
    if frames:
        check_overscan_agrees(
            master, step, frame_sections(frames[0], context.parameters)[1] is not None
        )
    return product, master


def check_overscan_agrees(master: MasterFrame, step: str, frame_has_overscan: bool) -> None:
    """Refuse a master taken with a different overscan handling than the frame's (for
    example an overscan configured for calibrate but not for the master steps)."""
    relative = master.overscan_relative
    if relative != frame_has_overscan:
        raise PermanentError(
            f"{step} was made {'with' if relative else 'without'} overscan correction but "
            f"this frame is {'not ' if relative else ''}corrected: set the same overscan "
            "parameter for master_bias, master_dark, master_flat and calibrate"
        )


def _stack(context: StepContext, frames: list[ImageInfo], transform) -> dict[str, np.ndarray]:
    """Clipped stack of the frames' light-sensitive region, each frame's overscan level
    removed first; ``transform(index, band, rows)`` calibrates a band of that region."""
    full = _check_shapes(frames)
    data_section, bias_section = frame_sections(frames[0], context.parameters)
    window = data_section or (slice(0, full[0]), slice(0, full[1]))
    y0, y1, _ = window[0].indices(full[0])
    x0, x1, _ = window[1].indices(full[1])
    height, width = y1 - y0, x1 - x0
    if bias_section is not None:
        layout = frames[0].layout
        channel_map = channel_index_map(layout, full)
        levels = [_overscan_by_channel(f.path, bias_section, channel_map) for f in frames]
        window_map = channel_map[window]

        def corrected(index: int, band: np.ndarray, rows: slice) -> np.ndarray:
            band = band - levels[index][window_map[rows]]
            return transform(index, band, rows) if transform else band

        step = corrected
    else:
        step = transform
    rows = band_rows(len(frames), width, float(context.parameters["memory_limit_mb"]))
    value = np.empty((height, width), np.float32)
    error = np.empty((height, width), np.float32)
    used = np.empty((height, width), np.int16)
    for band, data in read_bands([f.path for f in frames], rows, step, window):
        result = clipped_stack(data, sigma=float(context.parameters["sigma"]))
        value[band], error[band], used[band] = result.value, result.error, result.used
    return {"MASTER": value, "ERROR": error, "USED": used}


def _overscan_by_channel(path: Path, section: tuple[slice, slice], channel_map) -> np.ndarray:
    """Level of each channel's pixels in a frame's overscan section, ADU."""
    with fits.open(path, memmap=False) as hdus:
        values = np.asarray(hdus[image_hdu_index(hdus)].section[section], dtype=np.float64)
    where = channel_map[section]
    levels = np.zeros(int(channel_map.max()) + 1)
    for channel in range(levels.size):
        chosen = values[where == channel]
        if chosen.size == 0:
            raise PermanentError(f"{path.name}: the overscan holds no pixel of channel {channel}")
        levels[channel] = robust_level(chosen)
    return levels


def _product(
    context: StepContext,
    step: type[Step],
    frames: list[ImageInfo],
    rejected: list[tuple[ImageInfo, str]],
    images: dict[str, np.ndarray],
    *,
    unit: str,
    iso: int | None,
    masters: dict[str, InputProduct] | None = None,
    **facts,
) -> MasterFrame:
    """The master frame a master step writes, with its provenance."""
    night = context.require_night()
    relative = bool(frames) and frame_sections(frames[0], context.parameters)[1] is not None
    return MasterFrame(
        master=images["MASTER"],
        error=images["ERROR"],
        used=images["USED"],
        hot=images.get("HOT"),
        provenance=Provenance.of(context, version=step.version, masters=masters),
        frames_used=tuple((str(f.path), f.sha256) for f in frames),
        rejected=tuple((str(f.path), reason) for f, reason in rejected),
        iso=iso,
        overscan_relative=relative,
        camera_serial=night.camera_serial,
        layout=night.layout,
        unit=unit,
        **facts,
    )


class MasterBias(Step):
    name = "master_bias"
    outputs = ("master_frame",)
    scope = Scope.NIGHT
    inputs = ("frame_qc",)
    queue = "heavy"
    image_types = frozenset({ImageType.BIAS})
    parameters = COMMON

    def run(self, context: StepContext) -> StepResult:
        frames, rejected, iso = _one_iso(_frames(context, ImageType.BIAS), "bias")
        _check_count(context, frames, "bias", rejected)
        images = _stack(context, frames, None)
        path = context.output_path("fits")
        write_master_frame(
            path, _product(context, type(self), frames, rejected, images, unit="adu", iso=iso)
        )
        master = images["MASTER"]
        return StepResult(
            path,
            {
                "frames": len(frames),
                "iso": iso,
                "median_adu": float(np.median(master)),
                "median_error_adu": float(np.median(images["ERROR"])),
                "rejected": {str(i.path): r for i, r in rejected},
            },
        )


class MasterDark(Step):
    name = "master_dark"
    outputs = ("master_frame",)
    scope = Scope.NIGHT
    inputs = ("frame_qc",)
    queue = "heavy"
    master_inputs = ("master_bias",)
    image_types = frozenset({ImageType.DARK})
    parameters = (*COMMON, Parameter("hot_sigma", 10.0, "σ", "Hot pixel threshold."))

    def run(self, context: StepContext) -> StepResult:
        frames = [f for f in _frames(context, ImageType.DARK) if f.exptime > 0]
        frames, rejected, iso = _one_iso(frames, "dark")
        _check_count(context, frames, "dark", rejected)
        bias_product, bias_master = _upstream(context, "master_bias")
        bias = bias_master.master

        def to_rate(index: int, band: np.ndarray, rows: slice) -> np.ndarray:
            return (band - bias[rows]) / frames[index].exptime

        images = _stack(context, frames, to_rate)
        # The master bias's error is common to every frame: the scatter does not show it.
        exptime = float(np.mean([f.exptime for f in frames]))
        images["ERROR"] = np.hypot(images["ERROR"], bias_master.error / exptime).astype(np.float32)
        rate = images["MASTER"]
        median = float(np.median(rate))
        spread = float(1.4826 * np.median(np.abs(rate - median)))
        hot = rate > median + float(context.parameters["hot_sigma"]) * max(spread, 1e-6)
        images["HOT"] = hot
        path = context.output_path("fits")
        product = _product(
            context, type(self), frames, rejected, images, unit="adu/s", iso=iso,
            masters={"master_bias": bias_product},
        )  # fmt: skip
        write_master_frame(path, product)
        return StepResult(
            path,
            {
                "frames": len(frames),
                "iso": iso,
                "median_rate_adu_s": median,
                "hot_pixels": int(hot.sum()),
                "rejected": {str(i.path): r for i, r in rejected},
            },
        )


class MasterFlat(Step):
    name = "master_flat"
    outputs = ("master_frame",)
    scope = Scope.NIGHT
    inputs = ("frame_qc",)
    queue = "heavy"
    master_inputs = ("master_bias", "master_dark")
    image_types = frozenset({ImageType.FLAT})
    parameters = (
        *COMMON,
        SATURATION,
        Parameter("min_level", 0.1, "fraction", "Least flat level, of the saturation level."),
        Parameter("max_level", 0.75, "fraction", "Highest flat level, of the saturation."),
        Parameter(
            "max_structure",
            0.02,
            "fraction",
            "Largest large-scale deviation from the night's median flat (clouds).",
        ),
    )

    def run(self, context: StepContext) -> StepResult:
        frames, rejected, iso = _one_iso(_frames(context, ImageType.FLAT), "flat")
        bias_product, bias_master = _upstream(context, "master_bias")
        bias = bias_master.master
        dark_product, dark_master = _upstream(context, "master_dark")
        dark = dark_master.master
        layout = context.night.layout if context.night else "MONO"
        chans = channels(layout)
        kept, levels = [], {}
        normalised = {}
        bias_level = float(np.median(bias))
        # Per frame: its level, its zero, its own clip level and saturated fraction; the
        # exposure limits are applied once the night's clip level is known (a camera whose
        # headers give no SATURATE: the highest measured over the night's flats, so a
        # flat none of whose pixels clips is judged against the one that does).
        seen = []
        for image in frames:
            whole, header = read_image(image.path)
            raw, overscan = overscan_of(image, whole, context.parameters)
            limit = saturation_level(context.parameters, header, raw)
            zero = 0.0 if overscan is None else overscan
            signal = raw.astype(np.float32) - zero - bias - dark * image.exptime
            median = float(np.median(signal))
            for channel in chans:
                view = channel.view(signal)
                view /= np.median(view)
            normalised[image.id] = _block_means(signal, 32)
            seen.append((image, median, float(np.median(zero)), limit,
                         float(np.mean(raw >= limit))))  # fmt: skip
        night_limit = max((entry[3] for entry in seen), default=0.0)
        for image, median, zero_level, limit, clipped in seen:
            # Room above the frame's zero level (its overscan, if any, plus the bias).
            headroom = night_limit - bias_level - zero_level
            saturated = clipped if limit >= night_limit else 0.0
            if median < float(context.parameters["min_level"]) * headroom:
                rejected.append((image, f"under-exposed: level {median:.0f} ADU"))
            elif saturated > 1e-3 or median > float(context.parameters["max_level"]) * headroom:
                rejected.append((image, f"over-exposed or saturated: level {median:.0f} ADU"))
            else:
                levels[image.id] = median
                kept.append(image)
        if kept:
            reference = np.median(np.array([normalised[i.id] for i in kept]), axis=0)
            limit = float(context.parameters["max_structure"])
            for image in list(kept):
                structure = float(np.max(np.abs(normalised[image.id] / reference - 1)))
                if structure > limit:
                    kept.remove(image)
                    rejected.append((image, f"clouds: large-scale structure {structure:.1%}"))
        _check_count(context, kept, "usable flat", rejected)

        def calibrate(index: int, band: np.ndarray, rows: slice) -> np.ndarray:
            # Each frame scaled by its level; the master is normalised per channel below.
            signal = band - bias[rows] - dark[rows] * kept[index].exptime
            return signal / levels[kept[index].id]

        images = _stack(context, kept, calibrate)
        for channel in chans:
            view = channel.view(images["MASTER"])
            norm = float(np.median(view))
            view /= norm
            channel.view(images["ERROR"])[...] /= norm
        gain, read_noise = self._photon_transfer(kept, context, bias, dark, chans)
        product = _product(
            context, type(self), kept, rejected, images, unit="", iso=iso,
            masters={"master_bias": bias_product, "master_dark": dark_product},
            gain=gain, read_noise=read_noise,
        )  # fmt: skip
        path = context.output_path("fits")
        write_master_frame(path, product)
        return StepResult(
            path,
            {
                "frames": len(kept),
                "iso": iso,
                "gain": gain,
                "read_noise": read_noise,
                "rejected": {str(i.path): r for i, r in rejected},
            },
        )

    @staticmethod
    def _photon_transfer(kept, context, bias, dark, chans) -> tuple[float, float]:
        iso = header_iso(kept[0].header) if kept else None
        biases = [
            i
            for i in context.night.images
            if i.image_type is ImageType.BIAS and header_iso(i.header) in (None, iso)
        ][:2]
        if len(kept) < 2 or len(biases) < 2:
            raise PermanentError("photon transfer needs two usable flats and two biases")

        def science(image):
            raw, overscan = overscan_of(image, read_image(image.path)[0], context.parameters)
            return raw.astype(np.float64) - (0.0 if overscan is None else overscan)

        flat_a, flat_b = (science(i) for i in kept[:2])
        bias_a, bias_b = (science(i) for i in biases)
        gains, noises = [], []
        for channel in chans:
            gain, noise = photon_transfer(
                (channel.view(flat_a), channel.view(flat_b)),
                (channel.view(bias_a), channel.view(bias_b)),
                bias_level=channel.view(bias) + channel.view(dark) * kept[0].exptime,
            )
            gains.append(gain)
            noises.append(noise)
        return float(np.median(gains)), float(np.median(noises))


def _block_means(image: np.ndarray, block: int) -> np.ndarray:
    ny, nx = (d - d % block for d in image.shape)
    view = image[:ny, :nx].reshape(ny // block, block, nx // block, block)
    return view.mean(axis=(1, 3))
