"""Readiness and inputs of tasks, derived from the kinds of the DAG's edges, in one place.

For a pending task, :func:`evaluate` decides per input edge (see
:class:`autowisp.steps.base.Kind`) whether it can run now (``ready``, with the exact
upstream task ids it will read), must wait (with the reason an operator sees), or will
never be able to run (``exclude``, with the reason). Upstream tasks are always those of
the configuration that the task's own configuration pins (``Configuration.upstream``),
never "whatever is active now", and of the generation the task works on.

The executors record the resolved inputs in the task row when they queue it; the runner
gives the step exactly those (:func:`input_products`).
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import literal, select
from sqlalchemy.orm import Session

from autowisp.db.fields import shard_nights
from autowisp.db.models import (
    Camera,
    Configuration,
    Image,
    ImageState,
    ImageType,
    LightCurveShard,
    Night,
    ShardNight,
    Task,
    TaskState,
)
from autowisp.errors import TransientError
from autowisp.io.keywords import header_iso
from autowisp.steps.base import InputProduct, Kind, Step
from autowisp.steps.registry import Registry
from autowisp.vocabulary import Scope

__all__ = ["Decision", "evaluate", "input_products"]

TERMINAL = frozenset({TaskState.DONE, TaskState.DEAD, TaskState.EXCLUDED})
UNUSABLE = frozenset({TaskState.DEAD, TaskState.EXCLUDED})


@dataclass(frozen=True)
class Decision:
    """What to do with a pending task: ``ready`` (with its inputs), ``wait`` or
    ``exclude`` (with the reason)."""

    task_id: int
    verdict: str
    reason: str = ""
    inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Upstream:
    id: int
    state: TaskState
    image_id: int | None
    night_id: int | None
    generation: int
    iso: int | None


@dataclass(frozen=True)
class _Frame:
    id: int
    image_type: str
    generation: int
    iso: int | None


def _chunks(values: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class _MasterIndex:
    """A camera's masters (one configuration): by (night, generation), the nights' current
    ones under way, and the done current ones by date per ISO, so choosing the nearest
    for each of thousands of frames is a bisection, not a scan of every night."""

    def __init__(self, masters: Sequence[tuple[_Upstream, dt.date, int]]):
        self.own = {(u.night_id or -1, u.generation): u for u, _, _ in masters}
        current = [(u, d) for u, d, closed in masters if u.generation == closed]
        self.busy = [(u.night_id, d) for u, d in current if u.state not in TERMINAL]
        self._done = sorted(
            ((d, u) for u, d in current if u.state is TaskState.DONE),
            key=lambda pair: (pair[0], pair[1].night_id or 0),
        )
        self._by_iso: dict[int | None, tuple[list[dt.date], list[_Upstream]]] = {}

    def nearest(self, iso: int | None, night_id: int, local_date: dt.date) -> _Upstream | None:
        """The done current master of another night nearest ``local_date`` (the earlier
        of two equally near) usable at ``iso`` (masters without an ISO match any)."""
        if iso not in self._by_iso:
            rows = [(d, u) for d, u in self._done if iso is None or u.iso in (None, iso)]
            self._by_iso[iso] = ([d for d, _ in rows], [u for _, u in rows])
        dates, masters = self._by_iso[iso]
        split = bisect.bisect_left(dates, local_date)
        before = next(
            (i for i in range(split - 1, -1, -1) if masters[i].night_id != night_id), None
        )
        after = next(
            (i for i in range(split, len(dates)) if masters[i].night_id != night_id), None
        )
        if before is None and after is None:
            return None
        if after is None or (
            before is not None
            and (local_date - dates[before]).days <= (dates[after] - local_date).days
        ):
            return masters[before] if before is not None else None
        return masters[after]


class _Facts:
    """Everything the decisions for a batch of pending tasks need, loaded in bulk."""

    def __init__(self, session: Session, tasks: Sequence[Task], *, with_iso: bool):
        """``with_iso``: read the frames' headers for their ISO (only master edges need
        it; a header is a few kB of JSON per frame)."""
        self.session = session
        self.nights = sorted({t.night_id for t in tasks if t.night_id is not None})
        self.night_rows: dict[int, tuple[int, dt.date, int]] = {}
        for chunk in _chunks(self.nights):
            for night_id, camera_id, local_date, closed in session.execute(
                select(Night.id, Night.camera_id, Night.local_date, Night.closed_generation)
                .where(Night.id.in_(chunk))
            ):  # fmt: skip
                self.night_rows[night_id] = (camera_id, local_date, closed)
        self.frames: dict[int, list[_Frame]] = defaultdict(list)
        header = Image.header if with_iso else literal(None)
        for chunk in _chunks(self.nights):
            for image_id, night_id, image_type, generation, values in session.execute(
                select(Image.id, Image.night_id, Image.image_type, Image.generation, header)
                .where(Image.night_id.in_(chunk), Image.state == ImageState.INGESTED)
            ):  # fmt: skip
                iso = header_iso(values) if values else None
                self.frames[night_id].append(_Frame(image_id, str(image_type), generation, iso))
        self.iso_of_image = {f.id: f.iso for fs in self.frames.values() for f in fs}
        cameras = sorted({camera for camera, _, _ in self.night_rows.values()})
        self._serials = dict(
            session.execute(select(Camera.id, Camera.serial).where(Camera.id.in_(cameras))).all()
        )
        self._by_night: dict[int, dict[tuple[str, int], _Upstream]] = {}
        self._by_camera: dict[tuple[int, int], list[tuple[_Upstream, dt.date, int]]] = {}
        self._master_indexes: dict[tuple[int, int], _MasterIndex] = {}
        self._shard_ids = sorted({t.shard_id for t in tasks if t.shard_id is not None})
        self._placements: dict[int, list[tuple[int, int, int, int]]] = {}
        self._field_shards: dict[int, list[int]] = {}
        self._night_placements: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self._chains: dict[tuple[int, str], list[_Upstream]] = {}
        self._night_tasks: dict[tuple[int, int], dict[int, _Upstream]] = {}

    # Shards and fields: loaded only for batches that have such edges.

    def placements(self, shard_id: int) -> list[tuple[int, int, int, int]]:
        """The shard's (night, night generation, shard generation, field generation)."""
        if shard_id not in self._placements:
            self._placements.update(
                {s: [] for s in self._shard_ids} | shard_nights(self.session, self._shard_ids)
            )
            if shard_id not in self._placements:
                self._placements.update(shard_nights(self.session, [shard_id]))
        return self._placements.get(shard_id, [])

    def shards_of_field(self, field_id: int) -> list[int]:
        if field_id not in self._field_shards:
            self._field_shards[field_id] = list(
                self.session.scalars(
                    select(LightCurveShard.id)
                    .where(LightCurveShard.field_id == field_id)
                    .order_by(LightCurveShard.shard_index)
                )
            )
        return self._field_shards[field_id]

    def placed_night(self, night_id: int, generation: int) -> list[tuple[int, int, int]]:
        """(shard, field, shard generation) where the night generation was placed."""
        key = (night_id, generation)
        if key not in self._night_placements:
            self._night_placements[key] = [
                (shard, field_, shard_generation)
                for shard, field_, shard_generation in self.session.execute(
                    select(
                        ShardNight.shard_id, LightCurveShard.field_id, ShardNight.shard_generation
                    )
                    .join(LightCurveShard, LightCurveShard.id == ShardNight.shard_id)
                    .where(
                        ShardNight.night_id == night_id, ShardNight.night_generation == generation
                    )
                    .order_by(ShardNight.shard_id)
                )
            ]
        return self._night_placements[key]

    def night_fields(self, night_id: int, generation: int) -> set[int]:
        """Fields of the night generation's object frames."""
        return set(
            self.session.scalars(
                select(Image.field_id)
                .where(
                    Image.night_id == night_id,
                    Image.generation <= generation,
                    Image.state == ImageState.INGESTED,
                    Image.image_type == ImageType.OBJECT,
                    Image.field_id.is_not(None),
                )
                .distinct()
            )
        )

    def chain(self, configuration_id: int, target: str) -> list[_Upstream]:
        """The configuration's tasks of a shard or field target, by generation."""
        key = (configuration_id, target)
        if key not in self._chains:
            rows = self.session.execute(
                select(Task.id, Task.state, Task.generation)
                .where(Task.configuration_id == configuration_id, Task.target == target)
                .order_by(Task.generation)
            )
            self._chains[key] = [
                _Upstream(task_id, state, None, None, generation, None)
                for task_id, state, generation in rows
            ]
        return self._chains[key]

    def night_task(
        self, configuration_id: int, night_id: int, generation: int
    ) -> _Upstream | None:
        """The configuration's night task of (night, generation)."""
        key = (configuration_id, night_id)
        if key not in self._night_tasks:
            self._night_tasks[key] = {
                generation_: _Upstream(task_id, state, None, night_id, generation_, None)
                for task_id, state, generation_ in self.session.execute(
                    select(Task.id, Task.state, Task.generation).where(
                        Task.configuration_id == configuration_id,
                        Task.night_id == night_id,
                        Task.image_id.is_(None),
                    )
                )
            }
        return self._night_tasks[key].get(generation)

    def master_index(self, configuration_id: int, camera_id: int) -> _MasterIndex:
        """The camera's masters of the configuration, indexed for :func:`_master`."""
        key = (configuration_id, camera_id)
        if key not in self._master_indexes:
            self._master_indexes[key] = _MasterIndex(self.camera_masters(*key))
        return self._master_indexes[key]

    def serial_of(self, camera_id: int) -> str:
        return str(self._serials.get(camera_id, ""))

    def upstream_of_nights(self, configuration_id: int) -> dict[tuple[str, int], _Upstream]:
        """The configuration's tasks in the batch's nights, by (target, generation)."""
        if configuration_id not in self._by_night:
            found: dict[tuple[str, int], _Upstream] = {}
            for chunk in _chunks(self.nights):
                rows = self.session.execute(
                    select(Task.id, Task.state, Task.target, Task.image_id, Task.night_id,
                           Task.generation)
                    .where(Task.configuration_id == configuration_id, Task.night_id.in_(chunk))
                )  # fmt: skip
                for task_id, state, target, image_id, night_id, generation in rows:
                    found[(target, generation)] = _Upstream(
                        task_id, state, image_id, night_id, generation, None
                    )
            self._by_night[configuration_id] = found
        return self._by_night[configuration_id]

    def camera_masters(
        self, configuration_id: int, camera_id: int
    ) -> list[tuple[_Upstream, dt.date, int]]:
        """The configuration's night tasks of every night of the camera, with the night's
        date and closed generation (masters: one per night and generation)."""
        key = (configuration_id, camera_id)
        if key not in self._by_camera:
            rows = self.session.execute(
                select(Task.id, Task.state, Task.night_id, Task.generation, Task.qc["iso"],
                       Night.local_date, Night.closed_generation)
                .join(Night, Night.id == Task.night_id)
                .where(
                    Task.configuration_id == configuration_id,
                    Task.image_id.is_(None),
                    Night.camera_id == camera_id,
                )
            )  # fmt: skip
            self._by_camera[key] = [
                (
                    _Upstream(task_id, state, None, night_id, gen, _int_or_none(iso)),
                    local_date,
                    closed,
                )
                for task_id, state, night_id, gen, iso, local_date, closed in rows
            ]
        return self._by_camera[key]


