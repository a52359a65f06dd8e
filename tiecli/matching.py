"""Finding the equal tensors among many without reading most of them.

Candidates are narrowed by dtype and shape (or the transposed shape), then by
their first and last elements, then by elements at fixed positions; only the
survivors are read whole (a pair compared, a larger bucket hashed). Small reads
of neighbouring places in a local file are made in one call (:func:`gather`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import field
from typing import Any, TypeVar

from .checkpoint import Entry
from .dtypes import itemsize
from .lean import dataclass
from .progress import NO_PROGRESS, Progress
from .values import (
    Digest,
    digest,
    equal,
    first_element,
    is_constant,
    same_bytes,
    sample,
    sampled_places,
    sampled_places_transposed,
    uniform,
)

T = TypeVar("T")

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
    """Tensors found equal by value, and pairs found transposed."""

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
    samples = gather(sampled, sampled_places)
    for e in sampled:
        normal[(e.dtype, e.shape, samples[e.name])].append(e)
    transposed_candidates: list[tuple[Entry, Entry]] = []
    order = {e.name: i for i, e in enumerate(items)}
    flipped = [e for k, g in by_shape.items() if wanted_transposed(k) for e in g]
    samples_t = gather(flipped, sampled_places_transposed)
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
        if uniform(sample(g[0]), itemsize(g[0].dtype) or 1):
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
            if uniform(sample(x), size) and is_constant(x):
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
        if x.name not in digests and uniform(sample(x), itemsize(x.dtype) or 1) and is_constant(x):
            constant.add(x.name)
            continue
        if equal(y, x, "transpose"):
            pairs.append((x, y))
    groups.sort(key=lambda g: order[g[0].name])
    return ValueMatches(groups, pairs, unconfirmed)
