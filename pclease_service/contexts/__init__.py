"""Contexts: the rules of their life, and what callers may do with them.

::

    rules.py      when a context takes leases and when (and why) it stops: the one function
                  the reconciler, the API's stops_at and the dashboard all use
    lifecycle.py  context transitions that reach its leases (started, failed, force-stopped)
    manager.py    what callers may do: list, read, force-stop
"""
