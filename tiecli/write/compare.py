"""Comparing a written file's tensors with the input tensors they stand for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from ..atomic import fsync_file
from ..checkpoint import Entry
from ..errors import CheckpointFormatError, VerificationError
from ..io import FileBlob
from ..plan import Check, FilePlan, Plan
from ..progress import Progress
from ..values import equal

T = TypeVar("T")


def check_all(checks: list[Check], out: dict[str, Entry], shown: Path, progress: Progress) -> None:
    with progress.task("verifying", sum(2 * c.input.nbytes for c in checks)) as bar:
        for check in checks:
            check_one(check, out, shown, bar)


def check_one(check: Check, out: dict[str, Entry], shown: Path, bar: Progress) -> None:
    got = out.get(check.out)
    if got is None or not equal(got, check.input, check.transform, bar):
        raise mismatch(check, shown)


def mismatch(check: Check, shown: Path) -> VerificationError:
    return VerificationError(
        f"verification failed: written {check.out!r} does not equal the input's "
        f"{check.input.name!r}; nothing was changed",
        shown,
    )


def read_back(tmp: Path, shown: Path, open_it: Callable[[], T]) -> T:
    """Open a file just written; one that cannot be read back failed verification."""
    try:
        return open_it()
    except CheckpointFormatError as e:
        raise VerificationError(
            f"verification failed: the written {tmp.name} cannot be read back ({e.message}); "
            "nothing was changed",
            shown,
        ) from None


def start(e: Entry) -> int:
    """Where a tensor's bytes begin in its file, after the header."""
    return cast(FileBlob, e.blob).start


def sync_file(path: Path, durable: bool) -> None:
    if durable:
        fsync_file(path)


def write_total(plan: Plan, f: FilePlan) -> int:
    """What writing ``f`` as safetensors reports: its bytes, and both sides of each check."""
    names = {t.name for t in f.tensors}
    checks = sum(2 * c.input.nbytes for c in plan.checks if c.out in names)
    return sum(t.nbytes for t in f.tensors) + checks
