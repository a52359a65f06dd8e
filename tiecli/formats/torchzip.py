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
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..checkpoint import CHUNK, Entry
from ..dtypes import itemsize
from ..io import ByteFile, FileBlob, writes
from ..io.writes import PAD_FROM, PAGE

# Storage classes torch pickles, and the element type each holds.
STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = ("collections", "OrderedDict")
ALIGN = 64  # torch aligns every record's data to 64 bytes unless the file records another
# The largest alignment a rewrite can honour: its padding lives in a 16-bit extra field.
MAX_ALIGN = 1 << 15
_ZIP64_LIMIT = 0xFFFFFFFF
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


class Declined(Exception):
    """Not a file this reader handles; the torch-based reader takes over."""


# -- the pickle, with placeholders ----------------------------------------------


class _Global:
    """A class or function the pickle names; never imported."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def key(self) -> tuple[str, str]:
        return (self.module, self.name)

    def __call__(self, *args: Any) -> _Call:
        return _Call(self, args)

    def __setstate__(self, state: Any) -> None:
        raise Declined("state set on a class")  # torch's loader refuses it too


class _Call:
    """What calling a :class:`_Global` would have returned: kept as the call.

    Only an ``OrderedDict`` takes items (SETITEMS) and state (BUILD, its
    ``_metadata``), as torch's weights-only loader allows; anything else declines.
    """

    __slots__ = ("func", "args", "state", "items")

    def __init__(self, func: _Global, args: tuple[Any, ...]):
        self.func, self.args = func, args
        self.state: Any = None
        self.items: dict[Any, Any] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.func.key() != _ORDERED_DICT:
            raise Declined("items set on something else than a dict")
        self.items[key] = value

    def __setstate__(self, state: Any) -> None:
        if self.func.key() != _ORDERED_DICT:
            raise Declined("state set on something else than a dict")
        self.state = state

    def with_items(self, items: dict[Any, Any]) -> _Call:
        new = _Call(self.func, self.args)
        new.state, new.items = self.state, items
        return new


class _Storage:
    """A storage the pickle refers to by key (its bytes are the record data/<key>)."""

    __slots__ = ("pid", "kind", "key", "numel")

    def __init__(self, pid: tuple[Any, ...]):
        self.pid = pid
        self.kind: _Global = pid[1]
        self.key: str = pid[2]
        self.numel: int = pid[4]

    def __setstate__(self, state: Any) -> None:
        raise Declined("state set on a storage")


def _holds_tensors(obj: Any) -> bool:
    """Whether a storage or tensor is anywhere inside ``obj``."""
    if isinstance(obj, _Storage):
        return True
    if isinstance(obj, _Call):
        return obj.func.key() != _ORDERED_DICT or any(
            _holds_tensors(x) for x in (obj.args, obj.state, *obj.items.items())
        )
    if isinstance(obj, dict):
        return any(_holds_tensors(k) or _holds_tensors(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds_tensors(x) for x in obj)
    return False


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (_REBUILD, _ORDERED_DICT) or (
            module == "torch" and name in STORAGE_DTYPES
        ):
            return _Global(module, name)
        raise Declined(f"names {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _Global)
            and pid[1].module == "torch"
            and isinstance(pid[2], str)
            and pid[3] == "cpu"
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise Declined("a storage reference of another shape")
        return _Storage(pid)


class _Pickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """Writes placeholders back as the globals, calls and storages they stand for."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Storage) else None

    def _save_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    def _save_call(self, obj: _Call) -> None:
        self.save_reduce(  # type: ignore[attr-defined]
            obj.func,
            obj.args,
            obj.state,
            None,
            iter(obj.items.items()) if obj.items else None,
            obj=obj,
        )

    dispatch[_Global] = _save_global  # type: ignore[assignment]
    dispatch[_Call] = _save_call  # type: ignore[assignment]


