"""One ``Settings`` object: database URL, broker URL, storage root, step parameters, ingest rules.

Where each value comes from, first match wins:

1. the environment: ``AUTOWISP_DATABASE_URL``, ``AUTOWISP_BROKER_URL``,
   ``AUTOWISP_STORAGE_ROOT``;
2. the TOML configuration file: ``AUTOWISP_CONFIG``, else ``<home>/autowisp.toml`` if it
   exists;
3. defaults under ``<home>`` = ``AUTOWISP_HOME`` or ``./autowisp-data``: the embedded
   SQLite database ``<home>/autowisp.sqlite`` and storage ``<home>/storage``.

Nothing is read at import time: call :meth:`Settings.load`.

Retention (``[storage.retention]``, :mod:`autowisp.pipeline.retention`; applied by
``autowisp prune``): empty by default, and then nothing is ever deleted.
``<step> = "consumed"`` deletes a current product of the step once every task of the
active configurations that reads it is done (steps whose readers are not known in
advance, such as masters, are refused); ``superseded = N`` deletes the products of tasks
that are no longer current (an older generation of their night, a configuration no
longer active) N days after they finished. A product is never deleted while an
unfinished reader names it, nor a master while a kept calibrated frame names it.

The TOML file (its ``[steps.*]`` become the database's active configuration with
``autowisp init`` or ``autowisp config apply``; on the embedded SQLite database
``autowisp run`` applies them itself)::

    [database]
    url = "postgresql+psycopg2://autowisp@db/autowisp"
    [broker]
    url = "redis://redis:6379/0"
    [storage]
    root = "/data/autowisp"
    [storage.retention]         # deleting intermediate products (default: empty, none)
    calibrate = "consumed"      # once every task reading it is done (see below)
    superseded = 30             # products of old generations/configurations, days after
    [steps.frame_qc]            # per-step parameters (see `autowisp config show`)
    saturation_fraction = 1e-3
    [ingest]
    longitude = -155.58          # used for night dates when a header has no site
    [[ingest.rules]]             # classify frames whose camera writes no IMAGETYP
    header = { FILTER = "RGGB" } # every keyword matches (case-insensitive glob)
    path = "*/flats/*"           # optional glob on the file path
    type = "flat"
    [ingest.camera_defaults]     # last resort, by camera serial
    "012070048413" = "object"
    [pipeline]                   # retries and leases (defaults shown)
    max_attempts = 3             # of a task failing with transient errors
    backoff_seconds = 5.0        # first retry delay, doubled each attempt
    lease_seconds = 600.0        # a running task's lease, renewed by its heartbeat
    time_limit_seconds = 3600.0  # a step running longer fails (transient; retried)
    time_limits = { calibrate = 900.0 }   # per step, s
    queued_timeout = 600.0       # queued this long, its queue empty: published again
    night_quiet_seconds = 3600.0 # an open night with no new frame this long closes (0: never)
    visibility_timeout = 3900.0  # Celery workers: Redis redelivery (time limit + 300 s)
    max_tasks_per_child = 200    # Celery workers: a pool process is replaced after this
    registry = "autowisp.steps.registry:default_registry"   # or AUTOWISP_REGISTRY
    [watch]
    quiet_seconds = 60.0         # a directory is ingested once unchanged this long
    rescan_seconds = 30.0        # periodic rescans (network mounts miss events)
    marker = "UPLOAD_COMPLETE"   # or at once when this file appears; it closes the night
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autowisp.errors import ConfigurationError

__all__ = ["DEFAULT_REGISTRY", "RunPolicy", "Settings"]

DEFAULT_HOME = "autowisp-data"
#: The package's pipeline, as a ``module:attribute`` registry spec.
DEFAULT_REGISTRY = "autowisp.steps.registry:default_registry"


@dataclass(frozen=True)
class RunPolicy:
    """Retries and leases of the runner, from ``[pipeline]``.

    Parameters
    ----------
    max_attempts : int
        Attempts of a task before it is dead.
    backoff_seconds : float
        Delay before the first retry, s; doubled each attempt.
    lease_seconds : float
        A running task's lease, s, renewed by its heartbeat every third of it.
    time_limit_seconds : float
        Default time limit of a step, s (a step class may set its own ``time_limit``).
    time_limits : mapping of str to float
        Time limits by step name, s (``[pipeline] time_limits = { calibrate = 900 }``).
    """

    max_attempts: int = 3
    backoff_seconds: float = 5.0
    lease_seconds: float = 600.0
    time_limit_seconds: float = 3600.0
    time_limits: Mapping[str, float] = field(default_factory=dict)

    def time_limit(self, step: Any) -> float:
        """The time limit of a step class, s."""
        configured = self.time_limits.get(step.name)
        if configured is not None:
            return float(configured)
        return float(getattr(step, "time_limit", 0.0) or self.time_limit_seconds)


@dataclass(frozen=True)
class Settings:
    """Process-wide settings (see the module docstring for the sources)."""

    home: Path
    database_url: str
    storage_root: Path
    broker_url: str = "redis://127.0.0.1:6379/0"
    steps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ingest: Mapping[str, Any] = field(default_factory=dict)
    pipeline: Mapping[str, Any] = field(default_factory=dict)
    watch: Mapping[str, Any] = field(default_factory=dict)
    retention: Mapping[str, Any] = field(default_factory=dict)
    config_file: Path | None = None

    @classmethod
    def load(
        cls, *, config_file: str | Path | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from the environment, the configuration file and the defaults."""
        env = os.environ if environ is None else environ
        home = Path(env.get("AUTOWISP_HOME", DEFAULT_HOME)).expanduser().absolute()
        path = config_file or env.get("AUTOWISP_CONFIG")
        if path is None and (home / "autowisp.toml").is_file():
            path = home / "autowisp.toml"
        document: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            try:
                document = tomllib.loads(path.read_text())
            except FileNotFoundError as error:
                raise ConfigurationError(
                    f"configuration file {str(path)!r} does not exist"
                ) from error
            except tomllib.TOMLDecodeError as error:
                raise ConfigurationError(
                    f"configuration file {str(path)!r} is not valid TOML: {error}"
                ) from error
        database_url = (
            env.get("AUTOWISP_DATABASE_URL")
            or _get(document, "database", "url")
            or (f"sqlite:///{home / 'autowisp.sqlite'}")
        )
        storage = (
            env.get("AUTOWISP_STORAGE_ROOT")
            or _get(document, "storage", "root")
            or str(home / "storage")
        )
        broker = (
            env.get("AUTOWISP_BROKER_URL") or _get(document, "broker", "url") or cls.broker_url
        )
        steps = document.get("steps", {})
        if not isinstance(steps, dict) or not all(isinstance(v, dict) for v in steps.values()):
            raise ConfigurationError(
                f"[steps] in {path} must hold one table per step, e.g. [steps.frame_qc]"
            )
        tables = {}
        for name in ("ingest", "pipeline", "watch"):
            tables[name] = document.get(name, {})
            if not isinstance(tables[name], dict):
                raise ConfigurationError(f"[{name}] in {path} must be a table")
        retention = _get(document, "storage", "retention") or {}
        if not isinstance(retention, dict):
            raise ConfigurationError(f"[storage.retention] in {path} must be a table")
        pipeline = dict(tables["pipeline"])
        if env.get("AUTOWISP_REGISTRY"):
            pipeline["registry"] = env["AUTOWISP_REGISTRY"]
        return cls(
            home=home,
            database_url=str(database_url),
            storage_root=Path(storage).expanduser().absolute(),
            broker_url=str(broker),
            steps=steps,
            ingest=tables["ingest"],
            pipeline=pipeline,
            watch=tables["watch"],
            retention=retention,
            config_file=Path(path) if path is not None else None,
        )

    def policy(self) -> RunPolicy:
        """Retry and lease policy of the runner, from ``[pipeline]``."""
        known = {
            "max_attempts",
            "backoff_seconds",
            "lease_seconds",
            "time_limit_seconds",
            "time_limits",
        }
        return RunPolicy(**{k: v for k, v in self.pipeline.items() if k in known})

    @property
    def registry_spec(self) -> str:
        """Where the DAG of steps is: ``[pipeline] registry`` (or ``AUTOWISP_REGISTRY``) as
        ``module:attribute``, a Registry or a function returning one; by default the
        package's pipeline. :func:`autowisp.steps.registry.load_registry` loads it."""
        return str(self.pipeline.get("registry", DEFAULT_REGISTRY))

    @property
    def is_embedded(self) -> bool:
        """True for the embedded SQLite database."""
        return self.database_url.startswith("sqlite")


def _get(document: Mapping[str, Any], section: str, key: str) -> Any:
    table = document.get(section, {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"[{section}] must be a table, got {table!r}")
    return table.get(key)
