"""The Alembic migrations build exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

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


def test_0003_gives_stops_from_before_it_their_kind(database_url: str) -> None:
    """Once, in the migration: the kind of an old stop is read from its reason text."""
    upgrade(database_url)
    command.downgrade(alembic_config(database_url), "0002")
    engine = create_db_engine(database_url, pool_size=1)
    reasons = {
        "a": ("stopped", "idle for its grace period of 30 s", "idle"),
        "b": ("stopped", "idle past its max_lifetime_s of 100", "max_lifetime"),
        "c": ("stopped", "force-stopped by token:ops", "forced"),
        "d": ("stopped", "the service is shutting down", "shutdown"),
        "e": ("stopped", "profile 'gone' is no longer configured", "unconfigured"),
        "f": ("failed", "start failed: quota", "failed"),
        "g": ("stopped", "something else", None),
        "h": ("running", None, None),
    }
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO profiles (name, lock_version) VALUES ('p', 0)"))
            for context_id, (state, reason, _) in reasons.items():
                conn.execute(
                    text(
                        "INSERT INTO contexts (id, profile, backend, state, refcount, "
                        "leases_total, hourly_cost, created_at, stop_reason) VALUES "
                        "(:id, 'p', 'memory', :state, 0, 0, 0, '2026-01-01 00:00:00', :reason)"
                    ),
                    {"id": context_id, "state": state, "reason": reason},
                )
        upgrade(database_url)
        with engine.connect() as conn:
            kinds = dict(conn.execute(text("SELECT id, stop_kind FROM contexts")).all())
        assert kinds == {context_id: kind for context_id, (_, _, kind) in reasons.items()}
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM contexts"))
            conn.execute(text("DELETE FROM profiles"))
        engine.dispose()


def test_0008_finds_who_started_the_contexts_from_before_it(database_url: str) -> None:
    """Contexts created before 0008 count for the token whose request created them (the
    actor of their creation event); those created otherwise count for nobody."""
    upgrade(database_url)
    command.downgrade(alembic_config(database_url), "0003")
    engine = create_db_engine(database_url, pool_size=1)
    created = {"a": "token:team-a", "b": "token:team-b", "c": "reconciler", "d": "token:team-a"}
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO profiles (name, lock_version) VALUES ('p', 0)"))
            for token_id, name in (("ta", "team-a"), ("tb", "team-b")):
                conn.execute(
                    text(
                        "INSERT INTO tokens (id, name, token_hash, scopes, created_at) VALUES "
                        "(:id, :name, :hash, 'lease', '2026-01-01 00:00:00')"
                    ),
                    {"id": token_id, "name": name, "hash": f"hash-{token_id}"},
                )
            for context_id, actor in created.items():
                conn.execute(
                    text(
                        "INSERT INTO contexts (id, profile, backend, state, refcount, "
                        "leases_total, hourly_cost, created_at) VALUES "
                        "(:id, 'p', 'memory', 'running', 1, 1, 0, '2026-01-01 00:00:00')"
                    ),
                    {"id": context_id},
                )
                conn.execute(
                    text(
                        "INSERT INTO events (at, kind, context_id, to_state, actor, reason) "
                        "VALUES ('2026-01-01 00:00:00', 'context', :id, 'starting', :actor, "
                        "'no context had room')"
                    ),
                    {"id": context_id, "actor": actor},
                )
            # A later transition by the same token is no start.
            conn.execute(
                text(
                    "INSERT INTO events (at, kind, context_id, from_state, to_state, actor, "
                    "reason) VALUES ('2026-01-01 00:01:00', 'context', 'c', 'running', "
                    "'starting', 'token:team-b', 'not a start')"
                )
            )
        upgrade(database_url)
        with engine.connect() as conn:
            starters = dict(
                conn.execute(text("SELECT context_id, token_id FROM context_starters")).all()
            )
        assert starters == {"a": "ta", "b": "tb", "d": "ta"}
    finally:
        with engine.begin() as conn:
            for table in ("context_starters", "events", "contexts", "tokens", "profiles"):
                conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608
        engine.dispose()
