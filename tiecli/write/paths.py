"""Where a rewrite's output goes, and what it may not replace.

Output mirrors the input: a file for a file, a folder for a folder or a
sharded checkpoint; ``--to safetensors`` renames as :mod:`tiecli.formats.folder_names`
says. An output never lies inside its input, nor is the input itself.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import OutputError, TiecliError, UsageError
from ..formats import INDEX_SUFFIX, find_weights
from ..formats.folder_names import SAFETENSORS_INDEX, safetensors_name


def lock_targets(path: Path, output: Path | None, to_safetensors: bool) -> list[Path]:
    """What a rewrite of ``path`` replaces, known before opening it: the files to lock.

    In place: the weight file or index a folder resolves to (its shards go with
    it), and the converted name with ``--to safetensors``; with ``-o``: the output,
    and when it is a checkpoint folder, what an in-place run on it would lock.
    """

    def weights(folder: Path) -> list[Path]:
        try:
            return [find_weights(folder)]
        except TiecliError:
            return []  # opening it reports the same error

    if output is not None:
        return [output, *(weights(output) if output.is_dir() else [])]
    if path.is_dir():
        found = weights(path)
        if not found:
            return []
        path = found[0]
    elif not path.exists():
        return []
    targets = [path]
    if to_safetensors:
        index = path.name.endswith(INDEX_SUFFIX)
        name = SAFETENSORS_INDEX if index else safetensors_name(path.name)
        targets.append(path.parent / name)
    return targets


def source_folder(ckpt: Checkpoint) -> Path:
    """The folder the input's files lie in."""
    return ckpt.folder or (
        ckpt.index_path.parent if ckpt.index_path else ckpt.weight_files[0].parent
    )


def index_name(ckpt: Checkpoint, converting: bool) -> str:
    """The name of the index a rewrite of the sharded ``ckpt`` writes."""
    assert ckpt.index_path is not None
    return SAFETENSORS_INDEX if converting else ckpt.index_path.name


def final_path(ckpt: Checkpoint, written: list[Path]) -> Path:
    """What an in-place rewrite's result names: the folder, the index, or the file."""
    if ckpt.path.is_dir():
        return ckpt.path
    index = [w for w in written if w.name.endswith(INDEX_SUFFIX)]
    return index[0] if index else written[0]


def check_output(ckpt: Checkpoint, output: Path, force: bool, folder_like: bool) -> None:
    """Refuse an output that is the input, holds it, lies in its folder, or exists
    (without ``force``)."""
    inputs = {p.resolve() for p in ckpt.weight_files}
    if ckpt.index_path:
        inputs.add(ckpt.index_path.resolve())
    if ckpt.folder:
        inputs.add(ckpt.folder.resolve())
    target = output.resolve()
    if target in inputs or ckpt.path.resolve() == target:
        raise UsageError("is the input itself; leave out -o to rewrite in place", output)
    if any(target in p.parents for p in inputs):
        raise UsageError("contains the input checkpoint; choose an output beside it", output)
    src_folder = ckpt.folder or (ckpt.index_path.parent if ckpt.index_path else None)
    if folder_like and src_folder is not None and src_folder.resolve() in target.parents:
        raise UsageError("lies inside the input folder; choose an output beside it", output)
    if output.exists() or output.is_symlink():
        if not force:
            raise OutputError("already exists; pass --force to replace it", output)
        if not folder_like and output.is_dir():
            raise OutputError("is a folder; the output of a single file is a file", output)
    if not output.parent.is_dir():
        raise OutputError("parent folder does not exist", output)


def refuse_replacing(ckpt: Checkpoint, names: list[str], folder: Path) -> None:
    """A conversion in place never replaces another checkpoint: an existing index, a
    single file, or a shard some index names. Shards no index names are leftovers of
    an interrupted run."""
    from ..formats import indexes_in

    named = {s for _index, shards in indexes_in(folder) for s in shards}
    for name in names:
        sharded_orphan = ckpt.index_path is not None and name not in named
        if (folder / name).exists() and not (sharded_orphan and name.endswith(".safetensors")):
            raise OutputError(
                f"would be replaced by the converted {ckpt.weight_files[0].name}; "
                "move it away or use -o",
                folder / name,
            )
