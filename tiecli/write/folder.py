"""A folder output's other files: copied from the input folder, confined to it.

The input folder is untrusted: nothing is followed out of it, and nothing but
regular files, folders and links inside it is copied.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ..atomic import OLD_SUFFIX, TMP_SUFFIX, fsync_dir, fsync_file
from ..checkpoint import Checkpoint
from ..formats.confine import BROKEN, OUTSIDE, belongs, is_cache_blob, resolved
from ..formats.folder_names import CONFIG


def copy_other_files(
    src: Path, dst: Path, skip: set[Path], durable: bool, not_copied: list[tuple[Path, str]]
) -> None:
    """Copy the folder's other files (tokenizer, generation config...) into ``dst``.

    The folder is untrusted: nothing is followed out of it. Files and folders are
    copied; a link is copied as a (relative) link when it leads to a file or folder
    inside ``src``, and a blob of the Hugging Face cache ``src`` is a snapshot of is
    copied as the file it is. Links leading out of ``src``, broken links and loops,
    and fifos, sockets and devices (never opened: a fifo would hang the run) are
    not copied, and each is added to ``not_copied`` with the reason."""
    copy_tree(src, src, dst, skip, not_copied)
    if durable:  # the folder replaces one: all of it reaches the disk first
        for folder, dirs, files in os.walk(dst):
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink():
                    fsync_file(path)
            for name in dirs:
                if not (Path(folder) / name).is_symlink():
                    fsync_dir(Path(folder) / name)


def copy_tree(
    root: Path, src: Path, dst: Path, skip: set[Path], not_copied: list[tuple[Path, str]]
) -> None:
    """Copy ``src`` (inside ``root``) into ``dst``, leaving out ``skip``; what is not
    copied goes into ``not_copied`` with the reason. Walks with a stack, not recursion:
    a folder may nest thousands of levels deep."""
    pending = [(src, dst)]
    folders: list[tuple[Path, Path]] = []  # their times are set once their contents are in
    while pending:
        here, there = pending.pop()
        folders.append((here, there))
        for item in sorted(here.iterdir()):
            if item.name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
                continue
            mode = item.lstat().st_mode
            if stat.S_ISDIR(mode):
                (there / item.name).mkdir()
                pending.append((item, there / item.name))
            elif stat.S_ISREG(mode):
                if item.resolve() not in skip:
                    shutil.copy2(item, there / item.name, follow_symlinks=False)
            elif not stat.S_ISLNK(mode):
                not_copied.append((item, "a fifo, socket or device, not a regular file"))
            elif (real := resolved(item)) is None:
                not_copied.append((item, BROKEN.removeprefix("is ")))
            elif real in skip:
                continue  # another name of a weight file: the rewrite writes those
            elif not belongs(root, real):
                not_copied.append((item, OUTSIDE.removeprefix("is ")))
            elif not (stat.S_ISREG(target := real.stat().st_mode) or stat.S_ISDIR(target)):
                not_copied.append((item, "a symbolic link to a fifo, socket or device"))
            elif is_cache_blob(root.resolve(), real):
                if stat.S_ISREG(target):  # the cache's storage of the folder's own file
                    shutil.copy2(real, there / item.name)
                else:
                    not_copied.append((item, OUTSIDE.removeprefix("is ")))
            else:  # inside the folder: the same link, relative, so the copy stays self-contained
                os.symlink(os.path.relpath(real, item.parent.resolve()), there / item.name)
    for here, there in reversed(folders[1:]):
        shutil.copystat(here, there)


def place_config(ckpt: Checkpoint, src_folder: Path, tmpdir: Path) -> None:
    """The ``config.json`` named with ``--config`` goes beside the output's weights."""
    cfg = ckpt.config_path
    if cfg is not None and cfg.resolve() != (src_folder / CONFIG).resolve():
        shutil.copyfile(cfg, tmpdir / CONFIG)


def replace_file(path: Path, data: bytes, durable: bool) -> None:
    """Write ``data`` as ``path`` (a fresh file: a link copied there is replaced, not
    followed), fsynced when ``durable``."""
    if path.is_symlink() or path.exists():
        path.unlink()
    write_new(path, data, durable, os.O_EXCL)


def write_new(path: Path, data: bytes, durable: bool, mode: int) -> None:
    """Write ``data`` to ``path`` opened with ``O_CREAT | mode``, fsynced when ``durable``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
