"""Writing beside the target and renaming into place, so nothing is half-written.

New files are written under hidden temporary names in the target's folder,
verified by the caller (and fsynced by it when they replace anything), then
renamed over their targets. A run killed at any moment leaves the old files
intact plus temporaries, which the next run in that folder removes.

Concurrent runs: a run that replaces files holds a lock per target
(:func:`locked`), and every temporary carries its writer's process id and a
random part, so two runs never write under one name, and a run removes only
leftovers whose writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import BusyError, OutputError

TMP_SUFFIX = ".tiecli-tmp"
OLD_SUFFIX = ".tiecli-old"
LOCK_SUFFIX = ".tiecli.lock"
# What follows ".<target>" in a leftover's name: the writer's "<pid>-<random>"
# (absent in names written before temporaries carried it), then the suffix.
_LEFTOVER = re.compile(r"(?:\.(\d{1,10})-[0-9a-f]{8})?\.tiecli-(tmp|old)")


def temp_name(final: Path, suffix: str = TMP_SUFFIX) -> Path:
    """A hidden name beside ``final`` that no other run uses: pid and random part."""
    return final.parent / f".{final.name}.{os.getpid()}-{os.urandom(4).hex()}{suffix}"


def lock_name(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _owner_gone(pid: int | None) -> bool:
    """Whether the run that named a leftover ``pid`` has ended.

    Called with the target's lock held: a run of this process (which the lock
    serialises) or one from before pids were recorded is over.
    """
    if pid is None or pid == os.getpid() or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clean_leftovers(folder: Path, targets: set[str]) -> list[Path]:
    """Remove what interrupted runs writing ``targets`` in ``folder`` left there.

    Only the temporaries of these targets, and only those whose writer is gone:
    a live run elsewhere in the folder, or on these targets from a tiecli that
    takes no lock, keeps its own. A replaced output moved aside (``-o --force``
    killed between its two renames) is put back when its target is missing,
    and removed when the target is there. Call with the targets' locks held.
    """
    removed: list[Path] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        found = _leftover_of(name, targets)
        if found is None:
            continue
        target, pid, kind = found
        if not _owner_gone(pid):
            continue
        p = folder / name
        final = folder / target
        with contextlib.suppress(OSError):
            missing = not (final.exists() or final.is_symlink())
            if kind == "old" and missing and not p.is_symlink():
                os.replace(p, final)  # the replaced output, put back where it was
                fsync_dir(folder)
                continue
            _remove(p)
            removed.append(p)
    return removed


def _leftover_of(name: str, targets: set[str]) -> tuple[str, int | None, str] | None:
    """(target, writer's pid or None, "tmp" | "old") when ``name`` is a leftover of one."""
    if not name.startswith(".") or not name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
        return None
    for target in targets:
        prefix = f".{target}"
        if name.startswith(prefix):
            m = _LEFTOVER.fullmatch(name, len(prefix))
            if m:
                return target, int(m.group(1)) if m.group(1) else None, m.group(2)
    return None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


@contextlib.contextmanager
def locked(targets: Iterable[Path], shown: Path) -> Iterator[None]:
    """Hold an advisory lock per target (a file this run creates or replaces).

    The lock is ``flock`` on ``.<name>.tiecli.lock`` beside the target: a second
    run on the same target fails at once with :class:`BusyError` (exit 2) rather
    than waiting. The kernel lets go of it when its holder ends, however it
    ends; the lock file is removed on release (it stays only after a kill, empty
    and harmless: the next run takes it over). Where no lock file can be created
    (a read-only folder, a missing parent), there is nothing to lock: the run
    goes on and meets the same error when it writes. Without ``fcntl``
    (Windows) there is no lock.
    """
    held: list[tuple[Path, int]] = []
    try:
        for target in sorted({Path(t) for t in targets}, key=str):
            fd = _acquire(lock_name(target), shown)
            if fd is not None:
                held.append((lock_name(target), fd))
        yield
    finally:
        for path, fd in reversed(held):
            _release(path, fd)


def _acquire(lock: Path, shown: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            fd = os.open(lock, flags, 0o644)
        except PermissionError:
            # Another user's lock file in a shared folder: flock works on a descriptor
            # opened for reading too, and excludes that user's run all the same.
            try:
                fd = os.open(lock, flags & ~(os.O_RDWR | os.O_CREAT) | os.O_RDONLY)
            except OSError:
                return None  # no lock file, and none may be made: nor can a rival's
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(
                    f"{lock.name} beside it is a symbolic link; nothing was changed",
                    shown,
                    hint="remove it",
                ) from None
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR):
                return None  # nowhere to write: nor can a rival, and the write says why
            with output_errors(shown):
                raise
            raise  # pragma: no cover - output_errors always raises
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise BusyError(
                    f"another tiecli{who} is rewriting {shown.name}; nothing was changed",
                    shown,
                    hint=f"wait for it to end and run the command again (lock: {lock.name})",
                ) from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                return None  # a file system without locks
            raise OutputError(
                f"cannot lock it ({e.strerror}); nothing was changed", shown
            ) from None
        # The run before may have removed the file as it let go: lock the one in place.
        try:
            here = os.stat(lock, follow_symlinks=False)
            mine = os.fstat(fd)
            current = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
        except OSError:
            current = False
        if current:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder(fd: int) -> int | None:
    """The pid a lock's holder wrote into it (a number, nothing else is shown)."""
    try:
        raw = os.pread(fd, 16, 0)
        return int(raw.decode("ascii").strip()) if raw.strip().isdigit() else None
    except (OSError, ValueError):
        return None


def _release(lock: Path, fd: int) -> None:
    try:
        here = os.stat(lock, follow_symlinks=False)
        mine = os.fstat(fd)
        if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
            lock.unlink()  # while still held: a rival that opened it retries on a new one
    except OSError:
        pass
    finally:
        os.close(fd)


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


def exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
    ``renamex_np(RENAME_SWAP)``); False where the system or file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return False
    src, dst = os.fsencode(a), os.fsencode(b)
    if hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        r = libc.renameat2(at_fdcwd, src, at_fdcwd, dst, rename_exchange)
    elif hasattr(libc, "renamex_np"):  # pragma: no cover - macOS
        r = libc.renamex_np(src, dst, 2)
    else:  # pragma: no cover
        return False
    if r == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