def _int_or_none(value: Any) -> int | None:
    """An ISO from a master's QC (a JSON value: a number, or absent)."""
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


@functools.cache
def _type_values(step: type[Step]) -> frozenset[str]:
    """The values of a step's image types (computed once per step class)."""
    return frozenset(t.value for t in step.image_types)


def _iso_for(task: Task, image_types: frozenset[str], facts: _Facts) -> int | None:
    """The ISO a task's masters must have: its frame's, or most of the night's frames'
    of the step's types (frames without one match any)."""
    if task.image_id is not None:
        return facts.iso_of_image.get(task.image_id)
    isos = [
        f.iso
        for f in facts.frames.get(task.night_id or -1, [])
        if f.image_type in image_types and f.generation <= task.generation and f.iso is not None
    ]
    if not isos:
        return None
    counts = Counter(isos)
    return min(counts, key=lambda iso: (-counts[iso], iso))


def evaluate(
    session: Session,
    registry: Registry,
    configurations: Mapping[str, Configuration],
    tasks: Sequence[Task],
) -> list[Decision]:
    """Decide ready / wait / exclude for pending ``tasks`` (rows of the configurations in
    ``configurations``, by step name), with the inputs of the ready ones."""
    by_id = {c.id: (name, c) for name, c in configurations.items()}
    names = {by_id[t.configuration_id][0] for t in tasks}
    facts = _Facts(
        session,
        tasks,
        with_iso=any(e.kind is Kind.MASTER for n in names for e in registry.edges(n)),
    )
    decisions = []
    for task in tasks:
        name, configuration = by_id[task.configuration_id]
        step = registry[name]
        verdict, reason = "ready", ""
        inputs: dict[str, tuple[int, ...]] = {}
        edges = sorted(registry.edges(step.name), key=lambda e: e.kind is not Kind.PREVIOUS)
        previous = 0  # the generation a shard task appends to (its PREVIOUS edge's)
        for edge in edges:
            upstream_id = int(configuration.upstream.get(edge.step, -1))
            if edge.step == step.name:
                upstream_id = configuration.id
            upstream_generational = registry.generational(edge.step)
            generation = task.generation if upstream_generational else 0
            upstream_scope = registry[edge.step].scope
            if edge.kind is Kind.PREVIOUS:
                outcome, previous = _previous(task, edge.step, upstream_id, facts)
            elif edge.kind is Kind.NIGHTS:
                outcome = _nights(task, edge.step, upstream_id, previous, facts)
            elif edge.kind is Kind.SHARDS:
                outcome = _shards(task, edge.step, upstream_id, facts)
            elif edge.kind is Kind.FIELD_SHARDS:
                outcome = _field_shards(task, edge.step, upstream_id, facts)
            elif edge.kind is Kind.SAME and upstream_scope in (Scope.SHARD, Scope.FIELD):
                outcome = _same_generation(task, step.scope, edge.step, upstream_scope,
                                           upstream_id, facts)  # fmt: skip
            elif edge.kind is Kind.SAME:
                outcome = _same(task, edge.step, upstream_id, generation, registry, facts)
            elif edge.kind is Kind.AFTER:
                outcome = _after(task, edge.step, upstream_id, generation, facts)
            elif edge.kind is Kind.BARRIER:
                outcome = _barrier(task, step, edge.step, upstream_id, registry, facts)
            else:
                outcome = _master(task, step, edge.step, upstream_id, configuration, facts)
            edge_verdict, edge_reason, ids = outcome
            if edge_verdict == "exclude":
                verdict, reason = "exclude", edge_reason
                break
            if edge_verdict == "wait" and verdict == "ready":
                verdict, reason = "wait", edge_reason
            inputs[edge.step] = ids
        decisions.append(Decision(task.id, verdict, reason, inputs if verdict == "ready" else {}))
    return decisions


