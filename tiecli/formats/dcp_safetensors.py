"""DCP files written with ``SerializationFormat.SAFETENSORS``: each rank's ``.distcp``
file is one safetensors file holding that rank's chunk of each tensor under its fully
qualified name, the chunk's place in the whole tensor in the ``DCP_SHARDING_INFO``
metadata (torch/distributed/checkpoint/filesystem.py ``_write_files_from_queue``; the
keys in _hf_utils.py). The ``.metadata`` storage entries of such a file do not point at
the bytes (torch records the stream position before the tensors are written), so the
chunk is found by name in the safetensors header and checked against the metadata."""

from __future__ import annotations

import json
import struct
from typing import Any

from ..io import ByteFile
from .safetensors import MAX_HEADER, SafetensorsFile

SHARDING_KEY = "DCP_SHARDING_INFO"
OFFSETS_KEY = "saved_offsets"


class SafetensorsRank:
    """The chunks of one safetensors ``.distcp`` file: name -> (dtype, sizes, offsets,
    where its bytes start in the file)."""

    def __init__(self, file: ByteFile, fail: Any):
        parsed = SafetensorsFile(file.path)
        try:
            tensors, metadata, start = parsed.tensors, parsed.metadata, parsed.data_start
        finally:
            parsed.close()
        try:
            sharding = json.loads(metadata.get(SHARDING_KEY, "{}"))
        except (ValueError, RecursionError):
            raise fail(f"its {SHARDING_KEY} metadata is not valid JSON") from None
        if not isinstance(sharding, dict):
            raise fail(f"its {SHARDING_KEY} metadata is not a JSON object")
        self.chunks: dict[str, tuple[str, tuple[int, ...], Any, int]] = {}
        for name, (dtype, shape, begin, _end) in tensors.items():
            info = sharding.get(name)
            offsets = info.get(OFFSETS_KEY) if isinstance(info, dict) else None
            self.chunks[name] = (dtype, shape, offsets, start + begin)

    def chunk(
        self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: str, fail: Any
    ) -> int:
        """Where the chunk of ``fqn`` at ``offsets`` begins in the file, checked against
        the element type, sizes and offsets the ``.metadata`` gives."""
        found = self.chunks.get(fqn)
        if found is None:
            raise fail(f"holds no tensor named {fqn!r}")
        have, shape, saved, at = found
        if have != dtype:
            raise fail(f"holds another element type ({have}) than the metadata's {dtype}")
        if shape != sizes:
            raise fail(f"holds a chunk of another shape than the metadata's {list(sizes)}")
        if not isinstance(saved, list) or tuple(saved) != offsets:
            raise fail(f"does not place its chunk at the metadata's offsets {list(offsets)}")
        return at


def safetensors_rank(file: ByteFile, size: int, fail: Any) -> SafetensorsRank | None:
    """The file's chunks when it is a safetensors file (its first bytes a header length
    that fits and a JSON object), else None: a file of ``torch.save`` archives."""
    if size < 10:
        return None
    head = file.pread(0, 9)
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size or head[8:9] != b"{":
        return None
    return SafetensorsRank(file, fail)
