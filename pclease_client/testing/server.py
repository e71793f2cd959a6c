"""The fake service on a loopback port, for code that builds its own client from an
address (an Airflow connection) and for the watchdog, which releases over ``urllib``.

A standard-library ``ThreadingHTTPServer`` (a thread per request, so long polls do not
block each other) that turns each request into an ``httpx.Request`` for the same handler
the fake's ``MockTransport`` uses.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

_HOP_BY_HOP = frozenset({"connection", "transfer-encoding", "content-length", "keep-alive"})


@contextmanager
def serve(handle: Callable[[httpx.Request], httpx.Response]) -> Iterator[str]:
    """Serve ``handle`` on 127.0.0.1 (a free port) while the block runs; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request = httpx.Request(
                self.command,
                f"http://{self.headers.get('Host') or '127.0.0.1'}{self.path}",
                headers=list(self.headers.items()),
                content=body,
            )
            response = handle(request)
            content = response.read()
            self.send_response(response.status_code)
            for name, value in response.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass  # the fake's request log is FakePclease.requests

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            # A client that hangs up first (a long-poll it gave up on) is not an error of
            # the fake's; anything else still prints its traceback.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)  # type: ignore[arg-type]

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="pclease-fake", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
