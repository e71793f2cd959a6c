"""Queries run through a lease.

::

    manager.py  what clients may do: submit (the plan pipeline runs here, in a thread),
                read (long-poll), list, cancel, fetch a result
    runner.py   the loop that alone calls the backend to execute queries
    spool.py    plans waiting to run and collect results, as files

A client submits plan bytes on its lease; the service checks them without deserializing
them (:mod:`pclease_service.plans`), spools them to disk and records a ``queued`` query. The
runner starts queued queries whose lease is active, awaits the backend's ``execute`` and
records the outcome. Cancelling a query, or ending its lease in any way, flags it; the
runner cancels the task that runs it.
"""
