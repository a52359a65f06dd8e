"""Running a rewrite: every planned file written beside its target and verified,
then all renamed into place, in place or into a new file or folder.

Nothing here knows a format: the output form's ``write`` writes and checks
each file (:mod:`tiecli.formats.base`). Nothing is renamed into place before
every output tensor has been compared, bit for bit, with the input tensor it
stands for.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import field
from functools import partial
from pathlib import Path

from ..atomic import LOCK_SUFFIX, Staging, clean_leftovers, fsync_dir, output_errors
from ..checkpoint import Checkpoint
from ..errors import UnsafeChangeError
from ..formats import read_json
from ..formats.base import Format, Job
from ..formats.folder_names import SAFETENSORS_INDEX, safetensors_name
from ..lean import dataclass
from ..options import RewriteOptions
from ..plan import FilePlan, Plan, stale_copies
from ..progress import Progress
from .compare import check_all, write_total
from .folder import copy_other_files, place_config, replace_file, write_new
from .paths import check_output, final_path, index_name, refuse_replacing, source_folder


@dataclass
class Written:
    """What a rewrite wrote: the output, its files, and files it left out."""

    output: Path
    changed: bool  # False when an in-place run found nothing to change
    files: list[Path]
    not_copied: list[tuple[Path, str]] = field(default_factory=list)  # other files left out


@dataclass
class Run:
    """One rewrite: the input, its plan, the form written, and how."""

    ckpt: Checkpoint
    plan: Plan
    form: Format  # the output's form
    converting: bool  # a pickle rewritten as safetensors
    staging: Staging
    progress: Progress

    def write(self, f: FilePlan, tmp: Path, shown: Path, durable: bool, progress: Progress) -> None:
        """Write one output file, compare every tensor in it with the input, and (when
        ``durable``) fsync it; the disk starts on the bytes while the copy goes on."""
        names = {t.name for t in f.tensors}
        # a form that shares storage keeps its aliases, as views of their sources
        names |= {a for a, (s, _t) in self.plan.views.items() if s in names}
        checks = [c for c in self.plan.checks if c.out in names]
        job = Job(self.ckpt, self.plan, shown, progress, durable)
        self.form.write(job, f, tmp, checks)


def execute(
    ckpt: Checkpoint,
    plan: Plan,
    options: RewriteOptions,
    *,
    progress: Progress,
    files: dict[str, bytes] | None = None,
) -> Written:
    """Write ``plan``, verify it, and put it in place, as ``options`` say: at
    ``output`` (None: in place), replacing it if ``force``, synced if ``fsync``,
    converted if ``to`` is ``"safetensors"``.

    ``files``: other files of a folder output (``config.json``) that replace the
    input's copies in it, written once the weights are verified.

    Durability: whatever replaces an existing file (in place, or ``-o`` over an
    existing output) is fsynced before the rename, so a power cut leaves the old
    or the new, never neither. A new ``-o`` output is as durable as ``cp``'s: in
    the page cache, on disk within the kernel's writeback delay; ``fsync=True``
    syncs it before returning.
    """
    output, force, fsync = options.output, options.force, options.fsync
    to_safetensors = options.to_safetensors
    converting = options.converts(ckpt.form)
    folder_like = ckpt.folder is not None or ckpt.index_path is not None
    src_folder = source_folder(ckpt)

    if output is not None:
        # a replaced output an interrupted run moved aside goes back first
        clean_leftovers(output.parent, {output.name})
        check_output(ckpt, output, force, folder_like)
    if converting:
        for f in plan.files:
            f.name = safetensors_name(f.name)

    placed = {t.name for f in plan.files for t in f.tensors} | set(plan.views)
    for check in plan.checks:
        if check.out not in placed:
            raise UnsafeChangeError(
                f"{check.out!r} would not be written; nothing was changed", ckpt.path
            )
    durable = fsync or output is None or output.exists() or output.is_symlink()
    staging = Staging(durable)
    run = Run(ckpt, plan, ckpt.form.written_as(to_safetensors), converting, staging, progress)
    not_copied: list[tuple[Path, str]] = []
    try:
        if output is None:
            ours = {p.name for p in ckpt.weight_files} | {f.name for f in plan.files}
            ours |= {ckpt.index_path.name, SAFETENSORS_INDEX} if ckpt.index_path else set()
            clean_leftovers(src_folder, ours)
            if not plan.changes(ckpt) and not converting:
                return Written(ckpt.path, False, [])
            written = _in_place(run, src_folder)
        elif folder_like:
            written, not_copied = _to_folder(run, src_folder, output, durable, files)
        else:
            with output_errors(output):
                tmp = staging.file(output)
                run.write(plan.files[0], tmp, output, durable, progress)
            written = [output]
        with output_errors(output or ckpt.path):
            staging.commit(replace_folder=force)
    except BaseException:
        staging.abort()
        raise
    if output is None and converting:
        for old in ckpt.weight_files + ([ckpt.index_path] if ckpt.index_path else []):
            if old not in written and old.exists():
                old.unlink()
        fsync_dir(src_folder)
    final = output if output is not None else final_path(ckpt, written)
    return Written(final, True, written, not_copied)


def _in_place(run: Run, folder: Path) -> list[Path]:
    ckpt, plan, staging = run.ckpt, run.plan, run.staging
    finals: list[Path] = []
    index_tmp = None
    if run.converting:
        new_names = [f.name for f in plan.files]
        if ckpt.index_path is not None:
            new_names.append(SAFETENSORS_INDEX)
        refuse_replacing(ckpt, new_names, folder)
    with output_errors(folder):
        if ckpt.index_path is not None:
            index_final = ckpt.index_path
            if run.converting:
                index_final = folder / SAFETENSORS_INDEX
            # Removing names: the new index is valid with old shards and new, so it
            # goes first; adding names: old shards lack them, so it goes last. A
            # converted index names shards that do not exist yet: it goes last too.
            if plan.command == "dedupe" and index_final == ckpt.index_path:
                index_tmp = staging.file(index_final)
            for f in plan.files:
                if f.source is not None and f.source.name == f.name and not _changes(run, f):
                    _check_kept(run, f)
                    continue
                final = folder / f.name
                run.write(f, staging.file(final), ckpt.path, True, run.progress)
                finals.append(final)
            if index_tmp is None:
                index_tmp = staging.file(index_final)
            _write_index(index_tmp, plan, ckpt.index_path, True)
            finals.append(index_final)
        else:
            f = plan.files[0]
            final = ckpt.weight_files[0]
            if run.converting:
                final = final.parent / f.name
            run.write(f, staging.file(final), ckpt.path, True, run.progress)
            finals.append(final)
    return finals


def _check_kept(run: Run, f: FilePlan) -> None:
    """A file left as it is still stands in for what the plan removes elsewhere: a
    shard kept whole may hold the source of an alias dropped from another one."""
    entries = run.ckpt.entries
    names = {t.name for t in f.tensors}
    checks = [c for c in run.plan.checks if c.out in names and c.input is not entries[c.out]]
    check_all(checks, entries, run.ckpt.path, run.progress)


def _changes(run: Run, f: FilePlan) -> bool:
    """Whether the input file ``f`` replaces is rewritten (else it is kept as it is)."""
    ckpt, plan = run.ckpt, run.plan
    assert f.source is not None
    before = [n for n, e in ckpt.entries.items() if e.file == f.source]
    return (
        before != [t.name for t in f.tensors]
        or any(t.name in plan.trims for t in f.tensors)
        or bool(plan.views or plan.copies)
        or bool(stale_copies(ckpt, plan, f))
    )


def _to_folder(
    run: Run,
    src_folder: Path,
    output: Path,
    durable: bool,
    files: dict[str, bytes] | None = None,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The written files, and the other files of the folder left out (with the reason)."""
    ckpt, plan = run.ckpt, run.plan
    not_copied: list[tuple[Path, str]] = []
    with output_errors(output):
        tmpdir = run.staging.folder(output)
        skip = {p.resolve() for p in ckpt.weight_files}
        if ckpt.index_path:
            skip.add(ckpt.index_path.resolve())
        # a lock another run holds (or a killed one left) on the input is not the model's
        skip |= {p.resolve() for p in src_folder.glob(".*" + LOCK_SUFFIX)}
        if ckpt.folder is not None or ckpt.index_path is not None:
            copy_other_files(src_folder, tmpdir, skip, durable, not_copied)
        _write_files(run, tmpdir, output, durable)
        if ckpt.index_path is not None:
            name = index_name(ckpt, run.converting)
            _write_index(tmpdir / name, plan, ckpt.index_path, durable)
        elif plan.index_metadata is not None:  # a checkpoint sharded anew (a DCP's output)
            _write_index(tmpdir / SAFETENSORS_INDEX, plan, None, durable)
        place_config(ckpt, src_folder, tmpdir)
        for name, data in (files or {}).items():  # after the weights are verified
            replace_file(tmpdir / name, data, durable)
        if durable:
            fsync_dir(tmpdir)
    return [output / f.name for f in plan.files], not_copied


