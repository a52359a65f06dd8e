"""Writing beside the target and renaming into place, so nothing is half-written.

New files are written under hidden temporary names in the target's folder,
verified by the caller (and fsynced by it when they replace anything), then
renamed over their targets. A run killed at any moment leaves the old files
intact plus temporaries, which the next run in that folder removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError

TMP_SUFFIX = ".tiecli-tmp"
OLD_SUFFIX = ".tiecli-old"


def temp_name(final: Path) -> Path:
    return final.parent / f".{final.name}{TMP_SUFFIX}"


def clean_leftovers(folder: Path, targets: set[str]) -> list[Path]:
    """Remove what an interrupted run writing ``targets`` in ``folder`` left there.

    Only the temporaries of these targets: a run elsewhere in the folder keeps its own.
    """
    removed: list[Path] = []
    leftovers = {f".{t}{TMP_SUFFIX}" for t in targets} | {f".{t}{OLD_SUFFIX}" for t in targets}
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name in leftovers:
            p = folder / name
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Turn OS errors while writing into one clear OutputError."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            msg = "no space left on device; nothing was changed"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            msg = f"cannot write here ({e.strerror}); nothing was changed"
        else:
            msg = f"write failed ({e.strerror or e}); nothing was changed"
        raise OutputError(msg, path) from None


class Staging:
    """Temporary files and folders that become their targets on :meth:`commit`."""

    def __init__(self, durable: bool = True) -> None:
        self.pending: list[tuple[Path, Path]] = []  # (temporary, final), in rename order
        self.durable = durable  # sync the folders after renaming

    def file(self, final: Path) -> Path:
        tmp = temp_name(final)
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        self.pending.append((tmp, final))
        return tmp

    def folder(self, final: Path) -> Path:
        tmp = temp_name(final)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self.pending.append((tmp, final))
        return tmp

    def commit(self, replace_folder: bool = False) -> None:
        """Rename every temporary into place, in order, then sync the folders.

        Callers order the renames so that the target is valid after each one;
        an error after the first says that some are in place and the rest not.
        """
        for done, (tmp, final) in enumerate(self.pending):
            try:
                self._rename(tmp, final, replace_folder, self.durable)
            except OSError as e:
                if done == 0 or isinstance(e, OutputError):
                    raise
                raise OutputError(
                    f"interrupted after replacing {done} of {len(self.pending)} files "
                    f"({e.strerror or e}); it still loads with the original values",
                    final.parent,
                    hint="run the command again to finish",
                ) from None
        self.pending.clear()

    @staticmethod
    def _rename(tmp: Path, final: Path, replace_folder: bool, durable: bool) -> None:
        if not tmp.is_dir():
            with contextlib.suppress(FileNotFoundError):  # keep the replaced file's permissions
                os.chmod(tmp, stat.S_IMODE(os.stat(final).st_mode))
            os.replace(tmp, final)
            if durable:
                fsync_dir(final.parent)
            return
        old = None
        if final.exists():
            if not replace_folder:
                raise OutputError("exists; pass --force to replace it", final)
            old = final.parent / f".{final.name}{OLD_SUFFIX}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            if old is not None:  # put the replaced folder back
                os.replace(old, final)
            raise
        if durable:
            fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        for tmp, _final in self.pending:
            with contextlib.suppress(OSError):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
        self.pending.clear()
