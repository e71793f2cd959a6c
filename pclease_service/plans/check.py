"""The one plan pipeline: run once per submission (in a thread, off the event loop) and
again where the plan runs (the local executor, the Polars Cloud backend).

In order, each step refusing with a :class:`~pclease_service.errors.PlanRefused` whose
:class:`~pclease_service.errors.PlanRefusal` says why:

1. the header frame (:func:`header.read_header`): ``plan_invalid``;
2. the version rule against the Polars that will read it (:func:`header.check_version`):
   ``plan_version_mismatch``;
3. the guard (:func:`guard.inspect`): a DSL schema it was verified against, the marker of
   Python functions (``python_udf_refused``), the MessagePack payload complete and well
   formed (``plan_invalid``), every node it would run, bare pickles (``plan_refused``);
4. paths and output (:func:`access.check_access`): every path inside the profile's data
   roots and outside the service's own files, the output matching the query's target
   (``plan_refused``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pclease_service.plans.access import check_access
from pclease_service.plans.guard import PlanInfo, inspect
from pclease_service.plans.header import PlanHeader, check_version, read_header
from pclease_service.plans.targets import QueryTarget


@dataclass(frozen=True)
class Reader:
    """The Polars that will read the plan: its plan header and version."""

    header: PlanHeader
    polars_version: str


def check_plan(
    plan: bytes,
    *,
    reader: Reader,
    target: QueryTarget,
    allow_python_udfs: bool,
    data_roots: tuple[str, ...],
    denied_paths: tuple[str, ...],
    client_polars_version: str | None = None,
) -> PlanInfo:
    """Run the whole pipeline (see the module docstring); returns what the guard found."""
    check_version(
        read_header(plan),
        reader.header,
        reader.polars_version,
        client_polars_version=client_polars_version,
    )
    info = inspect(plan, allow_python_udfs=allow_python_udfs)
    check_access(info, target, data_roots, denied_paths)
    return info
