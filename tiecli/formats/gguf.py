"""GGUF checkpoints (llama.cpp): reading.

The header is walked here, over a read-only mapping, with gguf-py's
constants: every count, length and offset is checked against the file size
before anything is built from it, and the walk yields the architecture, the
alignment and the tensor infos. gguf-py's ``GGUFReader`` trusts the counts it
reads, and takes some 20 s over the 300,000 strings of a real vocabulary; it
reads what tiecli writes (:mod:`.gguf_write`), after the walk has passed it.
Tensor bytes are never read except to compare a tie candidate. What a missing
head means is the head rule's (:mod:`.gguf_heads`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..errors import CheckpointFormatError, MissingDependencyError
from ..io import ByteFile, FileBlob, open_input
from ..lean import dataclass
from .gguf_heads import HEAD, head_kind

SUFFIX = ".gguf"
MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays, deeper than any writer makes
MAX_NAME = 65535  # bytes of a key or tensor name (llama.cpp's tensor names take 64)
# bytes a key/value and a tensor info take at the least: what bounds their counts
MIN_KV = 8 + 4 + 1
MIN_TENSOR_INFO = 8 + 4 + 4 + 8


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError(
            "reading GGUF needs the gguf package", hint="pip install 'tiecli[gguf]'"
        ) from None
    return gguf


def quoted(name: str) -> str:
    """A name read from the file, quoted for a message: escaped, and cut when long."""
    return repr(name if len(name) <= 80 else name[:80] + "...")


def is_gguf(path: Path) -> bool:
    """A ``.gguf`` name, or a file that starts with the GGUF magic."""
    if path.suffix == SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a GGUF file's tensor table."""

    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the innermost
    type: int  # GGMLQuantizationType value
    offset: int  # from the start of the data section
    nbytes: int


