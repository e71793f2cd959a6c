"""Leases: how they are granted, waited for, and what callers may do with them.

::

    grant.py      THE transaction that grants a lease: join a context with room, or create
                  one (under the profile's lock), then insert the lease
    waiting.py    FIFO waiting for capacity, on the service's clock
    manager.py    what callers may do: acquire, read (long-poll), heartbeat, release, revoke
"""
