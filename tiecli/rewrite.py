"""Carrying out a plan: write beside the target, verify, rename into place.

Output mirrors the input: a file for a file, a folder for a folder or a
sharded checkpoint. Nothing is renamed into place before every output tensor
has been compared, bit for bit, with the input tensor it stands for.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from .atomic import LOCK_SUFFIX, Staging, clean_leftovers, fsync_dir, fsync_file, output_errors
from .checkpoint import Checkpoint, Entry
from .errors import (
    CheckpointFormatError,
    OutputError,
    UnsafeChangeError,
    UsageError,
    VerificationError,
)
from .formats.pytorch import PickleFile
from .formats.safetensors import SafetensorsFile
from .formats.safetensors_write import write_file
from .formats.torchzip import TorchZip, open_torchzip
from .formats.torchzip_pickle import Declined
from .formats.torchzip_write import write_shared
from .io import ByteFile, FileBlob, writes
from .plan import Check, FilePlan, Plan, stale_copies
from .progress import Progress
from .values import equal, same_bytes

T = TypeVar("T")


@dataclass
class Written:
    output: Path
    changed: bool  # False when an in-place run found nothing to change
    files: list[Path]
    not_copied: list[tuple[Path, str]] = field(default_factory=list)  # other files left out


def safetensors_name(name: str) -> str:
    """The safetensors file name a converted pickle gets."""
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def lock_targets(path: Path, output: Path | None, to_safetensors: bool) -> list[Path]:
    """What a rewrite of ``path`` replaces, known before opening it: the files to lock.

    In place: the weight file or index a folder resolves to (its shards go with
    it), and the converted name with ``--to safetensors``; with ``-o``: the output,
    and when it is a checkpoint folder, what an in-place run on it would lock.
    """
    from .errors import TiecliError
    from .formats import INDEX_SUFFIX, find_weights

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
        name = "model.safetensors.index.json" if index else safetensors_name(path.name)
        targets.append(path.parent / name)
    return targets


def execute(
    ckpt: Checkpoint,
    plan: Plan,
    output: Path | None,
    *,
    force: bool = False,
    to_safetensors: bool = False,
    fsync: bool = False,
    progress: Progress,
    files: dict[str, bytes] | None = None,
) -> Written:
    """Write ``plan``, verify it, and put it in place.

    ``files``: other files of a folder output (``config.json``) that replace the
    input's copies in it, written once the weights are verified.

    Durability: whatever replaces an existing file (in place, or ``-o`` over an
    existing output) is fsynced before the rename, so a power cut leaves the old
    or the new, never neither. A new ``-o`` output is as durable as ``cp``'s: in
    the page cache, on disk within the kernel's writeback delay; ``fsync=True``
    syncs it before returning.
    """
    pickled = ckpt.format.startswith("pytorch")
    as_safetensors = not pickled or to_safetensors
    folder_like = ckpt.folder is not None or ckpt.index_path is not None
    src_folder = ckpt.folder or (
        ckpt.index_path.parent if ckpt.index_path else ckpt.weight_files[0].parent
    )

    if output is not None:
        # a replaced output an interrupted run moved aside goes back first
        clean_leftovers(output.parent, {output.name})
        _check_output(ckpt, output, force, folder_like)
    if as_safetensors and pickled:
        for f in plan.files:
            f.name = safetensors_name(f.name)

    placed = {t.name for f in plan.files for t in f.tensors}
    if not as_safetensors:
        placed |= set(plan.pickle_views)  # kept in the pickle, as views
    for check in plan.checks:
        if check.out not in placed:
            raise UnsafeChangeError(
                f"{check.out!r} would not be written; nothing was changed", ckpt.path
            )
    durable = fsync or output is None or output.exists() or output.is_symlink()
    staging = Staging(durable)
    not_copied: list[tuple[Path, str]] = []
    try:
        if output is None:
            ours = {p.name for p in ckpt.weight_files} | {f.name for f in plan.files}
            ours |= (
                {ckpt.index_path.name, "model.safetensors.index.json"} if ckpt.index_path else set()
            )
            clean_leftovers(src_folder, ours)
            if not plan.changes(ckpt) and not (to_safetensors and pickled):
                return Written(ckpt.path, False, [])
            written = _in_place(ckpt, plan, staging, as_safetensors, src_folder, progress)
        elif folder_like:
            written, not_copied = _to_folder(
                ckpt, plan, staging, as_safetensors, src_folder, output, progress, durable, files
            )
        else:
            with output_errors(output):
                tmp = staging.file(output)
                _write_one(
                    ckpt, plan, plan.files[0], tmp, as_safetensors, output, progress, durable
                )
            written = [output]
        with output_errors(output or ckpt.path):
            staging.commit(replace_folder=force)
    except BaseException:
        staging.abort()
        raise
    if output is None and pickled and to_safetensors:
        for old in ckpt.weight_files + ([ckpt.index_path] if ckpt.index_path else []):
            if old not in written and old.exists():
                old.unlink()
        fsync_dir(src_folder)
    final = output if output is not None else _final_path(ckpt, written)
    return Written(final, True, written, not_copied)


def _final_path(ckpt: Checkpoint, written: list[Path]) -> Path:
    if ckpt.path.is_dir():
        return ckpt.path
    index = [w for w in written if w.name.endswith(".index.json")]
    return index[0] if index else written[0]


def _check_output(ckpt: Checkpoint, output: Path, force: bool, folder_like: bool) -> None:
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


def _in_place(
    ckpt: Checkpoint,
    plan: Plan,
    staging: Staging,
    as_safetensors: bool,
    folder: Path,
    progress: Progress,
) -> list[Path]:
    finals: list[Path] = []
    index_tmp = None
    converting = as_safetensors and ckpt.format.startswith("pytorch")
    if converting:
        # Never replace another checkpoint: an existing index, a single file, or a shard
        # some index names. Shards no index names are leftovers of an interrupted run.
        from .formats import indexes_in

        named = {s for _index, shards in indexes_in(folder) for s in shards}
        new_names = [f.name for f in plan.files]
        if ckpt.index_path is not None:
            new_names.append("model.safetensors.index.json")
        for name in new_names:
            sharded_orphan = ckpt.index_path is not None and name not in named
            if (folder / name).exists() and not (sharded_orphan and name.endswith(".safetensors")):
                raise OutputError(
                    f"would be replaced by the converted {ckpt.weight_files[0].name}; "
                    "move it away or use -o",
                    folder / name,
                )
    with output_errors(folder):
        if ckpt.index_path is not None:
            index_final = ckpt.index_path
            if converting:
                index_final = folder / "model.safetensors.index.json"
            # Removing names: the new index is valid with old shards and new, so it
            # goes first; adding names: old shards lack them, so it goes last. A
            # converted index names shards that do not exist yet: it goes last too.
            if plan.command == "dedupe" and index_final == ckpt.index_path:
                index_tmp = staging.file(index_final)
            for f in plan.files:
                if (
                    f.source is not None
                    and f.source.name == f.name
                    and not _file_changes(ckpt, plan, f)
                ):
                    _check_kept(ckpt, plan, f, progress)
                    continue
                final = folder / f.name
                tmp = staging.file(final)
                _write_one(ckpt, plan, f, tmp, as_safetensors, ckpt.path, progress, True)
                finals.append(final)
            if index_tmp is None:
                index_tmp = staging.file(index_final)
            _write_index(index_tmp, plan, ckpt.index_path, True)
            finals.append(index_final)
        else:
            f = plan.files[0]
            final = ckpt.weight_files[0]
            if converting:
                final = final.parent / f.name
            tmp = staging.file(final)
            _write_one(ckpt, plan, f, tmp, as_safetensors, ckpt.path, progress, True)
            finals.append(final)
    return finals


def _check_kept(ckpt: Checkpoint, plan: Plan, f: FilePlan, progress: Progress) -> None:
    """A file left as it is still stands in for what the plan removes elsewhere: a
    shard kept whole may hold the source of an alias dropped from another one."""
    names = {t.name for t in f.tensors}
    checks = [c for c in plan.checks if c.out in names and c.input is not ckpt.entries[c.out]]
    _check_all(checks, ckpt.entries, ckpt.path, progress)


def _file_changes(ckpt: Checkpoint, plan: Plan, f: FilePlan) -> bool:
    assert f.source is not None
    before = [n for n, e in ckpt.entries.items() if e.file == f.source]
    return (
        before != [t.name for t in f.tensors]
        or any(t.name in plan.trims for t in f.tensors)
        or bool(plan.pickle_views or plan.pickle_copies)
        or bool(stale_copies(ckpt, plan, f))
    )


def _to_folder(
    ckpt: Checkpoint,
    plan: Plan,
    staging: Staging,
    as_safetensors: bool,
    src_folder: Path,
    output: Path,
    progress: Progress,
    durable: bool,
    files: dict[str, bytes] | None = None,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The written files, and the other files of the folder left out (with the reason)."""
    not_copied: list[tuple[Path, str]] = []
    with output_errors(output):
        tmpdir = staging.folder(output)
        skip = {p.resolve() for p in ckpt.weight_files}
        if ckpt.index_path:
            skip.add(ckpt.index_path.resolve())
        # a lock another run holds (or a killed one left) on the input is not the model's
        skip |= {p.resolve() for p in src_folder.glob(".*" + LOCK_SUFFIX)}
        if ckpt.folder is not None or ckpt.index_path is not None:
            _copy_other_files(src_folder, tmpdir, skip, durable, not_copied)
        _write_files(ckpt, plan, tmpdir, as_safetensors, output, progress, durable)
        if ckpt.index_path is not None:
            name = ckpt.index_path.name
            if as_safetensors and ckpt.format.startswith("pytorch"):
                name = "model.safetensors.index.json"
            _write_index(tmpdir / name, plan, ckpt.index_path, durable)
        elif plan.index_metadata is not None:  # a checkpoint sharded anew (a DCP's output)
            _write_index(tmpdir / "model.safetensors.index.json", plan, None, durable)
        _place_config(ckpt, src_folder, tmpdir)
        for name, data in (files or {}).items():  # after the weights are verified
            replace_file(tmpdir / name, data, durable)
        if durable:
            fsync_dir(tmpdir)
    return [output / f.name for f in plan.files], not_copied