def dumps(top: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(top)
    return buf.getvalue()


# -- the archive -----------------------------------------------------------------


class _Record:
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


def _records(path: Path, fd: int, file_size: int) -> list[_Record]:
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
        if max(info.header_offset, info.file_size, file_size) >= _ZIP64_LIMIT:
            raise Declined("zip64")
        try:
            start = data_start(fd, info)
        except zipfile.BadZipFile as e:
            raise Declined("bad local header") from e
        if start + info.file_size > file_size:
            raise Declined("record past the end")
        out.append(_Record(info.filename, start, info.file_size, info.CRC))
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

    def _read(self, record: _Record) -> bytes:
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
            top = _Unpickler(io.BytesIO(raw)).load()
        except Declined:
            raise
        except Exception as e:  # noqa: BLE001 - damaged pickles fail in many ways
            raise Declined("unreadable pickle") from e
        if isinstance(top, _Call) and top.func.key() == _ORDERED_DICT and not top.args:
            items = top.items
            # state_dict()'s ``_metadata`` (module versions) is kept as it is; a tensor
            # hidden in the dict's state would escape both the rewrite and its check
            if top.state is not None and (
                not isinstance(top.state, dict)
                or set(top.state) != {"_metadata"}
                or _holds_tensors(top.state)
            ):
                raise Declined("state beside the state dict")
        elif isinstance(top, dict):
            items = top
        else:
            raise Declined("not a flat state dict")
        if not items or not all(isinstance(k, str) for k in items):
            raise Declined("not a flat state dict")
        self.top = top
        self.items: dict[str, _Call] = dict(items)
        self.storage_records: dict[str, _Record] = {}
        self._storages: dict[str, _Storage] = {}
        self._entries = [self._entry(name, call, by_name) for name, call in items.items()]

    def _entry(self, name: str, call: Any, by_name: dict[str, _Record]) -> Entry:
        if not (isinstance(call, _Call) and call.func.key() == _REBUILD and call.state is None):
            raise Declined(f"{name!r} is not a plain tensor")
        args = call.args
        if len(args) not in (6, 7) or not isinstance(args[0], _Storage):
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
            or not (isinstance(hooks, _Call) and hooks.func.key() == _ORDERED_DICT)
            or hooks.items
            or hooks.args
            or (len(args) == 7 and args[6] not in (None, {}))
        ):
            raise Declined(f"{name!r}: unexpected rebuild arguments")
        dtype = STORAGE_DTYPES.get(storage.kind.name)
        size = itemsize(dtype) if dtype else None
        if dtype is None or size is None:
            raise Declined(f"{name!r}: storage {storage.kind.name}")
        if stride != _contiguous(shape):
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


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def open_torchzip(path: Path, file_number: int = 0) -> TorchZip | None:
    """The torch-free reader for ``path``, or None where torch must do the reading."""
    try:
        return TorchZip(path, file_number)
    except Exception:  # noqa: BLE001 - whatever goes wrong here, torch's reader decides
        return None


# -- writing -----------------------------------------------------------------------


