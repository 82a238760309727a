"""Run the Alembic migrations that ship inside the package (``autowisp/db/migrations``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from autowisp.db.session import engine_for

__all__ = ["alembic_config", "current_revision", "downgrade", "head_revision", "upgrade"]

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` with the packaged migration scripts."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _run(url: str, action: Callable[[Config, str], None], revision: str) -> None:
    config = alembic_config(url)
    # Our engine: it creates the SQLite file's directory and sets its pragmas.
    with engine_for(url).begin() as connection:
        config.attributes["connection"] = connection
        action(config, revision)


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` (PostgreSQL, or SQLite in batch mode) to ``revision``."""
    _run(url, command.upgrade, revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision``."""
    _run(url, command.downgrade, revision)


def head_revision() -> str | None:
    """The newest migration shipped with this code."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None if never migrated)."""
    with engine_for(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
