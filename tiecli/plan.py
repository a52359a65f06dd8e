"""Planning a rewrite: what each output file holds, and what must match what.

``dedupe`` and ``untie`` differ only here. A plan names, for every output
file, the tensors it holds (each read from an input entry, possibly
transposed) and its metadata; and for verification, which output tensor must
equal which input tensor. Writers and the verifier follow the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import field
from pathlib import Path
from typing import Any

from .checkpoint import CHUNK, Checkpoint, Entry
from .errors import Wording, param
from .formats.base import by_file
from .grouping import fills
from .lean import dataclass
from .options import RewriteOptions
from .record import RecordedTie, read_record, record_entry, record_metadata
from .ties import Tie, TieReport, declared


@dataclass
class OutTensor:
    """One tensor a rewrite writes, and the input tensor its bytes come from."""

    name: str
    entry: Entry  # the input tensor whose bytes (maybe transposed) are written
    transform: str = "identity"

    @property
    def dtype(self) -> str:
        return self.entry.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape if self.transform == "identity" else self.entry.shape[::-1]

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes

    def chunks(self) -> Iterator[bytes]:
        if self.transform == "identity":
            yield from self.entry.chunks()
            return
        import numpy as np

        arr = self.entry.blob.array(self.entry.dtype, self.entry.shape)
        rows, cols = self.entry.shape
        step = max(1, CHUNK // max(1, self.entry.nbytes // max(1, cols)))
        for c in range(0, cols, step):
            yield np.ascontiguousarray(arr[:, c : c + step].T).tobytes()


@dataclass
class FilePlan:
    """One output weight file (relative name inside the output folder)."""

    name: str
    tensors: list[OutTensor]
    metadata: dict[str, str]
    source: Path | None = None  # the input file it replaces, if any


@dataclass
class Check:
    """After writing: output tensor ``out`` must equal ``transform(input)``."""

    out: str
    input: Entry
    transform: str = "identity"


@dataclass
class Plan:
    """Everything a rewrite writes and checks: its files, ties removed or restored, the record."""

    command: str  # dedupe | untie
    files: list[FilePlan]
    index_metadata: dict[str, Any] | None  # sharded: the index's new metadata
    checks: list[Check]
    removed: list[Tie] = field(default_factory=list)
    restored: list[Tie] = field(default_factory=list)
    # untie, fix: each name written anew -> (the stored tensor it copies, transform)
    made: dict[str, tuple[str, str]] = field(default_factory=dict)
    kept: list[tuple[Tie, str]] = field(default_factory=list)  # ties left stored, and why
    record: list[RecordedTie] = field(default_factory=list)
    # An output form that holds two names over one storage (a pickle): {name: (other
    # name, transform)} written as a view of the other's storage (dedupe), or as an
    # independent copy of it (untie, fix).
    views: dict[str, tuple[str, str]] = field(default_factory=dict)
    copies: dict[str, tuple[str, str]] = field(default_factory=dict)
    shares_storage: bool = False  # the output is of such a form (no metadata to compare)
    # fix: {name: rows} cut to their first rows (a padded vocabulary trimmed), and
    # names left out (a head equal to the first rows of the embedding it is tied to)
    trims: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def bytes_after(self) -> int:
        """Tensor bytes in the output (a shared storage counted once)."""
        return sum(t.nbytes for f in self.files for t in f.tensors if t.name not in self.views)

    def changes(self, ckpt: Checkpoint) -> bool:
        if self.removed or self.restored or self.made or self.trims or self.dropped:
            return True
        if self.shares_storage:
            return False
        if any(stale_copies(ckpt, self, f) for f in self.files):
            return True
        if self.index_metadata is not None:
            return _clean(self.index_metadata) != _clean(ckpt.metadata)
        return any(_clean(f.metadata) != _clean(ckpt.metadata) for f in self.files)


def stale_copies(ckpt: Checkpoint, plan: Plan, f: FilePlan) -> set[str]:
    """Recorded aliases a shard still stores though the index no longer lists them.

    An in-place dedupe renames the new index first; a run killed before the
    shards follow leaves the aliases' old copies in them, unreachable. The
    next run rewrites such a shard without them.
    """
    if ckpt.index_path is None or f.source is None:
        return set()
    reader = by_file(ckpt, f.source)
    stored = None if reader is None else ckpt.form.stored_names(reader)
    if stored is None:
        return set()
    recorded = {r.alias for r in plan.record}
    unlisted = set(stored) - set(ckpt.entries) - {t.name for t in f.tensors}
    return unlisted & recorded


def _clean(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "format"}


def plan_dedupe(ckpt: Checkpoint, report: TieReport, options: RewriteOptions) -> Plan:
    """Which ties leave the files (``removed``) and which stay stored (``kept``, with why),
    as ``options`` ask (``by_value``, ``min_bytes``, ``to``)."""
    by_value, min_bytes = options.by_value, options.min_bytes
    to_safetensors = options.converts(ckpt.form)
    removed: list[Tie] = []
    kept: list[tuple[Tie, str]] = []
    written = ckpt.form.written_as(to_safetensors)
    # A name dropped from a file a config describes comes back in transformers only
    # when the architecture ties it (a pickle keeps every name, as a view).
    loader_restores = report.architecture is None or written.shares_storage
    for t in report.ties:
        if not t.stored:
            continue
        if t.drift is not None:
            kept.append((t, "drift: the copies differ"))
        elif not t.source_stored:
            kept.append((t, "source not stored: this is the only copy"))
        elif not to_safetensors and t.across_files:
            kept.append(
                (t, "source in another shard: a pickle can share storage only within one file")
            )
        elif t.kind == "tied":
            removed.append(t)
        elif not by_value:
            kept.append((t, Wording(f"duplicate by value only (use {param('by_value')})")))
        elif t.bytes < min_bytes:
            kept.append((t, Wording(f"duplicate smaller than {param('min_bytes')} ({min_bytes})")))
        elif not loader_restores and not declared(t):
            why = f"transformers would not restore it: not a tie of {report.architecture}"
            kept.append((t, why))
        else:
            removed.append(t)
    copies: dict[str, list[OutTensor]] = {}  # shared-storage aliases written on their own
    if to_safetensors:
        # safetensors cannot store two names over one storage: a pickle's
        # shared-storage aliases leave the file and go into the record, unless the
        # loader would not restore them: those are written as copies of their source
        for t in report.ties:
            if not _in_storage(t, ckpt) or t.drift is not None:
                continue
            if loader_restores or declared(t):
                removed.append(t)
            else:
                src = ckpt.entries[t.source]
                copies.setdefault(t.source, []).append(OutTensor(t.alias, src, t.transform))
                why = f"transformers would not restore it: not a tie of {report.architecture}"
                kept.append((t, why + "; written as its own copy"))
    copied = {o.name for outs in copies.values() for o in outs}
    gone = {t.alias for t in removed}
    # The record: every alias absent from the output whose source is stored.
    shapes = {n: (e.shape, e.dtype) for n, e in ckpt.entries.items()}
    before = {r.alias: r for r in read_record(ckpt.metadata, shapes).ties}
    record = [
        record_entry(t, before)
        for t in report.ties
        if t.source in ckpt.entries and (t.alias in gone or t.alias not in ckpt.entries)
    ]
    record.sort(key=lambda r: (r.source, r.alias))  # stable across runs: dedupe is idempotent
    if not written.keeps_record:
        # a pickle keeps no metadata: aliasing itself is its record; a GGUF file keeps
        # its metadata as it is: the architecture's fall-back is its record
        record = []
    checks = [Check(n, e) for n, e in ckpt.entries.items() if n not in gone | copied]
    checks += [Check(t.source, ckpt.entries[t.alias], t.transform) for t in removed]
    checks += [Check(o.name, o.entry, o.transform) for outs in copies.values() for o in outs]
    plan = Plan("dedupe", [], None, checks, removed=removed, kept=kept, record=record)
    plan.shares_storage = written.shares_storage
    if written.shares_storage:
        plan.views = {t.alias: (t.source, t.transform) for t in report.ties if _in_storage(t, ckpt)}
        plan.views |= {t.alias: (t.source, t.transform) for t in removed}
        # a pickle still holds each alias (as a view of its source): read it back too
        plan.checks += [Check(a, ckpt.entries[a]) for a in plan.views if a in gone]
    _fill_files(plan, ckpt, keep=lambda n: n not in gone | copied, extra=copies)
    return plan


def plan_untie(ckpt: Checkpoint, report: TieReport) -> Plan:
    restored: list[Tie] = []
    extra: dict[str, list[OutTensor]] = {}  # by the name of the input tensor they follow
    checks = [Check(n, e) for n, e in ckpt.entries.items()]
    # names the format's loader always derives and refuses stored (a GGUF architecture
    # that never reads output.weight)
    fixed = ckpt.form.fixed_aliases(ckpt)
    whole = [t for t in report.ties if t.drift is None and t.alias not in fixed]
    made: dict[str, tuple[str, str]] = {}
    for f in fills(whole, ckpt.entries):
        origin = ckpt.entries[f.origin]
        extra.setdefault(f.origin, []).append(OutTensor(f.name, origin, f.transform))
        checks.append(Check(f.name, origin, f.transform))
        made[f.name] = (f.origin, f.transform)
        if f.tie not in restored:
            restored.append(f.tie)
    for t in whole:
        if _in_storage(t, ckpt):
            restored.append(t)  # a pickle view, written as its own copy
            made[t.alias] = (t.source, t.transform)
    plan = Plan("untie", [], None, checks, restored=restored, made=made)
    plan.shares_storage = ckpt.form.shares_storage
    if plan.shares_storage:
        plan.copies.update(made)
    _fill_files(plan, ckpt, keep=lambda n: True, extra=extra)
    return plan


def _in_storage(t: Tie, ckpt: Checkpoint) -> bool:
    """A pickle alias stored as a view of its source's storage."""
    return t.alias in ckpt.entries and "storage" in t.evidence and not t.stored