Outcome = tuple[str, str, tuple[int, ...]]


def _same(
    task: Task, name: str, upstream_id: int, generation: int, registry: Registry, facts: _Facts
) -> Outcome:
    """The same frame, the same night, or the frame's own night."""
    if registry[name].scope.value == "image":
        target = f"image:{task.image_id}"
    else:
        target = f"night:{task.night_id}"
    found = facts.upstream_of_nights(upstream_id).get((target, generation))
    if found is None:
        return "exclude", f"input {name} has no task for {target}", ()
    if found.state in UNUSABLE:
        return "exclude", f"input {name} ({target}) is {found.state.value}", ()
    if found.state is not TaskState.DONE:
        return "wait", f"waiting for {name} of {target} ({found.state.value})", ()
    return "ready", "", (found.id,)


def _after(task: Task, name: str, upstream_id: int, generation: int, facts: _Facts) -> Outcome:
    """The frame's own night's task, once it ended: read when done, left out (ready on
    nothing) when it died or was excluded."""
    target = f"night:{task.night_id}"
    found = facts.upstream_of_nights(upstream_id).get((target, generation))
    if found is None:
        return "wait", f"waiting for {name} of {target} to be planned", ()
    if found.state in UNUSABLE:
        return "ready", "", ()
    if found.state is not TaskState.DONE:
        return "wait", f"waiting for {name} of {target} ({found.state.value})", ()
    return "ready", "", (found.id,)