def _write_files(
    ckpt: Checkpoint,
    plan: Plan,
    folder: Path,
    as_safetensors: bool,
    shown: Path,
    progress: Progress,
    durable: bool,
) -> None:
    """Write every file of ``plan`` into ``folder``. Safetensors shards are written two
    at a time: the comparison that ends one shard (the follower catching up with the
    writer) overlaps the next shard's copy instead of leaving the disk idle. The first
    failure in file order is raised once no shard is being written any more."""
    files = plan.files
    if not as_safetensors or len(files) < 2:
        for f in files:
            _write_one(ckpt, plan, f, folder / f.name, as_safetensors, shown, progress, durable)
        return
    total = sum(_write_total(plan, f) for f in files)
    with progress.task(f"writing {files[0].name}", total) as bar:
        within = _Within(bar)
        pool = ThreadPoolExecutor(2)
        try:
            jobs = [
                pool.submit(
                    _write_one, ckpt, plan, f, folder / f.name, True, shown, within, durable
                )
                for f in files
            ]
            for job in jobs:
                job.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


class _Within(Progress):
    """One file's progress, reported into a bar that covers several files."""

    def __init__(self, bar: Progress):
        self._bar = bar

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Progress]:
        self._bar.describe(description)
        yield self

    def advance(self, amount: int) -> None:
        self._bar.advance(amount)


