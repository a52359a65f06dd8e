"""Comparing two tensors by value without reading what need not be read.

Everything here works on entries (bytes plus dtype and shape). Equality is
bitwise: elements at fixed positions are compared first (:func:`sample`), whole
tensors only when those agree; digests hash a tensor whole, differences measure
how far two copies are apart. Finding the equal ones among many is
:mod:`tiecli.matching`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .checkpoint import CHUNK, Entry
from .dtypes import itemsize, to_float64
from .io.blobs import RangeBlob
from .io.clib import c_function
from .lean import dataclass
from .progress import NO_PROGRESS, Progress

SAMPLES = 8


def sample_positions(n: int, k: int = SAMPLES) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({(i * (n - 1)) // (k - 1) for i in range(k)})


def sample(e: Entry) -> bytes:
    """Elements at fixed positions of the tensor (bytes, for sub-byte types)."""
    return b"".join(e.blob.read(at, size) for at, size in sampled_places(e))


def sample_transposed(e: Entry) -> bytes:
    """What :func:`sample` would return for the transpose of a 2-D tensor."""
    return b"".join(e.blob.read(at, size) for at, size in sampled_places_transposed(e))


def sampled_places(e: Entry) -> list[tuple[int, int]]:
    """Where :func:`sample` reads: (byte offset, size) of each element."""
    size = itemsize(e.dtype)
    if size is None:
        return [(p, 1) for p in sample_positions(e.nbytes)]
    return [(p * size, size) for p in sample_positions(e.numel)]


def sampled_places_transposed(e: Entry) -> list[tuple[int, int]]:
    """Where :func:`sample_transposed` reads: (byte offset, size) of each element."""
    rows, cols = e.shape
    size = itemsize(e.dtype)
    assert size is not None
    out = []
    for p in sample_positions(e.numel):
        r, c = divmod(p, rows)  # position (r, c) in the (cols, rows) transpose
        out.append(((c * cols + r) * size, size))
    return out


def uniform(data: bytes, size: int) -> bool:
    """Whether ``data`` is one element of ``size`` bytes repeated."""
    return len(data) < 2 * size or data == data[:size] * (len(data) // size)


@dataclass
class Digest:
    """A tensor's hash, and whether all its elements are equal."""

    digest: bytes
    constant: bool


