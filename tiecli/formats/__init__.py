"""The registry of forms, and opening any of them as a :class:`~tiecli.checkpoint.Checkpoint`.

Forms (:data:`FORMATS`, one :class:`~tiecli.formats.base.Format` each): a
.safetensors file; a sharded checkpoint (its ``*.index.json`` or the folder
holding it); a PyTorch pickle; a GGUF file; a torch distributed checkpoint. A
Hugging Face folder holds config.json plus weights in one of them (safetensors
preferred).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import CheckpointFormatError, CheckpointNotFoundError
from .base import Format
from .confine import escapes
from .folder_names import CONFIG, FOLDER_PREFERENCE, INDEX_SUFFIX, PICKLE_SUFFIXES
from .forms import DCP, GGUF, PYTORCH, PYTORCH_SHARDED, SAFETENSORS, SAFETENSORS_SHARDED
from .index import index_entries, index_parts, read_json

__all__ = [
    "FORMATS",
    "INDEX_SUFFIX",
    "checkpoint_roots",
    "find_weights",
    "form_named",
    "index_entries",
    "index_parts",
    "indexes_in",
    "open_checkpoint",
    "read_json",
    "register",
]

# Every form tiecli reads, in the order a file is offered to them: by name first
# (``claims``), then by content (``sniffs``); a file nobody claims is read as safetensors.
BUILT_IN: tuple[Format, ...] = (
    SAFETENSORS_SHARDED,
    SAFETENSORS,
    GGUF,
    PYTORCH,
    PYTORCH_SHARDED,
    DCP,
)
FORMATS: list[Format] = list(BUILT_IN)


def register(form: Format) -> Format:
    """Add a form: files it claims are opened by it, and ``form_named`` finds it."""
    FORMATS.append(form)
    return form


def form_named(name: str) -> Format:
    """The registered form ``ckpt.format`` (or a result's ``format``) names."""
    for form in FORMATS:
        if form.name == name:
            return form
    raise KeyError(f"no format named {name!r}")


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
    if DCP.claims(p):  # a torch distributed checkpoint: .metadata plus .distcp files
        ckpt = DCP.open(p, p, torch_free)
        p = ckpt.path
    elif p.is_dir():
        weights = find_weights(p)
        _refuse_escape(p, weights)
        ckpt = _open_weights(weights, p, torch_free)
        ckpt.folder = p
    else:
        ckpt = _open_weights(p, p, torch_free)
    cfg_path = (p if p.is_dir() else p.parent) / CONFIG
    if cfg_path.is_file() and not ckpt.form.architecture_inside:  # a GGUF file names its own
        try:
            _refuse_escape(cfg_path.parent, cfg_path)
            ckpt.config = read_json(cfg_path, what=CONFIG)
            if not isinstance(ckpt.config, dict):
                raise CheckpointFormatError(f"{CONFIG} is not a JSON object", cfg_path)
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
        [f for f in files if f.suffix == ".gguf"],  # llama.cpp's single-file form
        # then each form registered beyond these, by the file names it claims
        *([f for f in files if form.claims(f)] for form in FORMATS[len(BUILT_IN) :]),
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


def _open_weights(p: Path, shown: Path, torch_free: bool) -> Checkpoint:
    """Open one file by the first form that claims it by name, else by content."""
    form = next((f for f in FORMATS if f.claims(p)), None)
    if form is None:
        form = next((f for f in FORMATS if f.sniffs(p)), SAFETENSORS)  # its errors say why
    return form.open(p, shown, torch_free)


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