def _fill_files(
    plan: Plan,
    ckpt: Checkpoint,
    keep: Callable[[str], bool],
    extra: dict[str, list[OutTensor]],
    replace: dict[str, Entry] | None = None,
) -> None:
    replace = replace or {}
    names_after: set[str] = {n for n in ckpt.entries if keep(n)} | {
        o.name for outs in extra.values() for o in outs
    }
    sharded = ckpt.index_path is not None
    by_file: dict[Path, list[OutTensor]] = {f: [] for f in ckpt.weight_files}
    for name, entry in ckpt.entries.items():
        assert entry.file is not None
        if keep(name):
            by_file[entry.file].append(OutTensor(name, replace.get(name, entry)))
        by_file[entry.file].extend(extra.get(name, []))
    meta = record_metadata(ckpt.metadata, names_after, plan.record, restored=frozenset(plan.made))
    if sharded:
        plan.index_metadata = meta
    for f, tensors in by_file.items():
        if sharded:
            file_meta = dict(_file_metadata(ckpt, f))
        else:
            file_meta = meta
        plan.files.append(FilePlan(f.name, tensors, file_meta, source=f))


def _file_metadata(ckpt: Checkpoint, f: Path) -> dict[str, str]:
    reader = by_file(ckpt, f)
    return {} if reader is None else ckpt.form.file_metadata(reader)


