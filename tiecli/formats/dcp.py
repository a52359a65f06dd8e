"""Torch distributed checkpoints (DCP): a folder of ``.distcp`` files plus ``.metadata``.

``torch.distributed.checkpoint.save`` (FSDP/FSDP2, torchtitan, Megatron's
``torch_dist``) writes, from many ranks at once, one or more ``.distcp`` files per
rank and a ``.metadata`` pickle naming, for every tensor of the state dict, its
dtype, full shape and chunks (offsets and sizes within the tensor), and where each
chunk's bytes lie (file, offset, length). With the default (``torch_save``)
serialisation each chunk is a whole ``torch.save`` zip archive of the chunk
tensor, embedded in the ``.distcp`` file at that offset.

Read here without torch and without running pickle code:

- ``.metadata`` through an unpickler that knows exactly the classes DCP metadata
  holds (read from torch/distributed/checkpoint/metadata.py and filesystem.py)
  and builds inert stand-ins for them; any other global is refused;
- each chunk's zip archive through :mod:`zipfile` over its byte range, and its
  ``data.pkl`` through :mod:`tiecli.formats.torchzip`'s placeholder unpickler,
  which gives the byte range of the chunk's elements in the file;
- a tensor's bytes in row-major order as runs of byte ranges in those files
  (one run per chunk when chunks split dimension 0, as FSDP2 does), read by
  position on demand: nothing holds the checkpoint in memory.

The writer side is :func:`shard_plan`: a deduped plan laid out as a Hugging Face
safetensors folder (``model.safetensors`` or ``model-0000i-of-0000n`` plus an
index), which :mod:`tiecli.write.run` writes by copying each run in the kernel.
"""

from __future__ import annotations

import bisect
import io
import math
import mmap
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, Entry
from ..dtypes import TORCH_TO_CODE, itemsize, uint_view
from ..errors import CheckpointFormatError, UnsafePickleError
from .confine import escapes
from .safetensors import ByteFile

METADATA = ".metadata"
SUFFIX = ".distcp"
MAX_METADATA = 1 << 30  # the largest .metadata read (thousands of ranks: some 100 MB)
MAX_RUNS = 1 << 20  # byte runs one tensor may be made of (chunks split along inner dims)
MAX_SHARD_SIZE = 50 * 10**9  # transformers 5 save_pretrained's default "50GB"
NESTED_KEYS = ("model", "state_dict", "module")  # where a training state keeps the model

_META = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_CLASSES = {
    (_META, "Metadata"),
    (_META, "TensorStorageMetadata"),
    (_META, "TensorProperties"),
    (_META, "ChunkStorageMetadata"),
    (_META, "BytesStorageMetadata"),
    (_META, "StorageMeta"),
    (_META, "MetadataIndex"),
    (_FS, "_StorageInfo"),
}
_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}


def is_dcp(path: Path) -> bool:
    """Whether ``path`` is a DCP folder (or the ``.metadata`` file of one)."""
    if path.name == METADATA and path.is_file():
        return True
    return path.is_dir() and (path / METADATA).is_file()


# -- .metadata, through an allow-list ------------------------------------------------


class _Obj:
    """An instance of one of DCP's metadata dataclasses, as plain attributes."""

    kind = ""

    def __new__(cls, *args: Any) -> _Obj:  # NEWOBJ: cls.__new__(cls, *args)
        if args:
            raise pickle.UnpicklingError(f"{cls.kind} built with arguments")
        return object.__new__(cls)

    def __init__(self, *args: Any) -> None:
        raise pickle.UnpicklingError(f"{self.kind} called")  # dataclasses are never REDUCEd

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            self.__dict__.update(state)
        elif self.kind == "TensorProperties" and isinstance(state, tuple):
            self.__dict__["state"] = state  # (dtype, layout, requires_grad, format, pinned)
        else:
            raise pickle.UnpicklingError(f"{self.kind} with a state of another shape")


