"""A DCP tensor's bytes: each chunk a ``torch.save`` archive embedded in a
``.distcp`` file, read through :mod:`zipfile` over its byte range and the
placeholder unpickler; the tensor, row-major, as runs of byte ranges of those
files (:class:`DcpBlob`), read by position on demand."""

from __future__ import annotations

import bisect
import io
import math
import mmap
import zipfile
import zlib
from typing import Any

from ..dtypes import itemsize, uint_view
from ..io import ByteFile

MAX_RUNS = 1 << 20  # byte runs one tensor may be made of (chunks split along inner dims)


class _Window(io.RawIOBase):
    """``length`` bytes at ``start`` of a file, as a seekable stream for :mod:`zipfile`."""

    def __init__(self, file: ByteFile, start: int, length: int):
        self.file, self.start, self.length, self.pos = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.length)[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n:
            memoryview(b)[:n] = self.file.pread(self.start + self.pos, n)
        self.pos += n
        return n


class Chunk:
    __slots__ = ("offsets", "sizes", "file", "start")

    def __init__(
        self, offsets: tuple[int, ...], sizes: tuple[int, ...], file: ByteFile, start: int
    ):
        self.offsets, self.sizes, self.file, self.start = offsets, sizes, file, start


def chunk_bytes(
    file: ByteFile, start: int, length: int, dtype: str, sizes: tuple[int, ...], fail: Any
) -> int:
    """Where in ``file`` the elements of a chunk saved with ``torch.save`` at
    ``start`` (``length`` bytes) begin; checked against the chunk's dtype and sizes."""
    from .torchzip_pickle import (
        REBUILD,
        STORAGE_DTYPES,
        Call,
        Declined,
        Storage,
        Unpickler,
        contiguous,
    )

    try:
        with zipfile.ZipFile(_Window(file, start, length)) as z:
            infos = z.infolist()
    except Exception:  # noqa: BLE001 - zipfile raises many kinds on damaged bytes
        raise fail("is not a torch.save archive (damaged, or another serialisation)") from None
    records: dict[str, tuple[int, int, int]] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise fail("holds a compressed or encrypted record")
        head = (
            file.pread(start + info.header_offset, 30) if info.header_offset + 30 <= length else b""
        )
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise fail("has a damaged record header")
        at = info.header_offset + 30 + int.from_bytes(head[26:28], "little")
        at += int.from_bytes(head[28:30], "little")
        if at + info.file_size > length:
            raise fail("has a record running past its end")
        records[info.filename.split("/", 1)[-1]] = (at, info.file_size, info.CRC)
    if "data.pkl" not in records or records["data.pkl"][1] > 1 << 20:
        raise fail("has no tensor pickle (data.pkl)")
    at, size, crc = records["data.pkl"]
    raw = file.pread(start + at, size)
    if zlib.crc32(raw) != crc:
        raise fail("fails its checksum")
    try:
        call = Unpickler(io.BytesIO(raw)).load()
    except Declined as e:
        raise fail(f"is not a plain tensor ({e})") from None
    except Exception:  # noqa: BLE001 - damaged pickles fail in many ways
        raise fail("has an unreadable tensor pickle") from None
    if not (isinstance(call, Call) and call.func.key() == REBUILD and len(call.args) >= 4):
        raise fail("is not a plain tensor")
    storage, offset, shape, stride = call.args[:4]
    if not isinstance(storage, Storage) or STORAGE_DTYPES.get(storage.kind.name) != dtype:
        raise fail(f"holds another element type than the metadata's {dtype}")
    if shape != sizes or stride != contiguous(sizes) or type(offset) is not int or offset < 0:
        raise fail(f"holds a tensor of another shape than the metadata's {list(sizes)}")
    item = itemsize(dtype) or 1
    record = records.get(f"data/{storage.key}")
    numel = math.prod(sizes)
    if record is None or (offset + numel) * item > record[1]:
        raise fail("holds fewer bytes than its shape needs (truncated?)")
    return start + record[0] + offset * item


def tensor_runs(
    name: str, shape: tuple[int, ...], item: int, chunks: list[Chunk], fail: Any
) -> list[tuple[int, ByteFile, int, int]]:
    """The tensor's bytes as (position in the tensor, file, file offset, length), in
    order, each a contiguous piece of one chunk; the chunks must cover the tensor once."""
    strides = [item * math.prod(shape[i + 1 :]) for i in range(len(shape))]
    runs: list[tuple[int, ByteFile, int, int]] = []
    for c in chunks:
        # the innermost dimension the chunk does not span: below it, whole rows are contiguous
        d = max((i for i in range(len(shape)) if c.sizes[i] != shape[i]), default=0)
        length = (c.sizes[d] if shape else 1) * (strides[d] if shape else item)
        outer = c.sizes[:d]
        count = math.prod(outer)
        if count == 0 or length == 0:
            continue
        if len(runs) + count > MAX_RUNS:
            raise fail(f"tensor {name!r} is split into more than {MAX_RUNS} pieces")
        base = sum(o * s for o, s in zip(c.offsets, strides, strict=True))
        for j in range(count):
            pos, rest = base, j
            for i in reversed(range(d)):
                rest, k = divmod(rest, outer[i])
                pos += k * strides[i]
            runs.append((pos, c.file, c.start + j * length, length))
    runs.sort(key=lambda r: r[0])
    merged: list[tuple[int, ByteFile, int, int]] = []
    end = 0
    for pos, f, at, n in runs:
        if pos != end:
            why = "overlap" if pos < end else "leave a gap"
            raise fail(f"tensor {name!r}: its chunks {why} (at byte {min(pos, end)})")
        last = merged[-1] if merged else None
        if last is not None and last[1] is f and last[2] + last[3] == at:
            merged[-1] = (last[0], f, last[2], last[3] + n)
        else:
            merged.append((pos, f, at, n))
        end = pos + n
    if end != item * math.prod(shape):
        raise fail(f"tensor {name!r}: its chunks do not cover it")
    return merged


class DcpBlob:
    """A tensor's bytes, row-major, gathered from its chunks' byte ranges."""

    __slots__ = ("nbytes", "_pos", "_runs")

    def __init__(self, runs: list[tuple[int, ByteFile, int, int]], nbytes: int):
        self._runs = runs
        self._pos = [r[0] for r in runs]
        self.nbytes = nbytes

    @property
    def ranges(self) -> list[tuple[ByteFile, int, int]]:
        """(file, offset, length) pieces in order, for a writer to copy in the kernel."""
        return [(f, at, n) for _pos, f, at, n in self._runs]

    @property
    def order(self) -> tuple[int, int]:
        if not self._runs:
            return (0, 0)
        return (self._runs[0][1].file_number, self._runs[0][2])

    def readinto(self, offset: int, view: memoryview) -> None:
        i = max(0, bisect.bisect_right(self._pos, offset) - 1)
        done = 0
        while done < len(view):
            pos, f, at, n = self._runs[i]
            skip = offset + done - pos
            k = min(n - skip, len(view) - done)
            f.preadinto(at + skip, view[done : done + k])
            done += k
            i += 1

    def window(self, offset: int, length: int) -> tuple[mmap.mmap, int]:
        """A mapping holding ``length`` bytes at ``offset`` (close it when done), and where
        they start in it: a copy-on-write mapping of the file when one run holds them all
        (nothing copied to user space), else an anonymous one they are read into."""
        i = max(0, bisect.bisect_right(self._pos, offset) - 1)
        pos, f, at, n = self._runs[i] if self._runs else (0, None, 0, 0)
        if f is not None and offset + length <= pos + n:
            absolute = at + offset - pos
            start = absolute - absolute % mmap.ALLOCATIONGRANULARITY
            f.bytes_read += length
            with f.opened() as fd:
                m = mmap.mmap(fd, absolute + length - start, offset=start, access=mmap.ACCESS_COPY)
            return m, absolute - start
        m = mmap.mmap(-1, max(length, 1))
        view = memoryview(m)
        try:
            self.readinto(offset, view[:length])
        finally:
            view.release()
        return m, 0

    def read(self, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        import numpy as np

        view = uint_view(dtype)
        if view is None:
            return None
        buf = bytearray(self.nbytes)
        self.readinto(0, memoryview(buf))
        return np.frombuffer(buf, dtype=view).reshape(shape)
