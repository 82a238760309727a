"""Configuration versions: a step's version hashes its parameters, code and upstream versions.

Because each version includes the versions of the step's inputs, changing one parameter
changes the version of that step and of every step downstream of it, and of no other;
new versions mean new task rows, which start pending. Versions already seen are reused,
so going back to an old parameter set reuses its finished tasks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from autowisp.db.models import Base, Configuration, Step, utcnow
from autowisp.errors import ConfigurationError
from autowisp.steps.registry import Registry

__all__ = [
    "StepVersion",
    "activate",
    "active_configurations",
    "configuration_drift",
    "resolve_versions",
    "sync_configurations",
]


@dataclass(frozen=True)
class StepVersion:
    """A step's resolved parameters and configuration version."""

    name: str
    parameters: Mapping[str, Any]
    version: str


def resolve_versions(
    registry: Registry, overrides: Mapping[str, Mapping[str, Any]]
) -> dict[str, StepVersion]:
    """Each step's parameters (defaults overridden by ``overrides``) and version."""
    unknown_steps = set(overrides) - {step.name for step in registry}
    if unknown_steps:
        raise ConfigurationError(
            f"configuration names unknown steps {sorted(unknown_steps)}; "
            f"steps are {[step.name for step in registry]}"
        )
    versions: dict[str, StepVersion] = {}
    for step in registry:
        given = dict(overrides.get(step.name, {}))
        known = {p.name for p in step.parameters}
        extra = set(given) - known
        if extra:
            raise ConfigurationError(
                f"step {step.name!r} has no parameter(s) {sorted(extra)}; "
                f"its parameters are {sorted(known)}"
            )
        parameters = {p.name: given.get(p.name, p.default) for p in step.parameters}
        for p in step.parameters:
            if p.default is not None and not isinstance(parameters[p.name], type(p.default)):
                if not (isinstance(p.default, float) and isinstance(parameters[p.name], int)):
                    raise ConfigurationError(
                        f"step {step.name!r} parameter {p.name!r} should be "
                        f"{type(p.default).__name__}, got {parameters[p.name]!r}"
                    )
        document = {
            "step": step.name,
            "code": step.version,
            "parameters": parameters,
            "inputs": {
                name: versions[name].version
                for name in sorted({edge.step for edge in registry.upstream(step.name)})
            },
        }
        digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]
        versions[step.name] = StepVersion(step.name, parameters, digest)
    return versions


def _insert_missing(
    session: Session, table: type[Base], values: dict[str, Any], keys: list[str]
) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: safe when two schedulers start together."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=keys))


def activate(
    session: Session, registry: Registry, versions: Mapping[str, StepVersion]
) -> dict[str, Configuration]:
    """Make these versions the active configuration set: the one place that changes it.

    Every step and configuration gets its row (inserted once, whoever races); each
    configuration records the ids of its upstream configurations, which its tasks read.
    """
    result: dict[str, Configuration] = {}
    for step_cls in registry:
        _insert_missing(
            session,
            Step,
            {
                "name": step_cls.name,
                "scope": step_cls.scope,
                "code_version": step_cls.version,
            },
            ["name"],
        )
        step = session.scalars(
            select(Step)
            .where(Step.name == step_cls.name)
            .execution_options(populate_existing=True)
        ).one()
        if (step.scope, step.code_version) != (step_cls.scope, step_cls.version):
            step.scope, step.code_version = step_cls.scope, step_cls.version
        wanted = versions[step_cls.name]
        _insert_missing(
            session,
            Configuration,
            {
                "step_id": step.id,
                "version": wanted.version,
                "parameters": dict(wanted.parameters),
                "upstream": {
                    edge.step: result[edge.step].id for edge in registry.upstream(step_cls.name)
                },
                "active": True,
                "created_at": utcnow(),
            },
            ["step_id", "version"],
        )
        configuration = session.scalars(
            select(Configuration).where(
                Configuration.step_id == step.id, Configuration.version == wanted.version
            )
        ).one()
        pinned = {edge.step: result[edge.step].id for edge in registry.upstream(step_cls.name)}
        if configuration.upstream != pinned:
            # A row from before configurations pinned their inputs (schema 0001): its
            # version already hashes the upstream versions, so these are its inputs.
            configuration.upstream = pinned
        if not configuration.active:
            # Activated again after a while: frames and nights that arrived meanwhile were
            # planned for another configuration only; plan every target for this one.
            configuration.planned_at = None
        session.execute(
            update(Configuration)
            .where(Configuration.step_id == step.id)
            .values(active=Configuration.id == configuration.id)
            .execution_options(synchronize_session=False)
        )
        configuration.active = True
        result[step_cls.name] = configuration
    # Steps no longer in the pipeline keep their history but are no longer current.
    session.execute(
        update(Configuration)
        .where(Configuration.step_id.not_in(select(Step.id).where(Step.name.in_(list(result)))))
        .values(active=False)
    )
    session.flush()
    return result


#: Kept for callers of the earlier name.
sync_configurations = activate


def active_configurations(session: Session, registry: Registry) -> dict[str, Configuration]:
    """The active configuration of every step of ``registry``, as the database holds them
    (nothing changes). ConfigurationError naming the steps that have none."""
    rows = session.execute(
        select(Step.name, Configuration)
        .join(Configuration, Configuration.step_id == Step.id)
        .where(Configuration.active.is_(True), Step.name.in_([s.name for s in registry]))
    ).all()
    found = {name: configuration for name, configuration in rows}
    missing = [step.name for step in registry if step.name not in found]
    if missing:
        raise ConfigurationError(
            f"steps {missing} have no active configuration in the database: run "
            "`autowisp config apply` (or `autowisp init`) to activate one"
        )
    return found


def configuration_drift(
    session: Session, registry: Registry, versions: Mapping[str, StepVersion]
) -> list[str]:
    """Steps whose active version in the database differs from ``versions`` (for example
    another configuration file, or code of another version); [] when they agree."""
    active = dict(
        session.execute(
            select(Step.name, Configuration.version)
            .join(Configuration, Configuration.step_id == Step.id)
            .where(Configuration.active.is_(True))
        ).all()
    )
    return [step.name for step in registry if active.get(step.name) != versions[step.name].version]
