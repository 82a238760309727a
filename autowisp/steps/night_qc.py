"""night_qc: the night's frames at a glance, with outliers flagged (a barrier step).

Runs once every frame of the night has its frame_qc done (or dead, or excluded), reading
their reports (:func:`autowisp.io.products.read_frame_qc`). For each frame type it
compares each frame's median level with the night's same-type frames and flags those
more than ``outlier_sigma`` robust deviations away (an over-exposed flat, a cloudy or
capped frame). Writes ``night-<id>.json`` and a plot of the object frames'
sky level and noise through the night, ``night-<id>.png``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from autowisp.errors import PermanentError
from autowisp.io.atomic import atomic_path, write_bytes_atomic
from autowisp.io.products import read_frame_qc
from autowisp.io.provenance import Provenance
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
from autowisp.vocabulary import Scope

__all__ = ["NightQC", "flag_outliers"]


def flag_outliers(levels: np.ndarray, *, sigma: float, floor: float) -> np.ndarray:
    """Mask of values more than ``sigma`` robust deviations (at least ``floor``) off the median."""
    levels = np.asarray(levels, dtype=float)
    if levels.size < 3:
        return np.zeros(levels.size, dtype=bool)
    median = np.median(levels)
    spread = max(1.4826 * np.median(np.abs(levels - median)), floor)
    return np.abs(levels - median) > sigma * spread


class NightQC(Step):
    name = "night_qc"
    scope = Scope.NIGHT
    inputs = ("frame_qc",)
    outputs = ("night_qc",)
    queue = "heavy"
    version = "1"
    parameters = (
        Parameter("outlier_sigma", 5.0, "", "Robust deviations from the night's median."),
        Parameter(
            "level_floor",
            0.05,
            "fraction",
            "Smallest spread assumed, as a fraction of the median level.",
        ),
    )

    def run(self, context: StepContext) -> StepResult:
        night = context.require_night()
        by_id = {image.id: image for image in night.images}
        products = context.inputs.get("frame_qc", ())
        rows: list[dict[str, Any]] = []
        for product in products:
            image = by_id.get(product.image_id or -1)
            if image is None:
                continue
            if product.output_path is None:
                raise PermanentError(f"frame_qc of {image.path.name} is done but wrote no report")
            try:
                report = read_frame_qc(product.output_path)
            except (OSError, KeyError) as error:
                raise PermanentError(
                    f"cannot read the frame_qc report {product.output_path} of "
                    f"{image.path.name}: {error}; rerun frame_qc for this night"
                ) from error
            channels = report.as_dict()
            rows.append(
                {
                    "image_id": image.id,
                    "path": str(image.path),
                    "type": str(image.image_type),
                    "jd": image.jd,
                    "level": float(np.mean([c["median"] for c in channels.values()])),
                    "channels": channels,
                }
            )
        summary: dict = {
            "night_id": night.id,
            "date": night.local_date.isoformat(),
            "camera": night.camera_serial,
            "frames_used": len(rows),
            "frames_in_night": len(night.images),
            "types": {},
            "provenance": {
                key: value
                for key, value, _ in Provenance.of(context, version=self.version).items()
            },
        }
        for kind in sorted({row["type"] for row in rows}):
            group = [row for row in rows if row["type"] == kind]
            levels = np.array([row["level"] for row in group])
            flags = flag_outliers(
                levels,
                sigma=float(context.parameters["outlier_sigma"]),
                floor=float(context.parameters["level_floor"]) * abs(np.median(levels)),
            )
            summary["types"][kind] = {
                "count": len(group),
                "median_level": float(np.median(levels)),
                "outliers": [group[i]["path"] for i in np.flatnonzero(flags)],
            }
        path = context.output_path("json")
        write_bytes_atomic(path, (json.dumps(summary, indent=2) + "\n").encode())
        objects = sorted((row for row in rows if row["type"] == "object"), key=lambda r: r["jd"])
        plot = None
        if objects:
            plot = path.with_suffix(".png")
            _plot(objects, plot, title=f"{night.camera_serial} night {night.local_date}")
        qc = {
            "frames_used": len(rows),
            "frames_in_night": len(night.images),
            "outliers": sum(len(t["outliers"]) for t in summary["types"].values()),
            "plot": str(plot) if plot else None,
        }
        return StepResult(path, qc)


def _plot(objects: list[dict], path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    hours = (np.array([row["jd"] for row in objects]) - objects[0]["jd"]) * 24
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    colours = {"R": "tab:red", "G1": "tab:green", "G2": "olive", "B": "tab:blue", "L": "k"}
    for name in objects[0]["channels"]:
        top.plot(
            hours,
            [row["channels"][name]["median"] for row in objects],
            ".-",
            color=colours.get(name),
            label=name,
        )
        bottom.plot(
            hours,
            [row["channels"][name]["noise"] for row in objects],
            ".-",
            color=colours.get(name),
        )
    top.set_ylabel("median level [ADU]")
    bottom.set_ylabel("robust noise [ADU]")
    bottom.set_xlabel("hours since first object frame")
    top.legend(fontsize="small", ncol=4)
    top.set_title(title)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=90)
    plt.close(figure)