class GGUFFile(ByteFile):
    """One open GGUF file: validated header, ``GGUFReader`` fields, positioned reads."""

    def __init__(self, path: Path, file_number: int = 0, with_gguf: bool = False):
        """``with_gguf``: also parse the header with ``GGUFReader`` (``fields``), its
        tensor infos checked against the walk's."""
        super().__init__(path, file_number, open_input(path, ".gguf"))
        try:
            with self.opened() as fd:
                self.size = os.fstat(fd).st_size
            self._walk()
            if with_gguf:
                self._parse()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str, hint: str | None = None) -> CheckpointFormatError:
        return CheckpointFormatError(what, self.path, hint=hint)

    def short_read(self, offset: int) -> Exception:
        return self._fail("short read (file changed or truncated?)")

    # -- the header, bounds only ------------------------------------------

    def _walk(self) -> None:
        """Check every count, length and offset of the header against the file."""
        gguf = _gguf()
        if self.size < 24:
            raise self._fail(f"file is {self.size} bytes, too short for a GGUF header")
        buf = self.view()
        if buf[:4] != MAGIC:
            raise self._fail("does not start with the GGUF magic (not a GGUF file)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version & 0xFFFF == 0 and version:
            raise self._fail("is a big-endian GGUF file; tiecli reads little-endian GGUF only")
        if version not in (2, 3):
            raise self._fail(f"is GGUF version {version}; tiecli reads versions 2 and 3")
        pos = 24
        if n_kv > (self.size - pos) // MIN_KV:
            raise self._fail(f"header claims {n_kv} metadata keys, more than the file can hold")
        types = gguf.GGUFValueType
        scalar = {
            types.UINT8: 1,
            types.INT8: 1,
            types.BOOL: 1,
            types.UINT16: 2,
            types.INT16: 2,
            types.UINT32: 4,
            types.INT32: 4,
            types.FLOAT32: 4,
            types.UINT64: 8,
            types.INT64: 8,
            types.FLOAT64: 8,
        }
        scalar_codes = {int(k): v for k, v in scalar.items()}
        string, array = int(types.STRING), int(types.ARRAY)
        unsigned = {int(t) for t in (types.UINT8, types.UINT16, types.UINT32, types.UINT64)}

        def need(at: int, n: int, what: str) -> None:
            if n < 0 or at + n > self.size:
                raise self._fail(f"{what} runs past the end of the file (truncated?)")

        def text(at: int, what: str) -> tuple[str, int]:
            need(at, 8, what)
            (n,) = struct.unpack_from("<Q", buf, at)
            need(at + 8, n, what)
            if n > MAX_NAME:
                raise self._fail(f"{what} is {n} bytes long (at most {MAX_NAME})")
            try:
                return buf[at + 8 : at + 8 + n].decode("utf-8"), at + 8 + n
            except UnicodeDecodeError:
                raise self._fail(f"{what} is not UTF-8") from None

        def skip_string(at: int, what: str) -> int:
            need(at, 8, what)
            (n,) = struct.unpack_from("<Q", buf, at)
            need(at + 8, n, what)
            return at + 8 + n

        def value(at: int, vtype: int, key: str, depth: int) -> int:
            if vtype in scalar_codes:
                need(at, scalar_codes[vtype], f"metadata {quoted(key)}")
                return at + scalar_codes[vtype]
            if vtype == string:
                return skip_string(at, f"metadata {quoted(key)}")
            if vtype != array:
                raise self._fail(f"metadata {quoted(key)} has unknown value type {vtype}")
            if depth >= MAX_NESTING:
                raise self._fail(
                    f"metadata {quoted(key)} nests arrays more than {MAX_NESTING} deep"
                )
            need(at, 12, f"metadata {quoted(key)}")
            item, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if item in scalar_codes:
                need(at, count * scalar_codes[item], f"metadata {quoted(key)}")
                return at + count * scalar_codes[item]
            least = 8 if item == string else 12
            if count > (self.size - at) // least:
                raise self._fail(
                    f"metadata {quoted(key)} claims {count} array items, more than the file can hold"
                )
            for _ in range(count):
                at = value(at, item, key, depth + 1)
            return at

        self.kv_start = pos
        alignment = None
        keys: set[str] = set()
        self.architecture: str | None = None
        for _ in range(n_kv):
            key, pos = text(pos, "a metadata key")
            if key in keys:
                raise self._fail(f"names metadata key {quoted(key)} twice")
            keys.add(key)
            need(pos, 4, f"metadata {quoted(key)}")
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            start = pos
            pos = value(pos, vtype, key, 0)
            if key == "general.alignment":
                if vtype != int(types.UINT32):
                    raise self._fail("general.alignment is not a uint32")
                (alignment,) = struct.unpack_from("<I", buf, start)
                if alignment == 0 or alignment & (alignment - 1):
                    raise self._fail(f"general.alignment {alignment} is not a power of two")
            elif key == "general.architecture" and vtype == string:
                self.architecture = buf[start + 8 : pos].decode("utf-8", "replace")
            elif key == "split.count" and vtype in unsigned:
                split = int.from_bytes(buf[start:pos], "little")
                if split > 1:
                    raise self._fail(
                        f"is one part of a split GGUF ({split} parts): its tie lies across "
                        "the parts",
                        hint="merge it first: llama-gguf-split --merge FIRST-PART merged.gguf",
                    )
        self.kv_end = pos
        self.alignment = alignment or int(gguf.GGUF_DEFAULT_ALIGNMENT)
        self.version, self.n_kv = version, n_kv

        if n_tensors > (self.size - pos) // MIN_TENSOR_INFO:
            raise self._fail(f"header claims {n_tensors} tensors, more than the file can hold")
        sizes = gguf.GGML_QUANT_SIZES
        infos: list[TensorInfo] = []
        for _ in range(n_tensors):
            name, pos = text(pos, "a tensor name")
            need(pos, 4, f"tensor {quoted(name)}")
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if n_dims > MAX_DIMS:
                raise self._fail(
                    f"tensor {quoted(name)} has {n_dims} dimensions (at most {MAX_DIMS})"
                )
            need(pos, 8 * n_dims + 12, f"tensor {quoted(name)}")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, type_size = sizes[qtype]
            except (ValueError, KeyError):
                raise self._fail(f"tensor {quoted(name)} has unknown type {ttype}") from None
            numel = 1
            for d in dims:
                if d >= 1 << 62:
                    raise self._fail(f"tensor {quoted(name)} has an absurd dimension {d}")
                numel *= d
            if dims and dims[0] % block:
                raise self._fail(
                    f"tensor {quoted(name)}: its first dimension {dims[0]} is not a multiple of "
                    f"the {qtype.name} block size {block}"
                )
            nbytes = numel // block * type_size
            infos.append(TensorInfo(name, tuple(dims), ttype, offset, nbytes))
        self.infos_end = pos
        self.data_start = pos + (-pos % self.alignment)
        data_size = self.size - self.data_start
        names: set[str] = set()
        for t in infos:
            if t.name in names:
                raise self._fail(f"names tensor {quoted(t.name)} twice")
            names.add(t.name)
            if t.offset % self.alignment:
                raise self._fail(
                    f"tensor {quoted(t.name)}: its offset is not a multiple of the alignment "
                    f"({self.alignment})"
                )
            if t.offset + t.nbytes > data_size:
                raise self._fail(
                    f"tensor {quoted(t.name)}: its data runs past the end of the file "
                    f"({self.size}-byte file; truncated?)"
                )
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos if t.nbytes)
        for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise self._fail(f"tensors {quoted(k0)} and {quoted(k1)} overlap in the file")
        self.infos = {t.name: t for t in infos}
        self.bytes_read += self.infos_end

    # -- gguf-py's reading ---------------------------------------------------

    def _parse(self) -> None:
        """Fields and tensor infos from ``GGUFReader``, checked against the walk."""
        try:
            reader = _reader(self.path)
        except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
            raise self._fail(f"gguf cannot read it ({type(e).__name__})") from None
        self.fields = reader.fields
        got = [
            (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), t.data_offset, t.n_bytes)
            for t in reader.tensors
        ]
        want = [
            (t.name, t.dims, t.type, self.data_start + t.offset, t.nbytes)
            for t in self.infos.values()
        ]
        if got != want or reader.data_offset != self.data_start:
            raise self._fail("gguf reads its tensor infos differently (a malformed header)")
        del reader  # its mapping goes with it; the fields' arrays keep what they need

    def type_name(self, t: TensorInfo) -> str:
        return str(_gguf().GGMLQuantizationType(t.type).name)

    def entries(self) -> list[Entry]:
        return [
            Entry(
                t.name,
                self.type_name(t),
                tuple(reversed(t.dims)),  # row-major, as numpy and torch name shapes
                t.nbytes,
                FileBlob(self, t.offset, t.nbytes),
                file=self.path,
            )
            for t in self.infos.values()
        ]

    def field_bytes(self) -> bytes:
        """The key/value fields as ``GGUFReader`` read them (each key, type and value,
        in order): the bytes of the key/value section when it reads them right."""
        return b"".join(
            p.tobytes()
            for name, field in self.fields.items()
            if not name.startswith("GGUF.")
            for p in field.parts
        )

    def kv_section(self) -> bytes:
        return self.pread(self.kv_start, self.kv_end - self.kv_start)

    # a format's note for the planner: names its loader always derives and refuses stored
    @property
    def fixed_aliases(self) -> frozenset[str]:
        return frozenset({HEAD}) if head_kind(self.architecture) == "always-tied" else frozenset()


def _reader(path: Path) -> Any:
    """``GGUFReader`` of ``path``, four times faster where gguf allows: its ``_get``
    slices a plain array over the same mapping, not the ``np.memmap`` (whose Python
    hooks run for every one of a vocabulary's strings). A gguf whose ``_get`` takes
    other arguments gets its own reader."""
    import numpy as np

    gguf = _gguf()

    class Reader(gguf.GGUFReader):  # type: ignore[misc,name-defined]
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            dt = np.dtype(dtype)
            arr = plain[offset : offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    try:
        return Reader(path, "r")
    except TypeError:
        return gguf.GGUFReader(path, "r")


def open_gguf(path: Path, shown: Path) -> Any:
    """A GGUF file as a checkpoint: its tensors, no tie record (GGUF has none)."""
    from ..checkpoint import Checkpoint

    f = GGUFFile(path)
    entries = {e.name: e for e in f.entries()}
    ckpt = Checkpoint(shown, "gguf", entries, [f.path], readers=[f])
    ckpt.notes.append(f"GGUF v{f.version}, architecture {f.architecture!r}")
    return ckpt
