"""Measuring: wall time, exit code and peak memory of one command; rounds of cases;
the median of the rounds and its spread.

A command that exits non-zero stops the benchmark (:class:`CommandFailed`): a run
that errors is not a fast run, and its time must not reach a table.
"""

from __future__ import annotations

import mmap
import os
import shlex
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from synth import CHUNK


def remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def copy_any(src: Path, dst: Path) -> None:
    remove(dst)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)


def _proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in bytes; (0, 0) once it is gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, anon


@dataclass
class Sample:
    seconds: float
    rc: int
    peak_rss: int  # bytes: max(GNU time %M of the command, polled process-tree VmRSS sum)
    peak_anon: int  # bytes: polled process-tree RssAnon sum (file-backed mmap pages excluded)
    stderr: str = ""
    cpu: float | None = None  # user + system seconds of the command (GNU time), all threads


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
RSS_METHOD = (
    "max(GNU `/usr/bin/time -f %M` of the command, VmRSS summed over the command's process tree "
    "polled every 5 ms from /proc)"
    if GNU_TIME
    else "VmRSS summed over the command's process tree, polled every 5 ms from /proc (no /usr/bin/time here; "
    "a poll can miss spikes shorter than 5 ms)"
)


def measure(argv: list[str], scratch: Path, poll_s: float = 0.005) -> Sample:
    """Run argv once: wall time, exit code, peak memory of the whole process tree.

    The kernel's ru_maxrss of a child we fork ourselves starts at *our* RSS (exec
    keeps the forked image's high-water mark), so the command runs under GNU
    time, a ~2 MB process whose own child starts clean.
    """
    import psutil

    out, err, tfile = scratch / ".stdout", scratch / ".stderr", scratch / ".maxrss"
    remove(tfile)
    full = [GNU_TIME, "-f", "%M %U %S", "-o", str(tfile)] + argv if GNU_TIME else argv
    with open(out, "wb") as fo, open(err, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=scratch)
        pid = proc.pid
        stop = threading.Event()
        peak = {"rss": 0, "anon": 0}

        def poll() -> None:
            tree: list[int] = [] if GNU_TIME else [pid]
            n = 0
            while not stop.is_set():
                if n % 10 == 0 or not tree:  # rescanning /proc for children is the costly part
                    try:
                        kids = [c.pid for c in psutil.Process(pid).children(recursive=True)]
                        tree = kids if GNU_TIME else [pid] + kids
                    except psutil.Error:
                        pass
                n += 1
                rss = anon = 0
                for p in tree:
                    r, a = _proc_mem(p)
                    rss, anon = rss + r, anon + a
                peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
                stop.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
    stderr = err.read_bytes().decode(errors="replace")
    kernel_peak, cpu = 0, None
    if GNU_TIME:
        try:
            rss, user, system = tfile.read_text().strip().splitlines()[-1].split()
            kernel_peak, cpu = int(rss) * 1024, float(user) + float(system)
        except (OSError, ValueError, IndexError):
            pass
    return Sample(seconds, rc, max(kernel_peak, peak["rss"]), peak["anon"], stderr, cpu)


@dataclass
class Case:
    key: str  # stable id used by the target checks and the JSON
    label: str  # what the table shows
    argv: list[str]
    out: Path | None = None  # removed before (and after) each run
    fresh: tuple[Path, Path] | None = None  # (input, scratch copy): recopied before each run
    samples: list[Sample] = field(default_factory=list)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> None:
    """Empty the page cache (root only): the next run reads everything from disk."""
    os.sync()
    DROP_CACHES.write_text("3\n")


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and give it back (untimed).

    On a VM that returns free guest memory to its host (free page reporting, as
    on this benchmark's Firecracker machine), the next command to allocate that
    memory pays the host's page faults: ``cp`` of the same file took 0.35 s or
    3.6 s depending on it. Touching memory just before each timed run leaves the
    guest's free lists backed, so every row pays for its own work only.
    """
    if nbytes <= 0:
        return
    m = mmap.mmap(-1, nbytes)
    block = b"\1" * (1 << 20)
    for off in range(0, nbytes - len(block) + 1, len(block)):
        m[off : off + len(block)] = block
    m.close()


def prefault_bytes(gb: float | None, checkpoint: int) -> int:
    if gb is not None:
        return int(gb * (1 << 30))
    import psutil

    return min(2 * checkpoint + (1 << 30), psutil.virtual_memory().available // 2)


def run_cases(
    cases: list[Case],
    repeat: int,
    scratch: Path,
    log: Callable[[str], None],
    cold: bool = False,
    warm_bytes: int = 0,
) -> None:
    """Round-robin over the cases `repeat` times, so drift hits every row alike."""
    for r in range(repeat):
        for c in cases:
            if c.out is not None:
                remove(c.out)
            if c.fresh is not None:
                copy_any(*c.fresh)
                warm([c.fresh[1]])  # cached as its original is, not as the copy left it
            os.sync()  # flush dirty pages of earlier runs (untimed); page cache stays warm
            if cold:
                drop_caches()
            prefault(warm_bytes)
            s = measure(c.argv, scratch)
            c.samples.append(s)
            if s.rc != 0:
                raise CommandFailed(c, s)
            if c.out is not None and r < repeat - 1:
                remove(c.out)
        log(f"  round {r + 1}/{repeat} done")
    for c in cases:
        if c.out is not None:
            remove(c.out)
        if c.fresh is not None:
            remove(c.fresh[1])


def warm(paths: list[Path]) -> None:
    """Put inputs in the page cache as a read puts them there, so every timed run
    starts page-cache warm and every input's cached pages are laid out alike.

    Everything is synced, each file's cached pages dropped (``POSIX_FADV_DONTNEED``
    drops clean pages only), then it is read from start to end. Which pages a file has in
    the cache depends on what put them there: pages left by the writes that made
    the file copy far slower than pages a read brought in (Linux 6.18, ext4: ``cp``
    of the 1.26 GB synthetic file 0.42 s, then 0.31 s once dropped and read back;
    the reading side gets larger folios). Without this, each row's baseline
    depended on how its input happened to be cached."""
    advise = getattr(os, "posix_fadvise", None)
    os.sync()
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                if advise is not None:
                    advise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while fh.read(CHUNK):
                    pass


class CommandFailed(Exception):
    """A timed command exited non-zero: the benchmark stops and says which, and why."""

    def __init__(self, case: Case, sample: Sample):
        self.case, self.sample = case, sample
        tail = "\n".join("    " + line for line in sample.stderr.rstrip().splitlines()[-20:])
        super().__init__(
            f"{case.label}: exit {sample.rc}\n  command: {shlex.join(case.argv)}\n"
            f"  stderr:\n{tail or '    (empty)'}"
        )


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratios(case: Case, base: Case) -> list[float]:
    """``case``'s time over ``base``'s, round by round (the rows of a round run back to
    back, so each ratio compares runs made under the same load)."""
    return [s.seconds / b.seconds for s, b in zip(case.samples, base.samples, strict=True)]
