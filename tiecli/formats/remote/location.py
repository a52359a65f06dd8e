"""One remote location and its file system: ``huggingface_hub``'s for ``hf://``, fsspec's
for every other URL (aiohttp for HTTP(S), s3fs, gcsfs, memory...).

It opens files, reads their ranges (exactly those, or an error), lists folders,
names files beside one another, turns every backend's failure into one line
naming the URL, and counts every request and byte. The libraries are optional
and imported here only, when a URL is named.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ...errors import (
    CheckpointFormatError,
    MissingDependencyError,
    RemoteError,
    TiecliError,
    UsageError,
)
from ..safetensors import RepeatedKey, unique_keys
from .failures import TooLong, why
from .http_client import HttpFile, range_length
from .options import LOCAL_SCHEMES, RemoteOptions, RemoteStats, shown_url

MAX_JSON = 64 << 20
INSTALL = "install them with: pip install 'tiecli[remote]'"


class Remote:
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
        bytes are counted by :class:`HttpFile` as it reads them)."""
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
            asked = range_length(params.headers.get("Range"))
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
            asked = range_length(response.request.headers.get("range"))
            if asked is None or response.status_code not in (200, 206):
                return
            length = response.headers.get("content-length")
            if length is None or not length.isdigit() or int(length) > asked:
                response.close()
                raise TooLong(asked, int(length) if length and length.isdigit() else None)

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
            raise RemoteError(why(e, self.options.timeout), self.shown(path)) from None

    def count(self, requests: int, nbytes: int = 0) -> None:
        self.stats.add(
            0 if self.requests_by_transport else requests, 0 if self.bytes_by_transport else nbytes
        )

    def open(self, path: str) -> Any:
        """A handle with the file's ``size`` whose ranges :meth:`fetch` reads: for HTTP(S)
        an :class:`HttpFile` (its first bytes read with the size), for the Hub a
        :class:`HubFile` (each range one request, checked to be one), else a
        :class:`CatFile` (the file system's ``cat_file``: s3fs, gcsfs, memory)."""
        handle: Any
        with self.guard(path):
            self.count(1)
            if self.protocol in ("http", "https"):
                handle = HttpFile(self.fs, path, self.stats)
            elif self.protocol == "hf":
                handle = HubFile(self.fs.open(path, "rb", cache_type="none"))
            else:
                handle = CatFile(self.fs, path, self.fs.size(path))
        if getattr(handle, "size", None) is None:
            handle.close()
            raise RemoteError("the server does not say how large the file is", self.shown(path))
        return handle

    def fetch(self, handle: Any, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; exactly those or an error."""
        with self.guard(path):
            data = handle.fetch_range(start, end)
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
        if len(ranges) > 1 and self.multi_range is not False and isinstance(handle, HttpFile):
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


class CatFile:
    """A file of a file system that reads ranges with ``cat_file``."""

    def __init__(self, fs: Any, path: str, size: Any):
        self.fs = fs
        self.path = path
        self.size = size

    def fetch_range(self, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(self.path, start=start, end=end))

    def close(self) -> None:
        pass


class HubFile:
    """A file of huggingface_hub's file system, opened unbuffered: each range is one
    request, read by the file's own range fetcher (which, unlike seek and read, keeps
    no position: threads share the handle)."""

    def __init__(self, file: Any):
        self.file = file
        # a handle that cannot fetch a range by itself is read by none: no size then
        self.size = getattr(file, "size", None) if hasattr(file, "_fetch_range") else None

    def fetch_range(self, start: int, end: int) -> bytes:
        return bytes(self.file._fetch_range(start, end))

    def close(self) -> None:
        self.file.close()
