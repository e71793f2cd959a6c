"""Run the fake standalone: ``python -m tests.fakepc --port 0 --client-id X
--client-secret-file F --data-dir D``. The first stdout line is its URL, the second
``workspace_id=...``; it serves until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from tests.fakepc.server import FakePolarsCloud


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakepc", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret-file", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--workspace", default="pclease-ws")
    parser.add_argument("--token-ttl-s", type=int, default=3600)
    args = parser.parse_args(argv)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    fake = FakePolarsCloud(
        client_id=args.client_id,
        client_secret=args.client_secret_file.read_text().strip(),
        workspace=args.workspace,
        data_dir=args.data_dir,
        token_ttl_s=args.token_ttl_s,
        port=args.port,
    )
    with fake:
        print(fake.url, flush=True)
        print(f"workspace_id={fake.workspace_id}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
