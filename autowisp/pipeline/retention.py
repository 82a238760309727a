"""Retention of intermediate products: which outputs may be deleted, and deleting them.

The policy is the ``[storage.retention]`` table of the configuration file; empty (the
default), nothing is ever deleted. Two rules:

``<step> = "consumed"``
    A current product of the step (active configuration; generation 0 or the night's
    closed generation) goes once every task that reads it is done: the current tasks
    whose recorded ``inputs`` name it, and the current task of every downstream step
    whose active configuration pins the product's configuration and that would read it
    (that task must exist and be done; while it is pending, queued, running, failed,
    dead or excluded the product stays). Only steps whose readers are known in advance
    qualify: read through ``same`` edges of the same scope or ``barrier`` edges, and not
    a frame's own work (generation 0) read by a night-generation step (a night that
    reopens with late frames reads it again). Masters (``master`` edges) and final
    products (read by no step) are refused with the reason.
``superseded = N``
    Products of tasks that are no longer current (an older generation of their night,
    or a configuration that is not active) go N days after they finished.

Products of shard and field steps are never deleted: a shard generation's file holds the
data of the nights it wrote, which every later generation points to
(:mod:`autowisp.io.shards`).

Whatever the rule, a product is kept while a current task that is not done names it in
its inputs, and while a kept product read it through a ``master`` edge (a calibrated
frame's ERROR plane is derived from the masters its MBIAS/MDARK/MFLAT keywords name).

Pruning records ``task.output_pruned_at`` (the row keeps ``output_path`` and
``output_sha256`` as history) and commits *before* deleting the files, so a row never
claims a file that is gone. A task whose inputs were pruned is never run against the
missing files: the runner fails it with the reason (:func:`pruned_inputs`), and
``autowisp retry`` refuses to reset it. Products re-made by a later run of their task
are no longer pruned (:func:`autowisp.pipeline.state.finish` clears the mark).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from autowisp.db.clock import db_time
from autowisp.db.models import Configuration, Image, Night, Step, Task, TaskState, utcnow
from autowisp.db.session import rowcount
from autowisp.errors import ConfigurationError
from autowisp.steps.base import Kind
from autowisp.steps.registry import Registry
from autowisp.vocabulary import Scope

__all__ = ["Prunable", "PruneReport", "RetentionPolicy", "prunable", "prune", "pruned_inputs"]

CONSUMED = "consumed"
SUPERSEDED = "superseded"
#: A reader in one of these states may still read its inputs.
UNFINISHED = frozenset({TaskState.PENDING, TaskState.QUEUED, TaskState.RUNNING, TaskState.FAILED})


@dataclass(frozen=True)
class RetentionPolicy:
    """What may be deleted (see the module docstring).

    Parameters
    ----------
    consumed : frozenset of str
        Steps whose current products go once every reader is done.
    superseded_days : float or None
        Products of tasks no longer current go this many days after they finished, d;
        None: never.
    """

    consumed: frozenset[str] = frozenset()
    superseded_days: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether anything may ever be deleted."""
        return bool(self.consumed) or self.superseded_days is not None

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, registry: Registry) -> RetentionPolicy:
        """The policy of a ``[storage.retention]`` table, checked against the DAG.

        Raises
        ------
        ConfigurationError
            For an unknown key or value, or ``consumed`` on a step whose readers are not
            known in advance.
        """
        consumed = set()
        days: float | None = None
        for key, value in table.items():
            if key == SUPERSEDED:
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ConfigurationError(
                        f"[storage.retention] superseded = {value!r}: give the days after "
                        "which superseded products are deleted (a number >= 0)"
                    )
                days = float(value)
            elif key not in registry:
                raise ConfigurationError(
                    f"[storage.retention] {key!r} is neither 'superseded' nor a step; "
                    f"steps: {', '.join(s.name for s in registry)}"
                )
            elif value != CONSUMED:
                raise ConfigurationError(
                    f"[storage.retention] {key} = {value!r}: the only rule for a step is "
                    f"{CONSUMED!r}"
                )
            else:
                _check_consumable(registry, key)
                consumed.add(key)
        return cls(frozenset(consumed), days)


def _readers(registry: Registry, name: str) -> list[tuple[str, Kind]]:
    """The steps that read ``name`` directly, with the kind of the edge."""
    return [
        (step.name, edge.kind)
        for step in registry
        for edge in registry.edges(step.name)
        if edge.step == name
    ]


