"""The running service: every long-lived part, wired together (and nothing else)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import make_url

from pclease_service.backends import create_backend
from pclease_service.backends.base import Backend, Credentials
from pclease_service.blobs import create_blob_store
from pclease_service.clock import Clock, SystemClock
from pclease_service.config import ConfigError, Settings, load_settings
from pclease_service.contexts.manager import ContextManager
from pclease_service.credentials import install_sighup
from pclease_service.db.engine import create_db_engine, redacted
from pclease_service.db.migrate import upgrade
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.history import History
from pclease_service.leases.manager import LeaseManager
from pclease_service.metrics import PrometheusInstruments
from pclease_service.notify import Notifier
from pclease_service.plans.check import Reader
from pclease_service.plans.header import local_header, local_polars_version
from pclease_service.principals import Principals
from pclease_service.queries.manager import QueryManager
from pclease_service.queries.runner import QueryRunner
from pclease_service.queries.spool import Spool
from pclease_service.quotas import QuotaBook
from pclease_service.reconciler.loop import Reconciler
from pclease_service.reconciler.starts import DatabaseStartLedger
from pclease_service.replicas.liveness import Liveness, new_replica_id
from pclease_service.states import ReplicaState
from pclease_service.store import keys, profiles

log = logging.getLogger("pclease")

# How often the background check asks for a token while the credentials fail / work.
_CHECK_FAILS_S = 5.0
_CHECK_WORKS_S = 60.0
# Where releases before the shared key kept the dashboard's session key.
_LEGACY_SESSION_KEY_FILE = "session.key"


def _local_reader() -> Reader:
    return Reader(local_header(), local_polars_version())


class Service:
    """Owns every long-lived part. ``start`` and ``stop`` bracket the app's lifespan;
    tests build one with a fake clock and backend and drive ``reconciler.tick`` by hand."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        backend: Backend | None = None,
        run_reconciler: bool = True,
        migrate: bool = True,
        config_file: Path | None = None,
    ) -> None:
        self.settings = settings
        # Re-read on SIGHUP for what may change without a restart (the quotas).
        self.config_file = config_file
        self.quotas = QuotaBook(settings.quotas)
        self.clock = clock or SystemClock()
        self.replica_id = new_replica_id(settings)
        self.engine = create_db_engine(settings.resolved_database_url)
        self.notifier = Notifier()
        self.db = Database(self.engine, self.clock, on_commit=self._committed)
        self.backend = backend or create_backend(
            settings,
            self.clock,
            ledger=DatabaseStartLedger(self.db, self.clock, replica=self.replica_id),
        )
        instruments = PrometheusInstruments()
        self.principals = Principals(self.db, self.clock, settings.token_cache_s)
        self.leases = LeaseManager(
            settings,
            self.db,
            self.notifier,
            self.clock,
            self.backend.kind,
            ready_check=self.credentials_problem if self.credentials else None,
            instruments=instruments,
            quotas=self.quotas,
            replica=self.replica_id,
        )
        self.contexts = ContextManager(settings, self.db)
        self.history = History(self.db)
        self.reconciler = Reconciler(
            settings,
            self.db,
            self.backend,
            self.notifier,
            self.clock,
            replica=self.replica_id,
            instruments=instruments,
        )
        self.liveness = Liveness(settings, self.db, self.clock, self.replica_id)
        blobs = create_blob_store(settings, self.db, self.clock)
        self.spool = Spool(blobs, settings.data_dir / "spool" / "scratch")
        denied = self._denied_paths()
        self.queries = QueryManager(
            settings,
            self.db,
            self.notifier,
            self.clock,
            self.spool,
            reader=_local_reader,
            denied_paths=denied,
            backend=self.backend.kind,
            backend_distributes=self.backend.capabilities.distributed_queries,
        )
        self.runner = QueryRunner(
            settings,
            self.db,
            self.backend,
            self.notifier,
            self.spool,
            self.clock,
            denied_paths=denied,
            instruments=instruments,
            replica=self.replica_id,
        )
        self._run_reconciler = run_reconciler
        self._migrate = migrate
        self._uninstall_sighup: Callable[[], None] | None = None
        self._check_task: asyncio.Task[None] | None = None
        self.started_at = self.clock.now()
        self._loop_task: asyncio.Task[None] | None = None
        self._runner_task: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None
        self._heartbeats_task: asyncio.Task[None] | None = None
        #: Set once this replica drains (SIGTERM): it takes no request and no new work.
        self.draining = False
        self.loop_error: BaseException | None = None
        self._session_key: bytes | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    @property
    def credentials(self) -> Credentials | None:
        """The backend's credentials (the Polars Cloud service account), if it has any."""
        return self.backend.credentials

    def _denied_paths(self) -> tuple[str, ...]:
        """The service's own files: never readable or writable by a query."""
        denied = [str(self.settings.data_dir.resolve())]
        if self.settings.storage.directory is not None:
            denied.append(str(self.settings.storage.directory.resolve()))
        config = os.environ.get("PCLEASE_CONFIG")
        if config:
            denied.append(str(Path(config).resolve()))
        url = make_url(self.settings.resolved_database_url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            # The database may live outside data_dir; it and its WAL files are ours too.
            db_file = Path(url.database).resolve()
            denied += [str(db_file), f"{db_file}-wal", f"{db_file}-shm", f"{db_file}-journal"]
        return tuple(denied)

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        url = self.settings.resolved_database_url
        if self._migrate:
            await asyncio.to_thread(upgrade, url)
        await self.db.write(lambda tx: profiles.sync_profiles(tx, self.settings.profiles))
        self._session_key = await self._load_session_key()
        await asyncio.to_thread(self.spool.prepare)
        # Only queries of replicas that are gone (and of an earlier process under this
        # replica's id): the other replicas' go on.
        await self.runner.recover(at_start=True)
        await self.liveness.register()
        credentials = self.credentials
        if credentials is not None:
            # Learn early whether the credentials work (readiness and lease requests say
            # so), without holding up startup on the token endpoint.
            self._check_task = asyncio.create_task(
                self._watch_credentials(credentials), name="credentials-check"
            )
        if self.leases.active.enabled:
            self._heartbeats_task = asyncio.create_task(
                self.leases.active.run(), name="heartbeat-writer"
            )
            self._heartbeats_task.add_done_callback(self._loop_died)
        if threading.current_thread() is threading.main_thread():
            self._uninstall_sighup = install_sighup(self)
        log.info(
            "pclease ready: backend=%s database=%s profiles=%s",
            self.backend.kind,
            redacted(url),
            ",".join(self.settings.profiles) or "(none)",
        )
        if self._run_reconciler:
            self._liveness_task = asyncio.create_task(self.liveness.run(), name="liveness")
            self._liveness_task.add_done_callback(self._loop_died)
            self._loop_task = asyncio.create_task(self.reconciler.run(), name="reconciler")
            self._loop_task.add_done_callback(self._loop_died)
            self._runner_task = asyncio.create_task(self.runner.run(), name="query-runner")
            self._runner_task.add_done_callback(self._loop_died)

    def reload(self) -> None:
        """What ``SIGHUP`` does (in a thread): re-read the quotas from the config file,
        then the Polars Cloud credentials. A credentials failure raises
        :class:`~pclease_service.errors.CredentialsError`; a bad config file is logged and
        the quotas in force stay."""
        try:
            self.reload_quotas()
        except Exception:
            # Whatever went wrong there, the credentials are still re-read.
            log.exception("SIGHUP: re-reading the quotas failed; the quotas in force stay")
        if self.credentials is not None:
            self.credentials.reload()

    def reload_quotas(self) -> bool:
        """Apply the config file's ``[quotas]`` now; True when they changed. Only the
        quotas: any other change is logged as needing a restart."""
        if self.config_file is None:
            log.info("SIGHUP: the service was started without a config file; quotas unchanged")
            return False
        try:
            fresh = load_settings(self.config_file)
        except ConfigError as exc:
            log.error("SIGHUP: %s; the quotas in force stay", exc)
            return False
        changed = self.quotas.replace(fresh.quotas)
        others = [
            name
            for name in type(fresh).model_fields
            if name not in ("quotas", "log_format")
            and getattr(fresh, name) != getattr(self.settings, name)
        ]
        if others:
            log.warning(
                "SIGHUP: %s changed in %s as well; only [quotas] (and the Polars Cloud "
                "credentials) are re-read, restart the service for the rest",
                ", ".join(others),
                self.config_file,
            )
        log.info("SIGHUP: quotas %s", "replaced" if changed else "unchanged")
        return changed

    @property
    def session_key(self) -> bytes:
        """The dashboard's session signing key: ``session_secret``, or the deployment's
        shared key in the database (made by the first replica that started)."""
        if self._session_key is None:
            raise RuntimeError("the service has not started: no session key yet")
        return self._session_key

    async def _load_session_key(self) -> bytes:
        if self.settings.session_secret is not None:
            return self.settings.session_secret.get_secret_value().encode()
        candidate = await asyncio.to_thread(self._new_session_key)
        key = await self.db.write(lambda tx: keys.shared_key(tx, keys.DASHBOARD_SESSION, candidate))
        return key.encode()

    def _new_session_key(self) -> str:
        """The key an earlier release kept in ``data_dir/session.key`` (its sessions stay
        valid after the upgrade), or a new random one."""
        try:
            kept = (self.settings.data_dir / _LEGACY_SESSION_KEY_FILE).read_text().strip()
        except (OSError, UnicodeDecodeError):
            kept = ""
        return kept if 32 <= len(kept) <= 200 else secrets.token_hex(32)

    def _loop_died(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self.loop_error = task.exception()
        log.critical("the %s loop died: %r; /readyz now fails", task.get_name(), self.loop_error)

    @property
    def reconciler_alive(self) -> bool:
        if not self._run_reconciler:
            return True
        return all(
            task is not None and not task.done()
            for task in (self._loop_task, self._runner_task, self._liveness_task)
        )

    async def _watch_credentials(self, credentials: Credentials) -> None:
        """Keep the credential status current, so /readyz can read it without fetching:
        often while it fails (a fixed source is noticed soon), rarely once it works
        (backend calls keep it current then)."""
        while True:
            try:
                status = await asyncio.to_thread(credentials.check)
            except Exception:
                log.exception("checking the Polars Cloud credentials failed")
                status = None
            await self.clock.sleep(_CHECK_WORKS_S if status and status.ok else _CHECK_FAILS_S)

    async def credentials_problem(self) -> str | None:
        """Why the credentials do not work, or None. A failing status is checked again
        first, so a fixed source is noticed by the next request."""
        credentials = self.credentials
        if credentials is None or credentials.status().ok:
            return None
        return (await asyncio.to_thread(credentials.check)).problem

    def request_drain(self) -> None:
        """:meth:`begin_drain` from a signal handler (or any thread)."""
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        """Stop taking requests and new work (SIGTERM): the API answers 503 ``draining``,
        long-polls and waiting lease requests end, no query starts here and no context is
        claimed. Nothing about leases or contexts changes."""
        if self.draining:
            return
        self.draining = True
        self.runner.draining = True
        self.reconciler.draining = True
        self.notifier.begin_drain()
        log.info("replica %s is draining", self.replica_id)

    def _committed(self, tx: Tx) -> None:
        """Every committed unit of work: leases it changed are read afresh next time, and
        whoever waits on them wakes."""
        self.leases.active.forget(tx.leases_changed)
        self.notifier.publish(tx)

    async def _stop_writing_heartbeats(self) -> None:
        """Cancel the heartbeat writer, which writes what it still holds on its way out."""
        task, self._heartbeats_task = self._heartbeats_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("the last heartbeats could not be written")

    async def stop(self) -> None:
        """The replica exits: drain, finish (or, after ``drain_timeout_s``, cancel) the
        queries it runs and its backend calls, give its claims to the other replicas and
        mark its row stopped. Leases are left as they are; contexts too, unless the
        service as a whole is being shut down (see the reconciler's ``shutdown``)."""
        self.begin_drain()
        try:
            await self.liveness.set_state(ReplicaState.DRAINING)
        except Exception:
            log.exception("could not mark replica %s draining", self.replica_id)
        if self._uninstall_sighup is not None:
            self._uninstall_sighup()
            self._uninstall_sighup = None
        for task in (self._check_task, self._runner_task, self._loop_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self.runner.shutdown(grace_s=self.settings.drain_timeout_s)
            await self.reconciler.shutdown()
        finally:
            if self._liveness_task is not None:
                self._liveness_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._liveness_task
            try:
                await self.liveness.set_state(ReplicaState.STOPPED)
            finally:
                await self._stop_writing_heartbeats()
                await self.backend.close()
                self.engine.dispose()
