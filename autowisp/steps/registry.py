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
from autowisp.steps.base import Input, Kind, Step
from autowisp.steps.calibrate import Calibrate
from autowisp.steps.frame_qc import FrameQC
from autowisp.steps.lc_statistics import LightCurveStatistics
from autowisp.steps.lightcurves import LightCurves
from autowisp.steps.magfit import Magfit
from autowisp.steps.masters import MasterBias, MasterDark, MasterFlat
from autowisp.steps.night_qc import NightQC
from autowisp.steps.photometry import Photometry
from autowisp.steps.star_list import StarList
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
    StarList,
    Photometry,
    Magfit,
    LightCurves,
    LightCurveStatistics,
)


class Registry:
    """A validated DAG of step classes, iterated in dependency order."""

    def __init__(self, steps: Iterable[type[Step]]):
        self._steps: dict[str, type[Step]] = {}
        self._edges: dict[str, tuple[Input, ...]] = {}
        for step in steps:
            if step.name in self._steps:
                raise StepDefinitionError(f"two steps are named {step.name!r}")
            self._steps[step.name] = step
        for step in self._steps.values():
            declared = (*step.inputs, *(Input(name, Kind.MASTER) for name in step.master_inputs))
            self._edges[step.name] = tuple(self._edge(step, given) for given in declared)
        self._order = self._topological()
        self._generational: dict[str, bool] = {}
        for name in self._order:  # upstream first: each edge's step is known already
            self._generational[name] = self._steps[name].scope is not Scope.IMAGE or any(
                self._steps[edge.step].scope is not Scope.IMAGE or self._generational[edge.step]
                for edge in self._edges[name]
            )

    def _topological(self) -> list[str]:
        order: list[str] = []
        marks: dict[str, str] = {}

        def visit(name: str, path: tuple[str, ...]) -> None:
            if marks.get(name) == "done":
                return
            if marks.get(name) == "visiting":
                raise StepDefinitionError(f"the steps form a cycle: {' -> '.join((*path, name))}")
            marks[name] = "visiting"
            for edge in self._edges[name]:
                if edge.kind is not Kind.PREVIOUS:  # a step's own earlier generation
                    visit(edge.step, (*path, name))
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

    def _edge(self, step: type[Step], given: str | Input) -> Input:
        """The edge for a declared input, its kind derived from the scopes for a name;
        StepDefinitionError for an edge the scopes do not allow."""
        name = given.step if isinstance(given, Input) else given
        if name == step.name:
            if step.scope not in (Scope.SHARD, Scope.FIELD):
                raise StepDefinitionError(
                    f"step {step.name!r} ({step.scope.value}) names itself as an input: only "
                    "shard and field steps can read their own previous generation"
                )
            return Input(name, Kind.PREVIOUS)
        if name not in self._steps:
            raise StepDefinitionError(
                f"step {step.name!r} needs {name!r}, which is not a declared step"
            )
        upstream = self._steps[name]
        pair = (step.scope, upstream.scope)
        derived = {
            (Scope.NIGHT, Scope.IMAGE): Kind.BARRIER,
            (Scope.SHARD, Scope.NIGHT): Kind.NIGHTS,
            (Scope.NIGHT, Scope.SHARD): Kind.SHARDS,
            (Scope.FIELD, Scope.SHARD): Kind.FIELD_SHARDS,
        }
        kind = given.kind if isinstance(given, Input) else derived.get(pair, Kind.SAME)
        allowed = {
            Kind.SAME: {(Scope.IMAGE, Scope.IMAGE), (Scope.IMAGE, Scope.NIGHT),
                        (Scope.NIGHT, Scope.NIGHT), (Scope.SHARD, Scope.SHARD),
                        (Scope.FIELD, Scope.FIELD), (Scope.SHARD, Scope.FIELD)},
            Kind.BARRIER: {(Scope.NIGHT, Scope.IMAGE)},
            Kind.MASTER: {(Scope.IMAGE, Scope.NIGHT), (Scope.NIGHT, Scope.NIGHT)},
            Kind.AFTER: {(Scope.IMAGE, Scope.NIGHT)},
            Kind.NIGHTS: {(Scope.SHARD, Scope.NIGHT)},
            Kind.SHARDS: {(Scope.NIGHT, Scope.SHARD)},
            Kind.FIELD_SHARDS: {(Scope.FIELD, Scope.SHARD)},
            Kind.PREVIOUS: set(),  # only a step naming itself (above)
        }  # fmt: skip
        if pair not in allowed[kind]:
            raise StepDefinitionError(
                f"step {step.name!r} ({step.scope.value}) cannot take {name!r} "
                f"({upstream.scope.value}) as a {kind.value} input"
            )
        return Input(name, kind)

    def edges(self, name: str) -> tuple[Input, ...]:
        """The input edges of step ``name``, with their kinds."""
        return self._edges[name]

    def upstream(self, name: str) -> tuple[Input, ...]:
        """The edges of step ``name`` from other steps (its ``previous`` edge, to its own
        earlier generation, left out): the configurations it pins."""
        return tuple(e for e in self._edges[name] if e.kind is not Kind.PREVIOUS)

    def generational(self, name: str) -> bool:
        """Whether the step's tasks work on a night generation: night steps, and image
        steps that read (directly or not) a night step's output. The others work on the
        frame alone (generation 0) and run while the night is still open."""
        return self._generational[name]

    def downstream(self, name: str) -> set[str]:
        """Steps that depend on ``name``, directly or not (``name`` excluded)."""
        found: set[str] = set()
        for step in self:
            upstream = {
                edge.step for edge in self._edges[step.name] if edge.kind is not Kind.PREVIOUS
            }
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
