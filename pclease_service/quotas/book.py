"""The quotas in force, replaceable while the service runs."""

from __future__ import annotations

import logging
import threading

from pclease_service.config import Quota, QuotaSettings

log = logging.getLogger("pclease.quotas")


class QuotaBook:
    """The ``[quotas]`` of the configuration. :meth:`replace` swaps them at once (a request
    sees either the old or the new limits, never a mix); requests already granted keep
    what they hold."""

    def __init__(self, settings: QuotaSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()

    @property
    def settings(self) -> QuotaSettings:
        return self._settings

    def for_token(self, name: str) -> Quota:
        return self._settings.for_token(name)

    def replace(self, settings: QuotaSettings) -> bool:
        """Use ``settings`` from now on; True when they differ from the ones in force."""
        with self._lock:
            changed = settings != self._settings
            self._settings = settings
        if changed:
            log.info(
                "quotas replaced: a default and %d token entr%s",
                len(settings.tokens),
                "y" if len(settings.tokens) == 1 else "ies",
            )
        return changed