class Staging:
    """Temporary files and folders that become their targets on :meth:`commit`."""

    def __init__(self, durable: bool = True) -> None:
        self.pending: list[tuple[Path, Path]] = []  # (temporary, final), in rename order
        self.durable = durable  # sync the folders after renaming

    def file(self, final: Path) -> Path:
        tmp = temp_name(final)
        self.pending.append((tmp, final))
        return tmp

    def folder(self, final: Path) -> Path:
        tmp = temp_name(final)
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
            _keep_owner_and_mode(tmp, final)
            os.replace(tmp, final)
            if durable:
                fsync_dir(final.parent)
            return
        if not (final.exists() or final.is_symlink()):
            os.replace(tmp, final)
            if durable:
                fsync_dir(final.parent)
            return
        if not replace_folder:
            raise OutputError("exists; pass --force to replace it", final)
        # Replacing an output: at every instant it exists, old or new.
        if exchange(tmp, final):  # one step; the old one is now at tmp
            if durable:
                fsync_dir(final.parent)
            with contextlib.suppress(OSError):
                _remove(tmp)
            return
        # Two steps. Killed between them, the old one waits under a name the
        # next run on this output recognises and puts back.
        old = temp_name(final, OLD_SUFFIX)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)  # put the replaced one back
            raise
        if durable:
            fsync_dir(final.parent)
        with contextlib.suppress(OSError):
            _remove(old)

    def abort(self) -> None:
        for tmp, _final in self.pending:
            with contextlib.suppress(OSError):
                _remove(tmp)
        self.pending.clear()


def _keep_owner_and_mode(tmp: Path, final: Path) -> None:
    """Give a file that replaces ``final`` its owner (where allowed) and permissions."""
    try:
        st = os.stat(final)
    except FileNotFoundError:
        return
    mine = os.stat(tmp)
    if mine.st_uid != st.st_uid:
        with contextlib.suppress(PermissionError):  # only root may give a file away
            os.chown(tmp, st.st_uid, st.st_gid)
            mine = os.stat(tmp)
    if mine.st_gid != st.st_gid:
        with contextlib.suppress(PermissionError):  # a group of one's own may be kept
            os.chown(tmp, -1, st.st_gid)
    os.chmod(tmp, stat.S_IMODE(st.st_mode))