def write_shared(
    src: TorchZip,
    shared: dict[str, str],
    path: Path,
    copy: Callable[[int, int, int, int, int], None],
    placed: Callable[[int, int, int], None] = lambda at, n, src_at: None,
    reached: Callable[[int], None] = lambda n: None,
    copies: dict[str, str] | None = None,
) -> None:
    """Write ``src`` to ``path`` with each ``alias`` of ``shared`` saved as its source
    tensor itself (one storage, as ``torch.save`` writes a tensor kept twice), and
    each ``name`` of ``copies`` saved as a copy of its source tensor in a storage of
    its own (as ``torch.save`` writes ``source.clone()``): its record holds exactly
    the source tensor's bytes, copied from the input like any other record.

    ``placed(at, size, src_at)`` says where each record taken from ``src`` goes
    (``size`` bytes at ``at``, copied from ``src_at``) before it is written, and
    ``reached(n)`` that the first ``n`` bytes of the file are written: a reader
    can compare each record as soon as it is in.

    The archive is laid out as ``torch.save`` lays it out, since torch computes
    record offsets from that layout instead of reading them when it loads onto the
    ``meta`` device (and when configured to for any load): storages numbered
    in the order the pickle first names them, each record's data aligned as the
    source records it (64 bytes unless ``.storage_alignment`` says otherwise)
    and followed by a data descriptor. Storage records nothing refers to
    any more are left out; the others are copied byte for byte with
    ``copy(src_fd, dst_fd, src_offset, dst_offset, size)``.
    """
    items = dict(src.items)
    for alias, source in shared.items():
        if alias in items and source in items:
            items[alias] = items[source]
    made: dict[int, _Record] = {}  # id of a copy's call -> where its bytes are in src
    for name, source in (copies or {}).items():
        if source in src.items:
            items[name] = _clone(src, src.items[source], made)
    renamed: dict[str, _Storage] = {}  # old key -> the storage under its new key
    records: dict[str, _Record] = {}  # new key -> the bytes its record is copied from
    calls: dict[int, _Call] = {}
    for name, call in items.items():
        if id(call) not in calls:
            old = call.args[0]
            if id(call) in made:  # a copy: a storage of its own, never shared
                storage = _Storage((*old.pid[:2], str(len(records)), *old.pid[3:]))
                records[storage.key] = made[id(call)]
            else:
                if old.key not in renamed:
                    pid = (*old.pid[:2], str(len(records)), *old.pid[3:])
                    renamed[old.key] = _Storage(pid)
                    records[renamed[old.key].key] = src.storage_records[old.key]
                storage = renamed[old.key]
            new = _Call(call.func, (storage, *call.args[1:]))
            calls[id(call)] = new
        items[name] = calls[id(call)]
    top = src.top.with_items(items) if isinstance(src.top, _Call) else items
    pkl = dumps(top)

    # every data/ record is a storage: those the new pickle names are written under their
    # new keys, the others (aliases' copies, records nothing named) are left out
    storage_names = {r.name for r in src.records if r.name.startswith(src.prefix + "data/")}
    first = next(
        (i for i, r in enumerate(src.records) if r.name in storage_names), len(src.records)
    )
    tail = [r for r in src.records[first:] if r.name not in storage_names]
    order: list[tuple[str, _Record]] = [(r.name, r) for r in src.records[:first]]
    order += [(src.prefix + "data/" + key, record) for key, record in records.items()]
    order += [(r.name, r) for r in tail]

    pkl += b" " * _page_pad(src, order, pkl)
    central = []
    pending = bytearray()  # small pieces, written together before each kernel copy
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        pos = 0  # where pending starts
        for name_text, record in order:
            data = pkl if record.name == src.prefix + "data.pkl" else None
            size = len(data) if data is not None else record.size
            crc = zlib.crc32(data) if data is not None else record.crc
            raw = name_text.encode()
            at = pos + len(pending)
            pad = _padding(at, raw, src.alignment)
            extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch writes
            # sizes and checksum follow the data, in a descriptor (flag bit 3), as torch writes
            pending += struct.pack(
                "<IHHHHHIIIHH", 0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(raw), len(extra)
            )
            pending += raw + extra
            central.append((raw, crc, size, at))
            if data is None:
                placed(at + 30 + len(raw) + len(extra), size, record.start)
            if data is None and size >= _COPY_FROM:
                pos += writes.write_all(fd, bytes(pending), pos)
                pending.clear()
                reached(pos)
                with src.opened() as src_fd:
                    copy(src_fd, fd, record.start, pos, size)
                pos += size
                reached(pos)
            else:
                pending += data if data is not None else src.pread(record.start, size)
            pending += struct.pack("<IIII", 0x08074B50, crc, size, size)
        start = pos + len(pending)
        for raw, crc, size, offset in central:
            pending += struct.pack(
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
            pending += raw
        end = pos + len(pending)
        if end >= _ZIP64_LIMIT or len(central) > 0xFFFF:
            raise Declined("output would need zip64")
        pending += struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), end - start, start, 0
        )
        pos += writes.write_all(fd, bytes(pending), pos)
        reached(pos)
    finally:
        os.close(fd)


def _clone(src: TorchZip, call: _Call, made: dict[int, _Record]) -> _Call:
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
    hooks = _Call(rest[1].func, ())  # an empty OrderedDict of its own, as torch writes it
    pid = (storage.pid[0], storage.kind, storage.key, storage.pid[3], numel)
    clone = _Call(
        call.func, (_Storage(pid), 0, shape, _contiguous(shape), rest[0], hooks, *rest[2:])
    )
    made[id(clone)] = _Record(src.prefix + "data/copy", start, nbytes, crc)
    return clone


_COPY_FROM = 1 << 20  # records this large are copied in the kernel; smaller ones read


def _padding(at: int, raw: bytes, alignment: int) -> int:
    """Bytes of "FB" padding that put the data of record ``raw`` (its local header at
    ``at``, the extra field's own 4 bytes included) on an ``alignment``-byte boundary,
    as torch writes it and computes it."""
    return -(at + 30 + len(raw) + 4) % alignment


def _page_pad(src: TorchZip, order: list[tuple[str, _Record]], pkl: bytes) -> int:
    """Spaces to add after the pickle's STOP (unpicklers stop there) so that the largest
    record copied lands at the same offset within a page as in ``src``: the kernel then
    copies whole pages. Every later record moves by the same multiple of the alignment,
    so the layout stays the one torch computes."""
    pos, places = 0, []
    for name, record in order:
        size = len(pkl) if record.name == src.prefix + "data.pkl" else record.size
        raw = name.encode()
        start = pos + 30 + len(raw) + 4 + _padding(pos, raw, src.alignment)
        places.append((record, start))
        pos = start + size + 16  # the data descriptor
    copied = [(r.size, r.start - at) for r, at in places if r.name != src.prefix + "data.pkl"]
    first = next(i for i, (r, _at) in enumerate(places) if r.name == src.prefix + "data.pkl")
    if not copied or first != 0:
        return 0
    size, shift = max(copied)
    pad = shift % PAGE
    return pad if size >= PAD_FROM and pad % src.alignment == 0 else 0


_FLAGS = 0x808  # data descriptor follows the data; names are UTF-8
