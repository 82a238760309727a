"""Celery tasks: thin wrappers around the shared runner."""

from __future__ import annotations

from functools import lru_cache

from autowisp.config import Settings
from autowisp.pipeline.runner import run_task as run_pipeline_task
from autowisp.steps.registry import Registry, load_registry
from workers.celery_app import app


@lru_cache(maxsize=1)
def _environment() -> tuple[Settings, Registry]:
    settings = Settings.load()
    return settings, load_registry(settings.registry_spec)


@app.task(name="autowisp.run_task", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_task(task_id: int, time_limit: float | None = None) -> str | None:
    """Run task row ``task_id`` within ``time_limit`` seconds (the step's, sent by the
    scheduler); a duplicate delivery finds it claimed and does nothing."""
    settings, registry = _environment()
    outcome = run_pipeline_task(
        int(task_id),
        database_url=settings.database_url,
        storage_root=settings.storage_root,
        registry=registry,
        policy=settings.policy(),
        time_limit=time_limit,
    )
    return outcome.value if outcome else None