def _all_of(
    name: str, found: Sequence[_Upstream | None], noun: str, nobody: str | None
) -> Outcome:
    """A barrier over upstream tasks (None: not planned yet): wait while one is missing
    or unfinished, then ready on the done ones; with none done, exclude with ``nobody``
    (or, when it is None, ready on nothing)."""
    missing = sum(u is None for u in found)
    if missing:
        return "wait", f"waiting for {name} to be planned for {missing} {noun}", ()
    present = [u for u in found if u is not None]
    busy = [u for u in present if u.state not in TERMINAL]
    if busy:
        return "wait", f"waiting for {name} of {len(busy)} of {len(present)} {noun}", ()
    done = tuple(u.id for u in present if u.state is TaskState.DONE)
    if not done and nobody is not None:
        return "exclude", nobody, ()
    return "ready", "", done


def _barrier(
    task: Task, step: Any, name: str, upstream_id: int, registry: Registry, facts: _Facts
) -> Outcome:
    """Every frame of the closed night's generation (of both steps' frame types)."""
    types = {t.value for t in step.image_types} & {t.value for t in registry[name].image_types}
    frames = [
        f
        for f in facts.frames.get(task.night_id or -1, [])
        if f.image_type in types and f.generation <= task.generation
    ]
    generation = task.generation if registry.generational(name) else 0
    tasks = facts.upstream_of_nights(upstream_id)
    states = [tasks.get((f"image:{f.id}", generation)) for f in frames]
    return _all_of(name, states, "frames", f"no frame of the night has {name} done")


