"""The image's HEALTHCHECK: exit 0 when ``GET URL`` answers 200, else 1 (stdlib only).

Usage: ``python healthcheck.py [URL]`` (default ``http://127.0.0.1:8040/healthz``).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8040/healthz"
TIMEOUT_S = 4.0


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        print(f"unhealthy: {url!r} is not an http(s) URL", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
