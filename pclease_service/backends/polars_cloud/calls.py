"""How the backend calls Polars Cloud: with a current access token, on threads of its own,
each call bounded by ``polars_cloud.request_timeout_s`` and retried only where that is
safe.

A call goes to the client's own process (:class:`~.host.ClientHost`) from one of the
backend's threads, so calls abandoned at their timeout never crowd out the event loop's
default executor. On a 401 the token is invalidated (the provider re-reads its source, so a
rotated secret takes effect) and the call is tried once more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

from pclease_service.backends.polars_cloud.client import CloudError
from pclease_service.backends.polars_cloud.host import ClientHost
from pclease_service.config import POLARS_CLOUD_RETRY_DELAYS_S
from pclease_service.credentials import TokenProvider
from pclease_service.errors import BackendError, CredentialsError

log = logging.getLogger("pclease.backends.polars_cloud")

RETRY_DELAYS_S = POLARS_CLOUD_RETRY_DELAYS_S
# Threads for blocking client calls: enough for a few starts, polls and cancels at once,
# few enough that calls abandoned at their timeout cannot pile up without bound.
_WORKERS = 8
# How long close() waits for query cancellations still on their way.
_CANCEL_GRACE_S = 5.0


class CallTimeout(Exception):
    """Polars Cloud did not answer within ``request_timeout_s``."""


class NotSent(BackendError):
    """The call never reached Polars Cloud, or was refused at the door: it changed nothing."""


class CloudCalls:
    def __init__(self, provider: TokenProvider, host: ClientHost, timeout_s: float) -> None:
        self.provider = provider
        self.host = host
        self.timeout_s = timeout_s
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=_WORKERS, thread_name_prefix="pclease-polars-cloud"
        )
        self._cancels: set[concurrent.futures.Future[None]] = set()
        self._cancels_lock = threading.Lock()

    def authorized(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One client call with a current token (blocking); on 401, a fresh token and one
        retry."""
        for attempt in (0, 1):
            try:
                token = self.provider.token()
            except CredentialsError as exc:
                raise NotSent(f"Polars Cloud credentials are not usable: {exc.message}") from None
            try:
                return self.host.call(token, method, *args, **kwargs)
            except CloudError as exc:
                error = exc
            if error.auth and attempt == 0:
                log.info("Polars Cloud refused the access token; fetching a new one")
                self.provider.invalidate(token)
                continue
            if error.auth:
                raise NotSent(
                    "Polars Cloud refused a fresh access token for the service account from "
                    f"{self.provider.source.describe()} ({error.message}); check that the "
                    "service account may use the workspace"
                )
            raise error
        raise AssertionError("unreachable")

    def submit(self, method: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start one call on the backend's threads."""
        try:
            return self._executor.submit(self.authorized, method, *args, **kwargs)
        except RuntimeError:  # shut down
            raise BackendError("the polars_cloud backend is closed") from None

    async def once(self, method: str, *args: Any, **kwargs: Any) -> Any:
        future = self.submit(method, *args, **kwargs)
        try:
            # A timeout cancels the call if it has not begun; one under way runs out in
            # its thread and its answer is dropped.
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            raise CallTimeout(f"Polars Cloud did not answer within {self.timeout_s:g} s") from None

    async def safe(self, what: str, method: str, *args: Any) -> Any:
        """A call that is safe to repeat: retried on errors other than not-found."""
        last: str = ""
        for attempt in range(len(RETRY_DELAYS_S) + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS_S[attempt - 1])
            try:
                return await self.once(method, *args)
            except CloudError as exc:
                if exc.not_found:
                    raise
                last = exc.message
            except CallTimeout as exc:
                last = str(exc)
            log.warning("Polars Cloud %s failed (attempt %d): %s", what, attempt + 1, last)
        raise BackendError(f"Polars Cloud {what} failed {len(RETRY_DELAYS_S) + 1} times: {last}")

    def cancel_soon(self, workspace_id: str, query_id: str) -> None:
        """Cancel a query on Polars Cloud without holding up the task being cancelled
        (retried: cancelling is safe to repeat)."""

        def cancel() -> None:
            last: Exception | None = None
            for delay in (0.0, *RETRY_DELAYS_S):
                time.sleep(delay)
                try:
                    self.authorized("cancel", workspace_id, query_id)
                    log.info("cancelled Polars Cloud query %s", query_id)
                    return
                except CloudError as exc:
                    if exc.not_found:
                        return
                    last = exc
                except Exception as exc:
                    last = exc
            log.warning("could not cancel Polars Cloud query %s: %s", query_id, last)

        try:
            future = self._executor.submit(cancel)
        except RuntimeError:
            log.warning("could not cancel Polars Cloud query %s: the backend is closed", query_id)
            return
        with self._cancels_lock:
            self._cancels.add(future)
        future.add_done_callback(self._cancel_done)

    def _cancel_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._cancels_lock:
            self._cancels.discard(future)

    async def close(self) -> None:
        with self._cancels_lock:
            cancels = list(self._cancels)
        if cancels:
            # Cancellations on their way get a moment to reach Polars Cloud.
            await asyncio.to_thread(concurrent.futures.wait, cancels, _CANCEL_GRACE_S)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.host.close)
        await asyncio.to_thread(self.provider.close)