def _master(
    task: Task,
    step: Any,
    name: str,
    upstream_id: int,
    configuration: Configuration,
    facts: _Facts,
) -> Outcome:
    """The own night's master when the night has frames for it and it is done at the
    task's ISO; while it is under way, wait; when it is dead or absent, the nearest valid
    one of the camera (nearest night first, the earlier of two equally near)."""
    camera_id, local_date, _ = facts.night_rows[task.night_id or -1]
    iso = _iso_for(task, _type_values(step), facts)
    index = facts.master_index(upstream_id, camera_id)
    mine = index.own.get((task.night_id or -1, task.generation))
    if mine is not None:
        if mine.state not in TERMINAL:
            return "wait", f"waiting for this night's own {name} ({mine.state.value})", ()
        if mine.state is TaskState.DONE and (iso is None or mine.iso in (None, iso)):
            return "ready", "", (mine.id,)
    # Other nights' current masters of the camera.
    chosen = index.nearest(iso, task.night_id or -1, local_date)
    if chosen is not None:
        return "ready", "", (chosen.id,)
    busy = [d for night, d in index.busy if night != task.night_id]
    if busy:
        dates = ", ".join(sorted({d.isoformat() for d in busy})[:3])
        return "wait", f"waiting for a {name} of this camera under way (night {dates})", ()
    allowed = configuration.parameters.get("uncalibrated_cameras", [])
    serial = facts.serial_of(camera_id)
    if serial in allowed:
        return "ready", "", ()
    at = f" at ISO {iso}" if iso is not None else ""
    return (
        "wait",
        f"waiting for a {name} of camera {serial}{at}: none is done or under way (upload "
        "calibration frames for any night of this camera, or list the camera in "
        "uncalibrated_cameras)",
        (),
    )


def _at_or_after(chain: Sequence[_Upstream], generation: int) -> _Upstream | None:
    """The earliest task of a chain at ``generation`` or later that is not excluded (a
    superseded generation's nights are in the next one)."""
    for upstream in chain:
        if upstream.generation >= generation and upstream.state is not TaskState.EXCLUDED:
            return upstream
    return None


def _state_of(name: str, target: str, found: _Upstream | None) -> Outcome | None:
    """wait / exclude for an upstream task that is not done (None when it is)."""
    if found is None:
        return "wait", f"waiting for {name} to be planned for {target}", ()
    if found.state in UNUSABLE:
        return (
            "exclude",
            f"input {name} ({target}, generation {found.generation}) is " + (found.state.value),
            (),
        )
    if found.state is not TaskState.DONE:
        return "wait", f"waiting for {name} of {target} ({found.state.value})", ()
    return None


def _previous(task: Task, name: str, configuration_id: int, facts: _Facts) -> tuple[Outcome, int]:
    """The latest done earlier generation of the same shard or field, and its generation
    (0: none, the task builds from every night placed so far). Waits while an earlier
    generation is still under way (its pending ones are superseded by then)."""
    earlier = [
        u for u in facts.chain(configuration_id, task.target) if u.generation < task.generation
    ]
    busy = [u for u in earlier if u.state not in TERMINAL]
    if busy:
        last = busy[-1]
        return (
            "wait",
            f"waiting for generation {last.generation} of {name} of {task.target} "
            f"({last.state.value}) to append to",
            (),
        ), 0
    done = [u for u in earlier if u.state is TaskState.DONE]
    if not done:
        return ("ready", "", ()), 0
    return ("ready", "", (done[-1].id,)), done[-1].generation


