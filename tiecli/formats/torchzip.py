"""PyTorch zip checkpoints read and rewritten without importing torch.

A ``torch.save`` file is a zip archive of stored (uncompressed) records: a
pickle, ``data.pkl``, that names each tensor's storage by key, and one record
``data/<key>`` per storage holding its raw bytes. For the common case, a flat
``{name: tensor}`` dict of dense, contiguous CPU tensors, everything tiecli
needs is in those bytes: the pickle is read with placeholders instead of
torch's classes (nothing it names is imported or called), and a rewrite copies
the storage records byte for byte, in the kernel, next to a new pickle.

Anything else (nested checkpoints, other objects, views with strides, zip64,
compression, a damaged archive) is declined: the reader returns ``None`` and
the caller falls back to :class:`~tiecli.formats.pytorch.PickleFile`, which
loads through torch and gives the errors.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..dtypes import itemsize
from ..io import ByteFile, FileBlob
from .torchzip_pickle import (
    ORDERED_DICT,
    REBUILD,
    STORAGE_DTYPES,
    Call,
    Declined,
    Storage,
    Unpickler,
    contiguous,
    holds_tensors,
)

ALIGN = 64  # torch aligns every record's data to 64 bytes unless the file records another
# The largest alignment a rewrite can honour: its padding lives in a 16-bit extra field.
MAX_ALIGN = 1 << 15
ZIP64_LIMIT = 0xFFFFFFFF
# The largest pickle record read (unpacked): a state dict's pickle takes about 200
# bytes a tensor, so this is some 300,000 tensors; a compressed record can unpack
# to far more than its file's size, and unpickling takes several times its size.
MAX_PICKLE = 64 << 20


# Records torch.load reads whole besides data.pkl, and what torch.save writes in them.
# Checked before anything unpacks them: torch quotes a bad one in its error.
SMALL_RECORDS: dict[str, frozenset[bytes] | None] = {  # None: a number
    "byteorder": frozenset({b"little", b"big"}),
    "version": None,
    ".data/version": None,
    ".format_version": None,
    ".storage_alignment": None,
    ".data/serialization_id": None,
}
MAX_SMALL_RECORD = 64


def record_fault(name: str, size: int, read: Callable[[], bytes]) -> str | None:
    """Why a record of a torch zip (``name`` inside the archive folder) is not what
    torch.save writes; None when it is, or when it is a storage (never unpacked whole)."""
    if name.startswith("data/"):
        return None
    pickle = name.endswith(".pkl")
    limit = MAX_PICKLE if pickle else MAX_SMALL_RECORD
    if size > limit:
        shown = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
        return (
            f"its {'pickle' if pickle else 'record'} {name.rsplit('/', 1)[-1]} unpacks to "
            f"{size} bytes, more than the {shown} tiecli reads (a state dict's is far smaller)"
        )
    if name in SMALL_RECORDS:
        raw = read().strip()
        allowed = SMALL_RECORDS[name]
        if not (raw in allowed if allowed is not None else raw.isdigit()):
            return f"its record {name} does not hold what torch.save writes there"
    return None


class Record:
    __slots__ = ("name", "start", "size", "crc")

    def __init__(self, name: str, start: int, size: int, crc: int):
        self.name, self.start, self.size, self.crc = name, start, size, crc


def data_start(fd: int, info: zipfile.ZipInfo) -> int:
    """Where a record's data starts: after its local header, name and extra field
    (which the central directory does not give)."""
    local = os.pread(fd, 30, info.header_offset)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return int(info.header_offset) + 30 + name_len + extra_len


def _records(path: Path, fd: int, file_size: int) -> list[Record]:
    out = []
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on damaged bytes
        raise Declined("unreadable archive") from e
    if len(infos) > 0xFFFF:
        raise Declined("zip64 (too many records)")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise Declined("a record name twice")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise Declined("compressed or encrypted record")
        if max(info.header_offset, info.file_size, file_size) >= ZIP64_LIMIT:
            raise Declined("zip64")
        try:
            start = data_start(fd, info)
        except zipfile.BadZipFile as e:
            raise Declined("bad local header") from e
        if start + info.file_size > file_size:
            raise Declined("record past the end")
        out.append(Record(info.filename, start, info.file_size, info.CRC))
    return out


class TorchZip(ByteFile):
    """A flat state dict of a PyTorch zip checkpoint, read without torch; its tensors'
    blobs are addressed from the start of the file."""

    nested_key: str | None = None  # only flat state dicts are read here

    def __init__(self, path: Path, file_number: int = 0):
        super().__init__(path, file_number)
        try:
            with self.opened() as fd:
                self.size = os.fstat(fd).st_size
                self.records = _records(path, fd, self.size)
                self._parse()
        except BaseException:
            self.close()
            raise

    def _read(self, record: Record) -> bytes:
        return self.pread(record.start, record.size)

    def _parse(self) -> None:
        pkl = [r for r in self.records if r.name.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise Declined("no single data.pkl")
        self.prefix = pkl[0].name[: -len("data.pkl")]
        by_name = {r.name: r for r in self.records}
        for r in self.records:  # the torch-based reader says what is wrong
            if record_fault(r.name.removeprefix(self.prefix), r.size, partial(self._read, r)):
                raise Declined("a record torch.save would not write")
        order = by_name.get(self.prefix + "byteorder")
        if order is not None and self.pread(order.start, order.size) != b"little":
            raise Declined("big-endian")
        # torch.save records a non-default storage alignment, and torch computes record
        # offsets from it when it loads (``calculate_storage_offsets``): a rewrite keeps it
        self.alignment = ALIGN
        recorded = by_name.get(self.prefix + ".storage_alignment")
        if recorded is not None:
            text = self.pread(recorded.start, min(recorded.size, 16))
            if recorded.size > 16 or not text.isdigit() or not 0 < int(text) <= MAX_ALIGN:
                raise Declined("a storage alignment this writer cannot keep")
            self.alignment = int(text)
        if pkl[0].size > MAX_PICKLE:
            raise Declined("data.pkl too large")  # the torch-based reader says so
        raw = self.pread(pkl[0].start, pkl[0].size)
        if zlib.crc32(raw) != pkl[0].crc:
            raise Declined("data.pkl fails its checksum")
        try:
            top = Unpickler(io.BytesIO(raw)).load()
        except Declined:
            raise
        except Exception as e:  # noqa: BLE001 - damaged pickles fail in many ways
            raise Declined("unreadable pickle") from e
        if isinstance(top, Call) and top.func.key() == ORDERED_DICT and not top.args:
            items = top.items
            # state_dict()'s ``_metadata`` (module versions) is kept as it is; a tensor
            # hidden in the dict's state would escape both the rewrite and its check
            if top.state is not None and (
                not isinstance(top.state, dict)
                or set(top.state) != {"_metadata"}
                or holds_tensors(top.state)
            ):
                raise Declined("state beside the state dict")
        elif isinstance(top, dict):
            items = top
        else:
            raise Declined("not a flat state dict")
        if not items or not all(isinstance(k, str) for k in items):
            raise Declined("not a flat state dict")
        self.top = top
        self.items: dict[str, Call] = dict(items)
        self.storage_records: dict[str, Record] = {}
        self._storages: dict[str, Storage] = {}
        self._entries = [self._entry(name, call, by_name) for name, call in items.items()]

    def _entry(self, name: str, call: Any, by_name: dict[str, Record]) -> Entry:
        if not (isinstance(call, Call) and call.func.key() == REBUILD and call.state is None):
            raise Declined(f"{name!r} is not a plain tensor")
        args = call.args
        if len(args) not in (6, 7) or not isinstance(args[0], Storage):
            raise Declined(f"{name!r}: unexpected rebuild arguments")
        storage, offset, shape, stride, requires_grad, hooks = args[:6]
        ints = (shape, stride)
        if (
            type(offset) is not int
            or offset < 0
            or not all(
                isinstance(t, tuple) and all(type(i) is int and i >= 0 for i in t) for t in ints
            )
            or len(shape) != len(stride)
            or not isinstance(requires_grad, bool)
            or not (isinstance(hooks, Call) and hooks.func.key() == ORDERED_DICT)
            or hooks.items
            or hooks.args
            or (len(args) == 7 and args[6] not in (None, {}))
        ):
            raise Declined(f"{name!r}: unexpected rebuild arguments")
        dtype = STORAGE_DTYPES.get(storage.kind.name)
        size = itemsize(dtype) if dtype else None
        if dtype is None or size is None:
            raise Declined(f"{name!r}: storage {storage.kind.name}")
        if stride != contiguous(shape):
            raise Declined(f"{name!r} is a strided view")
        record = by_name.get(f"{self.prefix}data/{storage.key}")
        numel = 1
        for d in shape:
            numel *= d
        if record is None or storage.numel * size > record.size or offset + numel > storage.numel:
            raise Declined(f"{name!r}: storage out of its record")
        # torch keeps the class and size of a key's first reference for all later ones;
        # a key named as two storages is read as torch reads it, by torch
        first = self._storages.setdefault(storage.key, storage)
        if (first.kind.name, first.numel) != (storage.kind.name, storage.numel):
            raise Declined(f"{name!r}: storage {storage.key!r} named with two types or sizes")
        self.storage_records[storage.key] = record
        start = record.start + offset * size
        return Entry(
            name,
            dtype,
            shape,
            numel * size,
            FileBlob(self, start, numel * size),
            storage=((self.file_number << 33) + record.start, storage.numel * size),
            view=(offset * size, stride),
            file=self.path,
        )

    def entries(self) -> list[Entry]:
        return list(self._entries)


def open_torchzip(path: Path, file_number: int = 0) -> TorchZip | None:
    """The torch-free reader for ``path``, or None where torch must do the reading."""
    try:
        return TorchZip(path, file_number)
    except Exception:  # noqa: BLE001 - whatever goes wrong here, torch's reader decides
        return None
