"""One public port for both protocols: sniff the first bytes, splice to the right backend.

The client speaks REST as HTTP/1.1 and gRPC as cleartext HTTP/2 with prior knowledge to the
same address. An HTTP/2 connection opens with ``PRI * HTTP/2.0``; anything else is HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib

H2_PREFACE_START = b"PRI "


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


class Front:
    def __init__(self, http_port: int, grpc_port: int) -> None:
        self._http_port = http_port
        self._grpc_port = grpc_port
        self._writers: set[asyncio.StreamWriter] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        self._idle.clear()
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readexactly(len(H2_PREFACE_START))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            port = self._grpc_port if head == H2_PREFACE_START else self._http_port
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            self._writers.add(up_writer)
            up_writer.write(head)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    await _close(w)
            self._open -= 1
            if self._open == 0:
                self._idle.set()

    async def close_all(self, timeout_s: float = 5.0) -> None:
        """Close every spliced connection (both ends) and wait for the handlers to finish."""
        for w in list(self._writers):
            w.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
