"""Reading safetensors files: the header, validated, and lazy byte access.

Needs neither torch nor numpy (numpy only when an element array is asked for).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..dtypes import BITS, nbytes_of, uint_view
from ..errors import CheckpointFormatError, CheckpointNotFoundError

MAX_HEADER = 100 << 20  # the limit safetensors itself enforces
METADATA_KEY = "__metadata__"


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


class _Duplicate(Exception):
    pass


class SafetensorsFile:
    """One open safetensors file: parsed header plus positioned reads."""

    def __init__(self, path: Path, file_number: int = 0):
        self.path = path
        self.file_number = file_number
        self.bytes_read = 0
        self._mmap: mmap.mmap | None = None
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointNotFoundError("no such file", path) from None
        except IsADirectoryError:
            raise CheckpointFormatError("is a folder, expected a .safetensors file", path) from None
        except OSError as e:
            raise CheckpointFormatError(f"cannot open: {e.strerror}", path) from None
        try:
            self.size = os.fstat(self.fd).st_size
            self.header_size, self.tensors, self.metadata, self.header = self._parse()
        except BaseException:
            os.close(self.fd)
            raise
        self.data_start = 8 + self.header_size

    def _fail(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(what, self.path)

    def _parse(self) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], dict[str, Any]]:
        if self.size == 0:
            raise self._fail("file is empty, not a safetensors file")
        if self.size < 8:
            raise self._fail(f"file is {self.size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        if n > MAX_HEADER:
            raise self._fail(f"header length {n} exceeds the {MAX_HEADER}-byte limit (not a safetensors file?)")
        if 8 + n > self.size:
            raise self._fail(f"header length {n} runs past the end of the {self.size}-byte file (truncated?)")
        raw = os.pread(self.fd, n, 8)
        self.bytes_read += 8 + n
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except _Duplicate as d:
            raise self._fail(f"header names tensor {d.args[0]!r} twice") from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise self._fail("header is not valid JSON (not a safetensors file?)") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")

        meta_raw = header.get(METADATA_KEY, {})
        if meta_raw is None:
            meta_raw = {}
        if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_size = self.size - 8 - n
        tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == METADATA_KEY:
                continue
            tensors[name] = self._tensor_info(name, info, data_size)
        spans = sorted((v[2], v[3], k) for k, v in tensors.items() if v[3] > v[2])
        for (s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise self._fail(f"tensors {k0!r} and {k1!r} overlap in the file")
        return n, tensors, dict(meta_raw), header

    def _tensor_info(self, name: str, info: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
        if not isinstance(info, dict):
            raise self._fail(f"tensor {name!r}: header entry is not an object")
        dtype = info.get("dtype")
        if dtype not in BITS:
            raise self._fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise self._fail(f"tensor {name!r}: data_offsets {offsets!r} is not a pair of integers")
        start, end = offsets
        if not 0 <= start <= end <= data_size:
            raise self._fail(
                f"tensor {name!r}: data_offsets [{start}, {end}] out of range "
                f"(data section is {data_size} bytes; truncated file?)"
            )
        expected = nbytes_of(dtype, math.prod(shape))
        if expected is None or end - start != expected:
            raise self._fail(
                f"tensor {name!r}: {end - start} bytes stored but shape {shape} of {dtype} needs {expected}"
            )
        return dtype, tuple(shape), start, end

    # -- byte access -------------------------------------------------------

    def pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise self._fail(f"short read at byte {offset} (file changed or truncated?)")
        self.bytes_read += size
        return data

    def view(self) -> mmap.mmap:
        if self._mmap is None:
            self._mmap = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        return self._mmap

    def entries(self) -> list[Entry]:
        out = []
        for name, (dtype, shape, start, end) in sorted(self.tensors.items(), key=lambda kv: kv[1][2]):
            out.append(Entry(name, dtype, shape, end - start, FileBlob(self, start, end - start), file=self.path))
        return out

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a numpy view still points into it; the GC will unmap
                pass
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileBlob:
    """A tensor's byte range inside a safetensors file."""

    __slots__ = ("file", "start", "nbytes")

    def __init__(self, file: SafetensorsFile, start: int, nbytes: int):
        self.file = file
        self.start = start
        self.nbytes = nbytes

    @property
    def order(self) -> tuple[int, int]:
        return (self.file.file_number, self.start)

    def read(self, offset: int, size: int) -> bytes:
        return self.file.pread(self.file.data_start + self.start + offset, size)

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        import numpy as np

        view = uint_view(dtype)
        if view is None:
            return None
        self.file.bytes_read += self.nbytes
        count = self.nbytes // np.dtype(view).itemsize
        flat = np.frombuffer(self.file.view(), dtype=view, count=count, offset=self.file.data_start + self.start)
        return flat.reshape(shape)

