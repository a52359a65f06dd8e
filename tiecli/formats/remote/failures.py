"""What went wrong reading a remote file, in words of our own.

Each backend (aiohttp, httpx under huggingface_hub, botocore under s3fs) raises
its own exceptions; :func:`why` turns any of them into the short reason an
``Error:`` line gives. A server's own error text is never shown.
"""

from __future__ import annotations

import socket

from ...errors import param


class NotTheRange(Exception):
    """A range answer that is not the range asked for."""


class TooLong(Exception):
    """An answer of another length than asked for."""

    def __init__(self, asked: int, length: int | None):
        super().__init__(asked, length)
        self.asked = asked
        self.length = length


def why(e: BaseException, timeout: float) -> str:
    """What went wrong, in words of our own: a server's error text is not shown."""
    cause = e.__cause__ or e.__context__
    if isinstance(e, FileNotFoundError) and isinstance(cause, Exception):
        return why(cause, timeout)  # fsspec's HTTP reports any failed lookup as not found
    if isinstance(e, TooLong):
        said = "more" if e.length is None else f"{e.length} bytes"
        return f"asked for {e.asked} bytes, the server answers with {said}; not read"
    if isinstance(e, NotTheRange):
        return f"the server answers another range than {e.args[0]} asked for; not read"
    name = type(e).__name__
    status = getattr(e, "status", None)
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore's ClientError (s3fs)
        name = str(response.get("Error", {}).get("Code") or name)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    elif status is None and response is not None:
        status = getattr(response, "status_code", None)
    if name == "NoSuchBucket":
        return "no such bucket"
    if name == "NoSuchKey":
        return "not found"
    if name == "OfflineModeIsEnabled":
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); tiecli reads nothing remote then"
    if name == "RepositoryNotFoundError":
        return "no such repository (or it is private: set HF_TOKEN or run 'hf auth login')"
    if name == "RevisionNotFoundError":
        return "no such revision in the repository"
    if name == "EntryNotFoundError" or isinstance(e, FileNotFoundError):
        return "not found"
    if "Timeout" in name or isinstance(e, TimeoutError):
        return f"timed out (no answer within {timeout:g} s; raise {param('timeout')})"
    if status == 404:
        return "not found"
    if status in (401, 403):
        return f"the server answered HTTP {status} (access denied: credentials missing or refused)"
    if isinstance(status, int):
        return f"the server answered HTTP {status}"
    if isinstance(e, ValueError) and "range" in str(e).lower():
        return "the server does not answer range requests"
    if "DNS" in name or isinstance(e, socket.gaierror) or isinstance(cause, socket.gaierror):
        return "cannot resolve the host name"
    if "Connect" in name or isinstance(e, ConnectionError):
        return f"cannot connect ({name})"
    return f"cannot read it ({name})"
