"""Rewriting a PyTorch zip checkpoint without torch: a new pickle beside the
storage records, copied byte for byte, laid out as ``torch.save`` lays it out."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import CHUNK
from ..dtypes import itemsize
from ..io import writes
from ..io.writes import PAD_FROM, PAGE
from .torchzip import ZIP64_LIMIT, Record, TorchZip
from .torchzip_pickle import STORAGE_DTYPES, Call, Declined, Storage, contiguous, dumps


def write_shared(
    src: TorchZip,
    shared: dict[str, str],
    path: Path,
    copy: Callable[[int, int, int, int, int], None],
    placed: Callable[[int, int, int], None] = lambda at, n, src_at: None,
    reached: Callable[[int], None] = lambda n: None,
    copies: dict[str, str] | None = None,
    wrote: Callable[[int, bytes], None] = lambda at, data: None,
) -> None:
    """Write ``src`` to ``path`` with each ``alias`` of ``shared`` saved as its source
    tensor itself (one storage, as ``torch.save`` writes a tensor kept twice), and
    each ``name`` of ``copies`` saved as a copy of its source tensor in a storage of
    its own (as ``torch.save`` writes ``source.clone()``): its record holds exactly
    the source tensor's bytes, copied from the input like any other record.

    ``placed(at, size, src_at)`` says where each range taken from ``src`` goes
    (``size`` bytes at ``at``, copied from ``src_at``: a record, or a run of records
    with the headers between them) before it is written, and ``reached(n)`` that the
    first ``n`` bytes of the file are written: a reader can compare each piece of a
    range as soon as it is in. ``wrote(at, data)`` names each piece written from memory
    (headers, the pickle, data descriptors, the central directory), for a read-back.

    The archive is laid out as ``torch.save`` lays it out, since torch computes
    record offsets from that layout instead of reading them when it loads onto the
    ``meta`` device (and when configured to for any load): storages numbered
    in the order the pickle first names them, each record's data aligned as the
    source records it (64 bytes unless ``.storage_alignment`` says otherwise)
    and followed by a data descriptor. Storage records nothing refers to
    any more are left out; the others are copied byte for byte, runs of them in one
    ``copy(src_fd, dst_fd, src_offset, dst_offset, size)``.
    """
    items = dict(src.items)
    for alias, source in shared.items():
        if alias in items and source in items:
            items[alias] = items[source]
    made: dict[int, Record] = {}  # id of a copy's call -> where its bytes are in src
    for name, source in (copies or {}).items():
        if source in src.items:
            items[name] = _clone(src, src.items[source], made)
    renamed: dict[str, Storage] = {}  # old key -> the storage under its new key
    records: dict[str, Record] = {}  # new key -> the bytes its record is copied from
    calls: dict[int, Call] = {}
    for name, call in items.items():
        if id(call) not in calls:
            old = call.args[0]
            if id(call) in made:  # a copy: a storage of its own, never shared
                storage = Storage((*old.pid[:2], str(len(records)), *old.pid[3:]))
                records[storage.key] = made[id(call)]
            else:
                if old.key not in renamed:
                    pid = (*old.pid[:2], str(len(records)), *old.pid[3:])
                    renamed[old.key] = Storage(pid)
                    records[renamed[old.key].key] = src.storage_records[old.key]
                storage = renamed[old.key]
            new = Call(call.func, (storage, *call.args[1:]))
            calls[id(call)] = new
        items[name] = calls[id(call)]
    top = src.top.with_items(items) if isinstance(src.top, Call) else items
    pkl = dumps(top)

    # every data/ record is a storage: those the new pickle names are written under their
    # new keys, the others (aliases' copies, records nothing named) are left out
    storage_names = {r.name for r in src.records if r.name.startswith(src.prefix + "data/")}
    first = next(
        (i for i, r in enumerate(src.records) if r.name in storage_names), len(src.records)
    )
    tail = [r for r in src.records[first:] if r.name not in storage_names]
    order: list[tuple[str, Record]] = [(r.name, r) for r in src.records[:first]]
    order += [(src.prefix + "data/" + key, record) for key, record in records.items()]
    order += [(r.name, r) for r in tail]

    pkl += b" " * _page_pad(src, order, pkl)
    pieces, central, end = _layout(src, order, pkl)
    pieces = [*_merge(src, pieces), _directory(central, end)]  # nothing written if declined
    pending = bytearray()  # small pieces, written together before each kernel copy
    fd = writes.create(path, sum(len(p) if isinstance(p, bytes) else p[1] for p in pieces))
    try:
        pos = 0  # where pending starts
        for piece in pieces:
            if isinstance(piece, bytes):
                wrote(pos + len(pending), piece)
                pending += piece
                continue
            src_at, size = piece
            placed(pos + len(pending), size, src_at)
            if size >= COPY_FROM:
                pos += writes.write_all(fd, bytes(pending), pos)
                pending.clear()
                reached(pos)
                with src.opened() as src_fd:
                    copy(src_fd, fd, src_at, pos, size)
                pos += size
                reached(pos)
            else:
                pending += src.pread(src_at, size)
                if len(pending) >= COPY_FROM:  # many small records: memory stays bounded
                    pos += writes.write_all(fd, bytes(pending), pos)
                    pending.clear()
                    reached(pos)
        pos += writes.write_all(fd, bytes(pending), pos)
        reached(pos)
    finally:
        os.close(fd)


Piece = bytes | tuple[int, int]  # bytes to write, or (offset, size) of bytes to copy from src


def _layout(
    src: TorchZip, order: list[tuple[str, Record]], pkl: bytes
) -> tuple[list[Piece], list[tuple[bytes, int, int, int]], int]:
    """The archive's records, each a local header, its data (the pickle, or a range of
    ``src`` to copy) and a data descriptor; what the central directory says of each
    (name, checksum, size, offset of its local header); and where the records end."""
    pieces: list[Piece] = []
    central = []
    at = 0
    for name_text, record in order:
        data = pkl if record.name == src.prefix + "data.pkl" else None
        size = len(data) if data is not None else record.size
        crc = zlib.crc32(data) if data is not None else record.crc  # a copy keeps its CRC
        raw = name_text.encode()
        pad = _padding(at, raw, src.alignment)
        extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch writes
        # sizes and checksum follow the data, in a descriptor (flag bit 3), as torch writes
        head = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(raw), len(extra)
        )
        pieces += [head + raw + extra, data if data is not None else (record.start, size)]
        pieces.append(struct.pack("<IIII", 0x08074B50, crc, size, size))
        central.append((raw, crc, size, at))
        at += 30 + len(raw) + len(extra) + size + 16
    return pieces, central, at


def _merge(src: TorchZip, pieces: list[Piece]) -> list[Piece]:
    """``pieces`` with each run of ranges that lie in ``src`` as they lie in the output,
    the headers between them equal to the bytes between them in ``src``, joined into
    one range: a record kept as it was keeps its header, and the kernel copies the run
    in one go (faster than record by record: the whole of a file moves as ``cp``
    moves it)."""
    out: list[Piece] = []
    gap = bytearray()  # bytes since the last range in ``out``
    for piece in pieces:
        if isinstance(piece, bytes):
            gap += piece
            continue
        last = out[-1] if out and not isinstance(out[-1], bytes) else None
        if (
            last is not None
            and last[0] + last[1] + len(gap) == piece[0]
            and len(gap) < COPY_FROM
            and src.pread(last[0] + last[1], len(gap)) == gap
        ):
            out[-1] = (last[0], last[1] + len(gap) + piece[1])
        else:
            if gap:
                out.append(bytes(gap))
            out.append(piece)
        gap.clear()
    if gap:
        out.append(bytes(gap))
    return out


def _directory(central: list[tuple[bytes, int, int, int]], start: int) -> bytes:
    """The central directory, written at ``start``, and its end record."""
    out = bytearray()
    for raw, crc, size, offset in central:
        out += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            0,
            0,
            _FLAGS,
            0,
            0,
            0,
            crc,
            size,
            size,
            len(raw),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        out += raw
    end = start + len(out)
    if end >= ZIP64_LIMIT or len(central) > 0xFFFF:
        raise Declined("output would need zip64")
    out += struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), end - start, start, 0
    )
    return bytes(out)


def _clone(src: TorchZip, call: Call, made: dict[int, Record]) -> Call:
    """A call rebuilding a copy of the tensor ``call`` rebuilds, in a storage of its own
    holding exactly its elements; ``made`` learns where those bytes are in ``src``."""
    storage, offset, shape, _stride, *rest = call.args
    size = itemsize(STORAGE_DTYPES[storage.kind.name]) or 0
    numel = 1
    for d in shape:
        numel *= d
    record = src.storage_records[storage.key]
    start, nbytes = record.start + offset * size, numel * size
    if offset == 0 and nbytes == record.size:
        crc = record.crc
    else:  # part of a storage: its checksum is its own
        crc = 0
        for at in range(start, start + nbytes, CHUNK):
            crc = zlib.crc32(src.pread(at, min(CHUNK, start + nbytes - at)), crc)
    hooks = Call(rest[1].func, ())  # an empty OrderedDict of its own, as torch writes it
    pid = (storage.pid[0], storage.kind, storage.key, storage.pid[3], numel)
    clone = Call(call.func, (Storage(pid), 0, shape, contiguous(shape), rest[0], hooks, *rest[2:]))
    made[id(clone)] = Record(src.prefix + "data/copy", start, nbytes, crc)
    return clone


COPY_FROM = 1 << 20  # records this large are copied in the kernel; smaller ones read


def _padding(at: int, raw: bytes, alignment: int) -> int:
    """Bytes of "FB" padding that put the data of record ``raw`` (its local header at
    ``at``, the extra field's own 4 bytes included) on an ``alignment``-byte boundary,
    as torch writes it and computes it."""
    return -(at + 30 + len(raw) + 4) % alignment


def _page_pad(src: TorchZip, order: list[tuple[str, Record]], pkl: bytes) -> int:
    """Spaces to add after the pickle's STOP (unpicklers stop there) so that most of the
    bytes copied land at the same offset within a page as in ``src``: the kernel then
    copies whole pages (a range moved within its page copies about 40% slower). Every
    later record moves by the same multiple of the alignment, so the layout stays the
    one torch computes."""
    if order[0][1].name != src.prefix + "data.pkl":
        return 0  # torch writes the pickle first; spaces anywhere else would move it
    pieces, _central, _end = _layout(src, order, pkl)
    at, moved = 0, dict[int, int]()  # bytes copied, by the spaces that put them in place
    for piece in pieces:
        if isinstance(piece, bytes):
            at += len(piece)
            continue
        pad = (piece[0] - at) % PAGE
        if pad % src.alignment == 0:
            moved[pad] = moved.get(pad, 0) + piece[1]
        at += piece[1]
    size, pad = max(((n, pad) for pad, n in moved.items()), default=(0, 0))
    return pad if size >= PAD_FROM else 0


_FLAGS = 0x808  # data descriptor follows the data; names are UTF-8