def _check_consumable(registry: Registry, name: str) -> None:
    if registry[name].scope in (Scope.SHARD, Scope.FIELD):
        raise ConfigurationError(
            f"[storage.retention] {name} = 'consumed': {name} writes shard or field "
            "generations, which later generations point to; they are never deleted"
        )
    readers = _readers(registry, name)
    if not readers:
        raise ConfigurationError(
            f"[storage.retention] {name} = 'consumed': no step reads {name}, it is a final "
            "product (use 'superseded' for its old versions)"
        )
    for reader, kind in readers:
        same_scope = registry[reader].scope is registry[name].scope
        if not ((kind is Kind.SAME and same_scope) or kind is Kind.BARRIER):
            raise ConfigurationError(
                f"[storage.retention] {name} = 'consumed': {reader} reads it as a "
                f"{kind.value} input, so tasks not known yet (other nights, other frames) "
                "may read it later; only 'superseded' applies to it"
            )
        if registry.generational(reader) and not registry.generational(name):
            raise ConfigurationError(
                f"[storage.retention] {name} = 'consumed': {reader} reads it per night "
                "generation, and a night that reopens with late frames reads it again"
            )


@dataclass(frozen=True)
class Prunable:
    """A product the policy deletes: its task, file, size (bytes) and why."""

    task_id: int
    step: str
    target: str
    generation: int
    path: Path
    size_bytes: int
    reason: str


@dataclass
class PruneReport:
    """What :func:`prune` deleted (or would delete, on a dry run)."""

    items: list[Prunable] = field(default_factory=list)
    dry_run: bool = True
    missing: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        """Bytes of the files deleted (would be, on a dry run)."""
        gone = set(self.missing) | {path for path, _ in self.failed}
        return sum(item.size_bytes for item in self.items if item.path not in gone)


@dataclass(frozen=True)
class _Row:
    id: int
    step: str
    configuration_id: int
    target: str
    generation: int
    image_id: int | None
    night_id: int | None
    state: TaskState
    inputs: Mapping[str, Sequence[int]]
    output_path: str | None
    pruned: bool
    finished_at: dt.datetime | None


def _load(session: Session) -> tuple[list[_Row], dict[int, tuple[str, bool, dict[str, Any]]]]:
    configurations = {
        cid: (str(name), bool(active), dict(upstream or {}))
        for cid, name, active, upstream in session.execute(
            select(Configuration.id, Step.name, Configuration.active, Configuration.upstream)
            .join(Step, Step.id == Configuration.step_id)
        )
    }  # fmt: skip
    rows = [
        _Row(
            r.id,
            configurations[r.configuration_id][0],
            r.configuration_id,
            r.target,
            r.generation,
            r.image_id,
            r.night_id,
            r.state,
            dict(r.inputs or {}),
            r.output_path,
            r.output_pruned_at is not None,
            r.finished_at,
        )
        for r in session.execute(
            select(
                Task.id,
                Task.configuration_id,
                Task.target,
                Task.generation,
                Task.image_id,
                Task.night_id,
                Task.state,
                Task.inputs,
                Task.output_path,
                Task.output_pruned_at,
                Task.finished_at,
            )
        )
    ]
    return rows, configurations


