"""Comparing tensors by value without reading what need not be read.

Everything here works on entries (bytes plus dtype and shape). Equality is
bitwise. Finding equal tensors groups by dtype and shape, compares a few
elements at fixed positions, and reads whole tensors only for candidates that
survive the samples.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .checkpoint import CHUNK, Entry
from .dtypes import itemsize, to_float64
from .progress import NO_PROGRESS, Progress

SAMPLES = 8
T = TypeVar("T")


def sample_positions(n: int, k: int = SAMPLES) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({(i * (n - 1)) // (k - 1) for i in range(k)})


def sample(e: Entry) -> bytes:
    """Elements at fixed positions of the tensor (bytes, for sub-byte types)."""
    return b"".join(e.blob.read(at, size) for at, size in _sampled(e))


def sample_transposed(e: Entry) -> bytes:
    """What :func:`sample` would return for the transpose of a 2-D tensor."""
    return b"".join(e.blob.read(at, size) for at, size in _sampled_transposed(e))


def _sampled(e: Entry) -> list[tuple[int, int]]:
    """Where :func:`sample` reads: (byte offset, size) of each element."""
    size = itemsize(e.dtype)
    if size is None:
        return [(p, 1) for p in sample_positions(e.nbytes)]
    return [(p * size, size) for p in sample_positions(e.numel)]


def _sampled_transposed(e: Entry) -> list[tuple[int, int]]:
    rows, cols = e.shape
    size = itemsize(e.dtype)
    assert size is not None
    out = []
    for p in sample_positions(e.numel):
        r, c = divmod(p, rows)  # position (r, c) in the (cols, rows) transpose
        out.append(((c * cols + r) * size, size))
    return out


def _uniform(data: bytes, size: int) -> bool:
    return len(data) < 2 * size or data == data[:size] * (len(data) // size)


@dataclass
class Digest:
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
    if not _uniform(sample(e), size):
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
    n = a.nbytes
    if n != b.nbytes:
        return False
    if hasattr(a.blob, "window") and hasattr(b.blob, "window"):
        return _same_mapped(a, b, progress, ready)
    step = min(CHUNK, n) or 1
    buf_a, buf_b = bytearray(step), bytearray(step)
    view_a, view_b = memoryview(buf_a), memoryview(buf_b)
    for offset in range(0, n, step):
        k = min(step, n - offset)
        if ready is not None:
            ready(offset + k)
        a.blob.readinto(offset, view_a[:k])
        b.blob.readinto(offset, view_b[:k])
        progress.advance(2 * k)
        if not (buf_a == buf_b if k == step else buf_a[:k] == buf_b[:k]):
            return False
    return True


def _same_mapped(
    a: Entry, b: Entry, progress: Progress, ready: Callable[[int], None] | None
) -> bool:
    """Compare two file-backed tensors through short-lived mappings, piece by piece.

    No bytes are copied to user space, and each piece is unmapped once compared,
    so the resident size stays flat however large the tensors are.
    """
    n = a.nbytes
    for offset in range(0, n, CHUNK):
        k = min(CHUNK, n - offset)
        if ready is not None:
            ready(offset + k)
        (map_a, at_a), (map_b, at_b) = a.blob.window(offset, k), b.blob.window(offset, k)  # type: ignore[attr-defined]
        try:
            same = _same_memory(map_a, at_a, map_b, at_b, k)
        finally:
            map_a.close()
            map_b.close()
        progress.advance(2 * k)
        if not same:
            return False
    return True


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


_MEMCMP: list[Any] = []


def _memcmp() -> Any:
    if not _MEMCMP:
        fn = None
        try:
            import ctypes

            fn = ctypes.CDLL(None).memcmp
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        except (OSError, AttributeError):
            fn = None
        _MEMCMP.append(fn)
    return _MEMCMP[0]


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


GATHER_GAP = 4096  # elements of a local file this close are read in one call...
GATHER_SPAN = 64 << 10  # ...of at most this many bytes


def gather(items: list[Entry], where: Callable[[Entry], list[tuple[int, int]]]) -> dict[str, bytes]:
    """For each tensor, by name, the bytes at the places ``where(e)`` names (byte
    offset and size in the tensor), joined in that order: what reading them one by one
    would give.

    Places in a local file lying close together (thousands of small experts) are read
    in one call each; any other blob reads its own (a remote file serves what was
    fetched ahead). Only the bytes asked for count as read."""
    from .io import FileBlob

    parts: dict[str, list[bytes]] = {}
    local: dict[Any, list[tuple[int, int, Any]]] = defaultdict(list)
    for e in items:
        blob = e.blob
        places = where(e)
        got = parts[e.name] = [b""] * len(places)
        if type(blob) is FileBlob:
            wants = local[blob.file]
            for i, (offset, size) in enumerate(places):
                wants.append((blob.start + offset, size, (got, i)))
        else:
            for i, (offset, size) in enumerate(places):
                got[i] = blob.read(offset, size)
    for file, wants in local.items():
        for data, start, batch in _read_near(file, wants):
            for at, size, (got, i) in batch:
                got[i] = data[at - start : at - start + size]
    return {name: b"".join(p) for name, p in parts.items()}


def _ends(items: list[Entry], last: bool) -> dict[str, bytes]:
    """:func:`gather` of each tensor's first element (its last, with ``last``), by name;
    the one place per tensor taken without the general bookkeeping."""
    from .io import FileBlob

    sizes: dict[str, int] = {}
    out: dict[str, bytes] = {}
    local: dict[Any, list[tuple[int, int, str]]] = defaultdict(list)
    for e in items:
        size = sizes.get(e.dtype)
        if size is None:
            size = sizes[e.dtype] = itemsize(e.dtype) or 1
        offset = e.nbytes - size if last else 0
        blob = e.blob
        if type(blob) is FileBlob:
            local[blob.file].append((blob.start + offset, size, e.name))
        else:
            out[e.name] = blob.read(offset, size)
    for file, wants in local.items():
        for data, start, batch in _read_near(file, wants):
            for at, size, name in batch:
                out[name] = data[at - start : at - start + size]
    return out


def _read_near(
    file: Any, wants: list[tuple[int, int, T]]
) -> Iterator[tuple[bytes, int, list[Any]]]:
    """Read the ranges ``wants`` (start in the file's data, size, a tag) of a local file
    in few calls: (the bytes read, where they start, the wants they hold)."""
    wants.sort(key=_first_item)
    batch: list[tuple[int, int, T]] = []
    start = end = 0
    for want in wants:
        at, size = want[0], want[1]
        if batch and (at - end > GATHER_GAP or at + size - start > GATHER_SPAN):
            yield _read_batch(file, start, end, batch), start, batch
            batch = []
        if not batch:
            start, end = at, at + size
        elif at + size > end:
            end = at + size
        batch.append(want)
    if batch:
        yield _read_batch(file, start, end, batch), start, batch


def _read_batch(file: Any, start: int, end: int, batch: list[Any]) -> bytes:
    data: bytes = file.pread(file.data_start + start, end - start)
    file.bytes_read += sum(w[1] for w in batch) - (end - start)  # what was asked for
    return data


def _first_item(t: tuple[Any, ...]) -> Any:
    return t[0]


def shaped_like_another(items: list[Entry]) -> list[Entry]:
    """The tensors whose dtype and shape another shares, or whose transposed shape
    another has (2-D, whole-byte elements): the only ones that could equal another."""
    shapes = Counter((e.dtype, e.shape) for e in items)

    def partner(e: Entry) -> bool:
        if shapes[(e.dtype, e.shape)] > 1:
            return True
        flipped = e.shape[::-1]
        return (
            len(e.shape) == 2 and itemsize(e.dtype) is not None and shapes[(e.dtype, flipped)] > 0
        )

    return [e for e in items if partner(e)]


def could_match(items: list[Entry]) -> list[Entry]:
    """:func:`shaped_like_another`, narrowed by the first element: a tensor equal to
    another (or to its transpose, whose first element is the same) shares it. One
    small read per tensor spares the eight sampled reads of most of them."""
    shaped = shaped_like_another(items)
    heads = {e.name: first_element(e) for e in shaped}
    count = Counter((e.dtype, e.shape, heads[e.name]) for e in shaped)

    def live(e: Entry) -> bool:
        head = heads[e.name]
        if count[(e.dtype, e.shape, head)] > 1:
            return True
        flipped = e.shape[::-1]
        return len(e.shape) == 2 and flipped != e.shape and count[(e.dtype, flipped, head)] > 0

    return [e for e in shaped if live(e)]


def _narrowed(entries: list[Entry]) -> list[Entry]:
    """:func:`could_match`, narrowed once more by the last element, which a tensor
    shares with any tensor equal to it or to its transpose: one more small read per
    tensor spares the sixteen sampled reads (eight, and eight of the transpose) of
    most of them, which matters where thousands of same-shaped experts share a first
    element. Reads of neighbouring elements of a local file are made together."""
    classes: dict[tuple[str, tuple[int, ...]], tuple[Any, ...]] = {}
    for e in entries:  # a dtype and shape, or its transpose: the tensors that could match
        if (e.dtype, e.shape) not in classes:
            flip = len(e.shape) == 2 and itemsize(e.dtype) is not None
            shape = min(e.shape, e.shape[::-1]) if flip else e.shape
            classes[(e.dtype, e.shape)] = (e.dtype, shape, flip)
    keyed = [(classes[(e.dtype, e.shape)], e) for e in entries]
    for last in (False, True):
        count = Counter(k for k, _e in keyed)
        keyed = [(k, e) for k, e in keyed if count[k] > 1]
        got = _ends([e for _k, e in keyed], last)
        keyed = [((*k, got[e.name]), e) for k, e in keyed]
    count = Counter(k for k, _e in keyed)
    return [e for k, e in keyed if count[k] > 1]


@dataclass
class ValueMatches:
    groups: list[list[Entry]]  # each: bitwise-equal tensors, in file order
    transposed: list[tuple[Entry, Entry]]  # (x, y) with y == xᵀ, x first in file order
    # names whose match rests on sampled elements only (a budget refused the whole read)
    unconfirmed: set[str] = field(default_factory=set)


def find_equal(
    entries: Iterable[Entry],
    progress: Progress = NO_PROGRESS,
    known: dict[str, str] | None = None,
    budget: Any = None,
) -> ValueMatches:
    """Groups of equal tensors and transposed pairs; constant tensors never match.

    ``known`` maps names to classes already proven bitwise equal (a confirmed
    tie group): one member per class stands for it, so no pair is read twice.
    ``budget`` (remote checkpoints): whole reads it refuses are not made; those
    candidates match by their samples and are listed in ``unconfirmed``.
    """
    known = known or {}
    items = _narrowed([e for e in entries if e.nbytes > 0 and e.numel > 1])
    by_shape: dict[tuple[str, tuple[int, ...]], list[Entry]] = defaultdict(list)
    for e in items:
        by_shape[(e.dtype, e.shape)].append(e)

    def wanted_transposed(key: tuple[str, tuple[int, ...]]) -> bool:
        dtype, shape = key
        return len(shape) == 2 and itemsize(dtype) is not None and (dtype, shape[::-1]) in by_shape

    # 1. samples at fixed positions, only where a partner could exist
    normal: dict[tuple[Any, ...], list[Entry]] = defaultdict(list)
    sampled = [e for k, g in by_shape.items() if len(g) > 1 or wanted_transposed(k) for e in g]
    samples = gather(sampled, _sampled)
    for e in sampled:
        normal[(e.dtype, e.shape, samples[e.name])].append(e)
    transposed_candidates: list[tuple[Entry, Entry]] = []
    order = {e.name: i for i, e in enumerate(items)}
    flipped = [e for k, g in by_shape.items() if wanted_transposed(k) for e in g]
    samples_t = gather(flipped, _sampled_transposed)
    for key, group in by_shape.items():
        if not wanted_transposed(key):
            continue
        dtype, shape = key
        for x in group:
            for y in normal.get((dtype, shape[::-1], samples_t[x.name]), []):
                if y is not x and order[x.name] < order[y.name]:
                    transposed_candidates.append((x, y))

    # 2. whole tensors for the survivors: a pair is compared directly, a larger
    #    bucket (many same-shaped experts) is hashed
    candidates = []
    for g in normal.values():
        reps, classes = [], set()
        for e in g:
            cls = known.get(e.name)
            if cls is None or cls not in classes:
                reps.append(e)
                classes.add(cls)
        if len(reps) > 1:
            candidates.append(reps)
    unconfirmed: set[str] = set()

    def refused(g: list[Entry], nbytes: int) -> bool:
        """Whether the budget refuses reading ``g`` whole."""
        return budget is not None and not budget.allows(nbytes)

    def by_samples(g: list[Entry]) -> bool:
        """Unread candidates match by their samples, unless those are all one value
        (a constant tensor is never a tie)."""
        if _uniform(sample(g[0]), itemsize(g[0].dtype) or 1):
            return False
        unconfirmed.update(e.name for e in g)
        return True

    unread = [g for g in candidates if refused(g, sum(e.nbytes for e in g))]
    candidates = [g for g in candidates if not any(g is u for u in unread)]
    pairs_to_compare = [g for g in candidates if len(g) == 2]
    to_hash = {e.name: e for g in candidates if len(g) > 2 for e in g}
    total = sum(e.nbytes for e in to_hash.values()) + sum(2 * g[0].nbytes for g in pairs_to_compare)
    digests: dict[str, Digest] = {}
    groups: list[list[Entry]] = []
    constant: set[str] = set()
    with progress.task("comparing tensors", total) as bar:
        for x, y in pairs_to_compare:
            size = itemsize(x.dtype) or 1
            if _uniform(sample(x), size) and is_constant(x):
                constant.add(x.name)
            elif same_bytes(x, y, bar):
                groups.append(sorted((x, y), key=lambda e: order[e.name]))
        for name, e in to_hash.items():
            digests[name] = digest(e, bar)

    constant |= {n for n, d in digests.items() if d.constant}
    for g in candidates:
        if len(g) == 2:
            continue
        by_digest: dict[bytes, list[Entry]] = defaultdict(list)
        for e in g:
            if e.name not in constant:
                by_digest[digests[e.name].digest].append(e)
        groups.extend(
            sorted(m, key=lambda e: order[e.name]) for m in by_digest.values() if len(m) > 1
        )

    groups.extend(sorted(g, key=lambda e: order[e.name]) for g in unread if by_samples(g))
    pairs = []
    for x, y in transposed_candidates:
        if x.name in constant or y.name in constant:
            continue
        if refused([x, y], 2 * x.nbytes):
            if by_samples([x, y]):
                pairs.append((x, y))
            continue
        if x.name not in digests and _uniform(sample(x), itemsize(x.dtype) or 1) and is_constant(x):
            constant.add(x.name)
            continue
        if equal(y, x, "transpose"):
            pairs.append((x, y))
    groups.sort(key=lambda g: order[g[0].name])
    return ValueMatches(groups, pairs, unconfirmed)
