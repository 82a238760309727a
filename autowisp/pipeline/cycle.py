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

from sqlalchemy import select
from sqlalchemy.orm import Session

from autowisp.config import Settings
from autowisp.db.models import Configuration, Task, TaskState
from autowisp.db.nights import close_quiet_nights
from autowisp.pipeline import state
from autowisp.pipeline.dependencies import Decision, evaluate
from autowisp.pipeline.planning import plan_tasks, supersede_old_generations
from autowisp.steps.registry import Registry

__all__ = ["Triage", "housekeeping", "triage"]

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


def night_quiet_seconds(settings: Settings) -> float:
    """``[pipeline] night_quiet_seconds`` (default 1 h; 0 disables closing by quiet)."""
    return float(settings.pipeline.get("night_quiet_seconds", 3600.0))


def triage(
    session: Session,
    registry: Registry,
    configurations: Mapping[str, Configuration],
    *,
    nights: Sequence[int] | None = None,
) -> Triage:
    """Plan, then decide every pending task of the active configurations (of ``nights``)."""
    result = Triage()
    supersede_old_generations(session, nights=nights)
    result.created = plan_tasks(session, registry, configurations, nights=nights)
    current = [c.id for c in configurations.values()]
    for _ in range(CASCADE_ROUNDS):
        query = select(Task).where(
            Task.state == TaskState.PENDING, Task.configuration_id.in_(current)
        )
        if nights is not None:
            query = query.where(Task.night_id.in_(list(nights)))
        pending = session.scalars(query.order_by(Task.id)).all()
        decisions = evaluate(session, registry, configurations, pending)
        excluded = 0
        result.ready, result.waiting = [], {}
        for decision in decisions:
            if decision.verdict == "exclude":
                excluded += state.exclude(session, decision.task_id, reason=decision.reason)
            elif decision.verdict == "ready":
                result.ready.append(decision)
            else:
                result.waiting[decision.task_id] = decision.reason
        result.excluded += excluded
        if not excluded:
            break
    state.note_waiting(session, result.waiting)
    return result