def prunable(session: Session, registry: Registry, policy: RetentionPolicy) -> list[Prunable]:
    """The products ``policy`` deletes now, in task order (nothing for an empty policy)."""
    if not policy.enabled:
        return []
    rows, configurations = _load(session)
    closed = dict(session.execute(select(Night.id, Night.closed_generation)).all())
    types = {
        i: str(t.value if t is not None else "")
        for i, t in session.execute(select(Image.id, Image.image_type))
    }

    def current(row: _Row) -> bool:
        active = configurations[row.configuration_id][1]
        return active and (row.generation == 0 or row.generation == closed.get(row.night_id or -1))

    readers: dict[int, list[tuple[str, _Row]]] = defaultdict(list)
    for row in rows:
        for name, ids in row.inputs.items():
            for task_id in ids:
                readers[int(task_id)].append((name, row))
    by_key = {(r.configuration_id, r.target, r.generation): r for r in rows}
    active_by_step: dict[str, list[int]] = defaultdict(list)
    for cid, (name, active, _) in configurations.items():
        if active:
            active_by_step[name].append(cid)

    def consumed(row: _Row) -> str | None:
        """Why the product is consumed, or None while it may still be read."""
        recorded = [r for name, r in readers[row.id] if name == row.step and current(r)]
        if any(r.state is not TaskState.DONE for r in recorded):
            return None
        found = []
        for reader, kind in _readers(registry, row.step):
            step = registry[reader]
            pinning = [
                cid
                for cid in active_by_step[reader]
                if int(configurations[cid][2].get(row.step, -1)) == row.configuration_id
            ]
            if row.image_id is not None:
                kinds = {t.value for t in step.image_types}
                if types.get(row.image_id) not in kinds:
                    continue
            target = f"night:{row.night_id}" if kind is Kind.BARRIER else row.target
            generation = closed.get(row.night_id or -1, 0) if registry.generational(reader) else 0
            for cid in pinning:
                task = by_key.get((cid, target, generation))
                if (registry.generational(reader) and generation == 0) or task is None:
                    return None
                if task.state is not TaskState.DONE:
                    return None
                found.append(f"{reader} task {task.id}")
        if not found:
            return None
        return "consumed: read by " + ", ".join(found) + " (done)"

    cutoff = None
    if policy.superseded_days is not None:
        cutoff = utcnow() - dt.timedelta(days=policy.superseded_days)
    chosen: dict[int, tuple[_Row, str]] = {}
    for row in rows:
        if row.output_path is None or row.pruned or row.state in UNFINISHED - {TaskState.FAILED}:
            continue
        if row.target.startswith(("shard:", "field:")):
            continue  # a shard generation holds nights that later generations point to
        if current(row):
            if row.step in policy.consumed and row.state is TaskState.DONE:
                reason = consumed(row)
                if reason is not None:
                    chosen[row.id] = (row, reason)
        elif cutoff is not None and row.finished_at is not None and row.finished_at <= cutoff:
            if not configurations[row.configuration_id][1]:
                why = "its configuration is no longer active"
            else:
                why = f"generation {row.generation} of its night is superseded"
            chosen[row.id] = (row, f"superseded: {why}; finished {row.finished_at:%Y-%m-%d}")
    # Protections: unfinished current readers, and masters of kept products (to a fixpoint:
    # a kept master protects the masters it was made with).
    for task_id in list(chosen):
        if any(current(r) and r.state in UNFINISHED for _, r in readers[task_id]):
            del chosen[task_id]
    changed = True
    while changed:
        changed = False
        for row in rows:
            if row.output_path is None or row.pruned or row.id in chosen:
                continue
            for name in _master_inputs(registry, row):
                for task_id in row.inputs.get(name, ()):
                    if int(task_id) in chosen:
                        del chosen[int(task_id)]
                        changed = True
    result = []
    for task_id in sorted(chosen):
        row, reason = chosen[task_id]
        path = Path(str(row.output_path))
        size = path.stat().st_size if path.is_file() else 0
        result.append(Prunable(task_id, row.step, row.target, row.generation, path, size, reason))
    return result


def _master_inputs(registry: Registry, row: _Row) -> list[str]:
    """The inputs a kept product depends on while it exists: its ``master`` edges (all its
    inputs for a step the registry does not know)."""
    if row.step not in registry:
        return list(row.inputs)
    return [e.step for e in registry.edges(row.step) if e.kind is Kind.MASTER]


def prune(
    session: Session, registry: Registry, policy: RetentionPolicy, *, dry_run: bool = False
) -> PruneReport:
    """Delete what :func:`prunable` lists (nothing on a dry run).

    The rows are marked (``output_pruned_at``, database clock) and the session is
    **committed** before the files are deleted: a crash in between leaves a file too
    many, never a row naming a file that is gone. A file already missing is reported, a
    file that cannot be deleted too (``failed``; its row stays marked). Idempotent: what
    is pruned is not listed again.
    """
    report = PruneReport(items=prunable(session, registry, policy), dry_run=dry_run)
    if dry_run or not report.items:
        return report
    marked = []
    for item in report.items:
        result = session.execute(
            update(Task)
            .where(Task.id == item.task_id, Task.output_pruned_at.is_(None))
            .values(output_pruned_at=db_time(session))
        )
        if rowcount(result) == 1:
            marked.append(item)
    session.commit()
    report.items = marked
    for item in marked:
        try:
            item.path.unlink()
        except FileNotFoundError:
            report.missing.append(item.path)
        except OSError as error:
            report.failed.append((item.path, f"{type(error).__name__}: {error}"))
    return report


def pruned_inputs(
    session: Session, inputs: Mapping[str, Sequence[int]] | None
) -> list[tuple[str, int, dt.datetime]]:
    """The inputs (step, task id, when) whose products the retention policy deleted."""
    found: list[tuple[str, int, dt.datetime]] = []
    for name, ids in (inputs or {}).items():
        wanted = sorted(int(i) for i in ids)
        for start in range(0, len(wanted), 1000):
            rows = session.execute(
                select(Task.id, Task.output_pruned_at).where(
                    Task.id.in_(wanted[start : start + 1000]), Task.output_pruned_at.is_not(None)
                )
            )
            found.extend((name, int(i), when) for i, when in rows if when is not None)
    return found
