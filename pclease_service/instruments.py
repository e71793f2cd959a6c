"""What domain code measures, as small instruments that the edge implements.

The lease manager, the reconciler and the query runner record into an
:class:`Instruments`; :class:`pclease_service.metrics.PrometheusInstruments` turns the
records into Prometheus histograms and counters. Domain code never imports the metrics
module (or anything else at the edge): the runtime hands it the instruments.
"""

from __future__ import annotations

from typing import Protocol


class Instruments(Protocol):
    def lease_request(self, outcome: str, seconds: float) -> None:
        """One lease request answered: ``created``, ``replayed`` or an error code."""
        ...

    def backend_call(self, operation: str, seconds: float, *, failed: bool) -> None:
        """One backend call by the reconciler (``start``, ``status``, ``stop``, ``list``)."""
        ...

    def query_finished(self, outcome: str, seconds: float) -> None:
        """One query's run time by how it ended (``succeeded``, ``failed``, ``cancelled``)."""
        ...


class NoInstruments:
    """Records nothing (tools and tests that do not look at metrics)."""

    def lease_request(self, outcome: str, seconds: float) -> None:
        return None

    def backend_call(self, operation: str, seconds: float, *, failed: bool) -> None:
        return None

    def query_finished(self, outcome: str, seconds: float) -> None:
        return None
