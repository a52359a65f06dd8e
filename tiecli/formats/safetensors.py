"""Reading safetensors files: the header, validated, and lazy byte access.

Needs neither torch nor numpy (numpy only when an element array is asked for).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..dtypes import BITS, nbytes_of, uint_view
from ..errors import CheckpointFormatError, CheckpointNotFoundError

MAX_HEADER = 100 << 20  # the limit safetensors itself enforces
METADATA_KEY = "__metadata__"
LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts


class RepeatedKey(Exception):
    """A JSON object that names a key twice (raised by :func:`unique_keys`)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook that refuses repeated keys instead of keeping the last."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen.add(key)
    return out


class _Repeated(dict):  # type: ignore[type-arg]
    """A JSON object that named ``key`` more than once (error path only)."""

    key: str


def _mark_repeated(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    repeated = None
    for key, value in pairs:
        if key in out and repeated is None:
            repeated = key
        out[key] = value
    if repeated is None:
        return out
    marked = _Repeated(out)
    marked.key = repeated
    return marked


def _repeated_key_message(text: str) -> str:
    """Where a header repeats a key; parsed again only once one was found."""
    header = json.loads(text, object_pairs_hook=_mark_repeated)
    if isinstance(header, _Repeated):
        if header.key == METADATA_KEY:
            return f"header has {METADATA_KEY!r} twice"
        return f"header names tensor {header.key!r} twice"
    for name, value in header.items() if isinstance(header, dict) else ():
        if isinstance(value, _Repeated):
            if name == METADATA_KEY:
                return f"{METADATA_KEY} has key {value.key!r} twice"
            return f"tensor {name!r}: header entry has key {value.key!r} twice"
    return "header repeats a key inside a tensor entry"


def _open_limit() -> int:
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


class _OpenFiles:
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
            if f._fd < 0:
                f._reopen()
                self.files[f] = None
                self._trim()
            else:
                self.files.move_to_end(f)
            f._users += 1
            return f._fd

    def done(self, f: ByteFile) -> None:
        with self.lock:
            f._users -= 1

    def close(self, f: ByteFile) -> None:
        with self.lock:
            self.files.pop(f, None)
            f._closed = True
            f._release()

    def _trim(self) -> None:
        if not self.limit:
            self.limit = _open_limit()
        for f in list(self.files):
            if len(self.files) <= self.limit:
                return
            if f._users == 0:
                del self.files[f]
                f._release()


_OPEN = _OpenFiles()


def _dtype_shown(dtype: Any) -> str:
    """A dtype name worth quoting (a short identifier such as a newer float8 type); any
    other value of the field is file content, not quoted."""
    if isinstance(dtype, str) and re.fullmatch(r"[A-Z][A-Z0-9_]{0,15}", dtype):
        return f" {dtype!r}"
    return ""


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
    """An open file as :class:`FileBlob` reads it: positioned reads that fail on a
    short read, one lazy whole-file mapping, and a count of the bytes read.
    Offsets a blob gives are relative to ``data_start``.

    The descriptor may be closed between reads to bound how many files are open
    (see :class:`_OpenFiles`); :meth:`opened` holds it open for a longer use."""

    data_start = 0

    def __init__(self, path: Path, file_number: int = 0, fd: int | None = None):
        self.path = path
        self.file_number = file_number
        self.bytes_read = 0
        self._mmap: mmap.mmap | None = None
        self._users = 0
        self._closed = False
        self._fd = os.open(path, os.O_RDONLY) if fd is None else fd
        try:
            st = os.fstat(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._identity = (st.st_dev, st.st_ino)
        _OPEN.add(self)

    def _short_read(self, offset: int) -> Exception:
        return OSError(5, f"short read from {self.path} (file changed or truncated?)")

    def _changed(self) -> Exception:
        return CheckpointFormatError("was removed or replaced while being read", self.path)

    def _reopen(self) -> None:
        if self._closed:
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
        self._fd = fd

    def _release(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a numpy view still points into it; the GC will unmap
                pass
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @contextmanager
    def opened(self) -> Iterator[int]:
        """The descriptor, left open until the block ends (for a kernel copy)."""
        fd = _OPEN.use(self)
        try:
            yield fd
        finally:
            _OPEN.done(self)

    def pread(self, offset: int, size: int) -> bytes:
        fd = _OPEN.use(self)
        try:
            data = os.pread(fd, size, offset)
        finally:
            _OPEN.done(self)
        if len(data) != size:
            raise self._short_read(offset)
        self.bytes_read += size
        return data

    def preadinto(self, offset: int, view: memoryview) -> None:
        fd = _OPEN.use(self)
        try:
            done = fill(fd, view, offset)
        finally:
            _OPEN.done(self)
        if done < len(view):
            raise self._short_read(offset + done)
        self.bytes_read += done

    def view(self) -> mmap.mmap:
        with self.opened() as fd:
            if self._mmap is None:
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            return self._mmap

    def close(self) -> None:
        _OPEN.close(self)


class SafetensorsFile(ByteFile):
    """One open safetensors file: parsed header plus positioned reads."""

    def __init__(self, path: Path, file_number: int = 0):
        super().__init__(path, file_number, open_input(path, ".safetensors"))
        try:
            with self.opened() as fd:
                self.size = os.fstat(fd).st_size
                self.header_size, self.tensors, self.metadata = self._parse(
                    lambda size, offset: os.pread(fd, size, offset)
                )
        except BaseException:
            self.close()
            raise
        self.data_start = 8 + self.header_size

    def _fail(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(what, self.path)

    def _short_read(self, offset: int) -> Exception:
        return self._fail("short read (file changed or truncated?)")

    def _parse(
        self, pread: Callable[[int, int], bytes]
    ) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
        """The header, validated; ``pread(size, offset)`` reads the file (or a remote copy)."""
        if self.size == 0:
            raise self._fail("file is empty, not a safetensors file")
        if self.size < 8:
            raise self._fail(f"file is {self.size} bytes, too short for a safetensors header")
        head = pread(8, 0)
        if head == LFS_POINTER[:8] and pread(len(LFS_POINTER), 0) == LFS_POINTER:
            raise CheckpointFormatError(
                "is a Git LFS pointer, not the weights",
                self.path,
                hint="fetch them with 'git lfs pull'",
            )
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointFormatError(
                "is a zip archive (a PyTorch checkpoint?), not a safetensors file",
                self.path,
                hint="name it .bin or .pt to read it as one",
            )
        # Until the header has parsed, the bytes may be anyone's (a link to a secret):
        # messages quote none of them, only sizes the filesystem reports.
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise self._fail(
                f"header length exceeds the {MAX_HEADER >> 20} MiB limit (not a safetensors file?)"
            )
        if 8 + n > self.size:
            raise self._fail(
                f"header length runs past the end of the file ({self.size}-byte file; truncated?)"
            )
        raw = pread(n, 8)
        self.bytes_read += 8 + n
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
        except RepeatedKey:
            raise self._fail(_repeated_key_message(raw.decode("utf-8"))) from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self._fail("header is not valid JSON (not a safetensors file?)") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")

        meta_raw = header.get(METADATA_KEY, {})
        if meta_raw is None:
            meta_raw = {}
        if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_size = self.size - 8 - n
        tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == METADATA_KEY:
                continue
            tensors[name] = self._tensor_info(name, info, data_size)
        spans = sorted((v[2], v[3], k) for k, v in tensors.items() if v[3] > v[2])
        for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise self._fail(f"tensors {k0!r} and {k1!r} overlap in the file")
        return n, tensors, dict(meta_raw)

    def _tensor_info(
        self, name: str, info: Any, data_size: int
    ) -> tuple[str, tuple[int, ...], int, int]:
        # the usual entry, checked in few steps; anything else takes the steps below
        if type(info) is dict:
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if (
                type(shape) is list
                and type(offsets) is list
                and len(offsets) == 2
                and type(offsets[0]) is int
                and type(offsets[1]) is int
                and 0 <= offsets[0] <= offsets[1] <= data_size
                and all(type(d) is int and d >= 0 for d in shape)
                and type(dtype) is str
                and dtype in BITS
                and nbytes_of(dtype, math.prod(shape)) == offsets[1] - offsets[0]
            ):
                return dtype, tuple(shape), offsets[0], offsets[1]
        if not isinstance(info, dict):
            raise self._fail(f"tensor {name!r}: header entry is not an object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in BITS:
            raise self._fail(f"tensor {name!r}: unknown dtype{_dtype_shown(dtype)}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r}: shape is not a list of non-negative integers")
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise self._fail(f"tensor {name!r}: data_offsets is not a pair of integers")
        start, end = offsets
        if not 0 <= start <= end:
            raise self._fail(f"tensor {name!r}: data_offsets are negative or end before they start")
        if end > data_size:
            raise self._fail(
                f"tensor {name!r}: data_offsets run past the end of the file "
                f"({self.size}-byte file; truncated?)"
            )
        expected = nbytes_of(dtype, math.prod(shape))
        if expected is None:
            raise self._fail(
                f"tensor {name!r}: its shape does not fill whole bytes of {dtype} "
                f"({BITS[dtype]}-bit elements)"
            )
        if end - start != expected:
            raise self._fail(
                f"tensor {name!r}: its byte range (data_offsets) does not match "
                f"its shape and dtype ({dtype})"
            )
        return dtype, tuple(shape), start, end

    # -- byte access -------------------------------------------------------

    def _blob(self, start: int, nbytes: int) -> Any:
        return FileBlob(self, start, nbytes)

    def entries(self) -> list[Entry]:
        out = []
        for name, (dtype, shape, start, end) in sorted(
            self.tensors.items(), key=lambda kv: kv[1][2]
        ):
            out.append(
                Entry(
                    name,
                    dtype,
                    shape,
                    end - start,
                    self._blob(start, end - start),
                    file=self.path,
                )
            )
        return out


def fill(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` until it is full or the file ends; bytes read."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


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
    """A tensor's byte range inside a local safetensors file: mappings too."""

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


# -- writing -------------------------------------------------------------


def encode_header(
    tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str], pad: int = 0
) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8-byte alignment
    and then ``pad`` (a multiple of 8) spaces more."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8 + pad)
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: Path,
    items: list[Any],
    metadata: dict[str, str],
    progress: Any,
    reached: Callable[[int], None] | None = None,
    writeback: bool = False,
) -> None:
    """Write a safetensors file of ``items`` (each with name, dtype, shape, nbytes,
    entry and transform), copying byte ranges in the kernel where it can.

    The file gets its full size first, so a reader can parse the header while the
    data is still being written; ``reached(n)`` says the first ``n`` bytes are in.
    With ``writeback`` the disk is asked to start on each piece as soon as it is
    copied, for the caller's fsync to find little left to do."""
    listed = [(i.name, i.dtype, i.shape, i.nbytes) for i in items]
    runs = _runs(items)
    head = encode_header(listed, metadata)
    head = encode_header(listed, metadata, _page_pad(len(head), runs))
    reached = reached or (lambda n: None)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, len(head) + sum(i.nbytes for i in items))
        pos = _write_all(fd, head, 0)
        reached(pos)
        for run in runs:
            if isinstance(run, tuple):
                src, start, nbytes = run
                with src.opened() as src_fd:
                    _copy_range(
                        src_fd,
                        fd,
                        src.data_start + start,
                        pos,
                        nbytes,
                        progress,
                        reached,
                        writeback,
                    )
                pos += nbytes
            else:
                for chunk in run.chunks():
                    _write_all(fd, chunk, pos)
                    pos += len(chunk)
                    progress.advance(len(chunk))
                    reached(pos)
    finally:
        os.close(fd)


def _page_pad(head_size: int, runs: list[Any]) -> int:
    """Spaces to add to the header so the largest copied range lands at the same
    offset within a page as it has in its source: the kernel then copies whole
    pages (a range shifted within the page copies about 20% slower)."""
    pos, best = head_size, None
    for run in runs:
        size = run[2] if isinstance(run, tuple) else run.nbytes
        if isinstance(run, tuple) and (best is None or size > best[0]):
            src, start, _n = run
            best = (size, src.data_start + start - pos)
        pos += size
    if best is None or best[0] < PAD_FROM:
        return 0  # nothing worth up to 4 KiB of spaces
    pad = best[1] % PAGE
    return pad if pad % 8 == 0 else 0  # the header must stay a multiple of 8 bytes


PAGE = 4096
PAD_FROM = 1 << 20  # bytes of the largest copied range


def _runs(items: list[Any]) -> list[Any]:
    """Merge consecutive byte ranges of one source file into single copies."""
    runs: list[Any] = []
    for item in items:
        blob = item.entry.blob
        pieces = getattr(blob, "ranges", None)  # a tensor gathered from several ranges
        if item.transform == "identity" and pieces is not None:
            for file, start, nbytes in pieces:
                last = runs[-1] if runs else None
                if isinstance(last, tuple) and last[0] is file and last[1] + last[2] == start:
                    runs[-1] = (file, last[1], last[2] + nbytes)
                else:
                    runs.append((file, start, nbytes))
        elif item.transform == "identity" and isinstance(blob, FileBlob):
            last = runs[-1] if runs else None
            if isinstance(last, tuple) and last[0] is blob.file and last[1] + last[2] == blob.start:
                runs[-1] = (last[0], last[1], last[2] + blob.nbytes)
            else:
                runs.append((blob.file, blob.start, blob.nbytes))
        else:
            runs.append(item)
    return runs


_COPY_STEP = 32 << 20  # small enough for a follower to start early, large enough to cost nothing


def _copy_range(
    src: int,
    dst: int,
    src_off: int,
    dst_off: int,
    count: int,
    progress: Any,
    reached: Callable[[int], None],
    writeback: bool = False,
) -> None:
    copy = getattr(os, "copy_file_range", None)
    while count > 0:
        step = min(count, _COPY_STEP)
        n = 0
        if copy is not None:
            try:
                n = copy(src, dst, step, src_off, dst_off)
            except OSError as e:
                if e.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                    raise
                copy = None
        if n <= 0:
            data = os.pread(src, step, src_off)
            if not data:
                raise OSError(5, "source ended early")
            n = _write_all(dst, data, dst_off)
        src_off += n
        dst_off += n
        count -= n
        progress.advance(n)
        if writeback:
            _start_writeback(dst, dst_off - n, n)
        reached(dst_off)


_SYNC_FILE_RANGE: list[Any] = []


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting.

    The fsync that must follow then finds most of the file already on its way,
    so the disk works while the copy goes on instead of after it (Linux only;
    elsewhere the fsync does it all)."""
    if not _SYNC_FILE_RANGE:
        fn = None
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except (OSError, AttributeError):
            fn = None
        _SYNC_FILE_RANGE.append(fn)
    fn = _SYNC_FILE_RANGE[0]
    if fn is not None:
        fn(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE; a failure leaves it to fsync


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(28, "No space left on device")
        done += n
    return done
