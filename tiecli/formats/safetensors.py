"""Reading safetensors files: the header, validated, and lazy byte access.

Needs neither torch nor numpy (numpy only when an element array is asked for).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..dtypes import BITS, nbytes_of
from ..errors import CheckpointFormatError
from ..io import ByteFile, FileBlob, open_input

MAX_HEADER = 100 << 20  # the limit safetensors itself enforces
METADATA_KEY = "__metadata__"
LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts


class RepeatedKey(Exception):
    """A JSON object that names a key twice (raised by :func:`unique_keys`)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook that refuses repeated keys instead of keeping the last."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise RepeatedKey(key)
            seen.add(key)
    return out


class _Repeated(dict):  # type: ignore[type-arg]
    """A JSON object that named ``key`` more than once (error path only)."""

    key: str


def _mark_repeated(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    repeated = None
    for key, value in pairs:
        if key in out and repeated is None:
            repeated = key
        out[key] = value
    if repeated is None:
        return out
    marked = _Repeated(out)
    marked.key = repeated
    return marked


def _repeated_key_message(text: str) -> str:
    """Where a header repeats a key; parsed again only once one was found."""
    header = json.loads(text, object_pairs_hook=_mark_repeated)
    if isinstance(header, _Repeated):
        if header.key == METADATA_KEY:
            return f"header has {METADATA_KEY!r} twice"
        return f"header names tensor {header.key!r} twice"
    for name, value in header.items() if isinstance(header, dict) else ():
        if isinstance(value, _Repeated):
            if name == METADATA_KEY:
                return f"{METADATA_KEY} has key {value.key!r} twice"
            return f"tensor {name!r}: header entry has key {value.key!r} twice"
    return "header repeats a key inside a tensor entry"


def _dtype_shown(dtype: Any) -> str:
    """A dtype name worth quoting (a short identifier such as a newer float8 type); any
    other value of the field is file content, not quoted."""
    if isinstance(dtype, str) and re.fullmatch(r"[A-Z][A-Z0-9_]{0,15}", dtype):
        return f" {dtype!r}"
    return ""


class SafetensorsFile(ByteFile):
    """One open safetensors file: parsed header plus positioned reads."""

    def __init__(self, path: Path, file_number: int = 0):
        super().__init__(path, file_number, open_input(path, ".safetensors"))
        try:
            with self.opened() as fd:
                self.size = os.fstat(fd).st_size
                self.header_size, self.tensors, self.metadata = self._parse(
                    lambda size, offset: os.pread(fd, size, offset)
                )
        except BaseException:
            self.close()
            raise
        self.data_start = 8 + self.header_size

    def _fail(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(what, self.path)

    def short_read(self, offset: int) -> Exception:
        return self._fail("short read (file changed or truncated?)")

    def _parse(
        self, pread: Callable[[int, int], bytes]
    ) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
        """The header, validated; ``pread(size, offset)`` reads the file (or a remote copy)."""
        if self.size == 0:
            raise self._fail("file is empty, not a safetensors file")
        if self.size < 8:
            raise self._fail(f"file is {self.size} bytes, too short for a safetensors header")
        head = pread(8, 0)
        if head == LFS_POINTER[:8] and pread(len(LFS_POINTER), 0) == LFS_POINTER:
            raise CheckpointFormatError(
                "is a Git LFS pointer, not the weights",
                self.path,
                hint="fetch them with 'git lfs pull'",
            )
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointFormatError(
                "is a zip archive (a PyTorch checkpoint?), not a safetensors file",
                self.path,
                hint="name it .bin or .pt to read it as one",
            )
        # Until the header has parsed, the bytes may be anyone's (a link to a secret):
        # messages quote none of them, only sizes the filesystem reports.
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise self._fail(
                f"header length exceeds the {MAX_HEADER >> 20} MiB limit (not a safetensors file?)"
            )
        if 8 + n > self.size:
            raise self._fail(
                f"header length runs past the end of the file ({self.size}-byte file; truncated?)"
            )
        raw = pread(n, 8)
        self.bytes_read += 8 + n
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
        except RepeatedKey:
            raise self._fail(_repeated_key_message(raw.decode("utf-8"))) from None
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
        for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise self._fail(f"tensors {k0!r} and {k1!r} overlap in the file")
        return n, tensors, dict(meta_raw)

    def _tensor_info(
        self, name: str, info: Any, data_size: int
    ) -> tuple[str, tuple[int, ...], int, int]:
        # the usual entry, checked in few steps; anything else takes the steps below
        if type(info) is dict:
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if (
                type(shape) is list
                and type(offsets) is list
                and len(offsets) == 2
                and type(offsets[0]) is int
                and type(offsets[1]) is int
                and 0 <= offsets[0] <= offsets[1] <= data_size
                and all(type(d) is int and d >= 0 for d in shape)
                and type(dtype) is str
                and dtype in BITS
                and nbytes_of(dtype, math.prod(shape)) == offsets[1] - offsets[0]
            ):
                return dtype, tuple(shape), offsets[0], offsets[1]
        if not isinstance(info, dict):
            raise self._fail(f"tensor {name!r}: header entry is not an object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in BITS:
            raise self._fail(f"tensor {name!r}: unknown dtype{_dtype_shown(dtype)}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self._fail(f"tensor {name!r}: shape is not a list of non-negative integers")
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise self._fail(f"tensor {name!r}: data_offsets is not a pair of integers")
        start, end = offsets
        if not 0 <= start <= end:
            raise self._fail(f"tensor {name!r}: data_offsets are negative or end before they start")
        if end > data_size:
            raise self._fail(
                f"tensor {name!r}: data_offsets run past the end of the file "
                f"({self.size}-byte file; truncated?)"
            )
        expected = nbytes_of(dtype, math.prod(shape))
        if expected is None:
            raise self._fail(
                f"tensor {name!r}: its shape does not fill whole bytes of {dtype} "
                f"({BITS[dtype]}-bit elements)"
            )
        if end - start != expected:
            raise self._fail(
                f"tensor {name!r}: its byte range (data_offsets) does not match "
                f"its shape and dtype ({dtype})"
            )
        return dtype, tuple(shape), start, end

    # -- byte access -------------------------------------------------------

    def _blob(self, start: int, nbytes: int) -> Any:
        return FileBlob(self, start, nbytes)

    def entries(self) -> list[Entry]:
        out = []
        for name, (dtype, shape, start, end) in sorted(
            self.tensors.items(), key=lambda kv: kv[1][2]
        ):
            out.append(
                Entry(
                    name,
                    dtype,
                    shape,
                    end - start,
                    self._blob(start, end - start),
                    file=self.path,
                )
            )
        return out
