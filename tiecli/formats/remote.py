"""Checkpoints that live elsewhere (``hf://``, ``https://``, ``s3://``...), read by ranges.

A remote safetensors file is read like a local one, by position: headers, the
index and ``config.json`` whole, then a few elements per tensor, and whole
tensors only to confirm a tie candidate, within a download budget. The bytes
come from the ecosystem's file systems: ``huggingface_hub``'s ``HfFileSystem``
(its token, revision handling, ``HF_ENDPOINT`` and offline mode) for ``hf://``,
and ``fsspec`` for every other URL. Both are optional and imported only here,
only when a remote path is named.

What detection will sample is fetched up front, in two rounds: the first
element of every tensor another could equal by dtype and shape, then the eight
sampled elements of those whose first element another shares. Each round's
ranges are sorted, ranges closer than :data:`MERGE_GAP` merged, and over HTTP(S)
up to :data:`MAX_RANGES` of them asked in one multi-range request (one range per
request where the server refuses those, and for the Hub and object stores); the
requests are sent :data:`WORKERS` at a time.
"""

from __future__ import annotations

import json
import posixpath
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ..checkpoint import Checkpoint, Entry
from ..dtypes import itemsize, uint_view
from ..errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    MissingDependencyError,
    RemoteError,
    TiecliError,
    UsageError,
)
from ..io import RangeBlob
from ..progress import NO_PROGRESS, Progress
from .safetensors import RepeatedKey, SafetensorsFile, unique_keys

DEFAULT_MAX_DOWNLOAD = 256 << 20  # bytes of whole tensors read to confirm ties
DEFAULT_TIMEOUT = 30.0  # seconds, per request
HEAD_GUESS = 64 << 10  # the first read of a file: the header of most checkpoints whole
MERGE_GAP = 4 << 10  # ranges closer than this are read in one request
MAX_SPAN = 1 << 20  # ... up to this many bytes in one request
WORKERS = 8  # requests in flight at once
MAX_RANGES = 200  # ranges in one multi-range request (Apache's MaxRanges default)
MAX_RANGE_HEADER = 6000  # characters of its Range header (servers refuse lines over 8 KiB)
PART_OVERHEAD = 256  # bytes a part of a multipart/byteranges answer may add to its data
MAX_JSON = 64 << 20
INDEX_SUFFIX = ".index.json"
FOLDER_PREFERENCE = ("model.safetensors.index.json", "model.safetensors")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
INSTALL = "install them with: pip install 'tiecli[remote]'"


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


# fsspec schemes that are no remote location: the local disk, archives, chains
LOCAL_SCHEMES = frozenset(
    {"file", "local", "zip", "tar", "libarchive", "reference", "memory-local"}
)


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


def _range_length(header: str | None) -> int | None:
    """The byte count a ``Range: bytes=a-b`` header asks for; None for anything else."""
    m = re.fullmatch(r"\s*bytes=(\d+)-(\d+)\s*", header or "")
    return int(m.group(2)) - int(m.group(1)) + 1 if m else None


def coalesce(
    ranges: list[tuple[int, int]], gap: int = MERGE_GAP, span: int = MAX_SPAN
) -> list[tuple[int, int]]:
    """``[start, end)`` ranges sorted, and merged where they overlap or lie closer than
    ``gap``, as long as a merged range stays within ``span`` bytes: one request's body
    is held in memory, and a file of small tensors must not become one request."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start - out[-1][1] <= gap and max(out[-1][1], end) - out[-1][0] <= span:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _why(e: BaseException, timeout: float) -> str:
    """What went wrong, in words of our own: a server's error text is not shown."""
    cause = e.__cause__ or e.__context__
    if isinstance(e, FileNotFoundError) and isinstance(cause, Exception):
        return _why(cause, timeout)  # fsspec's HTTP reports any failed lookup as not found
    if isinstance(e, _TooLong):
        said = "more" if e.length is None else f"{e.length} bytes"
        return f"asked for {e.asked} bytes, the server answers with {said}; not read"
    if isinstance(e, _NotTheRange):
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
        return f"timed out (no answer within {timeout:g} s; raise --timeout)"
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


