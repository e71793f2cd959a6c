"""Release a lease the moment the process holding it dies, however it dies.

A heartbeat thread dies with its process, so a process killed with SIGKILL (or by the
OOM killer) would keep its lease until the lease's TTL ran out, and the context with it.
:class:`Watchdog` closes that gap: it starts a small helper process that holds the read
end of a pipe whose write end only the lease holder has. When the holder ends the lease
normally it says so on the pipe and the helper exits; when the holder dies, the kernel
closes the pipe, the helper reads end-of-file and releases the lease at once.

The helper runs this file as a script with ``python -I -S`` (standard library only, no
site-packages, so it starts in tens of milliseconds), in a session of its own (a signal
to the holder's process group does not reach it) and with no stdout or stderr (it never
holds the holder's log pipes open). The token travels on the pipe, never in its command
line or environment. A lost machine still ends its leases by TTL only.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import IO, Any

log = logging.getLogger("pclease_client")

_DONE = b"done\n"


class Watchdog:
    """The helper process guarding one lease (see the module docstring)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    @classmethod
    def start(
        cls,
        release_url: str,
        token: str,
        *,
        verify: bool | str = True,
        timeout_s: float = 5.0,
        give_up_after_s: float = 120.0,
    ) -> Watchdog | None:
        """Start guarding; None (logged) if no helper could be started: the lease then
        ends by TTL if this process dies."""
        orders = {
            "url": release_url,
            "token": token,
            "verify": verify,
            "timeout_s": timeout_s,
            "give_up_after_s": give_up_after_s,
        }
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            assert process.stdin is not None
            process.stdin.write(json.dumps(orders).encode() + b"\n")
            process.stdin.flush()
        except (OSError, ValueError) as exc:
            log.warning("no watchdog for %s (the lease TTL still ends it): %s", release_url, exc)
            return None
        return cls(process)

    @property
    def pid(self) -> int:
        return self._process.pid

    def disarm(self, *, wait: bool = True) -> None:
        """The holder ended the lease itself: let the helper exit without releasing.

        ``wait=False`` from signal handlers: the helper is reaped when this process exits.
        """
        stdin: IO[bytes] | None = self._process.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.write(_DONE)
                stdin.close()
            except (OSError, ValueError):  # it is gone already
                pass
        if wait:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)


# -- the helper process (standard library only) ----------------------------------------


def _release(orders: dict[str, Any]) -> None:
    import ssl
    import time
    import urllib.error
    import urllib.request

    verify = orders.get("verify", True)
    context: ssl.SSLContext | None = None
    if orders["url"].startswith("https://"):
        if verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            cafile = verify if isinstance(verify, str) else None
            context = ssl.create_default_context(cafile=cafile)
    request = urllib.request.Request(  # noqa: S310 (the URL's scheme is the client's own)
        orders["url"],
        method="DELETE",
        headers={"Authorization": f"Bearer {orders['token']}", "User-Agent": "pclease-watchdog"},
    )
    deadline = time.monotonic() + float(orders.get("give_up_after_s", 120))
    delay = 0.5
    while True:
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=float(orders.get("timeout_s", 5)), context=context
            ):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # ended already, or not ours: nothing more to do
                return
        except OSError:
            pass
        if time.monotonic() + delay > deadline:
            return
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def _main() -> None:
    pipe = sys.stdin.buffer
    line = pipe.readline()
    if not line:
        return
    orders = json.loads(line)
    if pipe.readline() == _DONE:
        return
    _release(orders)


if __name__ == "__main__":
    _main()
