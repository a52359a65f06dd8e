"""What a remote read may cost and what it did cost, and which paths are URLs.

The options a caller sets (download budget, timeout), the budget that whole
tensors are read against, the count of requests and bytes that ``--json``
reports, and how a URL is recognised and printed (never with its credentials).
"""

from __future__ import annotations

import re
import threading
from dataclasses import field
from urllib.parse import urlsplit, urlunsplit

from ...lean import dataclass

DEFAULT_MAX_DOWNLOAD = 256 << 20  # bytes of whole tensors read to confirm ties
DEFAULT_TIMEOUT = 30.0  # seconds, per request
HEAD_GUESS = 64 << 10  # the first read of a file: the header of most checkpoints whole
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# fsspec schemes that are no remote location: the local disk, archives, chains
LOCAL_SCHEMES = frozenset(
    {"file", "local", "zip", "tar", "libarchive", "reference", "memory-local"}
)


def is_remote(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``), never a local path."""
    return isinstance(path, str) and _SCHEME.match(path) is not None


def shown_url(url: str) -> str:
    """``url`` as it may be printed: no user name or password, no query (a signed
    URL carries its credential there), no fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("?", 1)[0]
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    netloc = host if "@" in parts.netloc else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class RemoteOptions:
    """How a remote checkpoint is read: the download cap and the request timeout."""

    max_download: int = DEFAULT_MAX_DOWNLOAD
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class RemoteStats:
    """Requests made and bytes received, for ``--json``'s ``remote`` object."""

    requests: int = 0
    bytes_read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int, nbytes: int) -> None:
        with self.lock:
            self.requests += requests
            self.bytes_read += nbytes

    def to_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes_read": self.bytes_read}


class DownloadBudget:
    """Bytes of whole tensors that may still be downloaded to confirm ties."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def allows(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` when they fit; False (and nothing reserved) when not."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True
