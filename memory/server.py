"""Memory on a Chroma server: the URL (`--chroma-url` / MODELCREW_CHROMA_URL), checked before anything is written.

Light on purpose (urllib only, no chromadb): the CLI's root callback calls `check_server` for every
command when a URL is set, so a command with the server down stops at once with one line naming the
URL (exit 2) instead of failing half-way, after its files are written.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from training.errors import InputError

ENV = "MODELCREW_CHROMA_URL"
START = "start it with `chroma run --path DIR --host HOST --port PORT`"


def server_url(url: str | None = None) -> str | None:
    """The Chroma server memory uses: `url`, else $MODELCREW_CHROMA_URL, else None (the embedded store)."""
    url = (url if url is not None else os.environ.get(ENV, "")).strip()
    if not url:
        return None
    parse_url(url)
    return url.rstrip("/")


def parse_url(url: str) -> tuple[str, int, bool]:
    """(host, port, ssl) of `http[s]://host[:port]`; the port defaults to 8000 as `chroma run`'s does."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path.strip("/"):
        raise InputError(f"--chroma-url {url!r}: expected http://HOST:PORT (a Chroma server, e.g. http://127.0.0.1:8000)")
    return parts.hostname, port or 8000, parts.scheme == "https"


class ServerUnreachable(InputError):
    """No Chroma server answers at the URL memory was told to use."""


def unreachable(url: str, why: object) -> ServerUnreachable:
    return ServerUnreachable(f"memory: cannot reach the Chroma server at {url} ({why}); {START}, or unset {ENV} "
                      "to use the workspace's own store")


def check_server(url: str, timeout: float = 5.0) -> None:
    """Raise `InputError` naming `url` unless a Chroma server answers its heartbeat there."""
    host, port, ssl = parse_url(url)
    heartbeat = f"{'https' if ssl else 'http'}://{host}:{port}/api/v2/heartbeat"
    try:
        with urllib.request.urlopen(heartbeat, timeout=timeout) as reply:
            if reply.status != 200:
                raise unreachable(url, f"heartbeat answered HTTP {reply.status}")
    except urllib.error.HTTPError as err:
        raise unreachable(url, f"heartbeat answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        raise unreachable(url, getattr(err, "reason", None) or err) from None