class _Remote:
    """One remote location: its file system, how to name files beside it, and the
    count of what reading it cost."""

    bytes_read = 0  # a checkpoint reader: its files count the bytes read

    def __init__(self, url: str, options: RemoteOptions):
        self.url = url
        self.options = options
        self.stats = RemoteStats()
        # what the HTTP client counts itself (every request; every body byte)
        self.requests_by_transport = False
        self.bytes_by_transport = False
        self._unhook: Any = None
        # whether the server answers multi-range requests (None: not asked yet)
        self.multi_range: bool | None = None
        self.protocol = url.split("://", 1)[0].lower()
        if self.protocol in LOCAL_SCHEMES or "::" in url:
            # a local file under another name, or a chain of file systems: local paths
            # get the local reader and its checks, so these are refused, not read
            raise UsageError(
                f"{self.protocol}:// is not a remote location tiecli reads; name a local "
                "file by its path, or use hf://, http(s):// or an object store's URL",
                shown_url(url),
            )
        self.fs, self.root = self._filesystem()

    def _filesystem(self) -> tuple[Any, str]:
        if self.protocol == "hf":
            try:
                from huggingface_hub import HfFileSystem, constants
            except ImportError:
                raise MissingDependencyError(
                    f"reading hf:// paths needs huggingface_hub and fsspec; {INSTALL}", self.url
                ) from None
            timeout = self.options.timeout
            constants.HF_HUB_DOWNLOAD_TIMEOUT = max(1, round(timeout))
            constants.HF_HUB_ETAG_TIMEOUT = max(1, round(timeout))
            self._count_hub_requests()
            return HfFileSystem(skip_instance_cache=True), self.url[len("hf://") :].rstrip("/")
        try:
            import fsspec
        except ImportError:
            raise MissingDependencyError(
                f"reading URLs needs fsspec; {INSTALL}", self.url
            ) from None
        kwargs: dict[str, Any] = {"skip_instance_cache": True}
        if self.protocol in ("http", "https"):
            kwargs["client_kwargs"] = self._http_client()
            self.requests_by_transport = self.bytes_by_transport = True
        elif self.protocol in ("s3", "s3a"):
            session = self._s3_session()
            if session is not None:
                kwargs["session"] = session
        try:
            with self.guard(self.url):  # a backend may connect while it is made
                fs, root = fsspec.core.url_to_fs(self.url, **kwargs)
        except ImportError as e:
            raise MissingDependencyError(
                f"reading {self.protocol}:// URLs needs an fsspec backend that is not installed "
                f"({type(e).__name__}); {INSTALL} (and s3fs or gcsfs for s3:// or gs://)",
                shown_url(self.url),
            ) from None
        except ValueError:
            raise UsageError(
                f"no fsspec file system reads {self.protocol}:// URLs", shown_url(self.url)
            ) from None
        return fs, root

    def _http_client(self) -> dict[str, Any]:
        """aiohttp settings: the timeout, and hooks that count every request (the body
        bytes are counted by :class:`_HttpFile` as it reads them)."""
        try:
            import aiohttp
        except ImportError:
            raise MissingDependencyError(
                f"reading http(s) URLs needs aiohttp; {INSTALL}", shown_url(self.url)
            ) from None
        stats = self.stats

        async def started(session: Any, ctx: Any, params: Any) -> None:
            stats.add(1, 0)

        async def answered(session: Any, ctx: Any, params: Any) -> None:
            # fsspec reads a range answer's whole body into memory: its length is
            # checked against the range asked for before a byte of it is read
            asked = _range_length(params.headers.get("Range"))
            response = params.response
            if asked is None or response.status != 206:
                return
            length = response.content_length
            if length is None or length > asked:
                response.close()
                said = "no length" if length is None else f"{length} bytes"
                raise RemoteError(
                    f"asked for {asked} bytes, the server answers with {said}; not read",
                    shown_url(str(params.url)),
                )

        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(started)
        trace.on_request_end.append(answered)
        return {
            "trace_configs": [trace],
            "timeout": aiohttp.ClientTimeout(total=self.options.timeout),
        }

    def _s3_session(self) -> Any:
        """An aiobotocore session for s3fs whose clients count every request they send
        (retries too); s3fs answers some lookups from its own cache, with none."""
        try:
            from aiobotocore.session import AioSession
        except ImportError:
            return None  # s3fs is missing too: url_to_fs says so
        stats = self.stats

        def sent(**_kwargs: Any) -> None:
            stats.add(1, 0)

        session = AioSession()
        session.register("before-send.s3", sent)
        self.requests_by_transport = True
        return session

    def _count_hub_requests(self) -> None:
        """Count every request huggingface_hub's shared client sends while this location
        is open (API calls included); the bytes counted are those of the files read."""
        from huggingface_hub.utils import get_session

        hooks = get_session().event_hooks
        stats = self.stats

        def hook(request: Any) -> None:
            stats.add(1, 0)

        def answered(response: Any) -> None:
            # httpx calls this with the headers, before the body is read: a range answer
            # longer than the range asked for (or of no stated length) is refused here
            asked = _range_length(response.request.headers.get("range"))
            if asked is None or response.status_code not in (200, 206):
                return
            length = response.headers.get("content-length")
            if length is None or not length.isdigit() or int(length) > asked:
                response.close()
                raise _TooLong(asked, int(length) if length and length.isdigit() else None)

        def unhook() -> None:
            for kind, f in (("request", hook), ("response", answered)):
                if f in hooks[kind]:
                    hooks[kind].remove(f)

        hooks["request"].append(hook)
        hooks["response"].append(answered)
        self.requests_by_transport = True
        self._unhook = unhook

    def close(self) -> None:
        unhook, self._unhook = self._unhook, None
        if unhook is not None:
            unhook()

    def shown(self, path: str) -> str:
        """The URL of a file system path, as printed."""
        if self.protocol in ("http", "https"):
            return shown_url(path)
        if self.protocol == "hf":
            return "hf://" + path
        fs = getattr(self, "fs", None)  # None while the file system is being made
        url = str(fs.unstrip_protocol(path)) if fs is not None else path
        return shown_url(url) if urlsplit(url).netloc else url.split("?", 1)[0]

    def folder_of(self, path: str) -> str:
        """The folder of a file path (for a URL: without its query)."""
        if self.protocol in ("http", "https"):
            parts = urlsplit(path)
            return urlunsplit(
                parts._replace(path=parts.path.rsplit("/", 1)[0], query="", fragment="")
            )
        return path.rsplit("/", 1)[0] if "/" in path else path

    def beside(self, path: str, name: str) -> str:
        """``name`` (a plain file name, checked by the caller) in ``path``'s folder."""
        return self.inside(self.folder_of(path), name)

    def inside(self, folder: str, name: str) -> str:
        if self.protocol in ("http", "https"):
            return folder.rstrip("/") + "/" + quote(name, safe="")
        return posixpath.join(folder, name)

    @contextmanager
    def guard(self, path: str) -> Iterator[None]:
        """Any failure below becomes one line naming the URL."""
        try:
            yield
        except TiecliError:
            raise
        except Exception as e:  # noqa: BLE001 - each backend raises its own types
            raise RemoteError(_why(e, self.options.timeout), self.shown(path)) from None

    def count(self, requests: int, nbytes: int = 0) -> None:
        self.stats.add(
            0 if self.requests_by_transport else requests, 0 if self.bytes_by_transport else nbytes
        )

    def open(self, path: str) -> Any:
        """A handle with the file's ``size`` whose ranges :meth:`fetch` reads: for HTTP(S)
        an :class:`_HttpFile` (its first bytes read with the size), for the Hub the file
        system's buffered file (each range one request, checked to be one), else the file
        system's ``cat_file`` (s3fs, gcsfs, memory)."""
        handle: Any
        with self.guard(path):
            self.count(1)
            if self.protocol in ("http", "https"):
                handle = _HttpFile(self.fs, path, self.stats)
            elif self.protocol == "hf":
                handle = self.fs.open(path, "rb", cache_type="none")
            else:
                handle = _CatFile(self.fs, path, self.fs.size(path))
        if not hasattr(handle, "_fetch_range") or getattr(handle, "size", None) is None:
            handle.close()
            raise RemoteError("the server does not say how large the file is", self.shown(path))
        return handle

    def fetch(self, handle: Any, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; exactly those or an error."""
        with self.guard(path):
            data = handle._fetch_range(start, end)
        self.count(1, len(data))
        if len(data) != end - start:
            raise RemoteError(
                f"asked for bytes {start}-{end - 1}, the server sent {len(data)} bytes "
                "(file changed, or no range support?)",
                self.shown(path),
            )
        return bytes(data)

    def fetch_many(
        self, handle: Any, path: str, ranges: list[tuple[int, int]]
    ) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]]]:
        """``ranges`` (sorted, apart) asked in one multi-range request: the parts the
        server sent, and the ranges they leave out (all of them where the server does not
        answer multi-range requests: each is then asked alone, and so are later ones)."""
        got: list[tuple[int, bytes]] = []
        if len(ranges) > 1 and self.multi_range is not False and isinstance(handle, _HttpFile):
            with self.guard(path):
                parts = handle.fetch_ranges(ranges)
            for start, data in parts or []:
                if start < 0 or start + len(data) > handle.size:
                    raise RemoteError(
                        f"the server sent bytes {start}-{start + len(data) - 1}, outside the "
                        "file; not read",
                        self.shown(path),
                    )
                got.append((start, data))
            covered = [(s, s + len(d)) for s, d in got]
            left = [(a, b) for a, b in ranges if not any(s <= a and b <= e for s, e in covered)]
            # a server that answers with a whole file or fewer ranges is asked one at a time
            self.multi_range = not left
            return got, left
        return [(start, self.fetch(handle, path, start, end)) for start, end in ranges], []

    def listing(self, folder: str, named: str | None = None) -> list[str] | None:
        """The file names in ``folder``; None where the file system cannot list (HTTP).
        A failure names ``named`` (the file the user named in it) where given."""
        if self.protocol in ("http", "https"):
            return None
        with self.guard(named or folder):
            self.count(1)
            found = self.fs.ls(folder, detail=True)
        return sorted(
            posixpath.basename(str(f["name"]).rstrip("/")) for f in found if f.get("type") == "file"
        )

    def read_json(self, path: str, what: str, unique: bool = False) -> Any | None:
        """A small JSON file whole; None when it does not exist."""
        try:
            handle = self.open(path)
        except RemoteError as e:
            if e.message == "not found":
                return None
            raise
        try:
            if handle.size > MAX_JSON:
                raise CheckpointFormatError(f"{what} is larger than 64 MiB", self.shown(path))
            raw = self.fetch(handle, path, 0, handle.size) if handle.size else b""
        finally:
            handle.close()
        try:
            return json.loads(
                raw.decode("utf-8"), object_pairs_hook=unique_keys if unique else None
            )
        except RepeatedKey as e:
            raise CheckpointFormatError(
                f"{what} lists {e.args[0]!r} twice", self.shown(path)
            ) from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise CheckpointFormatError(f"{what} is not valid JSON", self.shown(path)) from None


class _HttpFile:
    """A file on an HTTP(S) server, read by ranges through the aiohttp session of fsspec's
    HTTP file system (its client settings, trace hooks and event loop).

    Opening it is one GET of its first :data:`HEAD_GUESS` bytes, whose ``Content-Range``
    says how large the file is (no HEAD). Ranges are read one per request
    (:meth:`_fetch_range`) or many per request (:meth:`fetch_ranges`, ``Range:
    bytes=a-b,c-d,...`` answered ``206 multipart/byteranges``). Every answer's headers
    are checked before its body is read: a body longer than what was asked is refused,
    and a whole file is never read where a range was asked.
    """

    def __init__(self, fs: Any, url: str, stats: RemoteStats):
        self.fs = fs
        self.url = url
        self.stats = stats  # body bytes are counted here (aiohttp counts only read())
        self.size, self.first = self._sync(self._open)

    def _sync(self, func: Any, *args: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, func, *args)

    async def _get(self, ranges: list[tuple[int, int]] | None) -> Any:
        session = await self.fs.set_session()
        kwargs = dict(self.fs.kwargs)
        headers = dict(kwargs.pop("headers", None) or {})
        if ranges:
            headers["Range"] = "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in ranges)
        response = await session.get(self.fs.encode_url(self.url), headers=headers, **kwargs)
        if response.status == 404:
            response.close()
            raise FileNotFoundError(self.url)
        if response.status >= 400 and response.status != 416:
            response.close()
            response.raise_for_status()
        return response

    async def _open(self) -> tuple[int, bytes]:
        response = await self._get([(0, HEAD_GUESS)])
        async with response:
            if response.status == 416:  # an empty file has no byte 0
                if _content_range(response.headers) == (None, None, 0):
                    return 0, b""
                response.raise_for_status()
            if response.status == 206:
                start, end, total = _content_range(response.headers)
                if start != 0 or total is None or end != min(HEAD_GUESS, total):
                    response.close()
                    raise _NotTheRange(f"bytes 0-{HEAD_GUESS - 1}")
                return total, await _body(response, end, self.stats)
            # 200: the whole file, acceptable only when it is no more than was asked
            length = response.content_length
            if length is None or length > HEAD_GUESS:
                response.close()
                raise ValueError("the server does not answer range requests")
            return length, await _body(response, length, self.stats)

    def _fetch_range(self, start: int, end: int) -> bytes:
        have = self.first[start:end] if start < len(self.first) else b""
        if start + len(have) >= end:
            return have
        return have + self._sync(self._one, start + len(have), end)

    async def _one(self, start: int, end: int) -> bytes:
        response = await self._get([(start, end)])
        async with response:
            if response.status != 206:
                response.close()
                raise ValueError("the server does not answer range requests")
            if _content_range(response.headers)[:2] != (start, end):
                response.close()
                raise _NotTheRange(f"bytes {start}-{end - 1}")
            return await _body(response, end - start, self.stats)

    def fetch_ranges(self, ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]] | None:
        """The parts the server sends for ``ranges`` asked in one request (``(start, bytes)``,
        possibly fewer than asked); None when it answers a multi-range request with
        anything but ranges (read nothing then: the caller reads them one by one)."""
        return self._sync(self._many, ranges)  # type: ignore[no-any-return]

    async def _many(self, ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]] | None:
        asked = sum(e - s for s, e in ranges)
        response = await self._get(ranges)
        async with response:
            kind, _, params = (response.headers.get("Content-Type") or "").partition(";")
            if response.status != 206:
                response.close()  # a whole file, or an error: not a byte of it is read
                return None
            if kind.strip().lower() != "multipart/byteranges":
                # one range: the server merged them, or answers the first one only
                start, end, _total = _content_range(response.headers)
                if start is None or end is None or end - start > asked:
                    response.close()
                    return None
                return [(start, await _body(response, end - start, self.stats))]
            m = re.search(r'boundary="?([^";]+)"?', params)
            cap = asked + len(ranges) * PART_OVERHEAD
            if m is None or (response.content_length or 0) > cap:
                response.close()
                return None
            body = await _capped(response, cap, self.stats)
        return _parts(body, m.group(1).encode("latin-1"), self.url)

    def close(self) -> None:
        self.first = b""


class _NotTheRange(Exception):
    """A range answer that is not the range asked for."""


def _content_range(headers: Any) -> tuple[int | None, int | None, int | None]:
    """``Content-Range: bytes a-b/total`` as ``(a, b + 1, total)``; Nones where absent."""
    m = re.fullmatch(
        r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", headers.get("Content-Range") or ""
    )
    if m is None:
        return None, None, None
    start = int(m.group(1)) if m.group(1) else None
    end = int(m.group(2)) + 1 if m.group(2) else None
    return start, end, int(m.group(3)) if m.group(3) != "*" else None


async def _capped(response: Any, cap: int, stats: RemoteStats) -> bytes:
    """A body of at most ``cap`` bytes, its length checked from the headers first."""
    length = response.content_length
    if length is not None and length > cap:
        response.close()
        raise _TooLong(cap, length)
    chunks: list[bytes] = []
    got = 0
    while True:
        chunk = await response.content.read(1 << 20)
        if not chunk:
            return b"".join(chunks)
        got += len(chunk)
        stats.add(0, len(chunk))
        if got > cap:
            response.close()
            raise _TooLong(cap, None)
        chunks.append(chunk)


async def _body(response: Any, nbytes: int, stats: RemoteStats) -> bytes:
    """Exactly ``nbytes`` of body, or an error."""
    data = await _capped(response, nbytes, stats)
    if len(data) != nbytes:
        raise _TooLong(nbytes, len(data))
    return data


class _TooLong(Exception):
    """An answer of another length than asked for."""

    def __init__(self, asked: int, length: int | None):
        super().__init__(asked, length)
        self.asked = asked
        self.length = length


def _parts(body: bytes, boundary: bytes, url: str) -> list[tuple[int, bytes]]:
    """The ``(start, bytes)`` parts of a ``multipart/byteranges`` body; each part's length
    is taken from its ``Content-Range``, so a boundary inside the data cannot cut it."""
    out: list[tuple[int, bytes]] = []
    delimiter = b"--" + boundary
    at = body.find(delimiter)
    while at >= 0:
        at += len(delimiter)
        if body[at : at + 2] == b"--":
            return out
        head_end = body.find(b"\r\n\r\n", at)
        if head_end < 0:
            break
        head = body[at:head_end].decode("latin-1")
        m = re.search(r"(?im)^content-range:\s*bytes\s+(\d+)-(\d+)/", head)
        if m is None:
            break
        start, end = int(m.group(1)), int(m.group(2)) + 1
        data = body[head_end + 4 : head_end + 4 + end - start]
        if end <= start or len(data) != end - start:
            break
        out.append((start, data))
        at = body.find(delimiter, head_end + 4 + len(data))
    raise RemoteError("the server's multi-range answer is malformed; not read", shown_url(url))


class _CatFile:
    """A file of a file system that reads ranges with ``cat_file``."""

    def __init__(self, fs: Any, path: str, size: Any):
        self.fs = fs
        self.path = path
        self.size = size

    def _fetch_range(self, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(self.path, start=start, end=end))

    def close(self) -> None:
        pass


class RemoteFile:
    """A remote file read by position, as :class:`~tiecli.io.ByteFile`
    reads a local one: ``pread``/``preadinto`` relative to the file's start, failing
    on a short read. Ranges fetched ahead (:meth:`keep`) are served from memory."""

    data_start = 0
    path: Any  # the URL shown (a ByteFile's is a Path)

    def __init__(self, remote: _Remote, fspath: str, file_number: int = 0):
        self.remote = remote
        self.fspath = fspath
        self.path = remote.shown(fspath)
        self.file_number = file_number
        self.bytes_read = 0
        self._handle = remote.open(fspath)
        self.size: int = int(self._handle.size)
        self._kept: dict[int, bytes] = {}  # start -> bytes fetched ahead
        self._starts: list[int] = []
        self._lock = threading.Lock()

    def fetch(self, start: int, end: int) -> bytes:
        return self.remote.fetch(self._handle, self.fspath, start, end)

    def has(self, start: int, end: int) -> bool:
        """Whether bytes ``[start, end)`` are here already (no request needed)."""
        first = getattr(self._handle, "first", b"")
        return end <= len(first) or self._cached(start, end - start)[1] == end - start

    @property
    def multi_range(self) -> bool:
        """Whether several ranges may be asked in one request (an HTTP server that has
        not refused them)."""
        return isinstance(self._handle, _HttpFile) and self.remote.multi_range is not False

    def fetch_many(
        self, ranges: list[tuple[int, int]]
    ) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]]]:
        return self.remote.fetch_many(self._handle, self.fspath, ranges)

    def keep(self, start: int, data: bytes) -> None:
        """Hold ``data``, read at ``start``, for later reads (from any thread).

        No kept range contains another: a range inside one already kept is dropped,
        and ranges inside a new one are let go. Ends then rise with starts, so the
        range starting last at or before an offset is the only one that can hold it.
        """
        import bisect

        end = start + len(data)
        with self._lock:
            i = bisect.bisect_right(self._starts, start) - 1
            if i >= 0 and self._starts[i] + len(self._kept[self._starts[i]]) >= end:
                return  # already here
            j = bisect.bisect_left(self._starts, start)
            while j < len(self._starts) and (
                self._starts[j] + len(self._kept[self._starts[j]]) <= end
            ):
                del self._kept[self._starts.pop(j)]
            bisect.insort(self._starts, start)
            self._kept[start] = data

    def _cached(self, offset: int, size: int) -> tuple[bytes, int]:
        """The bytes at ``offset`` already here (up to ``size``) and how many."""
        import bisect

        with self._lock:  # keep() may let ranges go from another thread
            i = bisect.bisect_right(self._starts, offset) - 1
            if i < 0:
                return b"", 0
            start = self._starts[i]
            data = self._kept[start]
        if offset >= start + len(data):
            return b"", 0
        piece = data[offset - start : offset - start + size]
        return piece, len(piece)

    def pread(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if offset < 0 or offset + size > self.size:
            raise CheckpointFormatError("short read (file changed or truncated?)", self.path)
        have, n = self._cached(offset, size)
        data = have if n == size else have + self.fetch(offset + n, offset + size)
        self.bytes_read += size
        return data

    def preadinto(self, offset: int, view: memoryview) -> None:
        view[:] = self.pread(offset, len(view))

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: BLE001, S110 - a read-only handle has nothing to lose
                pass
        self._kept.clear()
        self._starts.clear()


class RemoteSafetensorsFile(RemoteFile, SafetensorsFile):
    """A remote safetensors file: its header read in one request (two when larger than
    :data:`HEAD_GUESS`), validated by the same code as a local file's."""

    def __init__(self, remote: _Remote, fspath: str, file_number: int = 0):
        RemoteFile.__init__(self, remote, fspath, file_number)
        try:
            first = min(self.size, HEAD_GUESS)
            if first:
                self.keep(0, self.fetch(0, first))
            self.header_size, self.tensors, self.metadata = self._parse(
                lambda size, offset: self._head_read(offset, size)
            )
        except BaseException:
            self.close()
            raise
        self.data_start = 8 + self.header_size
        self.bytes_read = 0
        if self.size > HEAD_GUESS:  # the header is parsed: its bytes need not stay (shards add up)
            with self._lock:
                self._kept.clear()
                self._starts.clear()

    def _head_read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        return self.pread(offset, size)

    def _blob(self, start: int, nbytes: int) -> Any:
        return RemoteBlob(self, start, nbytes)

    def close(self) -> None:
        RemoteFile.close(self)


class RemoteBlob(RangeBlob):
    """A tensor's byte range inside a remote safetensors file (no mappings: read by range)."""

    __slots__ = ()
    file: RemoteFile

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        import numpy as np

        view = uint_view(dtype)
        if view is None:
            return None
        return np.frombuffer(self.read(0, self.nbytes), dtype=view).reshape(shape)


# -- sampled elements, fetched ahead ----------------------------------------


def head_ranges(entries: list[Entry]) -> list[tuple[RemoteFile, int, int]]:
    """The first element of every tensor that could equal another by dtype and shape."""
    from ..matching import shaped_like_another

    out = []
    for e in shaped_like_another([e for e in entries if e.nbytes > 0 and e.numel > 1]):
        if isinstance(e.blob, RemoteBlob):
            base = e.blob.file.data_start + e.blob.start
            out.append((e.blob.file, base, base + (itemsize(e.dtype) or 1)))
    return out


def sample_ranges(entries: list[Entry]) -> list[tuple[RemoteFile, int, int]]:
    """The byte ranges (file, start, end) of the sampled elements of the tensors that
    could equal another (see :func:`~tiecli.matching.could_match`), and of the sampled
    elements of their transposes where a tensor of the transposed shape is among them."""
    from ..matching import could_match
    from ..values import sample_positions

    live = could_match([e for e in entries if e.nbytes > 0 and e.numel > 1])
    shapes = {(e.dtype, e.shape) for e in live}
    out = []
    for e in live:
        blob = e.blob
        if not isinstance(blob, RemoteBlob):
            continue
        base = blob.file.data_start + blob.start
        size = itemsize(e.dtype)
        if size is None:
            offsets = [(p, 1) for p in sample_positions(e.nbytes)]
        else:
            offsets = [(p * size, size) for p in sample_positions(e.numel)]
            if len(e.shape) == 2 and (e.dtype, e.shape[::-1]) in shapes:
                rows, cols = e.shape
                for p in sample_positions(e.numel):
                    r, c = divmod(p, rows)
                    offsets.append(((c * cols + r) * size, size))
        out += [(blob.file, base + o, base + o + n) for o, n in offsets]
    return out


def batches(ranges: list[tuple[int, int]], multi: bool) -> list[list[tuple[int, int]]]:
    """Sorted ranges grouped as requests send them: one each, or (``multi``) up to
    :data:`MAX_RANGES` in one request whose ``Range`` header stays within
    :data:`MAX_RANGE_HEADER` characters."""
    if not multi:
        return [[r] for r in ranges]
    out: list[list[tuple[int, int]]] = []
    width = 0
    for start, end in ranges:
        text = len(f"{start}-{end - 1},")
        if not out or len(out[-1]) >= MAX_RANGES or width + text > MAX_RANGE_HEADER:
            out.append([])
            width = len("bytes=")
        out[-1].append((start, end))
        width += text
    return out


def fetch_ahead(
    ranges: list[tuple[RemoteFile, int, int]], progress: Progress = NO_PROGRESS
) -> None:
    """Fetch ``ranges`` coalesced per file, several in one request where the server takes
    multi-range requests (HTTP), :data:`WORKERS` requests at a time."""
    by_file: dict[RemoteFile, list[tuple[int, int]]] = {}
    for f, start, end in ranges:
        if not f.has(start, end):
            by_file.setdefault(f, []).append((start, end))
    jobs = [
        (f, batch)
        for f, spans in by_file.items()
        for batch in batches(coalesce(spans), f.multi_range)
    ]
    if not jobs:
        return
    total = sum(e - s for _f, batch in jobs for s, e in batch)
    with progress.task("reading sampled elements", total) as bar:

        def one(job: tuple[RemoteFile, list[tuple[int, int]]]) -> list[Any]:
            f, batch = job
            parts, left = f.fetch_many(batch)
            for start, data in parts:
                f.keep(start, data)
            bar.advance(sum(e - s for s, e in batch) - sum(e - s for s, e in left))
            return [(f, [r]) for r in left]

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            while jobs:  # what a multi-range answer left out: one range per request
                jobs = [again for left in pool.map(one, jobs) for again in left]


# -- opening ------------------------------------------------------------------


class _Scratch:
    """A private folder for the config copy that transformers reads; removed on close."""

    bytes_read = 0  # held as a checkpoint reader, to be closed with it

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tiecli-remote-"))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _choose(names: list[str], shown: str) -> str:
    """The weights file of a remote folder, as :func:`~tiecli.formats.find_weights` picks."""
    for name in FOLDER_PREFERENCE:
        if name in names:
            return name
    for group in (
        [n for n in names if n.endswith(".safetensors" + INDEX_SUFFIX)],
        [n for n in names if n.endswith(".safetensors")],
    ):
        if len(group) == 1:
            return group[0]
        if len(group) > 1:
            raise CheckpointFormatError(
                f"holds several weight files ({', '.join(group[:4])}) and no index naming them",
                shown,
                hint="name one file in the URL",
            )
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        raise CheckpointFormatError(
            "holds PyTorch pickles only; remote reads cover safetensors checkpoints",
            shown,
            hint="download it first (hf download) and run tiecli on the local copy",
        )
    raise CheckpointNotFoundError(
        "no weights found (expected *.safetensors or *.safetensors.index.json)", shown
    )


def open_remote(
    url: str, options: RemoteOptions | None = None, progress: Progress = NO_PROGRESS
) -> Checkpoint:
    """Open the remote checkpoint at ``url``: headers, index and config, then the sampled
    elements of every tensor that has a possible partner, fetched ahead."""
    remote = _Remote(url, options or RemoteOptions())
    readers: list[Any] = [remote]
    try:
        target, folder, folder_names = _locate(remote)
        ckpt = _open_target(remote, target, readers)
        if folder_names is None or "config.json" in folder_names:
            config_at = remote.inside(folder, "config.json")
            config = remote.read_json(config_at, "config.json")
            if config is not None:
                if not isinstance(config, dict):
                    raise CheckpointFormatError(
                        "config.json is not a JSON object", remote.shown(config_at)
                    )
                scratch = _Scratch()
                readers.append(scratch)
                (scratch.folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
                ckpt.config = config
                ckpt.config_path = scratch.folder / "config.json"
                ckpt.config_url = remote.shown(config_at)
        entries = list(ckpt.entries.values())
        fetch_ahead(head_ranges(entries), progress)  # first elements, to rule most out
        fetch_ahead(sample_ranges(entries), progress)  # samples of those that remain
    except BaseException:
        for r in readers:
            r.close()
        raise
    ckpt.url = shown_url(url)
    ckpt.remote = remote.stats
    ckpt.budget = DownloadBudget(remote.options.max_download)
    return ckpt


def _check_shard(shard: str, index_shown: str) -> None:
    """A shard name (already a plain name, see ``index_parts``) that can lead nowhere
    but beside the index in a URL either, and names a safetensors file."""
    if "\\" in shard or "?" in shard or "#" in shard or "%" in shard:
        raise CheckpointFormatError(f"index names shard {shard!r} outside its folder", index_shown)
    if not shard.endswith(".safetensors"):
        raise CheckpointFormatError(
            f"index names shard {shard!r}; remote reads cover safetensors shards only",
            index_shown,
        )


def _locate(remote: _Remote) -> tuple[str, str, list[str] | None]:
    """The weights file (or index) a URL names, its folder, and the folder's file
    names where the file system lists them (None over HTTP)."""
    root = remote.root
    name = urlsplit(root).path if remote.protocol in ("http", "https") else root
    if name.endswith((".safetensors", INDEX_SUFFIX)):
        names = (
            None
            if remote.protocol in ("http", "https")
            else remote.listing(remote.folder_of(root), named=root)
        )
        return root, remote.folder_of(root), names
    if remote.protocol in ("http", "https"):
        raise UsageError(
            "an http(s) URL must name a .safetensors file or a *.safetensors.index.json",
            shown_url(remote.url),
        )
    names = remote.listing(root) or []
    return remote.inside(root, _choose(names, shown_url(remote.url))), root, names


DOWNLOAD_STEP = 8 << 20  # bytes per request when downloading a file


def download(
    url: str, folder: Path, options: RemoteOptions | None = None, progress: Progress = NO_PROGRESS
) -> tuple[Path, RemoteStats]:
    """Copy the remote checkpoint at ``url`` into the empty local ``folder``: its weights
    (the index and every shard it names), and ``config.json`` when there is one; each
    file streamed to disk in :data:`DOWNLOAD_STEP` requests. Returns the local path
    that stands for ``url`` (the folder for a folder, else the file) and the cost."""
    remote = _Remote(url, options or RemoteOptions())
    try:
        target, src, names = _locate(remote)
        base = posixpath.basename(urlsplit(target).path if "://" in target else target)
        files = [base]  # a plain name ending in .safetensors or .index.json
        if base.endswith(INDEX_SUFFIX):
            from . import index_parts

            index_shown = remote.shown(target)
            doc = remote.read_json(target, "index", unique=True)
            if doc is None:
                raise CheckpointNotFoundError("not found", index_shown)
            shards = index_parts(doc, index_shown)[2]
            for shard in shards:
                _check_shard(shard, index_shown)
            files += shards
        handles = [(f, remote.inside(src, f), remote.open(remote.inside(src, f))) for f in files]
        if names is None or "config.json" in names:
            try:
                at = remote.inside(src, "config.json")
                handles.append(("config.json", at, remote.open(at)))
            except RemoteError as e:
                if e.message != "not found":
                    raise
        try:
            total = sum(int(h.size) for _n, _p, h in handles)
            with progress.task("downloading", total) as bar:
                for name, at, handle in handles:
                    _save(remote, handle, at, folder / name, bar)
        finally:
            for _n, _p, h in handles:
                h.close()
    finally:
        remote.close()
    return (
        folder if names is not None and target != remote.root else folder / files[0]
    ), remote.stats


def _save(remote: _Remote, handle: Any, at: str, dst: Path, bar: Progress) -> None:
    size = int(handle.size)
    with open(dst, "xb") as out:
        for start in range(0, size, DOWNLOAD_STEP):
            data = remote.fetch(handle, at, start, min(size, start + DOWNLOAD_STEP))
            out.write(data)
            bar.advance(len(data))


def _open_target(remote: _Remote, target: str, readers: list[Any]) -> Checkpoint:
    shown = Path(remote.shown(target))
    if not target.endswith(INDEX_SUFFIX):
        f = RemoteSafetensorsFile(remote, target)
        readers.append(f)
        entries = {e.name: e for e in f.entries()}
        return Checkpoint(
            shown, "safetensors", entries, [shown], metadata=dict(f.metadata), readers=readers
        )
    from . import index_entries, index_parts

    index_shown = remote.shown(target)
    doc = remote.read_json(target, "index", unique=True)
    if doc is None:
        raise CheckpointNotFoundError("not found", index_shown)
    weight_map, metadata, shard_names = index_parts(doc, index_shown)
    files: dict[str, dict[str, Entry]] = {}
    for number, shard in enumerate(shard_names):
        _check_shard(shard, index_shown)
        try:
            reader = RemoteSafetensorsFile(remote, remote.beside(target, shard), number)
        except RemoteError as e:
            if e.message != "not found":
                raise
            raise CheckpointFormatError(
                f"index names shard {shard!r}, which does not exist", index_shown
            ) from None
        readers.append(reader)
        files[shard] = {e.name: e for e in reader.entries()}
    entries = index_entries(weight_map, files, index_shown)
    paths = [Path(remote.shown(remote.beside(target, s))) for s in shard_names]
    return Checkpoint(
        shown,
        "safetensors-sharded",
        entries,
        paths,
        index_path=shown,
        metadata=dict(metadata),
        readers=readers,
    )
