"""Which files belong to a checkpoint folder: symbolic links are followed only inside it.

A checkpoint folder is untrusted input, and a link in it may point anywhere:
``model-00002.safetensors -> ~/.ssh/id_ed25519``, ``assets -> /etc``, ``up -> ..``.
tiecli reads or copies what a link in a folder points at only when that lies
inside the folder. The one exception is the Hugging Face cache, where every file
of a snapshot (``models--org--name/snapshots/<rev>/``) is a link to a blob of the
same repository (``models--org--name/blobs/<hash>``): a link that resolves to a
file directly in that ``blobs`` folder belongs to the checkpoint too.

A file named on the command line is the user's choice and is followed wherever it
points; the rules here are for the names tiecli finds itself (weights found in a
folder, shards an index names, ``config.json``, the files ``-o`` copies).
"""

from __future__ import annotations

from pathlib import Path

OUTSIDE = "is a symbolic link to a place outside the checkpoint folder"
BROKEN = "is a symbolic link that points nowhere (broken, or a loop)"
CACHE_REPOS = ("models--", "datasets--", "spaces--")  # Hugging Face cache folder names


def resolved(path: Path) -> Path | None:
    """Where ``path`` leads after every link, or None if it leads nowhere."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a loop (RuntimeError before Python 3.13)
        return None


def belongs(root: Path, real: Path) -> bool:
    """Whether the fully resolved ``real`` is in the folder ``root`` or its cache blobs."""
    base = root.resolve()
    return real == base or base in real.parents or is_cache_blob(base, real)


def is_cache_blob(base: Path, real: Path) -> bool:
    """Whether ``real`` is a blob of the Hugging Face cache repository whose snapshot
    holds the resolved folder ``base``. Both paths are fully resolved, so a blob's
    parent that is literally ``<repo>/blobs`` is that folder itself, not a link."""
    for snapshot in (base, *base.parents):
        if snapshot.parent.name == "snapshots":
            repo = snapshot.parent.parent
            return repo.name.startswith(CACHE_REPOS) and real.parent == repo / "blobs"
    return False


def escapes(root: Path, path: Path) -> str | None:
    """Why tiecli must not follow ``path``, a name inside ``root``; None when it may.

    A path that does not exist at all is not for this function to report (None):
    the caller says what is missing."""
    if not path.is_symlink() and not path.exists():
        return None
    real = resolved(path)
    if real is None:
        return BROKEN
    return None if belongs(root, real) else OUTSIDE
