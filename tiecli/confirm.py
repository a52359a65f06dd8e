"""Ties by value: whether a claimed tie's stored copies are equal, how they drift
or pad when they are not, and the equal tensors nobody claimed (duplicates).

Evidence from here is ``value``, ``transposed`` or ``sampled`` (a remote
checkpoint's copies equal at their samples, not read whole past its budget).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from .checkpoint import Entry
from .dtypes import itemsize
from .grouping import Adjacency, component, compose, transforms_from
from .matching import find_equal
from .progress import Progress
from .ties import Drift, Evidence, Pad, Tie, Transform
from .values import difference, equal, same_samples, sampled_difference

SAMPLED_FROM = 1 << 20  # bytes: smaller tensors are always compared whole


class Confirmer:
    """Compares stored copies by value, each pair once.

    ``budget`` (remote checkpoints): pairs it refuses to read whole are equal by
    their samples and listed in ``unconfirmed``. ``sampled``: a large pair equal
    at its samples counts as equal unread, listed in ``assumed``."""

    def __init__(self, entries: Mapping[str, Entry], budget: Any, sampled: bool = False):
        self.entries = entries
        self.budget = budget
        self.sampled = sampled
        self.assumed: list[tuple[str, str, str]] = []
        self.unconfirmed: set[tuple[str, str, str]] = set()
        self._equal_cache: dict[tuple[str, str, str], bool] = {}

    def shape_transform(self, alias: str, source: str) -> Transform:
        """``transpose`` when the stored shapes are each other's reverse (2-D)."""
        a, s = self.entries.get(alias), self.entries.get(source)
        if a and s and len(a.shape) == 2 and a.shape != s.shape and a.shape == s.shape[::-1]:
            return "transpose"
        return "identity"

    def equal(self, alias: str, source: str, transform: Transform) -> bool:
        key = (alias, source, transform)
        if key not in self._equal_cache:
            a, s = self.entries[alias], self.entries[source]
            if self.sampled and a.nbytes >= SAMPLED_FROM:
                same = same_samples(a, s, transform)
                if same:
                    self.assumed.append(key)
            elif self.budget is not None and same_samples(a, s, transform):
                if self.budget.allows(a.nbytes + s.nbytes):
                    same = equal(a, s, transform)
                else:
                    same = True
                    self.unconfirmed.add(key)
            else:
                same = equal(a, s, transform)
            self._equal_cache[key] = same
        return self._equal_cache[key]

    def padded(self, alias: str, source: str) -> Pad | None:
        """``source`` is ``alias`` with more rows appended (a padded vocabulary): same
        dtype and row shape, more rows, and the alias's bytes are the source's first
        bytes. Either name may be the longer one; the pad names the rows of each."""
        a, s = self.entries[alias], self.entries[source]
        if a.dtype != s.dtype or len(a.shape) < 1 or a.shape[1:] != s.shape[1:]:
            return None
        if a.shape[0] == s.shape[0] or min(a.nbytes, s.nbytes) == 0:
            return None
        short, long = (a, s) if a.shape[0] < s.shape[0] else (s, a)
        if self.budget is not None and not self.budget.allows(2 * short.nbytes):
            # past --max-download: the first and last shared rows stand for the rest
            row = short.nbytes // short.shape[0]
            for at in {0, short.nbytes - row}:
                if short.blob.read(at, row) != long.blob.read(at, row):
                    return None
            return Pad(source_rows=s.shape[0], alias_rows=a.shape[0], sampled=True)
        if not same_prefix(short, long):
            return None
        return Pad(source_rows=s.shape[0], alias_rows=a.shape[0])

    def drift(self, a: Entry, s: Entry, transform: Transform) -> Drift:
        """How far the copies ``a`` and ``transform(s)`` are apart."""
        comparable = a.shape == (s.shape if transform == "identity" else s.shape[::-1])
        if (
            a.dtype != s.dtype
            or not comparable
            or (transform == "transpose" and itemsize(a.dtype) is None)
        ):
            return Drift(None, a.numel, a.numel)  # nothing to compare element by element
        if self.budget is not None and not self.budget.allows(a.nbytes + s.nbytes):
            d = sampled_difference(a, s, transform)
            return Drift(d.max_abs_diff, d.differing, d.numel, sampled=True)
        d = difference(a, s, transform)
        return Drift(d.max_abs_diff, d.differing, d.numel)


def same_prefix(short: Entry, long: Entry) -> bool:
    """The bytes of ``short`` are the first bytes of ``long`` (read in bounded pieces)."""
    step = 8 << 20
    for offset in range(0, short.nbytes, step):
        k = min(step, short.nbytes - offset)
        if short.blob.read(offset, k) != long.blob.read(offset, k):
            return False
    return True


def add_value_matches(
    ties: list[Tie],
    candidates: list[Entry],
    order: Mapping[str, int],
    progress: Progress,
    budget: Any,
) -> list[Tie]:
    """Equal tensors nobody declared: duplicates, or extra members of a tie group.

    ``candidates``: the tensors that hold their own bytes (one per pickle view)."""
    entries = {e.name: e for e in candidates}
    # only copies confirmed equal to their source form a group others may join: a
    # tensor equal to a drifted copy is not equal to that copy's source
    sound = [t for t in ties if t.drift is None and t.source_stored]
    root_of = {t.alias: t.source for t in sound} | {t.source: t.source for t in sound}
    relation = {t.alias: t.transform for t in sound}  # transform from the group's source
    for t in ties:  # a drifted alias stays where it is, never a duplicate of anything
        root_of.setdefault(t.alias, t.alias if t.drift is not None else t.source)
    # identity ties whose copies were compared equal are one class: read once
    known = {
        n: t.source
        for t in ties
        if t.transform == "identity" and t.drift is None and t.source_stored
        for n in (t.alias, t.source)
        if n in order
    }
    matches = find_equal(candidates, progress, known, budget)
    adj: Adjacency = defaultdict(list)
    for group in matches.groups:
        for e in group[1:]:
            adj[e.name].append((group[0].name, "identity"))
            adj[group[0].name].append((e.name, "identity"))
    for x, y in matches.transposed:
        adj[x.name].append((y.name, "transpose"))
        adj[y.name].append((x.name, "transpose"))
    seen: set[str] = set()
    for start in sorted(adj, key=order.__getitem__):
        if start in seen:
            continue
        members = component(adj, start)
        seen |= members
        anchors = sorted((n for n in members if n in root_of), key=order.__getitem__)
        anchor = anchors[0] if anchors else start
        root = root_of.get(anchor, anchor)
        rel = transforms_from(adj, anchor)
        for name in sorted(members - root_of.keys() - {root}, key=order.__getitem__):
            transform = compose(rel[name], relation.get(anchor, "identity"))
            unconfirmed = name in matches.unconfirmed
            evidence: Evidence = (
                "sampled" if unconfirmed else "transposed" if transform == "transpose" else "value"
            )
            ties.append(
                Tie(
                    name,
                    root,
                    transform,
                    "duplicate",
                    [evidence],
                    stored=True,
                    bytes=entries[name].nbytes,
                    source_stored=root in order,
                    unconfirmed=unconfirmed,
                )
            )
    return ties
