"""Steps for the service tests, importable by real Celery worker processes.

Each logs start and end (with the worker's pid) to the file named by its ``log``
parameter, so tests can count executions across processes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from autowisp.io.atomic import write_bytes_atomic
from autowisp.steps.base import Parameter, Step, StepContext, StepResult
from autowisp.steps.registry import Registry
from autowisp.vocabulary import ImageType, Scope


def log_event(context: StepContext, event: str) -> None:
    with open(context.parameters["log"], "a") as stream:
        stream.write(
            json.dumps(
                {
                    "step": context.step,
                    "target": context.target,
                    "event": event,
                    "pid": os.getpid(),
                    "t": time.time(),
                }
            )
            + "\n"
        )


def read_events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


class Slow(Step):
    """An image step that takes ``seconds`` and writes a 1 MB output atomically."""

    name = "slow"
    scope = Scope.IMAGE
    image_types = frozenset({ImageType.OBJECT})
    parameters = (Parameter("log", ""), Parameter("seconds", 1.0, "s"))

    def run(self, context: StepContext) -> StepResult:
        log_event(context, "start")
        time.sleep(float(context.parameters["seconds"]))
        payload = (f"{context.image.id}\n" * 100_000).encode()
        path = context.output_path("txt")
        write_bytes_atomic(path, payload)
        log_event(context, "end")
        return StepResult(path, {"bytes": len(payload)})


class Gather(Step):
    name = "gather"
    scope = Scope.NIGHT
    inputs = ("slow",)
    queue = "heavy"
    image_types = frozenset({ImageType.OBJECT})
    parameters = (Parameter("log", ""),)

    def run(self, context: StepContext) -> StepResult:
        log_event(context, "start")
        used = len(context.inputs["slow"])
        log_event(context, "end")
        return StepResult(None, {"used": used})


REGISTRY = Registry([Slow, Gather])
