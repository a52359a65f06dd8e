"""The tie record kept in a checkpoint's metadata (format v1).

Two parts live in safetensors ``__metadata__`` (or a sharded index's
``metadata``): tiecli's own versioned entry ``"tiecli"``, and, for identity
aliases, the ``{"<alias>": "<source>"}`` entries that safetensors
``save_model`` and huggingface_hub already write and read.

Records come from files of unknown origin, so every field is checked before
use; what is wrong becomes a :class:`RecordIssue` naming the alias. Writing
(:func:`record_metadata`) replaces a file's record and keeps every other entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import field
from typing import Any

from .dtypes import BITS, itemsize
from .lean import dataclass
from .ties import KINDS, TRANSFORMS, Kind, Tie, Transform

RECORD_KEY = "tiecli"
RECORD_VERSION = 1
# Metadata keys that are never tensor names.
RESERVED_KEYS = frozenset({"format", RECORD_KEY, "total_size", "total_parameters"})
# A record can list more aliases than the file stores tensors (one source may stand
# for several names), but not many times more: at most this many a stored tensor,
# plus a floor for the smallest files. A longer one is not read at all, so work
# stays proportional to the file's own tensors.
RECORD_FLOOR = 1024
RECORD_PER_TENSOR = 4


def max_record_ties(stored: int) -> int:
    """The most entries a record may list for a file of ``stored`` tensors."""
    return RECORD_FLOOR + RECORD_PER_TENSOR * stored


@dataclass(frozen=True)
class RecordedTie:
    """One tie as a file's record states it."""

    alias: str
    source: str
    transform: Transform = "identity"
    kind: Kind = "tied"
    evidence: tuple[str, ...] = ("metadata",)

    def to_json(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "source": self.source,
            "transform": self.transform,
            "kind": self.kind,
            "evidence": list(self.evidence),
        }


@dataclass(frozen=True)
class RecordIssue:
    """Why a record (or one of its entries) cannot be trusted."""

    message: str
    tensors: tuple[str, ...]


@dataclass
class Record:
    """A file's tie record as read: tiecli's entry, the ``{alias: source}`` convention, issues."""

    ties: list[RecordedTie] = field(default_factory=list)  # tiecli's own entry
    convention: list[RecordedTie] = field(default_factory=list)  # {alias: source} entries
    issues: list[RecordIssue] = field(default_factory=list)
    present: bool = False  # a "tiecli" entry exists


def read_record(
    metadata: Mapping[str, Any],
    shapes: Mapping[str, tuple[tuple[int, ...], str]],
) -> Record:
    """Parse and validate a record against the stored tensors ``{name: (shape, dtype)}``."""
    rec = Record()
    raw = metadata.get(RECORD_KEY)
    if raw is not None:
        rec.present = True
        _read_own(raw, shapes, rec)
    recorded = {t.alias for t in rec.ties}
    for key, value in metadata.items():
        if key in RESERVED_KEYS or not isinstance(value, str) or key == value:
            continue
        if value in shapes and key not in recorded:
            rec.convention.append(RecordedTie(key, value, "identity", "tied", ("metadata",)))
    cap = max_record_ties(len(shapes))
    if len(rec.convention) > cap:
        rec.issues.append(
            RecordIssue(
                f"metadata lists {len(rec.convention)} {{alias: source}} entries for "
                f"{len(shapes)} stored tensors, more than can be true (at most {cap})",
                (),
            )
        )
        rec.convention = []
    return rec


