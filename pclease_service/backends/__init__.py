"""Backends: what actually runs compute contexts (see ``base.py`` for the interface).

Kept free of imports at module level: worker processes import ``local_worker`` from this
package and should not pay for pydantic and the service's configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pclease_service.backends.base import Backend, Capabilities, StartLedger
    from pclease_service.clock import Clock
    from pclease_service.config import BackendKind, Settings


def create_backend(
    settings: Settings, clock: Clock, *, ledger: StartLedger | None = None
) -> Backend:
    """The backend the settings name. ``polars_cloud`` needs the service's start ledger."""
    from pclease_service.config import BackendKind

    if settings.backend is BackendKind.MEMORY:
        from pclease_service.backends.memory import MemoryBackend

        return MemoryBackend(clock)
    if settings.backend is BackendKind.LOCAL:
        from pclease_service.backends.local import LocalBackend

        return LocalBackend(settings.data_dir / "local")
    if settings.backend is BackendKind.POLARS_CLOUD:
        from pclease_service.backends.polars_cloud import PolarsCloudBackend
        from pclease_service.credentials import TokenProvider, create_source

        options = settings.polars_cloud
        provider = TokenProvider(
            create_source(options.credentials),
            options.token_url,
            refresh_margin_s=options.token_refresh_margin_s,
            reread_interval_s=options.credentials.reread_interval_s,
            # A fetch happens inside one Polars Cloud call: it gets half of its time.
            timeout_s=options.request_timeout_s / 2,
            deadline_s=options.request_timeout_s / 2,
        )
        if ledger is None:
            raise ValueError("the polars_cloud backend needs a start ledger")
        return PolarsCloudBackend(settings, provider, ledger=ledger)
    raise NotImplementedError(f"backend {settings.backend.value!r} is not available")


def backend_capabilities(kind: BackendKind) -> Capabilities:
    """What a backend of ``kind`` offers, without making one (its class attribute)."""
    from pclease_service.config import BackendKind

    if kind is BackendKind.MEMORY:
        from pclease_service.backends.memory import MemoryBackend

        return MemoryBackend.capabilities
    if kind is BackendKind.LOCAL:
        from pclease_service.backends.local import LocalBackend

        return LocalBackend.capabilities
    if kind is BackendKind.POLARS_CLOUD:
        from pclease_service.backends.polars_cloud import PolarsCloudBackend

        return PolarsCloudBackend.capabilities
    raise NotImplementedError(f"backend {kind.value!r} is not available")
