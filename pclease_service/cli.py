"""The ``pclease`` command: run the service and administer its database."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from pclease_service.config import ConfigError, Settings, load_settings

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="PCLEASE_CONFIG",
    help="TOML config file (default: $PCLEASE_CONFIG; PCLEASE_* variables override it).",
)


def _settings(config_file: Path | None) -> Settings:
    try:
        return load_settings(config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _engine(settings: Settings) -> Any:
    from sqlalchemy.exc import OperationalError

    from pclease_service.db.engine import create_db_engine, redacted
    from pclease_service.db.migrate import current_revision, head_revision

    engine = create_db_engine(settings.resolved_database_url, pool_size=1)
    try:
        current = current_revision(engine)
    except OperationalError as exc:
        engine.dispose()
        raise click.ClickException(
            f"cannot reach the database {redacted(settings.resolved_database_url)}: "
            f"{type(exc.orig or exc).__name__}; check database_url and that the server runs"
        ) from None
    if current != head_revision(settings.resolved_database_url):
        engine.dispose()
        raise click.ClickException(
            "the database is not at the current schema; run `pclease db upgrade` first"
        )
    return engine


def _tx(engine: Any) -> Any:
    from pclease_service.db.tx import Tx

    class _Unit:
        def __enter__(self) -> Tx:
            self._cm = engine.begin()
            return Tx(self._cm.__enter__(), datetime.now(UTC))

        def __exit__(self, *exc: object) -> None:
            self._cm.__exit__(*exc)

    return _Unit()


@click.group()
@click.version_option(package_name="pclease")
def main() -> None:
    """pclease: leases on shared Polars compute contexts."""


@main.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8040, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="json: one JSON object a line, with lease and context ids [default: log_format "
    "from the config, text]",
)
@click.option(
    "--no-migrate",
    is_flag=True,
    help="Do not migrate the database at startup; refuse to start unless it is already at "
    "the current schema (for deployments where a separate job runs `pclease db upgrade`).",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Run this many replica processes on the port (each its own replica id; the "
    "database must be PostgreSQL when more than one).",
)
@click.option("--reuse-port", is_flag=True, hidden=True)
def serve(
    config_file: Path | None,
    host: str,
    port: int,
    log_level: str,
    log_format: str | None,
    no_migrate: bool,
    workers: int,
    reuse_port: bool,
) -> None:
    """Run the service (migrates the database first, unless --no-migrate).

    SIGTERM stops this replica only: it drains (answers 503 draining, lets its queries
    finish) and exits without changing any lease. `pclease shutdown` stops the service
    as a whole."""
    from sqlalchemy import make_url

    from pclease_service import logs
    from pclease_service.api.app import create_app
    from pclease_service.config import LogFormat
    from pclease_service.runtime import Service
    from pclease_service.serving import run_replica, supervise, worker_argv

    settings = _settings(config_file)
    if log_format is not None:
        settings = settings.model_copy(update={"log_format": LogFormat(log_format)})
    logs.configure(settings.log_format, log_level)
    if workers > 1:
        if make_url(settings.resolved_database_url).get_backend_name() == "sqlite":
            raise click.UsageError(
                "--workers needs a database every process shares safely: set database_url "
                "to PostgreSQL, or run one worker"
            )
        if no_migrate:
            _engine(settings).dispose()
        else:
            from pclease_service.db.migrate import upgrade

            upgrade(settings.resolved_database_url)
        args = ["serve", "--host", host, "--port", str(port), "--log-level", log_level]
        args += ["--log-format", settings.log_format.value, "--no-migrate", "--reuse-port"]
        if config_file is not None:
            args += ["--config", str(config_file)]
        sys.exit(supervise(worker_argv(args), workers, settings.replica_id))
    if no_migrate:
        _engine(settings).dispose()
    _keep_running_on_sighup(settings)
    service = Service(settings, migrate=not no_migrate, config_file=config_file)
    app = create_app(service)
    run_replica(app, service, host=host, port=port, log_level=log_level, reuse_port=reuse_port)


def _keep_running_on_sighup(settings: Settings) -> None:
    """SIGHUP is the reload signal (``systemctl reload``, ``kill -HUP``). Once started, the
    service replaces this handler with one that re-reads the quotas and the Polars Cloud
    credentials; until then the signal's default action would end the process."""
    import logging
    import signal

    log = logging.getLogger("pclease")

    def on_sighup(signum: int, frame: object) -> None:
        log.info("SIGHUP before the service started: nothing re-read (%s)", settings.backend.value)

    signal.signal(signal.SIGHUP, on_sighup)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_file: Path | None, revision: str) -> None:
    """Migrate the database to the current schema."""
    from pclease_service.db.engine import redacted
    from pclease_service.db.migrate import upgrade

    settings = _settings(config_file)
    upgrade(settings.resolved_database_url, revision)
    click.echo(f"database {redacted(settings.resolved_database_url)} is at {revision}")


