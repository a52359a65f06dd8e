"""GGUF checkpoints (llama.cpp): reading, the head rule, writing back.

llama.cpp keeps no tie record: a tied head is ``output.weight`` left out of the
file, and the architecture's loader decides what that means. Most fall back to
``token_embd.weight``; some require the head; a few never read it. Which does
what is data read from llama.cpp's sources (``data/gguf_heads.json``, made by
``tools/gguf_fallback.py``), keyed by ``general.architecture``.

Reading: the header is walked here, over a read-only mapping, with gguf-py's
constants: every count, length and offset is checked against the file size
before anything is built from it, and the walk yields the architecture, the
alignment and the tensor infos. gguf-py's ``GGUFReader`` trusts the counts it
reads, and takes some 20 s over the 300,000 strings of a real vocabulary; it
reads what tiecli writes (below), after the walk has passed it. Tensor bytes
are never read except to compare a tie candidate.

Writing: the output's header is built from gguf's constants: the input's
key/value section is copied byte for byte (every key, value, type and order
kept, ``general.alignment`` included), the tensor infos are written anew, and
each tensor's bytes are copied by the kernel to an offset aligned as the input
says. The result is read back with ``GGUFReader`` and compared (fields equal,
every tensor's type, shape and bytes equal to its source) before it is renamed
into place. Little-endian GGUF v2 and v3 only.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..errors import CheckpointFormatError, MissingDependencyError
from ..io import ByteFile, FileBlob, open_input, writes

SUFFIX = ".gguf"
MAGIC = b"GGUF"
HEAD = "output.weight"
EMBEDDING = "token_embd.weight"
HEADS_TABLE = Path(__file__).parent.parent / "data" / "gguf_heads.json"
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


def _q(name: str) -> str:
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

    def _short_read(self, offset: int) -> Exception:
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
                need(at, scalar_codes[vtype], f"metadata {_q(key)}")
                return at + scalar_codes[vtype]
            if vtype == string:
                return skip_string(at, f"metadata {_q(key)}")
            if vtype != array:
                raise self._fail(f"metadata {_q(key)} has unknown value type {vtype}")
            if depth >= MAX_NESTING:
                raise self._fail(f"metadata {_q(key)} nests arrays more than {MAX_NESTING} deep")
            need(at, 12, f"metadata {_q(key)}")
            item, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if item in scalar_codes:
                need(at, count * scalar_codes[item], f"metadata {_q(key)}")
                return at + count * scalar_codes[item]
            least = 8 if item == string else 12
            if count > (self.size - at) // least:
                raise self._fail(
                    f"metadata {_q(key)} claims {count} array items, more than the file can hold"
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
                raise self._fail(f"names metadata key {_q(key)} twice")
            keys.add(key)
            need(pos, 4, f"metadata {_q(key)}")
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
            need(pos, 4, f"tensor {_q(name)}")
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if n_dims > MAX_DIMS:
                raise self._fail(f"tensor {_q(name)} has {n_dims} dimensions (at most {MAX_DIMS})")
            need(pos, 8 * n_dims + 12, f"tensor {_q(name)}")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
                block, type_size = sizes[qtype]
            except (ValueError, KeyError):
                raise self._fail(f"tensor {_q(name)} has unknown type {ttype}") from None
            numel = 1
            for d in dims:
                if d >= 1 << 62:
                    raise self._fail(f"tensor {_q(name)} has an absurd dimension {d}")
                numel *= d
            if dims and dims[0] % block:
                raise self._fail(
                    f"tensor {_q(name)}: its first dimension {dims[0]} is not a multiple of "
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
                raise self._fail(f"names tensor {_q(t.name)} twice")
            names.add(t.name)
            if t.offset % self.alignment:
                raise self._fail(
                    f"tensor {_q(t.name)}: its offset is not a multiple of the alignment "
                    f"({self.alignment})"
                )
            if t.offset + t.nbytes > data_size:
                raise self._fail(
                    f"tensor {_q(t.name)}: its data runs past the end of the file "
                    f"({self.size}-byte file; truncated?)"
                )
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos if t.nbytes)
        for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise self._fail(f"tensors {_q(k0)} and {_q(k1)} overlap in the file")
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


# -- the head rule ------------------------------------------------------------


@lru_cache(maxsize=1)
def heads_table() -> dict[str, Any]:
    with open(HEADS_TABLE, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def head_kind(architecture: str | None) -> str | None:
    """What llama.cpp's loader does with ``output.weight`` for ``architecture``
    (``falls-back``, ``always-tied``, ``required``, ``optional``, ``no-head``), or
    None for an architecture the table does not know."""
    if architecture is None:
        return None
    kind = heads_table()["architectures"].get(architecture)
    return str(kind) if kind is not None else None


@dataclass
class HeadFinding:
    """What the head rule says of one GGUF file."""

    architecture: str | None
    kind: str | None
    tie: tuple[str, str] | None = None  # (alias, source) the architecture declares
    missing: str | None = None  # an error: the loader requires the absent head
    note: str | None = None


def head_finding(
    architecture: str | None, entries: dict[str, Entry], equal: Callable[[str, str], bool]
) -> HeadFinding:
    """The tie (or the problem) of ``output.weight`` for this file; ``equal(a, b)``
    compares two stored tensors (type, shape and bytes)."""
    kind = head_kind(architecture)
    found = HeadFinding(architecture, kind)
    head, embd = entries.get(HEAD), entries.get(EMBEDDING)
    src = heads_table()["source"]
    where = f"llama.cpp's loader ({src['repo']}, {src['path']})"
    if architecture is None:
        found.note = "no general.architecture: llama.cpp would not load it"
        return found
    if kind is None:
        found.note = (
            f"architecture {architecture!r} is not in tiecli's llama.cpp table: "
            "whether output.weight falls back to token_embd.weight is unknown"
        )
        return found
    if embd is None:
        return found
    if kind in ("falls-back", "always-tied"):
        if head is None:
            found.tie = (HEAD, EMBEDDING)
        elif equal(HEAD, EMBEDDING):
            found.tie = (HEAD, EMBEDDING)  # a stored duplicate
            if kind == "always-tied":
                found.note = f"{architecture} never reads output.weight: the stored copy is unused"
        elif kind == "always-tied":
            found.note = (
                f"{architecture} never reads output.weight: llama.cpp's loader leaves the "
                "stored head unused"
            )
        elif head.dtype != embd.dtype:
            found.note = (
                f"output.weight ({head.dtype}) and token_embd.weight ({embd.dtype}) have "
                "different types: a separate head, never dropped (quantization may have "
                "given a stored copy of a tied head its own type)"
            )
        else:
            found.note = "output.weight differs from token_embd.weight: a separate head"
    elif kind == "required" and head is None:
        found.missing = (
            f"output.weight is absent and {architecture} has no fall-back to "
            f"token_embd.weight in {where}: llama.cpp refuses to load it; write it "
            "(convert again with the head stored)"
        )
    return found


# -- writing ------------------------------------------------------------------


def _aligned(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def write_gguf(
    src: GGUFFile,
    tensors: list[Any],
    path: Path,
    progress: Any,
    durable: bool,
) -> None:
    """Write ``tensors`` (each with ``name``, ``entry``, ``transform``; every entry a
    tensor of ``src``) as a GGUF file keeping ``src``'s key/values as they are."""
    infos = []
    offset = 0
    for t in tensors:
        if t.transform != "identity" or t.entry.blob.file is not src:
            raise CheckpointFormatError(
                f"{_q(t.name)}: a GGUF file is written from its own tensors, untransformed",
                src.path,
            )
        info = src.infos[t.entry.name]
        infos.append((t.name, info, offset))
        offset = _aligned(offset + info.nbytes, src.alignment)
    head = bytearray(MAGIC + struct.pack("<IQQ", src.version, len(infos), src.n_kv))
    head += src.kv_section()
    for name, info, at in infos:
        raw = name.encode("utf-8")
        head += struct.pack("<Q", len(raw)) + raw
        head += struct.pack(f"<I{len(info.dims)}Q", len(info.dims), *info.dims)
        head += struct.pack("<IQ", info.type, at)
    data_start = _aligned(len(head), src.alignment)
    size = data_start + (infos[-1][2] + infos[-1][1].nbytes if infos else 0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fd, size)  # the padding between tensors reads as zeros
        writes.write_all(fd, bytes(head), 0)
        with src.opened() as src_fd:
            for _name, info, at in infos:
                writes.copy_range(
                    src_fd,
                    fd,
                    src.data_start + info.offset,
                    data_start + at,
                    info.nbytes,
                    progress,
                    lambda n: None,
                    durable,
                )
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def check_written(src: GGUFFile, path: Path, checks: list[Any], progress: Any) -> str | None:
    """Read ``path`` back with ``GGUFReader``; what differs from what it must hold, or None.

    Its key/value fields, as gguf reads them, must be ``src``'s key/value section byte
    for byte (same version, count and alignment), and its tensors be
    exactly the ``checks``' outputs, each equal in type, shape and bytes to its input."""
    from ..values import equal

    try:
        out = GGUFFile(path, with_gguf=True)
    except CheckpointFormatError as e:
        return f"it cannot be read back ({e.message})"
    try:
        version = out.fields["GGUF.version"].parts[0][0]
        if (
            (version, out.n_kv) != (src.version, src.n_kv)
            or out.field_bytes() != src.kv_section()
            or out.alignment != src.alignment
        ):
            return "its metadata differs from the input's"
        got = {e.name: e for e in out.entries()}
        if set(got) != {c.out for c in checks}:
            return "it holds other tensors than planned"
        with progress.task(
            f"verifying {path.name}", sum(2 * c.input.nbytes for c in checks)
        ) as bar:
            for c in checks:
                if not equal(got[c.out], c.input, c.transform, bar):
                    return f"written {c.out!r} does not equal the input's {c.input.name!r}"
        return None
    finally:
        out.close()


def open_gguf(path: Path, shown: Path) -> Any:
    """A GGUF file as a checkpoint: its tensors, no tie record (GGUF has none)."""
    from ..checkpoint import Checkpoint

    f = GGUFFile(path)
    entries = {e.name: e for e in f.entries()}
    ckpt = Checkpoint(shown, "gguf", entries, [f.path], readers=[f])
    ckpt.notes.append(f"GGUF v{f.version}, architecture {f.architecture!r}")
    return ckpt
