"""Per-token quotas and budgets: what one token (one team) may hold and spend.

::

    book.py       QuotaBook: the limits in force (config ``[quotas]``), replaced on SIGHUP
    usage.py      a token's usage: live leases, live contexts per profile, instance-hours
                  this UTC day, cost per profile this UTC month; the windows and when they
                  restart
    admission.py  THE rule: admit_lease (every grant), admit_start (a grant that would
                  create a context), record_start (who created a context)

How a quota applies (docs/quotas.md): every lease counts against ``max_live_leases``. A
context counts for the token whose lease request created it, and only a request that would
create one is checked against ``max_live_contexts``, ``max_instance_hours_per_day`` and a
hard ``monthly_budget``: joining a context that runs costs nothing more, so it is never
refused by them. The checks run inside the grant's transaction under the token's row lock,
so concurrent requests cannot both pass a limit; a refusal changes nothing.
"""

from pclease_service.quotas.admission import admit_lease, admit_start, record_start
from pclease_service.quotas.book import QuotaBook
from pclease_service.quotas.usage import TokenUsage, usage_by_name, usage_by_token

__all__ = [
    "QuotaBook",
    "TokenUsage",
    "admit_lease",
    "admit_start",
    "record_start",
    "usage_by_name",
    "usage_by_token",
]