@main.group()
def token() -> None:
    """API tokens for clients (Airflow connections, dashboards, operators)."""


@token.command("create")
@config_option
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(["lease", "read", "admin"]),
    help="lease: take and run leases; read: see everything; admin: everything.",
)
@click.option(
    "--value-from-env",
    "value_env",
    metavar="VAR",
    help="Take the token's value from environment variable VAR (e.g. filled from a secret "
    "manager) instead of generating one; the value is never printed.",
)
@click.option(
    "--value-from-stdin",
    is_flag=True,
    help="Read the token's value from the first line of standard input instead of "
    "generating one; the value is never printed.",
)
def token_create(
    config_file: Path | None,
    name: str,
    scopes: tuple[str, ...],
    value_env: str | None,
    value_from_stdin: bool,
) -> None:
    """Create a token and print it once (only its hash is stored).

    With --value-from-env or --value-from-stdin the value is provisioned elsewhere (32 to
    512 characters: letters, digits, - . _ ~ + /). Running the same command again with the
    same value and scopes changes nothing and succeeds, so a deployment job can repeat it.
    """
    from pclease_service.principals import generate, hash_token
    from pclease_service.store import tokens

    if not 1 <= len(name) <= 100:
        raise click.BadParameter("a token name is 1 to 100 characters", param_hint="NAME")
    provided = _provided_token(value_env, value_from_stdin)
    engine = _engine(_settings(config_file))
    value = provided if provided is not None else generate()
    token_hash = hash_token(value)
    with _tx(engine) as tx:
        existing = tokens.token_by_name(tx, name)
        if (
            provided is not None
            and existing is not None
            and existing.token_hash == token_hash
            and existing.revoked_at is None
            and existing.scopes == frozenset(scopes)
        ):
            click.echo(f"token {name!r} already exists with this value and scopes", err=True)
            return
        if existing is not None:
            raise click.ClickException(
                f"a token named {name!r} exists; revoke it or pick another name"
            )
        if tokens.token_by_hash(tx, token_hash) is not None:
            raise click.ClickException(
                "another token already has this value; give every token its own value"
            )
        tokens.insert_token(tx, name=name, token_hash=token_hash, scopes=scopes)
    what = f"token {name!r} ({', '.join(sorted(scopes))})"
    if provided is not None:
        click.echo(f"{what} created with the value provided; it is not printed", err=True)
        return
    click.echo(value)
    click.echo(f"{what}: store it now, it is not shown again", err=True)


def _provided_token(value_env: str | None, from_stdin: bool) -> str | None:
    from pclease_service.principals import check_provided

    if value_env is not None and from_stdin:
        raise click.UsageError("give --value-from-env or --value-from-stdin, not both")
    if value_env is not None:
        value = os.environ.get(value_env)
        if not value:
            raise click.BadParameter(
                f"environment variable {value_env} is not set or empty",
                param_hint="--value-from-env",
            )
        source = "--value-from-env"
    elif from_stdin:
        # One line, its line ending dropped: what `echo` or a secret manager's CLI pipes in.
        value = sys.stdin.readline().rstrip("\r\n")
        source = "--value-from-stdin"
    else:
        return None
    try:
        return check_provided(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=source) from None


