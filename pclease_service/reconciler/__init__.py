"""The reconciler: the only component that calls a backend's lifecycle methods.

API calls only change rows (a new ``starting`` context, a lease ended, a context marked
``stopping``) and wake the reconciler. Each tick it makes the backend match the database:

1. expire leases whose TTL ran out;
2. compare what the backend reports with the database (on the first tick and then every
   ``orphan_sweep_interval_s``): adopt instances of known contexts whose start checkpoint
   was lost, stop instances of contexts that ended or that it never knew;
3. for each live context: launch starts, poll starting ones, health-check running ones,
   stop idle ones whose time has come (:mod:`pclease_service.contexts.rules` decides,
   :func:`pclease_service.store.contexts.begin_idle_stop` fences), carry out stops.

Backend calls run as tasks (at most one per context at a time) with timeouts, so a slow
start never delays expiry or another profile's stop.

::

    loop.py     the tick: expiry, sweep schedule, one task per live context, shutdown
    actions.py  what it does to one context: start, poll, health check, stop, fail
    sweep.py    adopt what the database lost track of, stop what nobody owns
    calls.py    every backend lifecycle call, each bounded by backend_call_timeout_s
"""