def digest(e: Entry, progress: Progress = NO_PROGRESS) -> Digest:
    """A strong hash of the whole tensor and whether all its elements are equal."""
    size = itemsize(e.dtype) or 1
    import hashlib  # here: its import costs more than most runs spend hashing

    h = hashlib.blake2b(digest_size=20)
    h.update(f"{e.dtype}{e.shape}".encode())
    first = b""
    constant = True
    for chunk in e.chunks():
        h.update(chunk)
        if constant:
            first = first or chunk[:size]
            constant = chunk == first * (len(chunk) // size)
        progress.advance(len(chunk))
    return Digest(h.digest(), constant)


def is_constant(e: Entry) -> bool:
    size = itemsize(e.dtype) or 1
    if not uniform(sample(e), size):
        return False
    first = e.blob.read(0, size) if e.nbytes else b""
    return all(chunk == first * (len(chunk) // size) for chunk in e.chunks())


def equal(
    a: Entry, b: Entry, transform: str = "identity", progress: Progress = NO_PROGRESS
) -> bool:
    """Bitwise equality of ``a`` and ``b`` (``transpose``: ``a`` equals ``b``ᵀ).

    The sampled elements are compared first; whole tensors only when they agree."""
    if not same_samples(a, b, transform):
        return False
    if transform == "transpose":
        return _equal_transposed(a, b)
    return same_bytes(a, b, progress)


def same_samples(a: Entry, b: Entry, transform: str = "identity") -> bool:
    """What :func:`equal` would say from the sampled elements alone (no whole reads)."""
    if a.dtype != b.dtype:
        return False
    if transform == "transpose":
        if len(a.shape) != 2 or a.shape != b.shape[::-1] or itemsize(a.dtype) is None:
            return False  # sub-byte elements are never compared transposed
        return sample(a) == sample_transposed(b)
    return a.shape == b.shape and sample(a) == sample(b)


def same_bytes(
    a: Entry,
    b: Entry,
    progress: Progress = NO_PROGRESS,
    ready: Callable[[int], None] | None = None,
) -> bool:
    """Whether two tensors hold the same bytes, compared piece by piece.

    ``ready(end)``, when given, is called before each piece and returns once the
    first ``end`` bytes of ``a`` may be read (``a`` is still being written)."""
    return first_different(a, [b], progress, ready) is None


def first_different(
    a: Entry,
    others: list[Entry],
    progress: Progress = NO_PROGRESS,
    ready: Callable[[int], None] | None = None,
) -> int | None:
    """The index of the first of ``others`` whose bytes differ from ``a``'s, or None
    when all are the same; one pass over ``a`` serves them all.

    ``ready`` as for :func:`same_bytes`. Each piece of ``a`` is read once and
    compared with the same piece of every other tensor while it is fresh in the
    cache, so checking a source against its written copy and against an alias
    of it costs one read of the source, not two. A tensor whose bytes are ``a``'s
    very bytes (the same range of the same file) is equal without a read."""
    n = a.nbytes
    for i, b in enumerate(others):
        if b.nbytes != n:
            return i
    read = [i for i, b in enumerate(others) if not _same_range(a, b)]
    progress.advance(2 * n * (len(others) - len(read)))  # compared without a read
    if len(read) < len(others):
        if not read:
            return None
        found = first_different(a, [others[i] for i in read], progress, ready)
        return None if found is None else read[found]
    if hasattr(a.blob, "window") and all(hasattr(b.blob, "window") for b in others):
        return _first_different_mapped(a, others, progress, ready)
    step = min(CHUNK, n) or 1
    buf_a, buf_b = bytearray(step), bytearray(step)
    view_a, view_b = memoryview(buf_a), memoryview(buf_b)
    for offset in range(0, n, step):
        k = min(step, n - offset)
        if ready is not None:
            ready(offset + k)
        a.blob.readinto(offset, view_a[:k])
        for i, b in enumerate(others):
            b.blob.readinto(offset, view_b[:k])
            progress.advance(2 * k)
            if not (buf_a == buf_b if k == step else buf_a[:k] == buf_b[:k]):
                return i
    return None


def _same_range(a: Entry, b: Entry) -> bool:
    """Whether ``b``'s bytes are ``a``'s very bytes: the same range of the same open
    file (two names of one stored tensor, as a pickle's shared storage gives them),
    equal without reading them."""
    x, y = a.blob, b.blob
    return (
        isinstance(x, RangeBlob)
        and isinstance(y, RangeBlob)
        and x.file is y.file
        and x.start == y.start
        and x.nbytes == y.nbytes
    )


def _first_different_mapped(
    a: Entry, others: list[Entry], progress: Progress, ready: Callable[[int], None] | None
) -> int | None:
    """:func:`first_different` through short-lived mappings, piece by piece.

    No bytes are copied to user space, and each piece is unmapped once compared,
    so the resident size stays flat however large the tensors are.
    """
    n = a.nbytes
    for offset in range(0, n, CHUNK):
        k = min(CHUNK, n - offset)
        if ready is not None:
            ready(offset + k)
        map_a, at_a = a.blob.window(offset, k)  # type: ignore[attr-defined]
        try:
            for i, b in enumerate(others):
                map_b, at_b = b.blob.window(offset, k)  # type: ignore[attr-defined]
                try:
                    same = _same_memory(map_a, at_a, map_b, at_b, k)
                finally:
                    map_b.close()
                progress.advance(2 * k)
                if not same:
                    return i
        finally:
            map_a.close()
    return None


def _same_memory(map_a: Any, at_a: int, map_b: Any, at_b: int, k: int) -> bool:
    """Whether ``k`` bytes of two mappings are the same.

    C ``memcmp`` where the C library can be reached (it runs without the GIL, so a
    writer thread keeps going meanwhile, and needs no numpy import); numpy on
    8-byte words otherwise.
    """
    memcmp = _memcmp()
    if memcmp is not None:
        import ctypes

        x = (ctypes.c_char * k).from_buffer(map_a, at_a)
        y = (ctypes.c_char * k).from_buffer(map_b, at_b)
        try:
            return bool(memcmp(x, y, k) == 0)
        finally:
            del x, y  # the mappings cannot close while these hold them
    import numpy as np

    whole = k - k % 8
    u, v = np.frombuffer(map_a, np.uint8, k, at_a), np.frombuffer(map_b, np.uint8, k, at_b)
    try:
        if not np.array_equal(u[:whole].view(np.uint64), v[:whole].view(np.uint64)):
            return False
        return bool(np.array_equal(u[whole:], v[whole:]))
    finally:
        del u, v


def _memcmp() -> Any:
    return c_function("memcmp", "c_int", "c_void_p", "c_void_p", "c_size_t")


def _equal_transposed(a: Entry, b: Entry) -> bool:
    """``a`` equals ``b``ᵀ, element by element (shapes already known to fit)."""
    import numpy as np

    x, y = a.blob.array(a.dtype, a.shape), b.blob.array(b.dtype, b.shape)
    if x is None or y is None:
        return False
    rows = max(1, CHUNK // max(1, a.nbytes // max(1, a.shape[0])))
    for r in range(0, a.shape[0], rows):
        if not np.array_equal(x[r : r + rows], y[:, r : r + rows].T):
            return False
    return True


@dataclass
class Difference:
    """How two tensors of one shape differ, element by element."""

    differing: int  # elements whose bits differ
    numel: int
    max_abs_diff: float | None  # None when values cannot be decoded (sub-byte types)


def _transposed_pairs(a: Entry, b: Entry) -> Iterator[tuple[bytes, bytes]]:
    """Row blocks of ``a`` beside the same blocks of ``b``ᵀ, as bytes."""
    import numpy as np

    x, y = a.blob.array(a.dtype, a.shape), b.blob.array(b.dtype, b.shape)
    rows = max(1, CHUNK // max(1, a.nbytes // max(1, a.shape[0])))
    for r in range(0, a.shape[0], rows):
        yield x[r : r + rows].tobytes(), np.ascontiguousarray(y[:, r : r + rows].T).tobytes()


def difference(a: Entry, b: Entry, transform: str = "identity") -> Difference:
    """How ``a`` differs from ``b`` (or from ``b``ᵀ), streamed piece by piece."""
    import numpy as np

    size = itemsize(a.dtype)
    differing, worst = 0, 0.0
    decodable = True
    pieces = (
        _transposed_pairs(a, b)
        if transform == "transpose"
        else zip(a.chunks(), b.chunks(), strict=False)
    )
    for x, y in pieces:
        if x == y:
            continue
        if size is None:
            differing += sum(1 for i, j in zip(x, y, strict=False) if i != j)
            decodable = False
            continue
        xs = np.frombuffer(x, dtype=np.uint8).reshape(-1, size)
        ys = np.frombuffer(y, dtype=np.uint8).reshape(-1, size)
        mask = (xs != ys).any(axis=1)
        differing += int(mask.sum())
        fx, fy = to_float64(a.dtype, x), to_float64(b.dtype, y)
        if fx is None:
            decodable = False
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(fx[mask] - fy[mask])
        if d.size:
            m = float(np.nanmax(d)) if not np.isnan(d).all() else float("nan")
            worst = m if np.isnan(m) or m > worst else worst
    return Difference(differing, a.numel, worst if decodable else None)


def sampled_difference(a: Entry, b: Entry, transform: str = "identity") -> Difference:
    """:func:`difference` over the sampled elements only (no whole reads)."""
    import numpy as np

    x = sample(a)
    y = sample_transposed(b) if transform == "transpose" else sample(b)
    size = itemsize(a.dtype)
    if size is None:
        return Difference(sum(1 for i, j in zip(x, y, strict=False) if i != j), len(x), None)
    xs = np.frombuffer(x, dtype=np.uint8).reshape(-1, size)
    ys = np.frombuffer(y, dtype=np.uint8).reshape(-1, size)
    mask = (xs != ys).any(axis=1)
    fx, fy = to_float64(a.dtype, x), to_float64(b.dtype, y)
    worst = None
    if fx is not None and fy is not None and mask.any():
        with np.errstate(invalid="ignore", over="ignore"):
            worst = float(np.nanmax(np.abs(fx[mask] - fy[mask])))
    return Difference(int(mask.sum()), len(xs), worst)


def first_element(e: Entry) -> bytes:
    """The tensor's first element (its first byte, for sub-byte types)."""
    return e.blob.read(0, itemsize(e.dtype) or 1)
