"""Writing safetensors files: the header, then each tensor's bytes, copied in the
kernel from their source file where they are a plain byte range of it."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import FileBlob, writes
from ..io.writes import PAD_FROM, PAGE
from .safetensors import METADATA_KEY


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
