"""Opening a remote checkpoint: find its weights (a file, an index and its shards,
or a folder's), read headers, index and ``config.json``, fetch the samples ahead.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...checkpoint import Checkpoint, Entry
from ...errors import CheckpointFormatError, CheckpointNotFoundError, RemoteError, UsageError
from ...progress import NO_PROGRESS, Progress
from .files import RemoteSafetensorsFile
from .location import Remote
from .options import DownloadBudget, RemoteOptions, shown_url
from .sampling import fetch_ahead, head_ranges, sample_ranges

INDEX_SUFFIX = ".index.json"
FOLDER_PREFERENCE = ("model.safetensors.index.json", "model.safetensors")


class _Scratch:
    """A private folder for the config copy that transformers reads; removed on close."""

    bytes_read = 0  # held as a checkpoint reader, to be closed with it

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tiecli-remote-"))

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _choose(names: list[str], shown: str) -> str:
    """The weights file of a remote folder, as :func:`~tiecli.formats.find_weights` picks."""
    for name in FOLDER_PREFERENCE:
        if name in names:
            return name
    for group in (
        [n for n in names if n.endswith(".safetensors" + INDEX_SUFFIX)],
        [n for n in names if n.endswith(".safetensors")],
    ):
        if len(group) == 1:
            return group[0]
        if len(group) > 1:
            raise CheckpointFormatError(
                f"holds several weight files ({', '.join(group[:4])}) and no index naming them",
                shown,
                hint="name one file in the URL",
            )
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        raise CheckpointFormatError(
            "holds PyTorch pickles only; remote reads cover safetensors checkpoints",
            shown,
            hint="download it first (hf download) and run tiecli on the local copy",
        )
    raise CheckpointNotFoundError(
        "no weights found (expected *.safetensors or *.safetensors.index.json)", shown
    )


def open_remote(
    url: str, options: RemoteOptions | None = None, progress: Progress = NO_PROGRESS
) -> Checkpoint:
    """Open the remote checkpoint at ``url``: headers, index and config, then the sampled
    elements of every tensor that has a possible partner, fetched ahead."""
    remote = Remote(url, options or RemoteOptions())
    readers: list[Any] = [remote]
    try:
        target, folder, folder_names = locate(remote)
        ckpt = _open_target(remote, target, readers)
        if folder_names is None or "config.json" in folder_names:
            config_at = remote.inside(folder, "config.json")
            config = remote.read_json(config_at, "config.json")
            if config is not None:
                if not isinstance(config, dict):
                    raise CheckpointFormatError(
                        "config.json is not a JSON object", remote.shown(config_at)
                    )
                scratch = _Scratch()
                readers.append(scratch)
                (scratch.folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
                ckpt.config = config
                ckpt.config_path = scratch.folder / "config.json"
                ckpt.config_url = remote.shown(config_at)
        entries = list(ckpt.entries.values())
        fetch_ahead(head_ranges(entries), progress)  # first elements, to rule most out
        fetch_ahead(sample_ranges(entries), progress)  # samples of those that remain
    except BaseException:
        for r in readers:
            r.close()
        raise
    ckpt.url = shown_url(url)
    ckpt.remote = remote.stats
    ckpt.budget = DownloadBudget(remote.options.max_download)
    return ckpt


def check_shard(shard: str, index_shown: str) -> None:
    """A shard name (already a plain name, see ``index_parts``) that can lead nowhere
    but beside the index in a URL either, and names a safetensors file."""
    if "\\" in shard or "?" in shard or "#" in shard or "%" in shard:
        raise CheckpointFormatError(f"index names shard {shard!r} outside its folder", index_shown)
    if not shard.endswith(".safetensors"):
        raise CheckpointFormatError(
            f"index names shard {shard!r}; remote reads cover safetensors shards only",
            index_shown,
        )


def locate(remote: Remote) -> tuple[str, str, list[str] | None]:
    """The weights file (or index) a URL names, its folder, and the folder's file
    names where the file system lists them (None over HTTP)."""
    root = remote.root
    name = urlsplit(root).path if remote.protocol in ("http", "https") else root
    if name.endswith((".safetensors", INDEX_SUFFIX)):
        names = (
            None
            if remote.protocol in ("http", "https")
            else remote.listing(remote.folder_of(root), named=root)
        )
        return root, remote.folder_of(root), names
    if remote.protocol in ("http", "https"):
        raise UsageError(
            "an http(s) URL must name a .safetensors file or a *.safetensors.index.json",
            shown_url(remote.url),
        )
    names = remote.listing(root) or []
    return remote.inside(root, _choose(names, shown_url(remote.url))), root, names


def _open_target(remote: Remote, target: str, readers: list[Any]) -> Checkpoint:
    shown = Path(remote.shown(target))
    if not target.endswith(INDEX_SUFFIX):
        f = RemoteSafetensorsFile(remote, target)
        readers.append(f)
        entries = {e.name: e for e in f.entries()}
        return Checkpoint(
            shown, "safetensors", entries, [shown], metadata=dict(f.metadata), readers=readers
        )
    from .. import index_entries, index_parts

    index_shown = remote.shown(target)
    doc = remote.read_json(target, "index", unique=True)
    if doc is None:
        raise CheckpointNotFoundError("not found", index_shown)
    weight_map, metadata, shard_names = index_parts(doc, index_shown)
    files: dict[str, dict[str, Entry]] = {}
    for number, shard in enumerate(shard_names):
        check_shard(shard, index_shown)
        try:
            reader = RemoteSafetensorsFile(remote, remote.beside(target, shard), number)
        except RemoteError as e:
            if e.message != "not found":
                raise
            raise CheckpointFormatError(
                f"index names shard {shard!r}, which does not exist", index_shown
            ) from None
        readers.append(reader)
        files[shard] = {e.name: e for e in reader.entries()}
    entries = index_entries(weight_map, files, index_shown)
    paths = [Path(remote.shown(remote.beside(target, s))) for s in shard_names]
    return Checkpoint(
        shown,
        "safetensors-sharded",
        entries,
        paths,
        index_path=shown,
        metadata=dict(metadata),
        readers=readers,
    )