def _write_total(plan: Plan, f: FilePlan) -> int:
    """What writing ``f`` as safetensors reports: its bytes, and both sides of each check."""
    names = {t.name for t in f.tensors}
    checks = sum(2 * c.input.nbytes for c in plan.checks if c.out in names)
    return sum(t.nbytes for t in f.tensors) + checks


def _copy_other_files(
    src: Path, dst: Path, skip: set[Path], durable: bool, not_copied: list[tuple[Path, str]]
) -> None:
    """Copy the folder's other files (tokenizer, generation config...) into ``dst``.

    The folder is untrusted: nothing is followed out of it. Files and folders are
    copied; a link is copied as a (relative) link when it leads to a file or folder
    inside ``src``, and a blob of the Hugging Face cache ``src`` is a snapshot of is
    copied as the file it is. Links leading out of ``src``, broken links and loops,
    and fifos, sockets and devices (never opened: a fifo would hang the run) are
    not copied, and each is added to ``not_copied`` with the reason."""
    _copy_tree(src, src, dst, skip, not_copied)
    if durable:  # the folder replaces one: all of it reaches the disk first
        for folder, dirs, files in os.walk(dst):
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink():
                    fsync_file(path)
            for name in dirs:
                if not (Path(folder) / name).is_symlink():
                    fsync_dir(Path(folder) / name)


