"""Entries and checkpoints built in memory: tie logic tested without files or formats.

``entry(name, array)`` makes an :class:`~tiecli.checkpoint.Entry` whose blob serves the
array's bytes from memory and records every read, so a test can tell what was read;
``checkpoint(*entries)`` puts entries into a :class:`~tiecli.checkpoint.Checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tiecli.checkpoint import Checkpoint, Entry
from tiecli.dtypes import uint_view

# numpy's element types under the names safetensors (and so tiecli) gives them
DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


class MemoryBlob:
    """The bytes of one tensor, held in memory; ``reads`` lists each (offset, size) read."""

    def __init__(self, data: bytes, order: tuple[int, int] = (0, 0)) -> None:
        self.data = bytes(data)
        self.nbytes = len(self.data)
        self.reads: list[tuple[int, int]] = []
        self.order = order  # (file number, byte offset), as Blob.order

    def read(self, offset: int, size: int) -> bytes:
        assert 0 <= offset and size >= 0 and offset + size <= self.nbytes, (offset, size)
        self.reads.append((offset, size))
        return self.data[offset : offset + size]

    def readinto(self, offset: int, view: memoryview) -> None:
        view[:] = self.read(offset, len(view))

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        view = uint_view(dtype)
        if view is None:
            return None
        self.reads.append((0, self.nbytes))
        return np.frombuffer(self.data, dtype=view).reshape(shape)

    @property
    def bytes_read(self) -> int:
        return sum(size for _offset, size in self.reads)


def entry(
    name: str,
    array: Any,
    dtype: str | None = None,
    shape: tuple[int, ...] | None = None,
    **fields: Any,
) -> Entry:
    """An entry holding ``array`` (numpy, or raw bytes with ``dtype`` and ``shape``);
    ``fields``: the rest of the entry (a pickle's ``storage``, ``view`` and ``file``)."""
    if isinstance(array, bytes | bytearray):
        assert dtype is not None and shape is not None, "raw bytes need a dtype and a shape"
        data = bytes(array)
    else:
        arr = np.ascontiguousarray(array)
        dtype = dtype or DTYPES[arr.dtype.name]
        shape = tuple(arr.shape) if shape is None else shape
        data = arr.tobytes()
    return Entry(name, dtype, tuple(shape), len(data), MemoryBlob(data), **fields)


def checkpoint(
    *entries: Entry,
    config: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    format: str = "safetensors",
) -> Checkpoint:
    """A checkpoint of ``entries`` in that order, as if read from one file."""
    offset = 0
    for e in entries:
        if isinstance(e.blob, MemoryBlob):
            e.blob.order = (0, offset)
        offset += e.nbytes
    return Checkpoint(
        path=Path("in-memory"),
        format=format,
        entries={e.name: e for e in entries},
        weight_files=[],
        metadata=dict(metadata or {}),
        config=config,
    )


def seeded(seed: int, *shape: int, dtype: str = "float32") -> Any:
    """Seeded random values of ``shape``: distinct tensors never equal by chance."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
