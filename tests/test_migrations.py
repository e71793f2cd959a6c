"""The Alembic migrations build exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from pclease_service.db.engine import create_db_engine
from pclease_service.db.migrate import alembic_config, current_revision, head_revision, upgrade
from pclease_service.db.schema import metadata


def test_upgrade_matches_the_schema_and_downgrade_empties_it(database_url: str) -> None:
    upgrade(database_url)
    engine = create_db_engine(database_url, pool_size=1)
    try:
        assert current_revision(engine) == head_revision(database_url)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []

        command.downgrade(alembic_config(database_url), "base")
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set()
        upgrade(database_url)  # and back, so the session's database stays usable
        assert current_revision(engine) == head_revision(database_url)
    finally:
        engine.dispose()
