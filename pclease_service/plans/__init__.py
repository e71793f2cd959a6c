"""Plans: what the service may know about a serialized Polars plan without running it.

::

    targets.py      what a query produces (collect, or a file sink of one format)
    header.py       the plan's frame and the one version rule
    messagepack.py  the payload, decoded without Polars (complete, well formed)
    guard.py        the walk: every node a plan would run, every path it touches, pickles
    access.py       paths inside the profile's data roots, output matching the target
    check.py        the pipeline (check_plan), run once per submission off the event loop
                    and again where the plan runs

Nothing here imports Polars (except ``header.local_header``, which asks the local Polars
for its header) or anything of the service beyond its errors: the local executor runs
these checks in its own process before Polars deserializes a plan.
"""