def _nights(task: Task, name: str, upstream_id: int, previous: int, facts: _Facts) -> Outcome:
    """The nights placed in the shard after generation ``previous`` up to the task's (a
    night placed twice at its newest generation), each night step's task of that night
    generation; a barrier over them."""
    newest: dict[int, int] = {}
    for night_id, night_generation, shard_generation, _ in facts.placements(task.shard_id or -1):
        if previous < shard_generation <= task.generation:
            newest[night_id] = max(newest.get(night_id, 0), night_generation)
    if not newest:
        return (
            "exclude",
            f"no night was placed in {task.target} for generation {task.generation}",
            (),
        )
    found = [facts.night_task(upstream_id, n, g) for n, g in sorted(newest.items())]
    # Appending to a previous generation, nights none of which is usable drop out.
    nobody = f"no night of {task.target} has {name} done" if previous == 0 else None
    return _all_of(name, found, "nights", nobody)


def _shards(task: Task, name: str, upstream_id: int, facts: _Facts) -> Outcome:
    """The shards the night's generation was placed in, each shard step's task at that
    shard generation (or the next not superseded); a barrier over them."""
    placed = facts.placed_night(task.night_id or -1, task.generation)
    if not placed:
        fields = facts.night_fields(task.night_id or -1, task.generation)
        if not fields:
            return "ready", "", ()  # no frame of the night is in a field: no shard to read
        return (
            "wait",
            f"waiting for the night to be placed in light-curve shards (its fields "
            f"{', '.join(str(f) for f in sorted(fields))} have none defined yet)",
            (),
        )
    chosen = [
        _at_or_after(facts.chain(upstream_id, f"shard:{shard}"), generation)
        for shard, _, generation in placed
    ]
    return _all_of(name, chosen, "shards", f"no shard of the night has {name} done")


def _field_shards(task: Task, name: str, upstream_id: int, facts: _Facts) -> Outcome:
    """All shards of the field, each at its generation in the task's field generation;
    a barrier over them."""
    chosen = []
    for shard in facts.shards_of_field(task.field_id or -1):
        generations = [
            shard_gen
            for _, _, shard_gen, field_gen in facts.placements(shard)
            if field_gen <= task.generation
        ]
        if generations:
            chain = facts.chain(upstream_id, f"shard:{shard}")
            chosen.append(_at_or_after(chain, max(generations)))
    if not chosen:
        return (
            "exclude",
            f"{task.target} has no shard with nights at generation {task.generation}",
            (),
        )
    return _all_of(name, chosen, "shards", f"no shard of {task.target} has {name} done")


def _same_generation(
    task: Task, scope: Scope, name: str, upstream_scope: Scope, upstream_id: int, facts: _Facts
) -> Outcome:
    """Shard on shard and field on field: the same target and generation. Shard on field:
    its field at the field generation the shard generation was placed in (or the next
    not superseded)."""
    if upstream_scope is scope:
        chain = facts.chain(upstream_id, task.target)
        found = next((u for u in chain if u.generation == task.generation), None)
        return _state_of(name, task.target, found) or ("ready", "", (found.id,) if found else ())
    field_generations = [
        field_gen
        for _, _, shard_gen, field_gen in facts.placements(task.shard_id or -1)
        if shard_gen == task.generation
    ]
    target = f"field:{task.field_id}"
    if not field_generations:
        return "exclude", f"{task.target} has no nights at generation {task.generation}", ()
    found = _at_or_after(facts.chain(upstream_id, target), max(field_generations))
    return _state_of(name, target, found) or ("ready", "", (found.id,) if found else ())


def input_products(
    session: Session, inputs: Mapping[str, Sequence[int]]
) -> dict[str, tuple[InputProduct, ...]]:
    """The done upstream tasks a task reads, by input step, in task order."""
    result: dict[str, tuple[InputProduct, ...]] = {}
    for name, ids in inputs.items():
        products = []
        for chunk in _chunks(sorted(int(i) for i in ids), 1000):
            rows = session.execute(
                select(Task.id, Task.target, Task.image_id, Task.output_path, Task.qc,
                       Task.state, Configuration.version, Night.local_date)
                .join(Configuration, Configuration.id == Task.configuration_id)
                .outerjoin(Night, Night.id == Task.night_id)
                .where(Task.id.in_(chunk))
                .order_by(Task.id)
            )  # fmt: skip
            for task_id, target, image_id, path, qc, state, version, local_date in rows:
                if state is not TaskState.DONE:
                    raise TransientError(
                        f"input task {task_id} of {name} is {state.value}, no longer done "
                        "(reset by an operator?): the task is evaluated again"
                    )
                products.append(
                    InputProduct(
                        target, image_id, Path(path) if path else None, qc or {}, task_id,
                        version, local_date,
                    )
                )  # fmt: skip
        result[name] = tuple(products)
    return result
