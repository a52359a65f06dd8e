"""Downloading a remote checkpoint whole: its weights (the index and every shard it
names) and ``config.json``, each file streamed to disk in :data:`DOWNLOAD_STEP`
requests, for the commands that rewrite a local copy.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...errors import CheckpointNotFoundError, RemoteError
from ...progress import NO_PROGRESS, Progress
from .location import Remote
from .opening import INDEX_SUFFIX, check_shard, locate
from .options import RemoteOptions, RemoteStats

DOWNLOAD_STEP = 8 << 20  # bytes per request when downloading a file


def download(
    url: str, folder: Path, options: RemoteOptions | None = None, progress: Progress = NO_PROGRESS
) -> tuple[Path, RemoteStats]:
    """Copy the remote checkpoint at ``url`` into the empty local ``folder``: its weights
    (the index and every shard it names), and ``config.json`` when there is one; each
    file streamed to disk in :data:`DOWNLOAD_STEP` requests. Returns the local path
    that stands for ``url`` (the folder for a folder, else the file) and the cost."""
    remote = Remote(url, options or RemoteOptions())
    try:
        target, src, names = locate(remote)
        base = posixpath.basename(urlsplit(target).path if "://" in target else target)
        files = [base]  # a plain name ending in .safetensors or .index.json
        if base.endswith(INDEX_SUFFIX):
            from .. import index_parts

            index_shown = remote.shown(target)
            doc = remote.read_json(target, "index", unique=True)
            if doc is None:
                raise CheckpointNotFoundError("not found", index_shown)
            shards = index_parts(doc, index_shown)[2]
            for shard in shards:
                check_shard(shard, index_shown)
            files += shards
        handles = [(f, remote.inside(src, f), remote.open(remote.inside(src, f))) for f in files]
        if names is None or "config.json" in names:
            try:
                at = remote.inside(src, "config.json")
                handles.append(("config.json", at, remote.open(at)))
            except RemoteError as e:
                if e.message != "not found":
                    raise
        try:
            total = sum(int(h.size) for _n, _p, h in handles)
            with progress.task("downloading", total) as bar:
                for name, at, handle in handles:
                    _save(remote, handle, at, folder / name, bar)
        finally:
            for _n, _p, h in handles:
                h.close()
    finally:
        remote.close()
    return (
        folder if names is not None and target != remote.root else folder / files[0]
    ), remote.stats


def _save(remote: Remote, handle: Any, at: str, dst: Path, bar: Progress) -> None:
    size = int(handle.size)
    with open(dst, "xb") as out:
        for start in range(0, size, DOWNLOAD_STEP):
            data = remote.fetch(handle, at, start, min(size, start + DOWNLOAD_STEP))
            out.write(data)
            bar.advance(len(data))
