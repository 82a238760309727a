"""One planning cycle, shared by the scheduler and the local executor.

In order: expired leases go back for a retry (their worker died), tasks whose backoff
has passed become pending, open nights quiet for long enough close, unfinished tasks of
superseded night generations are excluded, missing task rows are created, and every
pending task is triaged into ready (with its inputs), waiting (with the reason, written
only when it changed) or excluded (with the reason; exclusions cascade in the same cycle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from autowisp.config import Settings
from autowisp.db.fields import DEFAULT_FIELD_RADIUS
from autowisp.db.models import (
    Configuration,
    LightCurveShard,
    Night,
    ShardNight,
    Task,
    TaskState,
    Wakeup,
)
from autowisp.db.nights import close_quiet_nights
from autowisp.pipeline import state
from autowisp.pipeline.dependencies import Decision, evaluate
from autowisp.pipeline.planning import plan_tasks, supersede_old_generations
from autowisp.steps.base import Kind
from autowisp.steps.registry import Registry

__all__ = ["Triage", "field_radius", "housekeeping", "night_quiet_seconds", "triage"]

#: Rounds of exclusion cascading within one cycle (a chain of steps is rarely longer).
CASCADE_ROUNDS = 8


@dataclass
class Triage:
    """The pending tasks of one cycle: ready ones with their inputs, counts of the rest."""

    ready: list[Decision] = field(default_factory=list)
    waiting: dict[int, str] = field(default_factory=dict)
    excluded: int = 0
    created: int = 0


def housekeeping(
    session: Session, *, max_attempts: int, night_quiet_seconds: float | None
) -> dict[str, int]:
    """Sweep expired leases, release due retries, close quiet nights."""
    report = {
        "swept": state.sweep_expired_leases(session, max_attempts=max_attempts),
        "retried": state.release_due_retries(session),
        "closed": 0,
    }
    if night_quiet_seconds is not None and night_quiet_seconds > 0:
        report["closed"] = len(close_quiet_nights(session, quiet_seconds=night_quiet_seconds))
    return report


def field_radius(settings: Settings) -> float:
    """``[pipeline] field_radius_deg``: a field's radius when frames give no pixel scale."""
    return float(settings.pipeline.get("field_radius_deg", DEFAULT_FIELD_RADIUS))


def night_quiet_seconds(settings: Settings) -> float:
    """``[pipeline] night_quiet_seconds`` (default 1 h; 0 disables closing by quiet)."""
    return float(settings.pipeline.get("night_quiet_seconds", 3600.0))


def _woken(
    session: Session, registry: Registry, configurations: Mapping[str, Configuration]
) -> set[int]:
    """Consume the wakeups: the nights whose tasks changed, and for a master step's
    change, every night of its camera with pending tasks (they may take that master)."""
    rows = session.execute(delete(Wakeup).returning(Wakeup.night_id, Wakeup.step_id)).all()
    nights = {night for night, _ in rows if night is not None}
    masters = {
        configurations[edge.step].step_id
        for step in registry
        for edge in registry.edges(step.name)
        if edge.kind is Kind.MASTER
    }
    cameras_of = [night for night, step in rows if step in masters and night is not None]
    if cameras_of:
        cameras = select(Night.camera_id).where(Night.id.in_(cameras_of)).scalar_subquery()
        nights.update(
            session.scalars(
                select(Task.night_id)
                .join(Night, Night.id == Task.night_id)
                .where(Night.camera_id.in_(cameras), Task.state == TaskState.PENDING)
                .distinct()
            )
        )
    return nights


def triage(
    session: Session,
    registry: Registry,
    configurations: Mapping[str, Configuration],
    *,
    nights: Sequence[int] | None = None,
    full: bool = False,
    field_radius: float = DEFAULT_FIELD_RADIUS,
) -> Triage:
    """Plan, then decide the pending tasks of the active configurations that may have
    changed: those of nights with new tasks or woken by a transition (all of them with
    ``full``, or when a configuration was just activated), and every pending shard and
    field task (there are few). Only ``nights`` (and the shards and fields they were
    placed in) when given."""
    result = Triage()
    plan = plan_tasks(
        session, registry, configurations, nights=nights, everything=full,
        field_radius=field_radius,
    )  # fmt: skip
    # After planning: a placement made this pass supersedes older shard generations.
    supersede_old_generations(session, nights=nights)
    result.created = plan.created
    everything = full or plan.full
    look_at = set(plan.nights)
    current = [c.id for c in configurations.values()]
    ready: dict[int, Decision] = {}
    shard_readers = [
        configurations[step.name].id
        for step in registry
        if any(edge.kind is Kind.SHARDS for edge in registry.edges(step.name))
    ]
    for _ in range(CASCADE_ROUNDS):
        look_at |= _woken(session, registry, configurations)
        pending_of = select(Task).where(
            Task.state == TaskState.PENDING, Task.configuration_id.in_(current)
        )
        query = pending_of
        if nights is not None:
            query = query.where(Task.night_id.in_(list(nights)))
        pending: list[Task] = []
        if everything or look_at:
            if not everything:
                query = query.where(Task.night_id.in_(sorted(look_at)))
            pending = list(session.scalars(query.order_by(Task.id)))
        if not (everything and nights is None):
            # Shard and field tasks, and night steps over shards: few, always looked at.
            seen = {t.id for t in pending}
            extra = pending_of.where(
                or_(Task.night_id.is_(None), Task.configuration_id.in_(shard_readers))
            )
            if nights is not None:
                placed = select(ShardNight.shard_id).where(ShardNight.night_id.in_(list(nights)))
                extra = extra.where(
                    or_(
                        Task.night_id.in_(list(nights)),
                        Task.shard_id.in_(placed),
                        Task.field_id.in_(
                            select(LightCurveShard.field_id).where(LightCurveShard.id.in_(placed))
                        ),
                    )
                )
            pending += [t for t in session.scalars(extra.order_by(Task.id)) if t.id not in seen]
        if not pending:
            break
        decisions = evaluate(session, registry, configurations, pending)
        excluded = 0
        for decision in decisions:
            result.waiting.pop(decision.task_id, None)
            ready.pop(decision.task_id, None)
            if decision.verdict == "exclude":
                excluded += state.exclude(session, decision.task_id, reason=decision.reason)
            elif decision.verdict == "ready":
                ready[decision.task_id] = decision
            else:
                result.waiting[decision.task_id] = decision.reason
        result.excluded += excluded
        look_at = set()
        if not excluded:
            break
    result.ready = list(ready.values())
    state.note_waiting(session, result.waiting)
    return result
