"""Writing one planned safetensors file, compared with the input as it is written.

The writer runs in a thread; here a follower reads the file a piece behind it
(:mod:`tiecli.io.follow`) and compares each tensor with the input tensor it
stands for, so the comparison costs no second pass over the written bytes.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Entry
from ..errors import VerificationError
from ..io.follow import Mark, WriterEnded, beside
from ..plan import Check, FilePlan
from ..progress import Progress
from ..values import equal, same_bytes
from ..write.compare import check_one, mismatch, read_back, start, sync_file, write_total
from .base import Job
from .safetensors import SafetensorsFile, write_file


def write_safetensors(job: Job, f: FilePlan, tmp: Path, checks: list[Check]) -> None:
    """Write ``f`` as ``tmp`` while a follower compares it with the input."""
    mark = Mark()
    with job.progress.task(f"writing {f.name}", write_total(job.plan, f)) as bar:
        followed = beside(
            mark,
            job.shown,
            lambda: write_synced(tmp, f, bar, mark, job.durable),
            lambda: follow(tmp, checks, job.ckpt.entries, mark, job.shown, bar),
        )
    if not followed:  # the writer ended without error, short of what was checked
        raise VerificationError(
            f"verification failed: {tmp.name} was written short; nothing was changed", job.shown
        )


def write_synced(tmp: Path, f: FilePlan, bar: Progress, mark: Mark, durable: bool) -> None:
    write_file(tmp, f.tensors, f.metadata, bar, mark.reached, writeback=durable)
    sync_file(tmp, durable)


def follow(
    tmp: Path,
    checks: list[Check],
    inputs: dict[str, Entry],
    mark: Mark,
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
        check_one(check, inputs, shown, bar)
    try:
        mark.ready(8)
        reader = read_back(tmp, shown, lambda: SafetensorsFile(tmp))
    except WriterEnded:
        return False
    try:
        out = {e.name: e for e in reader.entries()}
        mark.ready(reader.data_start)
        rest = [c for c in checks if not any(c is e for e in early)]
        placed = [(start(out[c.out]) if c.out in out else -1, i) for i, c in enumerate(rest)]
        for at, i in sorted(placed):
            check, got = rest[i], out.get(rest[i].out)
            if got is None or not written_equal(got, check, mark, reader.data_start + at, bar):
                raise mismatch(check, shown)
    except WriterEnded:
        return False
    finally:
        reader.close()
    return True


def written_equal(got: Entry, check: Check, mark: Mark, at: int, bar: Progress) -> bool:
    """``got`` (at byte ``at`` of the file being written) equals what ``check`` wants."""
    want = check.input
    if check.transform != "identity":
        mark.ready(at + got.nbytes)
        return equal(got, want, check.transform, bar)
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    return same_bytes(got, want, bar, lambda end: mark.ready(at + end))
