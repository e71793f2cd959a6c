"""``FakePolarsCloud``: the control plane state plus its network front, in background threads."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import uvicorn

from tests.fakepc import grpc_api
from tests.fakepc.control import ControlPlane
from tests.fakepc.front import Front
from tests.fakepc.rest import TOKEN_PATH, create_app


def _listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class FakePolarsCloud(ControlPlane):
    """A Polars Cloud control plane on loopback that the unmodified client accepts.

    See the package docstring for the API, the knobs and the wire facts it relies on.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        workspace: str = "pclease-ws",
        data_dir: Path,
        token_ttl_s: int = 3600,
        port: int = 0,
    ) -> None:
        super().__init__(
            client_id=client_id,
            client_secret=client_secret,
            workspace=workspace,
            data_dir=data_dir,
            token_ttl_s=token_ttl_s,
        )
        self._port = port
        self._bound_port: int | None = None
        self._public: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._grpc: grpc.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("FakePolarsCloud is not started; call start() first")
        return self._bound_port

    @property
    def url(self) -> str:
        """The value for ``POLARS_CLOUD_API_ADDR``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    def issue_token(self) -> str:
        """A valid bearer token for the configured client, without an HTTP round trip."""
        return self.auth.mint().access_token

    def client_env(self, config_dir: Path, token: str | None = None) -> dict[str, str]:
        """Environment for a polars-cloud client process that should talk to this fake.

        The client reads the API address when ``polars_cloud`` is imported, so apply it to a
        fresh process (``subprocess``), not to one that has imported the client already.
        """
        return {
            "POLARS_CLOUD_API_ADDR": self.url,
            "POLARS_CLOUD_ACCESS_TOKEN": token if token is not None else self.issue_token(),
            "POLARS_CLOUD_CONFIG_DIR": str(config_dir),
        }

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakePolarsCloud.start() called twice")
        self._grpc, grpc_port = grpc_api.serve(self)
        self._public = _listen(self._port)
        self._bound_port = self._public.getsockname()[1]
        http_sock = _listen()
        self._thread = threading.Thread(
            target=self._run, args=(http_sock, grpc_port), name="fakepc-front", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(15) or self._failure is not None:
            self.close()
            raise RuntimeError("FakePolarsCloud failed to start") from self._failure
        return self

    def _run(self, http_sock: socket.socket, grpc_port: int) -> None:
        try:
            asyncio.run(self._main(http_sock, grpc_port))
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self, http_sock: socket.socket, grpc_port: int) -> None:
        assert self._public is not None
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        config = uvicorn.Config(
            create_app(self),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            http="h11",
            timeout_graceful_shutdown=1,
        )
        web = uvicorn.Server(config)
        web_task = asyncio.create_task(web.serve(sockets=[http_sock]))
        front = Front(http_sock.getsockname()[1], grpc_port)
        public = await asyncio.start_server(front.handle, sock=self._public)
        while not web.started:
            if web_task.done():
                web_task.result()
                raise RuntimeError("uvicorn exited during startup")
            await asyncio.sleep(0.005)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            public.close()
            await front.close_all()
            await public.wait_closed()
            web.should_exit = True
            await web_task
            http_sock.close()

    def close(self) -> None:
        """Stop serving, cancel unfinished queries and wait for their threads."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        if self._grpc is not None:
            self._grpc.stop(None).wait(5)
            self._grpc = None
        self.shutdown_queries()
        if self._public is not None:
            self._public.close()

    def __enter__(self) -> Self:
        return self.start() if self._thread is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
