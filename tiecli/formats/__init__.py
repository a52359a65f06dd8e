"""Opening any supported checkpoint form as a :class:`~tiecli.checkpoint.Checkpoint`.

Forms: a .safetensors file; a sharded checkpoint (its ``*.index.json`` or the
folder holding it); a PyTorch zip pickle; a Hugging Face folder (config.json
plus weights in any of those forms, safetensors preferred).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, Entry
from ..errors import CheckpointFormatError, CheckpointNotFoundError
from .confine import escapes
from .pytorch import PICKLE_SUFFIXES, PickleFile
from .safetensors import RepeatedKey, SafetensorsFile, unique_keys
from .torchzip import TorchZip, open_torchzip

INDEX_SUFFIX = ".index.json"
MAX_JSON = 64 << 20  # the largest index or config read
# Weight files of a Hugging Face folder, most preferred first.
FOLDER_PREFERENCE = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    torch_free: bool = True,
    remote: Any = None,
    progress: Any = None,
) -> Checkpoint:
    """Open ``path`` lazily: headers and pickle structure only, no tensor bytes.

    ``torch_free``: read PyTorch zip checkpoints without torch where they allow it
    (a flat dict of dense tensors); ``False`` for callers that want torch tensors.
    A URL (``hf://``, ``https://``, ``s3://``...) is read by ranges with the
    :class:`~tiecli.formats.remote.RemoteOptions` ``remote``; nothing else ever
    reaches the network.
    """
    if isinstance(path, str) and "://" in path:
        from .remote import is_remote, open_remote

        if is_remote(path):
            from ..progress import NO_PROGRESS

            return open_remote(path, remote, progress or NO_PROGRESS)
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError("no such file or folder", p)
    from .dcp import is_dcp

    if is_dcp(p):  # a torch distributed checkpoint: .metadata plus .distcp files
        from .dcp import open_dcp

        ckpt = open_dcp(p)
        p = ckpt.path
    elif p.is_dir():
        weights = find_weights(p)
        _refuse_escape(p, weights)
        ckpt = _open_weights(weights, p, torch_free)
        ckpt.folder = p
    else:
        ckpt = _open_weights(p, p, torch_free)
    cfg_path = (p if p.is_dir() else p.parent) / "config.json"
    if cfg_path.is_file() and ckpt.format != "gguf":  # a GGUF file carries its own metadata
        try:
            _refuse_escape(cfg_path.parent, cfg_path)
            ckpt.config = read_json(cfg_path, what="config.json")
            if not isinstance(ckpt.config, dict):
                raise CheckpointFormatError("config.json is not a JSON object", cfg_path)
        except BaseException:
            ckpt.close()
            raise
        ckpt.config_path = cfg_path
    return ckpt


def _refuse_escape(folder: Path, path: Path) -> None:
    """A file tiecli found itself (not one the user named) must not lead out of its folder:
    a downloaded folder's ``model.safetensors -> ~/.ssh/id_ed25519`` is never read."""
    why = escapes(folder, path)
    if why is not None:
        raise CheckpointFormatError(
            f"{why}; tiecli does not follow it",
            path,
            hint="copy the file into the folder, or name it on the command line to read it",
        )


def find_weights(folder: Path) -> Path:
    for name in FOLDER_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    try:
        files = sorted(f for f in folder.iterdir() if f.is_file())
    except OSError as e:
        raise CheckpointFormatError(f"cannot list the folder: {e.strerror}", folder) from None
    for group in (
        [f for f in files if f.name.endswith(".safetensors" + INDEX_SUFFIX)],
        [f for f in files if f.suffix == ".safetensors"],
        [f for f in files if f.name.endswith(INDEX_SUFFIX)],
        [f for f in files if f.suffix in PICKLE_SUFFIXES],
        [f for f in files if f.suffix == ".gguf"],  # llama.cpp's single-file form, last
    ):
        if len(group) == 1:
            return group[0]
        if len(group) > 1:
            names = ", ".join(f.name for f in group[:4])
            raise CheckpointFormatError(
                f"holds several weight files ({names}) and no index naming them",
                folder,
                hint="point tiecli at one file, or add a *.index.json",
            )
    raise CheckpointNotFoundError(
        "no weights found (expected *.safetensors, *.safetensors.index.json, a PyTorch .bin/.pt "
        "or a .gguf)",
        folder,
    )


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


def _open_weights(p: Path, shown: Path, torch_free: bool) -> Checkpoint:
    name = p.name
    if name.endswith(INDEX_SUFFIX):
        return _open_index(p, shown, torch_free)
    if p.suffix == ".safetensors":
        return _single(SafetensorsFile(p), "safetensors", shown)
    if p.suffix in PICKLE_SUFFIXES:
        return _single_pickle(_pickle_reader(p, 0, torch_free), shown)
    from .gguf import is_gguf, open_gguf

    if is_gguf(p):
        return open_gguf(p, shown)
    # Unknown extension: sniff.
    if zipfile.is_zipfile(p):
        return _single_pickle(_pickle_reader(p, 0, torch_free), shown)
    return _single(SafetensorsFile(p), "safetensors", shown)


def _pickle_reader(p: Path, number: int, torch_free: bool) -> PickleFile | TorchZip:
    if torch_free:
        fast = open_torchzip(p, number)
        if fast is not None:
            return fast
    return PickleFile(p, number)


def _single(f: SafetensorsFile, fmt: str, shown: Path) -> Checkpoint:
    entries = {e.name: e for e in f.entries()}
    return Checkpoint(shown, fmt, entries, [f.path], metadata=dict(f.metadata), readers=[f])


def _single_pickle(f: PickleFile | TorchZip, shown: Path) -> Checkpoint:
    entries = {e.name: e for e in f.entries()}
    ckpt = Checkpoint(shown, "pytorch", entries, [f.path], nested_key=f.nested_key, readers=[f])
    if f.nested_key:
        ckpt.notes.append(f"using the state dict under key {f.nested_key!r}")
    return ckpt


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
    entries: dict[str, Entry] = {}
    for name, shard in sorted(weight_map.items(), key=lambda kv: _order(files, kv)):
        entry = files[shard].get(name)
        if entry is None:
            raise CheckpointFormatError(
                f"index maps tensor {name!r} to {shard!r}, which does not hold it", index
            )
        entries[name] = entry
    return entries


def _open_index(index: Path, shown: Path, torch_free: bool) -> Checkpoint:
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
                else _pickle_reader(shard_path, number, torch_free)
            )
            readers.append(reader)
            files[shard] = {e.name: e for e in reader.entries()}
        entries = index_entries(weight_map, files, index)
    except BaseException:
        for r in readers:
            getattr(r, "close", lambda: None)()
        raise
    pickled = any(isinstance(r, (PickleFile, TorchZip)) for r in readers)
    fmt = "pytorch-sharded" if pickled else "safetensors-sharded"
    paths = [index.parent / s for s in shard_names]
    return Checkpoint(
        shown, fmt, entries, paths, index_path=index, metadata=dict(metadata), readers=readers
    )


