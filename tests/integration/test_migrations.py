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


def _registry_rows(url):
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.execute(text("SELECT * FROM star_registry"))]
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db):
    upgrade(empty_db)
    assert current_revision(empty_db) == head_revision()
    tables, views = _tables(empty_db)
    assert {"task", "image", "night", "camera", "configuration", "step"} <= tables
    assert {"field", "star", "field_star", "star_registry"} <= tables
    assert views == {"v_night_progress", "v_failures", "v_waiting"}
    assert _registry_rows(empty_db) == [(1, 0)]
    downgrade(empty_db, "base")
    tables, views = _tables(empty_db)
    assert tables == {"alembic_version"} and not views
    upgrade(empty_db)
    assert current_revision(empty_db) == head_revision()
    assert _registry_rows(empty_db) == [(1, 0)]  # the one row star registrations lock


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


def test_configurations_from_before_pinning_get_their_inputs(empty_db):
    """A database of schema 0001 holds configurations without pinned inputs: activating
    the same versions after the upgrade fills them in (else their tasks would wait for
    inputs of configuration -1)."""
    from autowisp.pipeline.configuration import resolve_versions
    from autowisp.pipeline.local import apply_configuration
    from autowisp.steps.registry import default_registry

    registry = default_registry()
    versions = resolve_versions(registry, {})
    upgrade(empty_db, "0001")
    engine = create_engine(empty_db)
    with engine.begin() as connection:
        for number, name in enumerate(("frame_qc", "night_qc"), start=1):
            connection.execute(
                text(
                    "INSERT INTO step (id, name, scope, code_version) "
                    "VALUES (:id, :name, :scope, '1')"
                ),
                {"id": number, "name": name, "scope": "image" if number == 1 else "night"},
            )
            connection.execute(
                text(
                    "INSERT INTO configuration (step_id, version, parameters, active, "
                    "created_at) VALUES (:id, :version, '{}', TRUE, CURRENT_TIMESTAMP)"
                ),
                {"id": number, "version": versions[name].version},
            )
    engine.dispose()
    upgrade(empty_db)
    configurations = apply_configuration(empty_db, registry, {})
    assert configurations["night_qc"].upstream == {"frame_qc": configurations["frame_qc"].id}
    assert configurations["night_qc"].version == versions["night_qc"].version  # same row
