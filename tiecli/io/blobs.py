"""A tensor's bytes as a range of a file read by position: :class:`RangeBlob`, and
:class:`FileBlob` for a local :class:`~tiecli.io.files.ByteFile` (mappings too)."""

from __future__ import annotations

import mmap
from typing import Any

from ..dtypes import uint_view
from .files import ByteFile


class RangeBlob:
    """A tensor's byte range inside a file read by position (local or remote): its
    ``file`` has ``pread``/``preadinto``, ``data_start`` and ``file_number``."""

    __slots__ = ("file", "start", "nbytes")

    def __init__(self, file: Any, start: int, nbytes: int):
        self.file = file
        self.start = start
        self.nbytes = nbytes

    @property
    def order(self) -> tuple[int, int]:
        return (self.file.file_number, self.start)

    def read(self, offset: int, size: int) -> bytes:
        return self.file.pread(self.file.data_start + self.start + offset, size)

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the bytes at ``offset``, with no intermediate copy."""
        self.file.preadinto(self.file.data_start + self.start + offset, view)


class FileBlob(RangeBlob):
    """A tensor's byte range inside a local file: mappings too."""

    __slots__ = ()
    file: ByteFile

    def window(self, offset: int, length: int) -> tuple[mmap.mmap, int]:
        """A mapping of ``length`` bytes at ``offset`` (close it when done), and where
        those bytes start inside it. Copy-on-write, so nothing written to it could
        reach the file; only ever read, it shares the page cache's pages."""
        absolute = self.file.data_start + self.start + offset
        start = absolute - absolute % mmap.ALLOCATIONGRANULARITY
        self.file.bytes_read += length
        with self.file.opened() as fd:
            m = mmap.mmap(fd, absolute + length - start, offset=start, access=mmap.ACCESS_COPY)
        return m, absolute - start

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        import numpy as np

        view = uint_view(dtype)
        if view is None:
            return None
        self.file.bytes_read += self.nbytes
        count = self.nbytes // np.dtype(view).itemsize
        with self.file.opened():  # the mapping stays open until the array holds it
            flat = np.frombuffer(
                self.file.view(), dtype=view, count=count, offset=self.file.data_start + self.start
            )
        return flat.reshape(shape)