def _read_own(raw: Any, shapes: Mapping[str, tuple[tuple[int, ...], str]], rec: Record) -> None:
    def bad(msg: str, *names: str) -> None:
        rec.issues.append(RecordIssue(msg, tuple(names)))

    if not isinstance(raw, str):
        return bad("tie record is not a JSON string")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return bad("tie record is not valid JSON")
    if not isinstance(doc, dict):
        return bad("tie record is not a JSON object")
    if doc.get("version") != RECORD_VERSION:
        return bad(
            f"tie record version {doc.get('version')!r} is not supported (this tiecli reads version 1)"
        )
    ties = doc.get("ties")
    if not isinstance(ties, list):
        return bad("tie record has no 'ties' list")
    cap = max_record_ties(len(shapes))
    if len(ties) > cap:
        return bad(
            f"tie record lists {len(ties)} ties for {len(shapes)} stored tensors, "
            f"more than can be true (at most {cap})"
        )
    seen: dict[str, RecordedTie] = {}
    for item in ties:
        if not isinstance(item, dict):
            bad("tie record entry is not an object")
            continue
        alias, source = item.get("alias"), item.get("source")
        transform = item.get("transform", "identity")
        kind = item.get("kind", "tied")
        evidence = item.get("evidence", ["metadata"])
        if not isinstance(alias, str) or not isinstance(source, str):
            bad("tie record entry lacks string 'alias' and 'source'")
            continue
        if transform not in TRANSFORMS:
            bad(f"alias {alias!r}: unknown transform {transform!r}", alias)
            continue
        if kind not in KINDS:
            bad(f"alias {alias!r}: unknown kind {kind!r}", alias)
            continue
        if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
            bad(f"alias {alias!r}: 'evidence' is not a list of strings", alias)
            continue
        if alias in seen:
            bad(f"alias {alias!r} is recorded twice", alias)
            continue
        seen[alias] = RecordedTie(
            alias, source, transform, kind, tuple(dict.fromkeys(["metadata", *evidence]))
        )
    for alias, tie in list(seen.items()):
        source = tie.source
        if alias == source:
            bad(f"alias {alias!r} is recorded as its own source", alias)
        elif alias in shapes:
            bad(f"alias {alias!r} is recorded as an alias but is also stored", alias, source)
        elif source in seen:
            bad(
                f"alias {alias!r} points to {source!r}, itself an alias (chains and cycles are not allowed)",
                alias,
                source,
            )
        elif source not in shapes:
            bad(f"alias {alias!r} points to source {source!r}, which is not stored", alias, source)
        elif (
            tie.transform == "transpose"
            and shapes[source][1] in BITS
            and itemsize(shapes[source][1]) is None
        ):
            bad(
                f"alias {alias!r}: a transpose of {source!r} needs whole-byte elements, not {shapes[source][1]}",
                alias,
                source,
            )
        elif tie.transform == "transpose" and len(shapes[source][0]) != 2:
            bad(
                f"alias {alias!r}: transpose of {source!r} needs a 2-D source, not shape {list(shapes[source][0])}",
                alias,
                source,
            )
        else:
            rec.ties.append(tie)


def record_metadata(
    metadata: dict[str, Any],
    names: set[str],
    ties: list[RecordedTie],
    restored: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """``metadata`` with the tie record replaced by ``ties``; every other entry kept.

    An earlier entry goes when its alias is absent from the output (``ties``
    lists it again if it still holds) or was ``restored`` into it. An entry
    whose alias is still stored (a tie kept because its copies drift) stays.
    """
    old = read_record(metadata, {n: ((), "") for n in names})
    earlier = {t.alias for t in old.convention} | recorded_aliases(metadata.get(RECORD_KEY))
    stale = {a for a in earlier if a not in names or a in restored}
    out = {k: v for k, v in metadata.items() if k != RECORD_KEY and k not in stale}
    out.setdefault("format", "pt")
    for tie in ties:
        if tie.transform == "identity":
            out[tie.alias] = tie.source
    if ties:
        out[RECORD_KEY] = json.dumps(
            {"version": RECORD_VERSION, "ties": [t.to_json() for t in ties]}, separators=(",", ":")
        )
    return out


def recorded_aliases(raw: Any) -> set[str]:
    """Aliases named by a (possibly unreadable) tiecli record."""
    try:
        doc = json.loads(raw) if isinstance(raw, str) else {}
        return {str(t.get("alias")) for t in doc.get("ties", []) if isinstance(t, dict)}
    except (ValueError, AttributeError, TypeError, RecursionError):
        return set()


def record_entry(t: Tie, before: Mapping[str, RecordedTie]) -> RecordedTie:
    """The record entry for a tie: why it exists, kept stable across runs (``before``:
    the file's own entries by alias)."""
    old = before.get(t.alias)
    evidence: list[str] = [e for e in t.evidence if e != "metadata"]
    if old is not None and old.source == t.source:
        evidence += [e for e in old.evidence if e != "metadata" and e not in evidence]
    order = ("declared", "pattern", "storage", "value", "transposed")
    ordered = tuple(e for e in order if e in evidence) or ("metadata",)
    return RecordedTie(t.alias, t.source, t.transform, t.kind, ordered)
