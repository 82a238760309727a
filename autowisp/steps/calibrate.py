"""calibrate: an object frame calibrated with its camera's nearest masters, error and mask.

C(I) = (I − O(I) − B0 − τI · Ḋ0) / (F0/‖F0‖) in electrons, with O(I) the frame's own
overscan level where the camera has an overscan (BIASSEC/DATASEC or the ``overscan``
parameter; the product is cut to the light-sensitive region), the nearest masters of the
camera at the frame's ISO, and the gain and read noise that master_flat measured by
photon transfer (or given as parameters). Cosmic-ray hits away from stars are flagged
(:mod:`autowisp.core.cosmics`). Written as :class:`autowisp.io.products.CalibratedFrame`:
tile-compressed ``IMAGE`` (e⁻) and ``MASK`` (:class:`autowisp.core.calibration.MaskBit`);
the ERROR (e⁻) is derived by the reader from the image and the masters, which the header
names (MBIAS, MDARK, MFLAT) with the raw frame, gain, read noise and Bayer layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autowisp.core.bayer import channels
from autowisp.core.calibration import MaskBit, calibrate_frame
from autowisp.core.cosmics import cosmic_ray_mask
from autowisp.errors import PermanentError
from autowisp.io.fits import read_image
from autowisp.io.keywords import header_iso
from autowisp.io.products import (
    KEPT_KEYWORDS,
    CalibratedFrame,
    read_master_frame,
    write_calibrated_frame,
)
from autowisp.io.provenance import Provenance
from autowisp.steps.base import InputProduct, Parameter, Step, StepContext, StepResult
from autowisp.steps.masters import (
    OVERSCAN,
    SATURATION,
    check_overscan_agrees,
    master_product,
    overscan_of,
    saturation_level,
)
from autowisp.vocabulary import ImageType, Scope

__all__ = ["Calibrate"]


class Calibrate(Step):
    name = "calibrate"
    outputs = ("calibrated_frame",)
    scope = Scope.IMAGE
    master_inputs = ("master_bias", "master_dark", "master_flat")
    image_types = frozenset({ImageType.OBJECT})
    parameters = (
        OVERSCAN,
        Parameter("gain", 0.0, "e⁻/ADU", "0: the master flat's photon-transfer gain."),
        Parameter("read_noise", 0.0, "e⁻", "0: the master flat's photon-transfer value."),
        SATURATION,
        Parameter(
            "cosmic_ray_sigma",
            12.0,
            "σ",
            "Peak of a cosmic-ray hit above the background (groups of at most 6 pixels "
            "above 2σ); 0 disables the search.",
        ),
        Parameter(
            "uncalibrated_cameras",
            [],
            "",
            "Serials of cameras whose frames proceed without masters when the camera "
            "has none (flagged UNCALIB); others wait for calibration frames.",
        ),
        Parameter(
            "uncalibrated_bias_adu",
            0.0,
            "ADU",
            "Bias level without masters; 0 estimates it per channel from the darkest "
            "0.1 % of pixels.",
        ),
    )

    def run(self, context: StepContext) -> StepResult:
        image = context.require_image()
        products: dict[str, InputProduct] = {}
        for step in self.master_inputs:
            product = master_product(context, step)
            if product is None:
                if image.camera_serial in context.parameters["uncalibrated_cameras"]:
                    return self._uncalibrated(context)
                iso = header_iso(image.header)
                at = f" at ISO {iso}" if iso is not None else ""
                raise PermanentError(f"no {step} of this camera{at} for {image.path.name}")
            products[step] = product
        masters = {
            step: read_master_frame(Path(str(p.output_path))) for step, p in products.items()
        }
        whole, header = read_image(image.path)
        raw, overscan = overscan_of(image, whole, context.parameters)
        for step, master in masters.items():
            check_overscan_agrees(master, step, overscan is not None)
        bias, dark, flat = (masters[s] for s in self.master_inputs)
        gain = float(context.parameters["gain"]) or float(flat.gain or 0.0)
        read_noise = float(context.parameters["read_noise"]) or float(flat.read_noise or 0.0)
        if gain <= 0:
            raise PermanentError(
                f"the master flat {products['master_flat'].output_path} gives no gain: set "
                "[steps.calibrate] gain (e-/ADU)"
            )
        saturation = saturation_level(context.parameters, header, raw)
        if raw.shape != bias.master.shape:
            raise PermanentError(
                f"{image.path.name} is {raw.shape[1]}x{raw.shape[0]} but the masters are "
                f"{bias.master.shape[1]}x{bias.master.shape[0]}"
            )
        calibrated, _error, mask = calibrate_frame(
            raw,
            exptime=image.exptime,
            bias=bias.master,
            dark_rate=dark.master,
            flat=flat.master,
            gain=gain,
            read_noise=read_noise,
            saturation=saturation,
            bias_error=bias.error,
            dark_error=dark.error,
            flat_error=flat.error,
            hot=dark.hot,
            overscan=0.0 if overscan is None else overscan,
        )
        hits = self._cosmic_rays(context, calibrated, mask, image.layout)
        path = context.output_path("fits")
        write_calibrated_frame(
            path,
            CalibratedFrame(
                image=calibrated,
                mask=mask,
                gain=gain,
                read_noise=read_noise,
                exptime=image.exptime,
                layout=image.layout,
                provenance=Provenance.of(
                    context, version=self.version, uncalibrated=False, masters=products
                ),
                header={k: header[k] for k in KEPT_KEYWORDS if k in header},
            ),
        )
        good = mask == 0
        median = noise = None
        if good.any():  # the good pixels and their median once (each a full-frame pass)
            values = calibrated[good]
            centre = np.median(values)
            median = float(centre)
            noise = float(1.4826 * np.median(np.abs(values - centre)))
        return StepResult(
            path,
            {
                "uncalibrated": False,
                "median_e": median,
                "noise_e": noise,
                "saturated_fraction": float(np.mean(raw >= saturation)),
                "masked_fraction": float(1 - good.mean()),
                "cosmic_ray_pixels": hits,
            },
        )

    @staticmethod
    def _cosmic_rays(context: StepContext, calibrated, mask, layout: str) -> int:
        """Flag cosmic-ray hits in ``mask`` (in place); the number of pixels flagged."""
        sigma = float(context.parameters["cosmic_ray_sigma"])
        if sigma <= 0:
            return 0
        found = cosmic_ray_mask(calibrated, layout, bad=mask != 0, threshold=sigma)
        mask[found] |= np.uint8(MaskBit.COSMIC_RAY)
        return int(found.sum())

    def _uncalibrated(self, context: StepContext) -> StepResult:
        """No masters exist for this camera and it may proceed: subtract a bias level only,
        and say so in the header and the QC figures."""
        image = context.require_image()
        whole, header = read_image(image.path)
        raw, overscan = overscan_of(image, whole, context.parameters)
        level = float(context.parameters["uncalibrated_bias_adu"])
        bias = np.zeros(raw.shape, dtype=np.float64)
        has_overscan = overscan is not None
        if not has_overscan:  # with an overscan, its level is the bias level
            for channel in channels(image.layout):
                view = channel.view(raw).astype(np.float64)
                channel.view(bias)[...] = level or float(np.percentile(view, 0.1))
        gain = float(context.parameters["gain"]) or 1.0
        read_noise = float(context.parameters["read_noise"])
        saturation = saturation_level(context.parameters, header, raw)
        calibrated, _error, mask = calibrate_frame(
            raw,
            exptime=image.exptime,
            bias=bias,
            dark_rate=np.zeros(raw.shape),
            flat=np.ones(raw.shape),
            gain=gain,
            read_noise=read_noise,
            saturation=saturation,
            overscan=0.0 if overscan is None else overscan,
        )
        hits = self._cosmic_rays(context, calibrated, mask, image.layout)
        if has_overscan:
            how = "bias level: the frame's overscan"
        else:
            how = f"bias level estimated per channel: {sorted(set(bias.flat))[:4]}"
        path = context.output_path("fits")
        write_calibrated_frame(
            path,
            CalibratedFrame(
                image=calibrated,
                mask=mask,
                gain=gain,
                read_noise=read_noise,
                exptime=image.exptime,
                layout=image.layout,
                unit="electron" if context.parameters["gain"] else "adu",
                provenance=Provenance.of(context, version=self.version, uncalibrated=True),
                header={k: header[k] for k in KEPT_KEYWORDS if k in header} | {"HISTORY": how},
            ),
        )
        return StepResult(
            path,
            {
                "uncalibrated": True,
                "saturated_fraction": float(np.mean(raw >= saturation)),
                "cosmic_ray_pixels": hits,
            },
        )