def _write_files(run: Run, folder: Path, shown: Path, durable: bool) -> None:
    """Write every file of the plan into ``folder``. A form that overlaps files (safetensors)
    has them written two at a time: the comparison that ends one (the follower catching
    up with the writer) overlaps the next one's copy instead of leaving the disk idle. The
    first failure in file order is raised once no file is being written any more."""
    files = run.plan.files
    if not run.form.overlaps_files or len(files) < 2:
        for f in files:
            run.write(f, folder / f.name, shown, durable, run.progress)
        return
    total = sum(write_total(run.plan, f) for f in files)
    with run.progress.task(f"writing {files[0].name}", total) as bar:
        within = _Within(bar)
        _two_at_a_time(
            [partial(run.write, f, folder / f.name, shown, durable, within) for f in files]
        )


def _two_at_a_time(calls: list[Callable[[], None]]) -> None:
    """Run ``calls`` in order on two threads, each taking the next call when it is free.
    After a failure no further call starts; once both threads are done, the first
    failure in call order is raised. Plain threads, not an executor: importing
    ``concurrent.futures`` costs a few ms and registers an exit handler (through
    ``logging``) that keeps :func:`tiecli.cli.main` from its quick exit."""
    failures: dict[int, BaseException] = {}
    following = iter(enumerate(calls))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if failures:
                    return
                i, call = next(following, (-1, None))
            if call is None:
                return
            try:
                call()
            except BaseException as e:  # noqa: BLE001 - raised by the caller below
                with lock:
                    failures[i] = e

    threads = [threading.Thread(target=work, name=f"tiecli-files-{n}") for n in range(2)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as e:  # Ctrl-C while waiting: no new file, then wait for both
        with lock:
            failures.setdefault(-1, e)
        for t in threads:
            t.join()
        raise
    if failures:
        raise failures[min(failures)]


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


def _write_index(path: Path, plan: Plan, original: Path | None, durable: bool) -> None:
    """The new index: the original's document with its ``weight_map`` and ``metadata``
    replaced; every other key (``quantization_config``...) and metadata entry kept."""
    weight_map = {t.name: f.name for f in plan.files for t in f.tensors}
    # an alias a form that shares storage keeps as a view lives in its source's shard
    weight_map |= {a: weight_map[s] for a, (s, _t) in plan.views.items() if s in weight_map}
    before = read_json(original, what="index") if original is not None else {}
    before = before if isinstance(before, dict) else {}
    old_meta = before.get("metadata")
    old_meta = old_meta if isinstance(old_meta, dict) else {}
    meta = dict(plan.index_metadata or {})
    if "format" not in old_meta:  # a shard's "format": "pt", not the index's
        meta.pop("format", None)
    meta["total_size"] = plan.bytes_after
    doc = dict(before) | {"metadata": meta, "weight_map": weight_map}
    write_new(path, (json.dumps(doc, indent=2) + "\n").encode(), durable, os.O_TRUNC)