_KINDS = {name: type(name, (_Obj,), {"kind": name}) for _module, name in _CLASSES}


class _Dtype(str):
    """A torch dtype the metadata names (``torch.float32``): its attribute name."""


def _size(dims: Any = ()) -> tuple[int, ...]:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise pickle.UnpicklingError("a torch.Size of something else than integers")
    return tuple(dims)


def _layout(name: Any) -> str:
    if not isinstance(name, str):
        raise pickle.UnpicklingError("a layout that is not named")
    return name


def _mem_format(value: Any) -> int:
    if type(value) is not int:
        raise pickle.UnpicklingError("a memory format that is not a number")
    return value


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError("a path of something else than strings")
    return "/".join(parts)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: io.BytesIO, where: Path):
        super().__init__(data)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CLASSES:
            return _KINDS[name]
        if module == _META and name == "_MEM_FORMAT_ENCODING":
            return _mem_format
        if module == "torch" and name == "Size":
            return _size
        if module == "torch" and name in TORCH_TO_CODE:
            return _Dtype(name)
        if module == "torch.serialization" and name == "_get_layout":
            return _layout
        if module == "pathlib" and name in _PATHS:
            return _path
        raise UnsafePickleError(
            f"{METADATA} names {module}.{name}, which torch distributed checkpoint metadata "
            "never holds; tiecli does not load it (a pickle that could run code)",
            self.where,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent reference")


def read_metadata(path: Path) -> Any:
    """The ``Metadata`` stand-in of a ``.metadata`` file, no code of it run."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_METADATA:
                raise CheckpointFormatError(f"is larger than {MAX_METADATA >> 30} GiB", path)
            raw = f.read(MAX_METADATA + 1)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read: {e.strerror}", path) from None
    if len(raw) > MAX_METADATA:
        raise CheckpointFormatError(f"is larger than {MAX_METADATA >> 30} GiB", path)
    try:
        top = _MetadataUnpickler(io.BytesIO(raw), path).load()
    except CheckpointFormatError:
        raise
    except Exception:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise CheckpointFormatError(
            "is not a torch distributed checkpoint metadata pickle (damaged or truncated?)", path
        ) from None
    if not isinstance(top, _KINDS["Metadata"]):
        raise CheckpointFormatError("does not hold a torch distributed checkpoint Metadata", path)
    return top


# -- the chunks ------------------------------------------------------------------------


class _Window(io.RawIOBase):
    """``length`` bytes at ``start`` of a file, as a seekable stream for :mod:`zipfile`."""

    def __init__(self, file: ByteFile, start: int, length: int):
        self.file, self.start, self.length, self.pos = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.length)[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n:
            memoryview(b)[:n] = self.file.pread(self.start + self.pos, n)
        self.pos += n
        return n


class _Chunk:
    __slots__ = ("offsets", "sizes", "file", "start")

    def __init__(
        self, offsets: tuple[int, ...], sizes: tuple[int, ...], file: ByteFile, start: int
    ):
        self.offsets, self.sizes, self.file, self.start = offsets, sizes, file, start


def _chunk_bytes(
    file: ByteFile, start: int, length: int, dtype: str, sizes: tuple[int, ...], fail: Any
) -> int:
    """Where in ``file`` the elements of a chunk saved with ``torch.save`` at
    ``start`` (``length`` bytes) begin; checked against the chunk's dtype and sizes."""
    from .torchzip import _REBUILD, STORAGE_DTYPES, Declined, _Call, _contiguous, _Storage
    from .torchzip import _Unpickler as _TensorUnpickler

    try:
        with zipfile.ZipFile(_Window(file, start, length)) as z:
            infos = z.infolist()
    except Exception:  # noqa: BLE001 - zipfile raises many kinds on damaged bytes
        raise fail("is not a torch.save archive (damaged, or another serialisation)") from None
    records: dict[str, tuple[int, int, int]] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise fail("holds a compressed or encrypted record")
        head = (
            file.pread(start + info.header_offset, 30) if info.header_offset + 30 <= length else b""
        )
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise fail("has a damaged record header")
        at = info.header_offset + 30 + int.from_bytes(head[26:28], "little")
        at += int.from_bytes(head[28:30], "little")
        if at + info.file_size > length:
            raise fail("has a record running past its end")
        records[info.filename.split("/", 1)[-1]] = (at, info.file_size, info.CRC)
    if "data.pkl" not in records or records["data.pkl"][1] > 1 << 20:
        raise fail("has no tensor pickle (data.pkl)")
    at, size, crc = records["data.pkl"]
    raw = file.pread(start + at, size)
    if zlib.crc32(raw) != crc:
        raise fail("fails its checksum")
    try:
        call = _TensorUnpickler(io.BytesIO(raw)).load()
    except Declined as e:
        raise fail(f"is not a plain tensor ({e})") from None
    except Exception:  # noqa: BLE001 - damaged pickles fail in many ways
        raise fail("has an unreadable tensor pickle") from None
    if not (isinstance(call, _Call) and call.func.key() == _REBUILD and len(call.args) >= 4):
        raise fail("is not a plain tensor")
    storage, offset, shape, stride = call.args[:4]
    if not isinstance(storage, _Storage) or STORAGE_DTYPES.get(storage.kind.name) != dtype:
        raise fail(f"holds another element type than the metadata's {dtype}")
    if shape != sizes or stride != _contiguous(sizes) or type(offset) is not int or offset < 0:
        raise fail(f"holds a tensor of another shape than the metadata's {list(sizes)}")
    item = itemsize(dtype) or 1
    record = records.get(f"data/{storage.key}")
    numel = math.prod(sizes)
    if record is None or (offset + numel) * item > record[1]:
        raise fail("holds fewer bytes than its shape needs (truncated?)")
    return start + record[0] + offset * item


def _runs(
    name: str, shape: tuple[int, ...], item: int, chunks: list[_Chunk], fail: Any
) -> list[tuple[int, ByteFile, int, int]]:
    """The tensor's bytes as (position in the tensor, file, file offset, length), in
    order, each a contiguous piece of one chunk; the chunks must cover the tensor once."""
    strides = [item * math.prod(shape[i + 1 :]) for i in range(len(shape))]
    runs: list[tuple[int, ByteFile, int, int]] = []
    for c in chunks:
        # the innermost dimension the chunk does not span: below it, whole rows are contiguous
        d = max((i for i in range(len(shape)) if c.sizes[i] != shape[i]), default=0)
        length = (c.sizes[d] if shape else 1) * (strides[d] if shape else item)
        outer = c.sizes[:d]
        count = math.prod(outer)
        if count == 0 or length == 0:
            continue
        if len(runs) + count > MAX_RUNS:
            raise fail(f"tensor {name!r} is split into more than {MAX_RUNS} pieces")
        base = sum(o * s for o, s in zip(c.offsets, strides, strict=True))
        for j in range(count):
            pos, rest = base, j
            for i in reversed(range(d)):
                rest, k = divmod(rest, outer[i])
                pos += k * strides[i]
            runs.append((pos, c.file, c.start + j * length, length))
    runs.sort(key=lambda r: r[0])
    merged: list[tuple[int, ByteFile, int, int]] = []
    end = 0
    for pos, f, at, n in runs:
        if pos != end:
            why = "overlap" if pos < end else "leave a gap"
            raise fail(f"tensor {name!r}: its chunks {why} (at byte {min(pos, end)})")
        last = merged[-1] if merged else None
        if last is not None and last[1] is f and last[2] + last[3] == at:
            merged[-1] = (last[0], f, last[2], last[3] + n)
        else:
            merged.append((pos, f, at, n))
        end = pos + n
    if end != item * math.prod(shape):
        raise fail(f"tensor {name!r}: its chunks do not cover it")
    return merged


class DcpBlob:
    """A tensor's bytes, row-major, gathered from its chunks' byte ranges."""

    __slots__ = ("nbytes", "_pos", "_runs")

    def __init__(self, runs: list[tuple[int, ByteFile, int, int]], nbytes: int):
        self._runs = runs
        self._pos = [r[0] for r in runs]
        self.nbytes = nbytes

    @property
    def ranges(self) -> list[tuple[ByteFile, int, int]]:
        """(file, offset, length) pieces in order, for a writer to copy in the kernel."""
        return [(f, at, n) for _pos, f, at, n in self._runs]

    @property
    def order(self) -> tuple[int, int]:
        if not self._runs:
            return (0, 0)
        return (self._runs[0][1].file_number, self._runs[0][2])

    def readinto(self, offset: int, view: memoryview) -> None:
        i = max(0, bisect.bisect_right(self._pos, offset) - 1)
        done = 0
        while done < len(view):
            pos, f, at, n = self._runs[i]
            skip = offset + done - pos
            k = min(n - skip, len(view) - done)
            f.preadinto(at + skip, view[done : done + k])
            done += k
            i += 1

    def window(self, offset: int, length: int) -> tuple[mmap.mmap, int]:
        """A mapping holding ``length`` bytes at ``offset`` (close it when done), and where
        they start in it: a copy-on-write mapping of the file when one run holds them all
        (nothing copied to user space), else an anonymous one they are read into."""
        i = max(0, bisect.bisect_right(self._pos, offset) - 1)
        pos, f, at, n = self._runs[i] if self._runs else (0, None, 0, 0)
        if f is not None and offset + length <= pos + n:
            absolute = at + offset - pos
            start = absolute - absolute % mmap.ALLOCATIONGRANULARITY
            f.bytes_read += length
            with f.opened() as fd:
                m = mmap.mmap(fd, absolute + length - start, offset=start, access=mmap.ACCESS_COPY)
            return m, absolute - start
        m = mmap.mmap(-1, max(length, 1))
        view = memoryview(m)
        try:
            self.readinto(offset, view[:length])
        finally:
            view.release()
        return m, 0

    def read(self, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        import numpy as np

        view = uint_view(dtype)
        if view is None:
            return None
        buf = bytearray(self.nbytes)
        self.readinto(0, memoryview(buf))
        return np.frombuffer(buf, dtype=view).reshape(shape)


# -- the checkpoint ---------------------------------------------------------------------


def _get(obj: Any, attr: str, kind: Any, fail: Any, what: str) -> Any:
    value = obj.__dict__.get(attr) if isinstance(obj, _Obj) else None
    if not isinstance(value, kind):
        raise fail(f"its {what} is missing or malformed")
    return value


def _model_part(meta: Any, names: list[str]) -> tuple[str | None, list[str]]:
    """Which tensors are the model's: in a nested training state (``{"model": ...,
    "optim": ...}``) those under the model's key, named without it; else the top-level
    tensors (a flat state dict), leaving out nested entries such as optimizer state."""
    planner = meta.__dict__.get("planner_data")
    paths: dict[str, tuple[Any, ...]] = {}
    for name in names:
        path = planner.get(name) if isinstance(planner, dict) else None
        if not isinstance(path, tuple) or not path:
            path = tuple(name.split(".", 1)) if "." in name else (name,)
            if not isinstance(planner, dict) and not any(
                n.startswith(("optim.", "optimizer.")) for n in names
            ):
                path = (name,)  # without the planner's paths, nested only beside an optimizer
        paths[name] = path
    top = [n for n in names if len(paths[n]) == 1]
    if top:
        return None, top
    tops = {str(p[0]) for p in paths.values()}
    part = next((k for k in NESTED_KEYS if k in tops), None)
    if part is None:
        return None, names
    return part, [n for n in names if str(paths[n][0]) == part]


def open_dcp(path: Path) -> Checkpoint:
    """A DCP folder as a :class:`Checkpoint` (format ``dcp``): the model's tensors, each
    read from its chunks; other entries (optimizer state, values) are left out."""
    folder = path.parent if path.name == METADATA else path
    meta_path = folder / METADATA
    why = escapes(folder, meta_path)
    if why is not None:
        raise CheckpointFormatError(f"{why}; tiecli does not follow it", meta_path)
    meta = read_metadata(meta_path)

    def fail_meta(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(what, meta_path)

    state = _get(meta, "state_dict_metadata", dict, fail_meta, "state_dict_metadata")
    storage = _get(meta, "storage_data", dict, fail_meta, "storage_data")
    tensors = {k: v for k, v in state.items() if isinstance(v, _KINDS["TensorStorageMetadata"])}
    if not all(isinstance(k, str) for k in state) or not all(
        isinstance(v, (_KINDS["TensorStorageMetadata"], _KINDS["BytesStorageMetadata"]))
        for v in state.values()
    ):
        raise fail_meta("its state_dict_metadata holds something else than tensors and values")
    where: dict[tuple[str, tuple[int, ...]], Any] = {}
    for index, info in storage.items():
        fqn = _get(index, "fqn", str, fail_meta, "storage index")
        offset = index.__dict__.get("offset")
        if not isinstance(info, _KINDS["_StorageInfo"]):
            raise fail_meta(f"the storage of {fqn!r} is malformed")
        if isinstance(offset, tuple):
            where[(fqn, offset)] = info
    part, kept = _model_part(meta, list(tensors))
    prefix = f"{part}." if part else ""

    files: dict[str, _DistcpFile] = {}
    entries: dict[str, Entry] = {}
    try:
        for fqn in kept:
            name = fqn[len(prefix) :]
            entries[name] = _entry(folder, meta_path, fqn, name, tensors[fqn], where, files)
    except BaseException:
        for f in files.values():
            f.close()
        raise
    if not entries:
        raise fail_meta("names no tensor of a model")
    readers: list[Any] = list(files.values())
    weight_files = [meta_path] + sorted(
        {f.path for f in readers} | set(folder.glob("*" + SUFFIX)), key=lambda p: p.name
    )
    ckpt = Checkpoint(
        folder, "dcp", entries, weight_files, folder=folder, nested_key=part, readers=readers
    )
    if part:
        ckpt.notes.append(f"using the state dict under key {part!r} (its tensors named {part}.*)")
    elif len(kept) < len(tensors):
        ckpt.notes.append(f"left out {len(tensors) - len(kept)} tensors beside the model's")
    return ckpt


def _entry(
    folder: Path,
    meta_path: Path,
    fqn: str,
    name: str,
    tmeta: Any,
    where: dict[tuple[str, tuple[int, ...]], Any],
    files: dict[str, _DistcpFile],
) -> Entry:
    def fail(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"tensor {fqn!r}: {what}", meta_path)

    props = tmeta.__dict__.get("properties")
    shape = tmeta.__dict__.get("size")
    chunks = tmeta.__dict__.get("chunks")
    pstate = props.__dict__.get("state") if isinstance(props, _Obj) else None
    if not (isinstance(pstate, tuple) and len(pstate) == 5 and isinstance(pstate[0], _Dtype)):
        raise fail("its properties are malformed")
    if pstate[1] != "torch.strided":
        raise fail(f"its layout {pstate[1]!r} is not a dense (strided) tensor")
    dtype = TORCH_TO_CODE[pstate[0]]
    item = itemsize(dtype)
    if item is None:
        raise fail(f"its element type {pstate[0]} has no whole-byte size")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise fail("its size is malformed")
    if not isinstance(chunks, list) or not chunks:
        raise fail("it has no chunks")
    parsed: list[_Chunk] = []
    for c in chunks:
        if not isinstance(c, _KINDS["ChunkStorageMetadata"]):
            raise fail("a chunk is malformed")
        offsets, sizes = c.__dict__.get("offsets"), c.__dict__.get("sizes")
        if not (
            isinstance(offsets, tuple)
            and isinstance(sizes, tuple)
            and len(offsets) == len(sizes) == len(shape)
        ):
            raise fail("a chunk is malformed")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise fail(f"a chunk (offsets {list(offsets)}, sizes {list(sizes)}) is out of range")
        info = where.get((fqn, offsets))
        if info is None:
            raise fail(f"the chunk at offsets {list(offsets)} has no storage entry")
        rel = info.__dict__.get("relative_path")
        start, length = info.__dict__.get("offset"), info.__dict__.get("length")
        if info.__dict__.get("transform_descriptors"):
            raise fail("its chunks are stored transformed (compressed); tiecli reads plain ones")
        if not isinstance(rel, str) or type(start) is not int or type(length) is not int:
            raise fail("a chunk's storage entry is malformed")
        file = _file(folder, meta_path, rel, files, fail)
        if start < 0 or length < 0 or start + length > file.size:
            raise fail(
                f"a chunk's bytes ({length} at {start}) lie outside {rel} ({file.size} bytes)"
            )

        def chunk_fail(what: str, rel: str = rel, start: int = start) -> CheckpointFormatError:
            return fail(f"the chunk at byte {start} of {rel} {what}")

        at = _chunk_bytes(file, start, length, dtype, sizes, chunk_fail)
        parsed.append(_Chunk(offsets, sizes, file, at))
    runs = _runs(fqn, shape, item, parsed, lambda what: CheckpointFormatError(what, meta_path))
    nbytes = item * math.prod(shape)
    return Entry(name, dtype, shape, nbytes, DcpBlob(runs, nbytes), file=meta_path)


def _file(
    folder: Path, meta_path: Path, rel: str, files: dict[str, _DistcpFile], fail: Any
) -> _DistcpFile:
    if rel in files:
        return files[rel]
    if "/" in rel or os.sep in rel or rel in ("", ".", ".."):
        raise fail(f"its chunks name the file {rel!r}, outside the checkpoint folder")
    p = folder / rel
    why = escapes(folder, p)
    if why is not None:
        raise fail(f"its chunks' file {rel} {why}; tiecli does not follow it")
    if not p.is_file():
        raise fail(f"its chunks' file {rel} does not exist")
    try:
        f = _DistcpFile(p, len(files))
    except OSError as e:
        raise fail(f"cannot open its chunks' file {rel}: {e.strerror}") from None
    files[rel] = f
    return f


class _DistcpFile(ByteFile):
    """One ``.distcp`` file, read by position; its size fixed when opened."""

    def __init__(self, path: Path, file_number: int):
        super().__init__(path, file_number)
        self.size = os.fstat(self._fd).st_size

    def _short_read(self, offset: int) -> Exception:
        return CheckpointFormatError("short read (file changed or truncated?)", self.path)


# -- writing: a Hugging Face folder -------------------------------------------------------


def shard_plan(plan: Any, max_shard_size: int = MAX_SHARD_SIZE) -> None:
    """Lay ``plan``'s tensors out as ``save_pretrained`` does: in order, a new shard
    whenever the next tensor would take the current one past ``max_shard_size`` (a
    tensor larger than that alone in its shard); one file is ``model.safetensors``,
    several are ``model-0000i-of-0000n.safetensors`` with an index holding the record."""
    from ..plan import FilePlan

    tensors = [t for f in plan.files for t in f.tensors]
    meta = dict(plan.files[0].metadata) if plan.files else {"format": "pt"}
    shards: list[list[Any]] = []
    size = 0
    for t in tensors:
        if not shards or (size + t.nbytes > max_shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) <= 1:
        plan.files = [FilePlan("model.safetensors", shards[0] if shards else [], meta)]
        plan.index_metadata = None
        return
    n = len(shards)
    plan.files = [
        FilePlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s, {"format": "pt"})
        for i, s in enumerate(shards)
    ]
    plan.index_metadata = meta
