"""Writing safetensors files: the header, then each tensor's bytes, copied in the
kernel from their source file where they are a plain byte range of it.

A rewrite writes one planned file in a thread while a follower reads it a piece
behind (:mod:`tiecli.io.follow`) and compares each tensor with the input tensor
it stands for, so the comparison costs no second pass over the written bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..errors import VerificationError
from ..io import FileBlob, writes
from ..io.follow import Mark, WriterEnded, beside
from ..io.writes import PAD_FROM, PAGE
from ..plan import Check, FilePlan
from ..progress import Progress
from ..values import equal, first_different, same_samples
from ..write.compare import check_one, mismatch, read_back, start, sync_file, write_total
from .base import Job
from .safetensors import METADATA_KEY, SafetensorsFile


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
    fd = writes.create(path, len(head) + sum(i.nbytes for i in items))
    try:
        pos = writes.write_all(fd, head, 0)
        reached(pos)
        for run in runs:
            if isinstance(run, tuple):
                src, start, nbytes = run
                with src.opened() as src_fd:
                    writes.copy_range(
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
                    writes.write_all(fd, chunk, pos)
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


def write_safetensors(job: Job, f: FilePlan, tmp: Path, checks: list[Check]) -> None:
    """Write ``f`` as ``tmp`` while a follower compares it with the input."""
    mark = Mark()
    with job.progress.task(f"writing {f.name}", write_total(job.plan, f)) as bar:
        followed = beside(
            mark,
            job.shown,
            lambda: write_synced(tmp, f, bar, mark, job.durable),
            lambda: follow(tmp, checks, job.ckpt.entries, mark, job.shown, bar),
        )
    if not followed:  # the writer ended without error, short of what was checked
        raise VerificationError(
            f"verification failed: {tmp.name} was written short; nothing was changed", job.shown
        )


def write_synced(tmp: Path, f: FilePlan, bar: Progress, mark: Mark, durable: bool) -> None:
    write_file(tmp, f.tensors, f.metadata, bar, mark.reached, writeback=durable)
    sync_file(tmp, durable)


def follow(
    tmp: Path,
    checks: list[Check],
    inputs: dict[str, Entry],
    mark: Mark,
    shown: Path,
    bar: Progress,
) -> bool:
    """Compare what the writer has written with the input, a piece behind it.

    A removed alias is compared with its source *in the input*; the written source
    is compared with the input's source as well, and equality is transitive. Where
    the source is copied as it is, both comparisons are one pass: each piece of the
    written source is compared with the input's source and with the alias while it
    is fresh in the cache (:func:`~tiecli.values.first_different`). Other aliases
    (transposed...) need no written byte, so they are compared first, while the
    writer gets ahead. Returns False, early, when the writer ends before writing
    what is to be compared (its error, if it failed, is the one to report).
    """
    direct = {c.out for c in checks if c.transform == "identity" and c.input is inputs.get(c.out)}
    early: list[Check] = []
    riders: dict[str, list[Check]] = {}
    for c in checks:
        if c.out not in direct or c.input is inputs.get(c.out):
            continue
        if c.transform == "identity" and same_samples(inputs[c.out], c.input):
            riders.setdefault(c.out, []).append(c)
        else:
            early.append(c)
    for check in early:
        check_one(check, inputs, shown, bar)
    try:
        mark.ready(8)
        reader = read_back(tmp, shown, lambda: SafetensorsFile(tmp))
    except WriterEnded:
        return False
    try:
        out = {e.name: e for e in reader.entries()}
        mark.ready(reader.data_start)
        ridden = {id(c) for cs in riders.values() for c in cs}
        rest = [c for c in checks if id(c) not in ridden and not any(c is e for e in early)]
        placed = [(start(out[c.out]) if c.out in out else -1, i) for i, c in enumerate(rest)]
        for at, i in sorted(placed):
            check, got = rest[i], out.get(rest[i].out)
            if got is None:
                raise mismatch(check, shown)
            carries = check.transform == "identity" and check.input is inputs.get(check.out)
            also = riders.pop(check.out, []) if carries else []  # only a pass that compares them
            failed = written_equal(got, check, also, mark, reader.data_start + at, bar)
            if failed is not None:
                raise mismatch(failed, shown)
        for left in riders.values():  # an alias whose source was never compared
            raise mismatch(left[0], shown)
    except WriterEnded:
        return False
    finally:
        reader.close()
    return True


def written_equal(
    got: Entry, check: Check, also: list[Check], mark: Mark, at: int, bar: Progress
) -> Check | None:
    """The check that fails, if any, for ``got`` (at byte ``at`` of the file being
    written): ``check``, or one of ``also``, aliases of ``check``'s input that must
    equal it byte for byte."""
    want = check.input
    if check.transform != "identity":
        mark.ready(at + got.nbytes)
        return None if equal(got, want, check.transform, bar) else check
    if got.dtype != want.dtype or got.shape != want.shape:
        return check
    alike = [want] + [c.input for c in also]
    differs = first_different(got, alike, bar, lambda end: mark.ready(at + end))
    return None if differs is None else ([check] + also)[differs]
