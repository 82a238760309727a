"""Integration tests share the database fixtures of tests/conftest.py, and this helper."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from autowisp.db.migrate import upgrade
from autowisp.db.models import Configuration, Image, Task
from autowisp.db.models import Step as StepRow
from autowisp.db.session import session_scope
from autowisp.ingest.ingest import ingest_paths
from autowisp.pipeline.local import run_local


def process_upload(home: Path, upload: Path, registry, parameters=None, rules=None) -> list:
    """Ingest ``upload`` (with the ingest ``rules``) into a new SQLite database under
    ``home``, run ``registry`` on it with the local executor, and return the active tasks'
    rows (step name, target, state, output path, QC, last error), in the order of the
    frames' file names."""
    url = f"sqlite:///{home / 'db.sqlite'}"
    upgrade(url)
    ingest_paths(url, [upload], close=True, rules=rules)
    run_local(url, home / "storage", registry, jobs=2, step_parameters=parameters or {})
    with session_scope(url) as session:
        return session.execute(
            select(
                StepRow.name, Task.target, Task.state, Task.output_path, Task.qc,
                Task.last_error,
            )
            .join(StepRow, StepRow.id == Task.step_id)
            .join(Configuration, Configuration.id == Task.configuration_id)
            .outerjoin(Image, Image.id == Task.image_id)
            .where(Configuration.active.is_(True))
            .order_by(Image.path, Task.id)
        ).all()  # fmt: skip
