"""Remote files read by position, as local ones are: the bytes, the safetensors
header, and the tensors' byte ranges.

A :class:`RemoteFile` serves ``pread`` from ranges fetched ahead where it holds
them and asks the location for the rest; a :class:`RemoteSafetensorsFile` parses
its header with the local reader's code; a :class:`RemoteBlob` is one tensor's
bytes, read by range (nothing is mapped).
"""

from __future__ import annotations

import threading
from typing import Any

from ...dtypes import uint_view
from ...errors import CheckpointFormatError
from ...io import RangeBlob
from ..safetensors import SafetensorsFile
from .http_client import HttpFile
from .location import Remote
from .options import HEAD_GUESS


class RemoteFile:
    """A remote file read by position, as :class:`~tiecli.io.ByteFile`
    reads a local one: ``pread``/``preadinto`` relative to the file's start, failing
    on a short read. Ranges fetched ahead (:meth:`keep`) are served from memory."""

    data_start = 0
    path: Any  # the URL shown (a ByteFile's is a Path)

    def __init__(self, remote: Remote, fspath: str, file_number: int = 0):
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
        return isinstance(self._handle, HttpFile) and self.remote.multi_range is not False

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

    def __init__(self, remote: Remote, fspath: str, file_number: int = 0):
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
