"""Plans waiting to run and collect results, as files under the data directory."""

from __future__ import annotations

import os
from pathlib import Path


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.plans = self.root / "plans"
        self.results = self.root / "results"

    def prepare(self) -> None:
        for directory in (self.root, self.plans, self.results):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def plan_path(self, query_id: str) -> Path:
        return self.plans / f"{query_id}.plan"

    def result_path(self, query_id: str) -> Path:
        return self.results / f"{query_id}.arrow"

    def write_plan(self, query_id: str, data: bytes) -> None:
        path = self.plan_path(query_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    def read_plan(self, query_id: str) -> bytes:
        return self.plan_path(query_id).read_bytes()

    def discard_plan(self, query_id: str) -> None:
        self.plan_path(query_id).unlink(missing_ok=True)
