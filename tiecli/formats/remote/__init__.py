"""Checkpoints that live elsewhere (``hf://``, ``https://``, ``s3://``...), read by ranges.

A remote safetensors file is read like a local one, by position: headers, the
index and ``config.json`` whole, then a few elements per tensor, and whole
tensors only to confirm a tie candidate, within a download budget. The bytes
come from the ecosystem's file systems: ``huggingface_hub``'s ``HfFileSystem``
(its token, revision handling, ``HF_ENDPOINT`` and offline mode) for ``hf://``,
and ``fsspec`` for every other URL. Both are optional and imported only in this
package, only when a remote path is named.

The modules, in the order a read goes through them: :mod:`.options` (options,
budget, counts, URLs), :mod:`.opening` (find the weights, open them),
:mod:`.location` (the file system: open, fetch, list, name),
:mod:`.http_client` (HTTP(S) ranges, several per request), :mod:`.files`
(remote files and tensor bytes), :mod:`.sampling` (the sampled elements,
fetched ahead), :mod:`.failures` (what went wrong, in words), and
:mod:`.downloading` (a whole copy, for the commands that rewrite).
"""

from .downloading import download
from .opening import open_remote
from .options import DownloadBudget, RemoteOptions, RemoteStats, is_remote, shown_url

__all__ = [
    "DownloadBudget",
    "RemoteOptions",
    "RemoteStats",
    "download",
    "is_remote",
    "open_remote",
    "shown_url",
]
