"""What detection will sample, fetched up front in few requests.

Two rounds: the first element of every tensor another could equal by dtype and
shape, then the eight sampled elements of those whose first element another
shares. Each round's ranges are sorted, ranges closer than :data:`MERGE_GAP`
merged, and over HTTP(S) up to :data:`MAX_RANGES` of them asked in one
multi-range request (one range per request where the server refuses those, and
for the Hub and object stores); the requests are sent :data:`WORKERS` at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...checkpoint import Entry
from ...dtypes import itemsize
from ...progress import NO_PROGRESS, Progress
from .files import RemoteBlob, RemoteFile

MERGE_GAP = 4 << 10  # ranges closer than this are read in one request
MAX_SPAN = 1 << 20  # ... up to this many bytes in one request
WORKERS = 8  # requests in flight at once
MAX_RANGES = 200  # ranges in one multi-range request (Apache's MaxRanges default)
MAX_RANGE_HEADER = 6000  # characters of its Range header (servers refuse lines over 8 KiB)


def coalesce(
    ranges: list[tuple[int, int]], gap: int = MERGE_GAP, span: int = MAX_SPAN
) -> list[tuple[int, int]]:
    """``[start, end)`` ranges sorted, and merged where they overlap or lie closer than
    ``gap``, as long as a merged range stays within ``span`` bytes: one request's body
    is held in memory, and a file of small tensors must not become one request."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start - out[-1][1] <= gap and max(out[-1][1], end) - out[-1][0] <= span:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def head_ranges(entries: list[Entry]) -> list[tuple[RemoteFile, int, int]]:
    """The first element of every tensor that could equal another by dtype and shape."""
    from ...matching import shaped_like_another

    out = []
    for e in shaped_like_another([e for e in entries if e.nbytes > 0 and e.numel > 1]):
        if isinstance(e.blob, RemoteBlob):
            base = e.blob.file.data_start + e.blob.start
            out.append((e.blob.file, base, base + (itemsize(e.dtype) or 1)))
    return out


def sample_ranges(entries: list[Entry]) -> list[tuple[RemoteFile, int, int]]:
    """The byte ranges (file, start, end) of the sampled elements of the tensors that
    could equal another (see :func:`~tiecli.matching.could_match`), and of the sampled
    elements of their transposes where a tensor of the transposed shape is among them."""
    from ...matching import could_match
    from ...values import sample_positions

    live = could_match([e for e in entries if e.nbytes > 0 and e.numel > 1])
    shapes = {(e.dtype, e.shape) for e in live}
    out = []
    for e in live:
        blob = e.blob
        if not isinstance(blob, RemoteBlob):
            continue
        base = blob.file.data_start + blob.start
        size = itemsize(e.dtype)
        if size is None:
            offsets = [(p, 1) for p in sample_positions(e.nbytes)]
        else:
            offsets = [(p * size, size) for p in sample_positions(e.numel)]
            if len(e.shape) == 2 and (e.dtype, e.shape[::-1]) in shapes:
                rows, cols = e.shape
                for p in sample_positions(e.numel):
                    r, c = divmod(p, rows)
                    offsets.append(((c * cols + r) * size, size))
        out += [(blob.file, base + o, base + o + n) for o, n in offsets]
    return out


def batches(ranges: list[tuple[int, int]], multi: bool) -> list[list[tuple[int, int]]]:
    """Sorted ranges grouped as requests send them: one each, or (``multi``) up to
    :data:`MAX_RANGES` in one request whose ``Range`` header stays within
    :data:`MAX_RANGE_HEADER` characters."""
    if not multi:
        return [[r] for r in ranges]
    out: list[list[tuple[int, int]]] = []
    width = 0
    for start, end in ranges:
        text = len(f"{start}-{end - 1},")
        if not out or len(out[-1]) >= MAX_RANGES or width + text > MAX_RANGE_HEADER:
            out.append([])
            width = len("bytes=")
        out[-1].append((start, end))
        width += text
    return out


def fetch_ahead(
    ranges: list[tuple[RemoteFile, int, int]], progress: Progress = NO_PROGRESS
) -> None:
    """Fetch ``ranges`` coalesced per file, several in one request where the server takes
    multi-range requests (HTTP), :data:`WORKERS` requests at a time."""
    by_file: dict[RemoteFile, list[tuple[int, int]]] = {}
    for f, start, end in ranges:
        if not f.has(start, end):
            by_file.setdefault(f, []).append((start, end))
    jobs = [
        (f, batch)
        for f, spans in by_file.items()
        for batch in batches(coalesce(spans), f.multi_range)
    ]
    if not jobs:
        return
    total = sum(e - s for _f, batch in jobs for s, e in batch)
    with progress.task("reading sampled elements", total) as bar:

        def one(job: tuple[RemoteFile, list[tuple[int, int]]]) -> list[Any]:
            f, batch = job
            parts, left = f.fetch_many(batch)
            for start, data in parts:
                f.keep(start, data)
            bar.advance(sum(e - s for s, e in batch) - sum(e - s for s, e in left))
            return [(f, [r]) for r in left]

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            while jobs:  # what a multi-range answer left out: one range per request
                jobs = [again for left in pool.map(one, jobs) for again in left]
