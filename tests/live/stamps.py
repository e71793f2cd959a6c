"""A Python UDF that records when it ran, for tests that check whether queries overlapped.

It lives in a module of its own so that a plan can pickle it by reference and a local
executor (whose ``PYTHONPATH`` is the repository) can import it without pulling in
pytest."""

from __future__ import annotations

import os
import time

import polars as pl


def stamp(series: pl.Series, path: str, label: str, sleep_s: float) -> pl.Series:
    """Append ``label start end pid`` to ``path`` around ``sleep_s`` of waiting."""
    start = time.time()
    time.sleep(sleep_s)
    end = time.time()
    line = f"{label} {start!r} {end!r} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one small O_APPEND write: whole lines, whoever writes
    finally:
        os.close(fd)
    return series


def intervals(path: str) -> dict[str, tuple[float, float, int]]:
    """What :func:`stamp` recorded: label -> (start, end, pid)."""
    found = {}
    with open(path) as f:
        for line in f:
            label, start, end, pid = line.split()
            found[label] = (float(start), float(end), int(pid))
    return found
