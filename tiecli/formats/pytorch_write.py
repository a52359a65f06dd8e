"""Writing one planned PyTorch pickle, and checking it against the input.

A torch zip read without torch is rewritten without it: its records copied
(in the kernel where it can), each compared with its input bytes as soon as it
is in, its pickle rewritten to name aliases as views of their sources. Any
other pickle (or a rewrite that transposes or trims) is saved by ``torch.save``
and read back in full.
"""

from __future__ import annotations

import copy
import os
from functools import partial
from pathlib import Path
from typing import Any, cast

from ..checkpoint import Entry
from ..errors import CheckpointFormatError, VerificationError
from ..io import ByteFile, FileBlob, writes
from ..io.follow import Mark, WriterEnded, beside
from ..plan import Check, FilePlan, Plan
from ..progress import Progress
from ..values import same_bytes
from ..write.compare import check_all, check_one, read_back, start, sync_file
from .base import Job, by_file
from .pytorch import PickleFile
from .torchzip import TorchZip, open_torchzip
from .torchzip_pickle import Declined
from .torchzip_write import write_shared


def write_pickle(job: Job, f: FilePlan, tmp: Path, checks: list[Check]) -> None:
    """Write ``f`` as a pickle beside its input file, and verify it."""
    reader = cast(Any, by_file(job.ckpt, cast(Path, f.source)))
    if zip_shareable(reader, job.plan) and write_zip(job, reader, tmp, f.name, checks):
        return
    with_torch = PickleFile(reader.path) if isinstance(reader, TorchZip) else reader
    try:
        save_with_torch(with_torch, job.plan, tmp, job.durable)
    finally:
        if with_torch is not reader:
            with_torch.close()
    verify_pickle(tmp, checks, job.shown, job.progress)


def zip_shareable(reader: Any, plan: Plan) -> bool:
    """Whether torch can be left out: a zip read without it, aliases shared as they are
    and copies made as they are (no transpose), nothing trimmed or left out."""
    return (
        isinstance(reader, TorchZip)
        and not plan.trims
        and not plan.dropped
        and all(t == "identity" for _s, t in (*plan.views.values(), *plan.copies.values()))
    )


def write_zip(job: Job, reader: TorchZip, tmp: Path, name: str, checks: list[Check]) -> bool:
    """Rewrite a torch zip without torch, comparing each range copied from the input a
    piece behind the writer, then the tensors the written pickle names.

    False (and nothing left behind) when the archive would need zip64."""
    plan, shown = job.plan, job.shown
    shared = {a: s for a, (s, _t) in plan.views.items()}
    copies = {a: s for a, (s, _t) in plan.copies.items()}
    mark = Mark()
    placed: list[tuple[int, int, int]] = []  # (output offset, size, input offset)
    literal: list[tuple[int, bytes]] = []  # (output offset, bytes written from memory)

    def place(at: int, size: int, src_at: int) -> None:
        placed.append((at, size, src_at))
        mark.poke()

    def write(bar: Progress) -> None:
        def copy(src: int, dst: int, at: int, to: int, n: int) -> None:
            # a durable write asks the disk to start on each piece as it is copied, so the
            # fsync that ends it finds most of the file on its way (as a safetensors write)
            writes.copy_range(src, dst, at, to, n, bar, mark.reached, writeback=job.durable)

        write_shared(
            reader, shared, tmp, copy, place, mark.reached, copies, lambda *p: literal.append(p)
        )
        sync_file(tmp, job.durable)

    total = 2 * reader.size  # about: what is copied, and compared
    entries = job.ckpt.entries
    with job.progress.task(f"writing {name}", total) as bar:
        try:
            compared, pairs = beside(
                mark,
                shown,
                lambda: write(bar),
                lambda: follow_zip(tmp, reader, placed, checks, entries, mark, shown, bar),
            )
        except Declined:  # declined before anything is written
            tmp.unlink(missing_ok=True)
            return False
    check_written_bytes(tmp, literal, shown)
    check_zip(tmp, reader, checks, compared, pairs, shown, job.progress)
    return True


