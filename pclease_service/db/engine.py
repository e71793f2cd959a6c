"""Engine creation, with the SQLite settings that make it safe for concurrent writers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url

READ_ONLY = {"pclease_read_only": True}


def create_db_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a busy timeout and serialised writers."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)

    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=pool_size,
        max_overflow=pool_size,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that BEGIN is ours.
        dbapi_connection.isolation_level = None
        # Text that is not UTF-8 (written by another tool) reads as U+FFFD instead of
        # failing the whole query; pclease itself only ever writes UTF-8.
        dbapi_connection.text_factory = _decode
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        # SQLite keeps a page cache per connection (2 MiB by default) and the pool holds up
        # to 2 x pool_size connections: at 10,000 leases that was 40 MB of the service's
        # memory for pages the operating system caches anyway.
        cursor.execute("PRAGMA cache_size=-512")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the write lock up front (IMMEDIATE): two deferred transactions that
        # both read and then write would otherwise deadlock into SQLITE_BUSY.
        if connection.get_execution_options().get("pclease_read_only"):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def redacted(url: str) -> str:
    """The URL with any password replaced, for logs and status output."""
    return make_url(url).render_as_string(hide_password=True)
