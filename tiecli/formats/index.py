"""A sharded checkpoint's index, and the JSON files beside weights.

An index (``*.index.json``) maps each tensor name to the shard holding it;
:func:`open_index` opens every shard it names, confined to its folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, Entry
from ..errors import CheckpointFormatError
from .confine import escapes
from .forms import PYTORCH_SHARDED, SAFETENSORS_SHARDED, pickle_reader
from .safetensors import RepeatedKey, SafetensorsFile, unique_keys

MAX_JSON = 64 << 20  # the largest index or config read


def read_json(path: Path, what: str, unique: bool = False) -> Any:
    """A JSON file; with ``unique``, an object that repeats a key is an error."""
    try:
        with open(path, "rb") as f:
            # refused before a byte is read when its size says so; read to the limit and
            # one byte more when it does not (a file that grows, a pipe)
            if os.fstat(f.fileno()).st_size > MAX_JSON:
                raise CheckpointFormatError(f"{what} is larger than 64 MiB", path)
            raw = f.read(MAX_JSON)
            if f.read(1):
                raise CheckpointFormatError(f"{what} is larger than 64 MiB", path)
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys if unique else None)
    except RepeatedKey as e:
        raise CheckpointFormatError(f"{what} lists {e.args[0]!r} twice", path) from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointFormatError(f"{what} is not valid JSON", path) from None
    except OSError as e:
        raise CheckpointFormatError(f"cannot read {what}: {e.strerror}", path) from None


MAX_SHARDS = 4096


def index_parts(doc: Any, index: str | Path) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    """An index document's ``weight_map``, ``metadata`` and shard names, validated:
    every shard name is a plain file name beside the index."""
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CheckpointFormatError("index has no 'weight_map' object", index)
    weight_map: dict[str, Any] = doc["weight_map"]
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError("index 'metadata' is not an object", index)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointFormatError("index 'weight_map' must map tensor names to file names", index)
    shard_names = list(dict.fromkeys(sorted(weight_map.values())))
    if len(shard_names) > MAX_SHARDS:  # each is opened (remote: requested) and kept track of
        raise CheckpointFormatError(
            f"index names {len(shard_names)} shards, more than the {MAX_SHARDS} tiecli opens "
            "(the largest published checkpoints have a few hundred)",
            index,
        )
    for shard in shard_names:
        if os.sep in shard or "/" in shard or shard in ("", ".", ".."):
            raise CheckpointFormatError(f"index names shard {shard!r} outside its folder", index)
    return weight_map, metadata, shard_names


def index_entries(
    weight_map: dict[str, str], files: dict[str, dict[str, Entry]], index: str | Path
) -> dict[str, Entry]:
    """The entries an index maps, in file order, each found in the shard it names."""
    found = []
    for shard, held in files.items():  # each shard's entries are in file order already
        for name, entry in held.items():
            if weight_map.get(name) == shard:
                found.append((*entry.blob.order, name, entry))
    if len(found) != len(weight_map):
        missing = sorted((n, s) for n, s in weight_map.items() if files.get(s, {}).get(n) is None)
        name, shard = missing[0]
        raise CheckpointFormatError(
            f"index maps tensor {name!r} to {shard!r}, which does not hold it", index
        )
    found.sort(key=lambda t: t[:3])  # by file, offset, and name (empty tensors share offsets)
    return {t[2]: t[3] for t in found}


def open_index(index: Path, shown: Path, torch_free: bool) -> Checkpoint:
    doc = read_json(index, what="index", unique=True)
    weight_map, metadata, shard_names = index_parts(doc, index)
    readers: list[Any] = []
    try:
        files: dict[str, Any] = {}
        for number, shard in enumerate(shard_names):
            shard_path = index.parent / shard
            why = escapes(index.parent, shard_path)
            if why is not None:
                raise CheckpointFormatError(
                    f"index names shard {shard!r}, which {why}; tiecli does not follow it",
                    index,
                    hint="copy the shard into the folder",
                )
            if not shard_path.is_file():
                what = "is not a file" if shard_path.exists() else "does not exist"
                raise CheckpointFormatError(f"index names shard {shard!r}, which {what}", index)
            reader: Any = (
                SafetensorsFile(shard_path, number)
                if shard.endswith(".safetensors")
                else pickle_reader(shard_path, number, torch_free)
            )
            readers.append(reader)
            files[shard] = {e.name: e for e in reader.entries()}
        entries = index_entries(weight_map, files, index)
    except BaseException:
        for r in readers:
            r.close()
        raise
    pickled = any(not isinstance(r, SafetensorsFile) for r in readers)  # pickle_reader's
    fmt = (PYTORCH_SHARDED if pickled else SAFETENSORS_SHARDED).name
    paths = [index.parent / s for s in shard_names]
    return Checkpoint(
        shown, fmt, entries, paths, index_path=index, metadata=dict(metadata), readers=readers
    )
