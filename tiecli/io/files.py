"""Files read by position: :class:`ByteFile`, the pool that bounds how many stay open,
and the reads themselves (``open_input``, ``fill``)."""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointFormatError, CheckpointNotFoundError


def open_limit() -> int:
    """How many files to keep open at once: an eighth of this process's limit on open
    descriptors (a file's mapping holds a descriptor of its own), from 8 to 128."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return 64
    if soft == resource.RLIM_INFINITY:
        return 128
    return max(8, min(128, soft // 8))


class OpenFiles:
    """The :class:`ByteFile` objects holding a descriptor, least recently used first.

    Past the limit, the least recently used file that no read is using closes its
    descriptor and mapping; it opens again, checked to be the same file, when next
    read. So a checkpoint of any number of shards needs a bounded number of
    descriptors, and threads (a writer and its follower) may read side by side."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: OrderedDict[ByteFile, None] = OrderedDict()
        self.limit = 0  # read from the process's limit when first needed

    def add(self, f: ByteFile) -> None:
        with self.lock:
            self.files[f] = None
            self._trim()

    def use(self, f: ByteFile) -> int:
        """``f``'s descriptor, open until the matching :meth:`done`."""
        with self.lock:
            if f.fd < 0:
                f.reopen()
                self.files[f] = None
                self._trim()
            else:
                self.files.move_to_end(f)
            f.users += 1
            return f.fd

    def done(self, f: ByteFile) -> None:
        with self.lock:
            f.users -= 1

    def close(self, f: ByteFile) -> None:
        with self.lock:
            self.files.pop(f, None)
            f.closed = True
            f.release()

    def _trim(self) -> None:
        if not self.limit:
            self.limit = open_limit()
        for f in list(self.files):
            if len(self.files) <= self.limit:
                return
            if f.users == 0:
                del self.files[f]
                f.release()


OPEN = OpenFiles()


def open_input(path: Path, suffix: str) -> int:
    """A read-only descriptor of the input ``path``, its failure one clear error naming
    the file form expected (``suffix``)."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such file", path) from None
    except IsADirectoryError:
        raise CheckpointFormatError(f"is a folder, expected a {suffix} file", path) from None
    except OSError as e:
        raise CheckpointFormatError(f"cannot open: {e.strerror}", path) from None


class ByteFile:
    """An open file as :class:`~tiecli.io.blobs.FileBlob` reads it: positioned reads
    that fail on a short read, one lazy whole-file mapping, and a count of the bytes
    read. Offsets a blob gives are relative to ``data_start``.

    The descriptor ``fd`` may be closed between reads (``-1`` then) to bound how many
    files are open (see :class:`OpenFiles`, which counts the reads in progress as
    ``users``); :meth:`opened` holds it open for a longer use."""

    data_start = 0

    def __init__(self, path: Path, file_number: int = 0, fd: int | None = None):
        self.path = path
        self.file_number = file_number
        self.bytes_read = 0
        self._mmap: mmap.mmap | None = None
        self.users = 0
        self.closed = False
        self.fd = os.open(path, os.O_RDONLY) if fd is None else fd
        try:
            st = os.fstat(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self._identity = (st.st_dev, st.st_ino)
        OPEN.add(self)

    def short_read(self, offset: int) -> Exception:
        """The error for a read that ended early at ``offset`` (a format names its own)."""
        return OSError(5, f"short read from {self.path} (file changed or truncated?)")

    def _changed(self) -> Exception:
        return CheckpointFormatError("was removed or replaced while being read", self.path)

    def reopen(self) -> None:
        """Open the file again by its path, refused unless it is still the same file."""
        if self.closed:
            raise OSError(9, f"{self.path} is closed")  # EBADF, as a read of a closed fd
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            raise self._changed() from None
        st = os.fstat(fd)
        size = getattr(self, "size", None)
        if (st.st_dev, st.st_ino) != self._identity or size not in (None, st.st_size):
            os.close(fd)
            raise self._changed()
        self.fd = fd

    def release(self) -> None:
        """Close the descriptor and the mapping, until :meth:`reopen`."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a numpy view still points into it; the GC will unmap
                pass
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextmanager
    def opened(self) -> Iterator[int]:
        """The descriptor, left open until the block ends (for a kernel copy)."""
        fd = OPEN.use(self)
        try:
            yield fd
        finally:
            OPEN.done(self)

    def pread(self, offset: int, size: int) -> bytes:
        fd = OPEN.use(self)
        try:
            data = os.pread(fd, size, offset)
        finally:
            OPEN.done(self)
        if len(data) != size:
            raise self.short_read(offset)
        self.bytes_read += size
        return data

    def preadinto(self, offset: int, view: memoryview) -> None:
        fd = OPEN.use(self)
        try:
            done = fill(fd, view, offset)
        finally:
            OPEN.done(self)
        if done < len(view):
            raise self.short_read(offset + done)
        self.bytes_read += done

    def view(self) -> mmap.mmap:
        with self.opened() as fd:
            if self._mmap is None:
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return self._mmap

    def close(self) -> None:
        OPEN.close(self)


def fill(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` until it is full or the file ends; bytes read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done
