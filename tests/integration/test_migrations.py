"""Migrations run on PostgreSQL and (batch mode) SQLite, and agree with the models."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from autowisp.db.migrate import current_revision, downgrade, head_revision, upgrade
from autowisp.db.models import Base


def _tables(url):
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        return set(inspector.get_table_names()), set(inspector.get_view_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db):
    upgrade(empty_db)
    assert current_revision(empty_db) == head_revision()
    tables, views = _tables(empty_db)
    assert {"task", "image", "night", "camera", "configuration", "step"} <= tables
    assert views == {"v_night_progress", "v_failures", "v_waiting"}
    downgrade(empty_db, "base")
    tables, views = _tables(empty_db)
    assert tables == {"alembic_version"} and not views
    upgrade(empty_db)
    assert current_revision(empty_db) == head_revision()


def test_models_and_migrations_agree(db_url):
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
            assert diff == []
            # The views answer on an empty database.
            assert connection.execute(text("SELECT COUNT(*) FROM v_night_progress")).scalar() == 0
    finally:
        engine.dispose()