@token.command("list")
@config_option
def token_list(config_file: Path | None) -> None:
    """List tokens (names and scopes, never values)."""
    from pclease_service.store import tokens

    engine = _engine(_settings(config_file))
    with _tx(engine) as tx:
        rows = tokens.list_tokens(tx)
    for record in rows:
        state = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
        click.echo(
            f"{record.name:30} {','.join(sorted(record.scopes)):20} "
            f"created {record.created_at:%Y-%m-%d %H:%M}  {state}"
        )


@token.command("revoke")
@config_option
@click.argument("name")
def token_revoke(config_file: Path | None, name: str) -> None:
    """Revoke a token; clients using it get 401 within token_cache_s."""
    from pclease_service.store import tokens

    engine = _engine(_settings(config_file))
    with _tx(engine) as tx:
        if not tokens.revoke_token(tx, name):
            raise click.ClickException(f"no active token named {name!r}; see `pclease token list`")
    click.echo(f"revoked {name!r}")


@main.command()
@config_option
def profiles(config_file: Path | None) -> None:
    """Validate the configuration and print its profiles."""
    settings = _settings(config_file)
    if not settings.profiles:
        click.echo("no profiles configured: add [profiles.NAME] tables to the config file")
        sys.exit(1)
    click.echo(f"backend: {settings.backend.value}")
    for p in settings.profiles.values():
        shape = p.instance_type or f"{p.cpus} cpu, {p.memory_gb:g} GB"
        click.echo(
            f"{p.name:16} {shape:20} x{p.cluster_size}  grace {p.idle_grace_s:g}s  "
            f"{p.max_leases_per_context} leases/context  max {p.max_contexts} context(s)  "
            f"${p.hourly_cost:g}/h"
        )


@main.command()
@config_option
def shutdown(config_file: Path | None) -> None:
    """Shut the service down as a whole (every replica), not just one process.

    Recorded in the database: within a heartbeat every replica revokes the leases of the
    contexts it holds and stops them (local workers are stopped by the replica hosting
    them). Stop the replicas afterwards (SIGTERM). A SIGTERM alone stops only one replica
    and changes no lease; starting a replica again ends the shutdown.
    """
    import getpass

    from pclease_service.store import replicas

    engine = _engine(_settings(config_file))
    with _tx(engine) as tx:
        replicas.request_shutdown(tx, by=f"cli:{getpass.getuser()}")
    click.echo(
        "shutdown requested: the replicas stop every context within a few seconds; "
        "then stop them (SIGTERM)"
    )


@main.command()
@config_option
def status(config_file: Path | None) -> None:
    """What is running now: live contexts and their leases."""
    from pclease_service.states import LIVE_CONTEXT_STATES, LIVE_LEASE_STATES
    from pclease_service.store import contexts
    from pclease_service.store import leases as lease_rows

    engine = _engine(_settings(config_file))
    with _tx(engine) as tx:
        live = contexts.list_contexts(tx, states=LIVE_CONTEXT_STATES)
        leases = lease_rows.list_leases(tx, states=LIVE_LEASE_STATES)
        now = tx.now
    if not live:
        click.echo("nothing is running")
        return
    for c in live:
        up = (now - c.created_at).total_seconds()
        click.echo(
            f"context {c.id} {c.profile:12} {c.state.value:9} leases={c.refcount} "
            f"up {up:.0f}s  ${c.hourly_cost * up / 3600:.4f}"
        )
        for lease in (x for x in leases if x.context_id == c.id):
            who = (
                "/".join(
                    str(lease.holder.get(k))
                    for k in ("dag_id", "run_id", "task_id")
                    if lease.holder.get(k)
                )
                or "-"
            )
            left = (lease.expires_at - now).total_seconds()
            click.echo(f"    lease {lease.id} {lease.state.value:8} {who}  expires in {left:.0f}s")