def _copy_tree(
    root: Path, src: Path, dst: Path, skip: set[Path], not_copied: list[tuple[Path, str]]
) -> None:
    """Walk with a stack, not recursion: a folder may nest thousands of levels deep."""
    import stat

    from .atomic import OLD_SUFFIX, TMP_SUFFIX
    from .formats.confine import BROKEN, OUTSIDE, belongs, is_cache_blob, resolved

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


def _place_config(ckpt: Checkpoint, src_folder: Path, tmpdir: Path) -> None:
    """The ``config.json`` named with ``--config`` goes beside the output's weights."""
    cfg = ckpt.config_path
    if cfg is not None and cfg.resolve() != (src_folder / "config.json").resolve():
        shutil.copyfile(cfg, tmpdir / "config.json")


def replace_file(path: Path, data: bytes, durable: bool) -> None:
    """Write ``data`` as ``path`` (a fresh file: a link copied there is replaced, not
    followed), fsynced when ``durable``."""
    if path.is_symlink() or path.exists():
        path.unlink()
    _write_new(path, data, durable, os.O_EXCL)


def _write_new(path: Path, data: bytes, durable: bool, mode: int) -> None:
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


def _write_index(path: Path, plan: Plan, original: Path | None, durable: bool) -> None:
    """The new index: the original's document with its ``weight_map`` and ``metadata``
    replaced; every other key (``quantization_config``...) and metadata entry kept."""
    from .formats import read_json

    weight_map = {t.name: f.name for f in plan.files for t in f.tensors}
    if plan.pickle_output:  # an alias a pickle keeps as a view lives in its source's shard
        weight_map |= {
            a: weight_map[s] for a, (s, _t) in plan.pickle_views.items() if s in weight_map
        }
    before = read_json(original, what="index") if original is not None else {}
    before = before if isinstance(before, dict) else {}
    old_meta = before.get("metadata")
    old_meta = old_meta if isinstance(old_meta, dict) else {}
    meta = dict(plan.index_metadata or {})
    if "format" not in old_meta:  # a shard's "format": "pt", not the index's
        meta.pop("format", None)
    meta["total_size"] = plan.bytes_after
    doc = dict(before) | {"metadata": meta, "weight_map": weight_map}
    _write_new(path, (json.dumps(doc, indent=2) + "\n").encode(), durable, os.O_TRUNC)


def _write_one(
    ckpt: Checkpoint,
    plan: Plan,
    f: FilePlan,
    tmp: Path,
    as_safetensors: bool,
    shown: Path,
    progress: Progress,
    durable: bool,
) -> None:
    """Write one output file, compare every tensor in it with the input, and (when
    ``durable``) fsync it; the disk starts on the bytes while the copy goes on."""
    names = {t.name for t in f.tensors}
    if not as_safetensors:  # a pickle keeps its aliases, as views of their sources
        names |= {a for a, (s, _t) in plan.pickle_views.items() if s in names}
    checks = [c for c in plan.checks if c.out in names]
    if ckpt.format == "gguf":
        _write_gguf(ckpt, f, tmp, checks, shown, progress, durable)
        return
    if not as_safetensors:
        reader = next(r for r in ckpt.readers if r.path == f.source)
        if _zip_shareable(reader, plan) and _write_zip(
            ckpt, plan, reader, tmp, f.name, checks, shown, progress, durable
        ):
            return
        with_torch = PickleFile(reader.path) if isinstance(reader, TorchZip) else reader
        try:
            _save_with_torch(with_torch, plan, tmp, durable)
        finally:
            if with_torch is not reader:
                with_torch.close()
        _verify_pickle(tmp, checks, shown, progress)
        return
    total = _write_total(plan, f)
    mark = _Mark()
    with progress.task(f"writing {f.name}", total) as bar:
        followed = _beside(
            mark,
            shown,
            lambda: _write_synced(tmp, f, bar, mark, durable),
            lambda: _follow(tmp, checks, ckpt.entries, mark, shown, bar),
        )
    if not followed:  # the writer ended without error, short of what was checked
        raise VerificationError(
            f"verification failed: {tmp.name} was written short; nothing was changed", shown
        )


