"""frame_qc: per-frame, per-channel level, noise and saturation of a raw frame.

Operators see at a glance which frames are blank, saturated or odd, and night_qc uses
these figures to flag outliers (an over-exposed flat, a frame taken with the cap on).
Output: ``frame_qc/<config>/<night>/image-<id>.h5`` with one row per channel
(:class:`autowisp.io.products.FrameQCReport`).
"""

from __future__ import annotations

import numpy as np

from autowisp.core.bayer import channels
from autowisp.errors import PermanentError
from autowisp.io.fits import read_image
from autowisp.io.products import ChannelQC, FrameQCReport, write_frame_qc
from autowisp.io.provenance import Provenance
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
from autowisp.vocabulary import Scope

__all__ = ["FrameQC", "channel_statistics"]


def channel_statistics(image: np.ndarray, layout: str, saturation: float) -> dict[str, dict]:
    """Median (ADU), robust noise (1.4826 MAD, ADU) and saturated fraction per channel."""
    result = {}
    for channel in channels(layout):
        values = channel.view(image).astype(np.float64).ravel()
        median = float(np.median(values))
        noise = float(1.4826 * np.median(np.abs(values - median)))
        result[channel.name] = {
            "median": median,
            "noise": noise,
            "saturated_fraction": float(np.mean(values >= saturation)),
        }
    return result


class FrameQC(Step):
    name = "frame_qc"
    scope = Scope.IMAGE
    outputs = ("frame_qc",)
    version = "1"
    parameters = (
        Parameter(
            "saturation_adu",
            0,
            "ADU",
            "Saturation level; 0 takes the header's SATURATE, else the type's maximum.",
        ),
    )

    def run(self, context: StepContext) -> StepResult:
        image_info = context.require_image()
        try:
            data, header = read_image(image_info.path)
        except (OSError, ValueError) as error:
            raise PermanentError(f"cannot read {image_info.path}: {error}") from error
        saturation = float(context.parameters["saturation_adu"]) or float(
            header.get("SATURATE", np.iinfo(data.dtype).max if data.dtype.kind in "iu" else np.inf)
        )
        stats = channel_statistics(data, image_info.layout, saturation)
        path = context.output_path("h5")
        report = FrameQCReport(
            channels={name: ChannelQC(**values) for name, values in stats.items()},
            saturation_adu=saturation,
            image_type=str(image_info.image_type),
            jd=image_info.jd,
            provenance=Provenance.of(context, version=self.version),
        )
        write_frame_qc(path, report)
        return StepResult(path, {"channels": stats, "saturation_adu": saturation})
