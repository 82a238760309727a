"""The DAG of steps, declared in one place.

:data:`PIPELINE` lists the package's steps in dependency order. Steps of the science
chain (calibration masters, calibrate, extract_sources, solve_astrometry, fit_psf,
measure_photometry, magfit, light curves, EPD, TFA, night report; see DESIGN.md) are
added here as they are implemented; a step that is not implemented is not declared,
so no task is ever created for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator

from autowisp.errors import ConfigurationError, StepDefinitionError
from autowisp.steps.astrometry import Astrometry
from autowisp.steps.base import Step
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.night_qc import NightQC
from autowisp.vocabulary import Scope

__all__ = ["PIPELINE", "Registry", "default_registry", "load_registry"]

#: The package's steps, upstream first.
PIPELINE: tuple[type[Step], ...] = (
    FrameQC,
    NightQC,
    MasterBias,
    MasterDark,
    MasterFlat,
    Calibrate,
    Astrometry,
)


class Registry:
    """A validated DAG of step classes, iterated in dependency order."""

    def __init__(self, steps: Iterable[type[Step]]):
        self._steps: dict[str, type[Step]] = {}
        for step in steps:
            if step.name in self._steps:
                raise StepDefinitionError(f"two steps are named {step.name!r}")
            if step.scope not in (Scope.IMAGE, Scope.NIGHT, Scope.SHARD):
                raise StepDefinitionError(f"step {step.name!r} has unknown scope {step.scope!r}")
            self._steps[step.name] = step
        for step in self._steps.values():
            for name in step.master_inputs:
                if name not in self._steps or self._steps[name].scope is not Scope.NIGHT:
                    raise StepDefinitionError(
                        f"step {step.name!r} takes masters from {name!r}, which is not a "
                        "declared night step"
                    )
            for name in step.inputs:
                if name not in self._steps:
                    raise StepDefinitionError(
                        f"step {step.name!r} needs {name!r}, which is not a declared step"
                    )
                if step.scope is Scope.IMAGE and self._steps[name].scope is Scope.SHARD:
                    raise StepDefinitionError(
                        f"image step {step.name!r} cannot depend on shard step {name!r}"
                    )
        self._order = self._topological()

    def _topological(self) -> list[str]:
        order: list[str] = []
        marks: dict[str, str] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if marks.get(name) == "done":
                return
            if marks.get(name) == "visiting":
                raise StepDefinitionError(f"the steps form a cycle: {' -> '.join((*path, name))}")
            marks[name] = "visiting"
            for upstream in self._steps[name].inputs + self._steps[name].master_inputs:
                visit(upstream, (*path, name))
            marks[name] = "done"
            order.append(name)

        for name in self._steps:
            visit(name, ())
        return order

    def __getitem__(self, name: str) -> type[Step]:
        try:
            return self._steps[name]
        except KeyError:
            raise KeyError(f"no step named {name!r}; steps: {', '.join(self._order)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._steps

    def __iter__(self) -> Iterator[type[Step]]:
        return (self._steps[name] for name in self._order)

    def __len__(self) -> int:
        return len(self._steps)

    def downstream(self, name: str) -> set[str]:
        """Steps that depend on ``name``, directly or not (``name`` excluded)."""
        found: set[str] = set()
        for step in self:
            upstream = set(step.inputs) | set(step.master_inputs)
            if name in upstream or found.intersection(upstream):
                found.add(step.name)
        return found


def default_registry() -> Registry:
    """The package's pipeline."""
    return Registry(PIPELINE)


def load_registry(spec: str) -> Registry:
    """The DAG of steps a ``module:attribute`` spec names (a Registry, or a function
    returning one), such as :attr:`autowisp.config.Settings.registry_spec`.

    Raises
    ------
    ConfigurationError
        When the spec cannot be imported or does not give a Registry.
    """
    module_name, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigurationError(
            f"pipeline registry {spec!r} cannot be imported: {error}"
        ) from error
    registry = found() if callable(found) and not isinstance(found, Registry) else found
    if not isinstance(registry, Registry):
        raise ConfigurationError(f"pipeline registry {spec!r} is not a Registry")
    return registry
