"""Writing bytes at a position: a new file of a known size (``create``), ``write_all``,
the kernel copy ``copy_range``, and asking the disk to start early (``start_writeback``).

Writers call these through this module (``writes.copy_range(...)``), so that one
replacement here reaches every writer."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .clib import c_function
from .files import fill

PAGE = 4096
PAD_FROM = 1 << 20  # bytes of the largest copied range worth aligning to its page offset
COPY_STEP = 4 << 20  # a follower trails the copy by little: less left to compare when it ends
BUFFER = 1 << 20  # a piece copied through user space: fits the cache


def copy_range(
    src: int,
    dst: int,
    src_off: int,
    dst_off: int,
    count: int,
    progress: Any,
    reached: Callable[[int], None],
    writeback: bool = False,
) -> None:
    """Copy ``count`` bytes from ``src`` at ``src_off`` to ``dst`` at ``dst_off``, in the
    kernel where it can, in steps of :data:`COPY_STEP`; ``reached(n)`` after each.

    The steps end at multiples of their size in the output: a copy that starts
    mid-block first copies up to the next one. Linux gives a write large page-cache
    blocks (folios) only as far as the write's first page is aligned to them
    (``__filemap_get_folio`` in mm/filemap.c), and the kernel copy writes a pipe's
    64 KiB at a time from where its call starts. Measured on Linux 6.18, ext4:
    0.94 GB copied from offset 32384 to 32384 in 4 MiB steps took 0.30 s, in
    steps aligned so 0.17 s; through the buffer (1 MiB pieces, to offset 1000)
    0.20 s, aligned 0.18 s.

    A large range (:data:`PAD_FROM` or more) that lands at another offset within the
    page than it has in its source (a DCP's chunks, at any offset of their files) is
    read and written through a small buffer instead: on Linux's ext4 the kernel copy
    of such a range costs some 30% more CPU than a read and a write of 1 MiB pieces
    (480 MB: 0.20 s against 0.15 s)."""
    copy = getattr(os, "copy_file_range", None)
    if count >= PAD_FROM and (src_off - dst_off) % PAGE:
        copy = None
    buf: memoryview | None = None
    while count > 0:
        step = min(count, COPY_STEP - dst_off % COPY_STEP)  # steps end at aligned offsets
        n = 0
        if copy is not None:
            try:
                n = copy(src, dst, step, src_off, dst_off)
            except OSError as e:
                if e.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                    raise
                copy = None
        if n <= 0:
            buf = buf if buf is not None else memoryview(bytearray(BUFFER))
            piece = buf[: min(step, BUFFER - dst_off % BUFFER)]
            got = fill(src, piece, src_off)
            if not got:
                raise OSError(5, "source ended early")
            n = write_all(dst, piece[:got], dst_off)
        src_off += n
        dst_off += n
        count -= n
        progress.advance(n)
        if writeback:
            start_writeback(dst, dst_off - n, n)
        reached(dst_off)


def create(path: Path, size: int) -> int:
    """A descriptor open for writing on ``path``, a new file (it must not exist) of
    ``size`` bytes, its blocks reserved where the file system can reserve them.

    Linux's ``fallocate`` reserves every block before a byte is written: a disk too
    small fails here, before any work, and the copies that follow skip the file
    system's block reservation page by page (ext4, 1.26 GB: a kernel copy 0.40 s
    against 0.31 s, a shifted copy through a buffer 0.51 s against 0.42 s). Where
    it cannot (another system, a file system without it) the file is only sized,
    and reads as zeros until written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if size > 0 and not _reserve(fd, size):
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reserve(fd: int, size: int) -> bool:
    """Whether ``fallocate`` gave the file ``size`` bytes of reserved blocks; a full
    disk (or quota) raises. The C library's own call, not ``os.posix_fallocate``,
    which where the file system has no such call writes every block instead."""
    # musl names it without the 64, where off_t is 64 bits anyway
    also = "fallocate" if sys.maxsize > 2**32 else None
    fn = c_function("fallocate64", "c_int", "c_int", "c_int", "c_int64", "c_int64", also=also)
    if fn is None:
        return False
    if fn(fd, 0, 0, size) == 0:
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise OSError(err, os.strerror(err))
    return False  # not supported here (EOPNOTSUPP, ENOSYS, EINVAL...)


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting.

    The fsync that must follow then finds most of the file already on its way,
    so the disk works while the copy goes on instead of after it (Linux only;
    elsewhere the fsync does it all)."""
    fn = c_function("sync_file_range", "c_int", "c_int", "c_int64", "c_int64", "c_uint")
    if fn is not None:
        fn(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE; a failure leaves it to fsync


def write_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset``; the bytes written (a full disk raises)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(28, "No space left on device")
        done += n
    return done
