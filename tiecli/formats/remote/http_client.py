"""The HTTP(S) client: a file's ranges read one or many per request
(``multipart/byteranges``), every answer's length checked before its body is read.
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import RemoteError
from .failures import NotTheRange, TooLong
from .options import HEAD_GUESS, RemoteStats, shown_url

PART_OVERHEAD = 256  # bytes a part of a multipart/byteranges answer may add to its data


def range_length(header: str | None) -> int | None:
    """The byte count a ``Range: bytes=a-b`` header asks for; None for anything else."""
    m = re.fullmatch(r"\s*bytes=(\d+)-(\d+)\s*", header or "")
    return int(m.group(2)) - int(m.group(1)) + 1 if m else None


class HttpFile:
    """A file on an HTTP(S) server, read by ranges through the aiohttp session of fsspec's
    HTTP file system (its client settings, trace hooks and event loop).

    Opening it is one GET of its first :data:`HEAD_GUESS` bytes, whose ``Content-Range``
    says how large the file is (no HEAD). Ranges are read one per request
    (:meth:`fetch_range`) or many per request (:meth:`fetch_ranges`, ``Range:
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
                if content_range(response.headers) == (None, None, 0):
                    return 0, b""
                response.raise_for_status()
            if response.status == 206:
                start, end, total = content_range(response.headers)
                if start != 0 or total is None or end != min(HEAD_GUESS, total):
                    response.close()
                    raise NotTheRange(f"bytes 0-{HEAD_GUESS - 1}")
                return total, await exact_body(response, end, self.stats)
            # 200: the whole file, acceptable only when it is no more than was asked
            length = response.content_length
            if length is None or length > HEAD_GUESS:
                response.close()
                raise ValueError("the server does not answer range requests")
            return length, await exact_body(response, length, self.stats)

    def fetch_range(self, start: int, end: int) -> bytes:
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
            if content_range(response.headers)[:2] != (start, end):
                response.close()
                raise NotTheRange(f"bytes {start}-{end - 1}")
            return await exact_body(response, end - start, self.stats)

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
                start, end, _total = content_range(response.headers)
                if start is None or end is None or end - start > asked:
                    response.close()
                    return None
                return [(start, await exact_body(response, end - start, self.stats))]
            m = re.search(r'boundary="?([^";]+)"?', params)
            cap = asked + len(ranges) * PART_OVERHEAD
            if m is None or (response.content_length or 0) > cap:
                response.close()
                return None
            body = await capped_body(response, cap, self.stats)
        return multipart_ranges(body, m.group(1).encode("latin-1"), self.url)

    def close(self) -> None:
        self.first = b""


def content_range(headers: Any) -> tuple[int | None, int | None, int | None]:
    """``Content-Range: bytes a-b/total`` as ``(a, b + 1, total)``; Nones where absent."""
    m = re.fullmatch(
        r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", headers.get("Content-Range") or ""
    )
    if m is None:
        return None, None, None
    start = int(m.group(1)) if m.group(1) else None
    end = int(m.group(2)) + 1 if m.group(2) else None
    return start, end, int(m.group(3)) if m.group(3) != "*" else None


async def capped_body(response: Any, cap: int, stats: RemoteStats) -> bytes:
    """A body of at most ``cap`` bytes, its length checked from the headers first."""
    length = response.content_length
    if length is not None and length > cap:
        response.close()
        raise TooLong(cap, length)
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
            raise TooLong(cap, None)
        chunks.append(chunk)


async def exact_body(response: Any, nbytes: int, stats: RemoteStats) -> bytes:
    """Exactly ``nbytes`` of body, or an error."""
    data = await capped_body(response, nbytes, stats)
    if len(data) != nbytes:
        raise TooLong(nbytes, len(data))
    return data


def multipart_ranges(body: bytes, boundary: bytes, url: str) -> list[tuple[int, bytes]]:
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