def _write_gguf(
    ckpt: Checkpoint,
    f: FilePlan,
    tmp: Path,
    checks: list[Check],
    shown: Path,
    progress: Progress,
    durable: bool,
) -> None:
    """A GGUF file: its metadata kept as it is, tensors copied, read back with gguf."""
    from .formats.gguf_write import check_written, write_gguf

    src = ckpt.readers[0]
    with progress.task(f"writing {f.name}", sum(t.nbytes for t in f.tensors)) as bar:
        with output_errors(shown):
            write_gguf(src, f.tensors, tmp, bar, durable)
    wrong = check_written(src, tmp, checks, progress)
    if wrong is not None:
        raise VerificationError(
            f"verification failed: the written {tmp.name}: {wrong}; nothing was changed", shown
        )


def _beside(mark: _Mark, shown: Path, write: Callable[[], None], follow: Callable[[], T]) -> T:
    """Run ``write`` in a thread while ``follow`` reads behind it here, through ``mark``.

    A follower that fails stops the writer; otherwise the writer's error, if any, is
    raised once it has ended (an OS error as an OutputError about ``shown``)."""

    def run() -> None:
        try:
            write()
        finally:
            mark.end()

    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(run)
        try:
            followed = follow()
        except BaseException:
            mark.stop()
            raise
        finally:
            wait([writing])
        with output_errors(shown):
            writing.result()
    return followed


class _Stopped(Exception):
    """The reader gave up; the writer stops at its next step."""