def _order(files: dict[str, Any], kv: tuple[str, str]) -> tuple[int, int, str]:
    name, shard = kv
    entry = files.get(shard, {}).get(name)
    if entry is None:
        return (1 << 30, 0, name)
    return (*entry.blob.order, name)


def checkpoint_roots(paths: list[Path]) -> list[Path]:
    """The distinct checkpoints that ``paths`` name.

    A shard listed by an index in its folder stands for that index, so passing
    every file of a sharded checkpoint (as pre-commit does) checks it once.
    """
    roots: dict[Path, Path] = {}
    index_cache: dict[Path, list[tuple[Path, set[str]]]] = {}
    for p in paths:
        root = p
        if p.is_file() and not p.name.endswith(INDEX_SUFFIX):
            folder = p.parent
            if folder not in index_cache:
                index_cache[folder] = indexes_in(folder)
            for index, shards in index_cache[folder]:
                if p.name in shards:
                    root = index
                    break
        key = root.resolve()
        roots.setdefault(key, root)
    return list(roots.values())


def indexes_in(folder: Path) -> list[tuple[Path, set[str]]]:
    """The indexes beside a file and the shards each names. One that cannot be read
    (too large, not JSON, nested too deeply, no ``weight_map``) names no shard: it is
    reported when it is itself the checkpoint checked."""
    out = []
    for f in sorted(folder.glob("*" + INDEX_SUFFIX)):
        if not f.is_file() or escapes(folder, f) is not None:
            continue  # a fifo would hang the read; a link out of the folder is not ours
        try:
            doc = read_json(f, what="index")
        except CheckpointFormatError:
            continue
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            continue
        out.append((f, {v for v in weight_map.values() if isinstance(v, str)}))
    return out
