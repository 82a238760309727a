"""Steps standing in for the science chain over shards and fields (magfit, light
curves, EPD, TFA templates, TFA, night report), importable by real Celery workers.

``lightcurves`` writes real shard generations through :mod:`autowisp.io.shards`, so the
tests check what a reader of the products sees; the others write JSON of what they read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autowisp.io.atomic import write_bytes_atomic
from autowisp.io.provenance import Provenance
from autowisp.io.shards import NightBlock, read_shard_generation, write_shard_generation
from autowisp.steps.base import Input, Kind, Parameter, Step, StepContext, StepResult
from autowisp.steps.registry import Registry
from autowisp.vocabulary import ImageType, Scope


class Measure(Step):
    """Per frame: its image id (stands in for photometry)."""

    name = "measure"
    scope = Scope.IMAGE
    image_types = frozenset({ImageType.OBJECT})

    def run(self, context: StepContext) -> StepResult:
        image = context.require_image()
        path = context.output_path("json")
        write_bytes_atomic(path, json.dumps({"image": image.id}).encode())
        return StepResult(path, {"image": image.id})


class Nightly(Step):
    """Per night: the frames measured (stands in for magfit)."""

    name = "nightly"
    scope = Scope.NIGHT
    inputs = ("measure",)
    image_types = frozenset({ImageType.OBJECT})

    def run(self, context: StepContext) -> StepResult:
        frames = sorted(int(p.qc["image"]) for p in context.inputs["measure"])
        path = context.output_path("json")
        write_bytes_atomic(path, json.dumps({"frames": frames}).encode())
        return StepResult(path, {"frames": len(frames)})


class LightCurves(Step):
    """Per shard generation: the previous generation plus the nights placed since."""

    name = "lightcurves"
    scope = Scope.SHARD
    inputs = ("nightly", "lightcurves")
    parameters = (Parameter("label", "a"),)

    def run(self, context: StepContext) -> StepResult:
        shard = context.require_shard()
        [previous] = context.inputs["lightcurves"] or (None,)
        by_night = {int(p.target.split(":")[1]): p for p in context.inputs["nightly"]}
        written = []
        for placed in shard.appended:
            product = by_night.get(placed.night_id)
            if product is None:
                continue
            frames = json.loads(product.output_path.read_text())["frames"]
            stars = np.arange(shard.star_lo, shard.star_hi)
            written.append(
                NightBlock(
                    placed.night_id,
                    placed.local_date.isoformat(),
                    placed.night_generation,
                    {"frames": np.array(frames), "flux": np.outer(frames, stars).astype(float)},
                    source=f"task {product.task_id}",
                )
            )
        path = context.output_path("h5")
        write_shard_generation(
            path,
            shard=shard.name,
            field_name=shard.field_name,
            star_lo=shard.star_lo,
            star_hi=shard.star_hi,
            generation=shard.generation,
            provenance=Provenance(self.name, self.version, context.config_version),
            previous=previous.output_path if previous is not None else None,
            written=written,
            dropped=[n.night_id for n in shard.appended if n.night_id not in by_night],
        )
        return StepResult(path, {"appended": [n.night_id for n in shard.appended]})


def content(path: Path) -> dict[str, list[int]]:
    """night id -> frames, as a reader of a shard generation sees it."""
    generation = read_shard_generation(path)
    return {str(n): [int(f) for f in b.columns["frames"]] for n, b in generation.nights.items()}


class Epd(Step):
    name = "epd"
    scope = Scope.SHARD
    inputs = ("lightcurves",)

    def run(self, context: StepContext) -> StepResult:
        [source] = context.inputs["lightcurves"]
        path = context.output_path("json")
        write_bytes_atomic(path, json.dumps(content(source.output_path)).encode())
        return StepResult(path, {"nights": len(content(source.output_path))})


class Templates(Step):
    """Per field generation: what every shard's EPD product holds."""

    name = "templates"
    scope = Scope.FIELD
    inputs = ("epd",)

    def run(self, context: StepContext) -> StepResult:
        field = context.require_field()
        shards = {p.target: json.loads(p.output_path.read_text()) for p in context.inputs["epd"]}
        path = context.output_path("json")
        write_bytes_atomic(path, json.dumps(shards, sort_keys=True).encode())
        return StepResult(
            path, {"shards": len(shards), "field_shards": [s.name for s in field.shards]}
        )


class Tfa(Step):
    name = "tfa"
    scope = Scope.SHARD
    inputs = ("epd", Input("templates", Kind.SAME))

    def run(self, context: StepContext) -> StepResult:
        [epd] = context.inputs["epd"]
        [templates] = context.inputs["templates"]
        path = context.output_path("json")
        content = {
            "epd": json.loads(epd.output_path.read_text()),
            "templates_task": templates.task_id,
        }
        write_bytes_atomic(path, json.dumps(content).encode())
        return StepResult(path, {"templates_task": templates.task_id})


class Report(Step):
    """Per night: the shards it touched, as TFA saw them."""

    name = "report"
    scope = Scope.NIGHT
    inputs = ("tfa",)
    image_types = frozenset({ImageType.OBJECT})

    def run(self, context: StepContext) -> StepResult:
        night = context.require_night()
        shards = {
            p.target: json.loads(p.output_path.read_text())["epd"] for p in context.inputs["tfa"]
        }
        mine = {t: c.get(str(night.id)) for t, c in shards.items()}
        path = context.output_path("json")
        write_bytes_atomic(path, json.dumps(mine, sort_keys=True).encode())
        return StepResult(path, {"shards": sorted(shards), "frames": mine})


REGISTRY = Registry([Measure, Nightly, LightCurves, Epd, Templates, Tfa, Report])