class _Mark:
    """How far a writer has got, shared with the reader that follows it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pos = 0
        self._ended = False  # the writer finished or failed
        self._stopped = False  # the reader wants the writer to stop

    def reached(self, pos: int) -> None:
        with self._cond:
            if self._stopped:
                raise _Stopped
            self._pos = pos
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def until(self, done: Callable[[], bool]) -> bool:
        """Wait until ``done()`` or the writer ends; whether ``done()``."""
        with self._cond:
            self._cond.wait_for(lambda: done() or self._ended)
            return done()

    def ready(self, pos: int) -> None:
        """Return once the first ``pos`` bytes are written; raise if they never will be."""
        with self._cond:
            self._cond.wait_for(lambda: self._pos >= pos or self._ended)
            if self._pos < pos:
                raise _WriterEnded


class _WriterEnded(Exception):
    """The writer finished or failed before writing what the reader waits for."""


def _write_synced(tmp: Path, f: FilePlan, bar: Progress, mark: _Mark, durable: bool) -> None:
    write_file(tmp, f.tensors, f.metadata, bar, mark.reached, writeback=durable)
    _sync_file(tmp, durable)


def _follow(
    tmp: Path,
    checks: list[Check],
    inputs: dict[str, Entry],
    mark: _Mark,
    shown: Path,
    bar: Progress,
) -> bool:
    """Compare what the writer has written with the input, a piece behind it.

    A removed alias is compared with its source *in the input*: that needs no
    written byte, so it runs first, while the writer gets ahead; the written
    source is compared with the input's source as well, and equality is
    transitive. Returns False, early, when the writer ends before writing what is to
    be compared (its error, if it failed, is the one to report).
    """
    direct = {c.out for c in checks if c.transform == "identity" and c.input is inputs.get(c.out)}
    early = [c for c in checks if c.out in direct and c.input is not inputs.get(c.out)]
    for check in early:
        _check_one(check, inputs, shown, bar)
    try:
        mark.ready(8)
        reader = _read_back(tmp, shown, lambda: SafetensorsFile(tmp))
    except _WriterEnded:
        return False
    try:
        out = {e.name: e for e in reader.entries()}
        mark.ready(reader.data_start)
        rest = [c for c in checks if not any(c is e for e in early)]
        placed = [(_start(out[c.out]) if c.out in out else -1, i) for i, c in enumerate(rest)]
        for start, i in sorted(placed):
            check, got = rest[i], out.get(rest[i].out)
            if got is None or not _written_equal(got, check, mark, reader.data_start + start, bar):
                raise _mismatch(check, shown)
    except _WriterEnded:
        return False
    finally:
        reader.close()
    return True


def _written_equal(got: Entry, check: Check, mark: _Mark, at: int, bar: Progress) -> bool:
    """``got`` (at byte ``at`` of the file being written) equals what ``check`` wants."""
    want = check.input
    if check.transform != "identity":
        mark.ready(at + got.nbytes)
        return equal(got, want, check.transform, bar)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    return same_bytes(got, want, bar, lambda end: mark.ready(at + end))


def _zip_shareable(reader: Any, plan: Plan) -> bool:
    """Whether torch can be left out: a zip read without it, aliases shared as they are
    and copies made as they are (no transpose), nothing trimmed."""
    return (
        isinstance(reader, TorchZip)
        and not plan.trims
        and all(
            t == "identity" for _s, t in (*plan.pickle_views.values(), *plan.pickle_copies.values())
        )
    )


def _write_zip(
    ckpt: Checkpoint,
    plan: Plan,
    reader: TorchZip,
    tmp: Path,
    name: str,
    checks: list[Check],
    shown: Path,
    progress: Progress,
    durable: bool,
) -> bool:
    """Rewrite a torch zip without torch, comparing each record copied from the input
    while the next is written, then the tensors the written pickle names.

    False (and nothing left behind) when the archive would need zip64."""
    shared = {a: s for a, (s, _t) in plan.pickle_views.items()}
    copies = {a: s for a, (s, _t) in plan.pickle_copies.items()}
    mark = _Mark()
    placed: list[tuple[int, int, int]] = []  # (output offset, size, input offset)

    def place(at: int, size: int, src_at: int) -> None:
        placed.append((at, size, src_at))
        mark.poke()

    def write(bar: Progress) -> None:
        write_shared(
            reader,
            shared,
            tmp,
            lambda src, dst, at, to, n: writes.copy_range(src, dst, at, to, n, bar, mark.reached),
            place,
            mark.reached,
            copies,
        )
        _sync_file(tmp, durable)

    total = 2 * reader.size  # about: what is copied, and compared
    with progress.task(f"writing {name}", total) as bar:
        try:
            compared, pairs = _beside(
                mark,
                shown,
                lambda: write(bar),
                lambda: _follow_zip(tmp, reader, placed, checks, ckpt.entries, mark, shown, bar),
            )
        except Declined:
            tmp.unlink()
            return False
    _check_zip(tmp, reader, checks, compared, pairs, shown, progress)
    return True


def _follow_zip(
    tmp: Path,
    reader: TorchZip,
    placed: list[tuple[int, int, int]],
    checks: list[Check],
    inputs: dict[str, Entry],
    mark: _Mark,
    shown: Path,
    bar: Progress,
) -> tuple[list[tuple[int, int, int]], set[tuple[int, int]]]:
    """Compare each record written from the input with its input bytes, as soon as it is
    in; first, each alias with its source in the input (that needs nothing written).

    Returns the records found equal and the (source, alias) input offsets found equal."""
    pairs: set[tuple[int, int]] = set()
    for check in checks:
        source = inputs.get(check.out)
        if source is not None and source is not check.input:
            _check_one(check, inputs, shown, bar)
            pairs.add((_start(source), _start(check.input)))
    compared: list[tuple[int, int, int]] = []
    if not mark.until(lambda: bool(placed)):  # the file exists once a record is placed
        return compared, pairs
    out = ByteFile(tmp)
    try:
        while mark.until(lambda: len(placed) > len(compared)):
            at, size, src_at = placed[len(compared)]
            mark.ready(at + size)
            if not same_bytes(_span(out, at, size), _span(reader, src_at, size), bar):
                raise VerificationError(
                    f"verification failed: {tmp.name} differs from the input at byte {at}; "
                    "nothing was changed",
                    shown,
                )
            compared.append((at, size, src_at))
    except _WriterEnded:
        pass  # the writer's error, if any, is the one to report; what is left is read below
    finally:
        out.close()
    return compared, pairs


def _check_zip(
    tmp: Path,
    reader: TorchZip,
    checks: list[Check],
    compared: list[tuple[int, int, int]],
    pairs: set[tuple[int, int]],
    shown: Path,
    progress: Progress,
) -> None:
    """Read the written archive back and check every tensor it names: one that lies in
    a record compared while writing, at the place its input tensor has in the input
    record (or at its source's place, an alias compared with it), is equal; any other
    is compared in full."""
    written: Any = _read_back(tmp, shown, lambda: open_torchzip(tmp) or PickleFile(tmp))
    try:
        out = {e.name: e for e in written.entries()}
        left = []
        for check in checks:
            got, want = out.get(check.out), check.input
            if (
                got is not None
                and isinstance(written, TorchZip)
                and check.transform == "identity"
                and (got.dtype, got.shape) == (want.dtype, want.shape)
                and cast(FileBlob, want.blob).file is cast(Any, reader)
            ):
                at = _copied_from(_start(got), got.nbytes, compared)
                if at is not None and (at == _start(want) or (at, _start(want)) in pairs):
                    continue
            left.append(check)
        _check_all(left, out, shown, progress)
    finally:
        written.close()


def _copied_from(start: int, size: int, compared: list[tuple[int, int, int]]) -> int | None:
    """Where in the input the ``size`` bytes written at ``start`` were compared equal to."""
    for at, n, src_at in compared:
        if at <= start and start + size <= at + n:
            return src_at + (start - at)
    return None


def _span(file: Any, start: int, size: int) -> Entry:
    """``size`` bytes at ``start`` of ``file``, as an entry to compare."""
    return Entry("", "U8", (size,), size, FileBlob(file, start, size))


def _sync_file(path: Path, durable: bool) -> None:
    if durable:
        fsync_file(path)


def _save_with_torch(reader: PickleFile, plan: Plan, tmp: Path, durable: bool) -> None:
    import torch

    new: dict[str, Any] = copy.copy(reader.state_dict)  # an OrderedDict keeps its _metadata
    for name, rows in plan.trims.items():  # a padded vocabulary cut to its first rows
        if name in new:
            new[name] = new[name][:rows].clone()
    for name, (src, transform) in plan.pickle_views.items():
        if name in new and src in new:
            new[name] = new[src] if transform == "identity" else new[src].t()
    for name, (src, transform) in plan.pickle_copies.items():
        if src in new:
            value = new[src] if transform == "identity" else new[src].t()
            new[name] = value.contiguous().clone()
    top = reader.top
    if reader.nested_key is not None:
        top = dict(top)
        top[reader.nested_key] = new
    else:
        top = new
    with open(tmp, "xb") as out:
        try:
            torch.save(top, out)
        except RecursionError:  # pickling recurses once per level of nesting
            raise CheckpointFormatError(
                "what it holds beside the tensors nests too deeply for torch.save to write it back",
                reader.path,
                hint="save the state dict alone: torch.save(checkpoint['state_dict'])",
            ) from None
        out.flush()
        if durable:
            os.fsync(out.fileno())


def _read_back(tmp: Path, shown: Path, open_it: Callable[[], Any]) -> Any:
    """Open a file just written; one that cannot be read back failed verification."""
    try:
        return open_it()
    except CheckpointFormatError as e:
        raise VerificationError(
            f"verification failed: the written {tmp.name} cannot be read back ({e.message}); "
            "nothing was changed",
            shown,
        ) from None


def _start(e: Entry) -> int:
    return cast(FileBlob, e.blob).start


def _verify_pickle(tmp: Path, checks: list[Check], shown: Path, progress: Progress) -> None:
    """Every tensor of a written pickle equals the input tensor it stands for, bit for bit."""
    reader: Any = _read_back(tmp, shown, lambda: open_torchzip(tmp) or PickleFile(tmp))
    try:
        _check_all(checks, {e.name: e for e in reader.entries()}, shown, progress)
    finally:
        reader.close()


def _check_all(checks: list[Check], out: dict[str, Entry], shown: Path, progress: Progress) -> None:
    with progress.task("verifying", sum(2 * c.input.nbytes for c in checks)) as bar:
        for check in checks:
            _check_one(check, out, shown, bar)


def _check_one(check: Check, out: dict[str, Entry], shown: Path, bar: Progress) -> None:
    got = out.get(check.out)
    if got is None or not equal(got, check.input, check.transform, bar):
        raise _mismatch(check, shown)


def _mismatch(check: Check, shown: Path) -> VerificationError:
    return VerificationError(
        f"verification failed: written {check.out!r} does not equal the input's "
        f"{check.input.name!r}; nothing was changed",
        shown,
    )
