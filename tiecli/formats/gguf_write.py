"""Writing GGUF files back.

The output's header is built from gguf's constants: the input's
key/value section is copied byte for byte (every key, value, type and order
kept, ``general.alignment`` included), the tensor infos are written anew, and
each tensor's bytes are copied by the kernel to an offset aligned as the input
says. The result is read back with ``GGUFReader`` and compared (fields equal,
every tensor's type, shape and bytes equal to its source) before it is renamed
into place. Little-endian GGUF v2 and v3 only.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from ..io import writes
from .gguf import MAGIC, GGUFFile, quoted


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
                f"{quoted(t.name)}: a GGUF file is written from its own tensors, untransformed",
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
    fd = writes.create(path, size)  # the padding between tensors reads as zeros
    try:
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