# -- fix -------------------------------------------------------------------------


class _FirstBytes:
    """The first ``nbytes`` of another tensor's blob: its first rows."""

    def __init__(self, blob: Any, nbytes: int, shape: tuple[int, ...]):
        self.blob, self.nbytes, self.shape = blob, nbytes, shape

    @property
    def order(self) -> tuple[int, int]:
        return tuple(self.blob.order)  # type: ignore[return-value]

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.blob.read(offset, size))

    def readinto(self, offset: int, view: memoryview) -> None:
        self.blob.readinto(offset, view)

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        full = self.blob.array(dtype, self.shape)
        return None if full is None else full[: shape[0]]


def first_rows(entry: Entry, rows: int) -> Entry:
    """``entry`` cut to its first ``rows`` rows, read from the same bytes."""
    from .io import RangeBlob

    row = entry.nbytes // entry.shape[0]
    nbytes = rows * row
    blob: Any = entry.blob
    if isinstance(blob, RangeBlob):
        blob = type(blob)(blob.file, blob.start, nbytes)
    else:
        blob = _FirstBytes(blob, nbytes, entry.shape)
    return Entry(
        entry.name,
        entry.dtype,
        (rows, *entry.shape[1:]),
        nbytes,
        blob,
        storage=entry.storage,
        view=entry.view,
        file=entry.file,
    )


def plan_fix(
    ckpt: Checkpoint,
    copies: list[tuple[str, str]],
    trims: dict[str, int],
    dropped: list[str] | None = None,
) -> Plan:
    """Store each ``(name, origin)`` of ``copies`` as a copy of ``origin``'s bytes (as
    ``untie`` stores an alias), cut each tensor of ``trims`` to its first rows and leave
    out each name of ``dropped``; every other tensor and metadata entry is kept. A name
    now stored leaves the record."""
    gone = set(dropped or ())
    cut = {n: first_rows(ckpt.entries[n], rows) for n, rows in trims.items()}
    checks = [Check(n, cut.get(n, e)) for n, e in ckpt.entries.items() if n not in gone]
    extra: dict[str, list[OutTensor]] = {}
    for name, origin in copies:
        src = cut.get(origin, ckpt.entries[origin])
        extra.setdefault(origin, []).append(OutTensor(name, src))
        checks.append(Check(name, src))
    made = {name: (origin, "identity") for name, origin in copies}
    plan = Plan("fix", [], None, checks, made=made, trims=dict(trims), dropped=sorted(gone))
    shapes = {n: (e.shape, e.dtype) for n, e in ckpt.entries.items()}
    plan.record = [r for r in read_record(ckpt.metadata, shapes).ties if r.alias not in made]
    plan.shares_storage = ckpt.form.shares_storage
    if plan.shares_storage:
        plan.record = []  # a pickle keeps no metadata
        plan.copies = dict(made)
    _fill_files(plan, ckpt, keep=lambda n: n not in gone, extra=extra, replace=cut)
    return plan