def check_written_bytes(tmp: Path, literal: list[tuple[int, bytes]], shown: Path) -> None:
    """Read back what was written from memory (record headers, the pickle, data
    descriptors with each record's CRC, the central directory): the file must hold it
    byte for byte, as the copied ranges are compared with their input."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        for at, data in literal:
            if os.pread(fd, len(data), at) != data:
                raise VerificationError(
                    f"verification failed: the {len(data)} bytes of archive structure written at "
                    f"byte {at} read back different; nothing was changed",
                    shown,
                )
    finally:
        os.close(fd)


def follow_zip(
    tmp: Path,
    reader: TorchZip,
    placed: list[tuple[int, int, int]],
    checks: list[Check],
    inputs: dict[str, Entry],
    mark: Mark,
    shown: Path,
    bar: Progress,
) -> tuple[list[tuple[int, int, int]], set[tuple[int, int]]]:
    """Compare each range written from the input with its input bytes, piece by piece as
    it comes in; first, each alias with its source in the input (that needs nothing
    written).

    Returns the records found equal and the (source, alias) input offsets found equal."""
    pairs: set[tuple[int, int]] = set()
    for check in checks:
        source = inputs.get(check.out)
        if source is not None and source is not check.input:
            check_one(check, inputs, shown, bar)
            pairs.add((start(source), start(check.input)))
    compared: list[tuple[int, int, int]] = []
    if not mark.until(lambda: bool(placed)):  # the file exists once a record is placed
        return compared, pairs
    out = ByteFile(tmp)
    try:
        while mark.until(lambda: len(placed) > len(compared)):
            at, size, src_at = placed[len(compared)]
            # each piece is compared as soon as it is in, not once the whole record is:
            # the last record's comparison then trails the writer by one copy step
            ready = partial(_ready_from, mark, at)
            if not same_bytes(span(out, at, size), span(reader, src_at, size), bar, ready):
                raise VerificationError(
                    f"verification failed: {tmp.name} differs from the input at byte {at}; "
                    "nothing was changed",
                    shown,
                )
            compared.append((at, size, src_at))
    except WriterEnded:
        pass  # the writer's error, if any, is the one to report; what is left is read below
    finally:
        out.close()
    return compared, pairs


def check_zip(
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
    written: Any = read_back(tmp, shown, lambda: open_torchzip(tmp) or PickleFile(tmp))
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
                at = copied_from(start(got), got.nbytes, compared)
                if at is not None and (at == start(want) or (at, start(want)) in pairs):
                    continue
            left.append(check)
        check_all(left, out, shown, progress)
    finally:
        written.close()


def _ready_from(mark: Mark, at: int, end: int) -> None:
    """Wait until the first ``end`` bytes of the record written at ``at`` are in."""
    mark.ready(at + end)


def copied_from(at: int, size: int, compared: list[tuple[int, int, int]]) -> int | None:
    """Where in the input the ``size`` bytes written at ``at`` were compared equal to."""
    for out_at, n, src_at in compared:
        if out_at <= at and at + size <= out_at + n:
            return src_at + (at - out_at)
    return None


def span(file: Any, at: int, size: int) -> Entry:
    """``size`` bytes at ``at`` of ``file``, as an entry to compare."""
    return Entry("", "U8", (size,), size, FileBlob(file, at, size))


def save_with_torch(reader: PickleFile, plan: Plan, tmp: Path, durable: bool) -> None:
    import torch

    new: dict[str, Any] = copy.copy(reader.state_dict)  # an OrderedDict keeps its _metadata
    for name, rows in plan.trims.items():  # a padded vocabulary cut to its first rows
        if name in new:
            new[name] = new[name][:rows].clone()
    for name in plan.dropped:
        new.pop(name, None)
    for name, (src, transform) in plan.views.items():
        if name in new and src in new:
            new[name] = new[src] if transform == "identity" else new[src].t()
    for name, (src, transform) in plan.copies.items():
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


def verify_pickle(tmp: Path, checks: list[Check], shown: Path, progress: Progress) -> None:
    """Every tensor of a written pickle equals the input tensor it stands for, bit for bit."""
    reader: Any = read_back(tmp, shown, lambda: open_torchzip(tmp) or PickleFile(tmp))
    try:
        check_all(checks, {e.name: e for e in reader.entries()}, shown, progress)
    finally:
        reader.close()
