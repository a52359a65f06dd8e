"""Tie groups: claims joined into groups, each with one source and the transform
from it to every member, and the members a file leaves absent (:func:`fills`).

A claim says two names are one tensor (by the record, the architecture, the
pattern table or shared storage); claims that share a name form one group. The
strongest evidence picks the group's source; every other member becomes a
:class:`~tiecli.ties.Tie` to it, checked by value when both copies are stored.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Container, Mapping
from typing import TYPE_CHECKING

from .checkpoint import Entry
from .lean import dataclass
from .ties import EVIDENCE_ORDER, SOURCE_RANK, Evidence, Fill, Tie, Transform

if TYPE_CHECKING:
    from .confirm import Confirmer

Adjacency = dict[str, list[tuple[str, Transform]]]


@dataclass
class Claim:
    """One piece of evidence that ``alias`` is ``source`` (maybe transformed)."""

    alias: str
    source: str
    transform: Transform
    evidence: Evidence
    duplicate: bool = False  # a recorded duplicate: metadata evidence, but not a tie by design


def component(adj: Adjacency, start: str) -> set[str]:
    """Every name linked to ``start``."""
    seen = {start}
    todo = [start]
    while todo:
        n = todo.pop()
        for m, _ in adj[n]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def compose(a: Transform, b: Transform) -> Transform:
    """One transform after another: two transposes cancel."""
    return "identity" if a == b else "transpose"


def transforms_from(adj: Adjacency, source: str) -> dict[str, Transform]:
    """The transform from ``source`` to every name linked to it."""
    out: dict[str, Transform] = {source: "identity"}
    queue = deque([source])
    while queue:
        n = queue.popleft()
        for m, t in adj[n]:
            if m not in out:
                out[m] = compose(out[n], t)
                queue.append(m)
    return out


def assemble(
    claims: list[Claim],
    entries: Mapping[str, Entry],
    order: Mapping[str, int],
    recorded: Mapping[str, tuple[str, Transform]],
    confirm: Confirmer,
) -> list[Tie]:
    """The ties the claims make: each group's members tied to its source.

    ``recorded``: absent alias -> (source, transform) exactly as the file's record says."""
    adj: Adjacency = defaultdict(list)
    evidence: dict[str, set[Evidence]] = defaultdict(set)
    structural: dict[str, bool] = defaultdict(bool)
    as_source: dict[str, int] = defaultdict(lambda: 9)
    as_alias: dict[str, int] = defaultdict(lambda: 9)
    for c in claims:
        adj[c.alias].append((c.source, c.transform))
        adj[c.source].append((c.alias, c.transform))
        for n in (c.alias, c.source):
            evidence[n].add(c.evidence)
            if not c.duplicate:
                structural[n] = True
        as_source[c.source] = min(as_source[c.source], SOURCE_RANK[c.evidence])
        as_alias[c.alias] = min(as_alias[c.alias], SOURCE_RANK[c.evidence])

    def rank(n: str) -> int:
        # a name is a source only by evidence stronger than any that makes it an alias
        return as_source[n] if as_source[n] < as_alias[n] else 9

    ties: list[Tie] = []
    seen: set[str] = set()
    for start in list(adj):
        if start in seen:
            continue
        members = component(adj, start)
        seen.update(members)
        held = [entries[n] for n in members if n in entries]
        if not held:
            continue  # nothing of the group is stored: nothing to tell
        source = min(members, key=lambda n: (rank(n), n not in entries, order.get(n, 0)))
        transforms = transforms_from(adj, source)
        for alias in sorted(members - {source}, key=lambda n: order.get(n, 1 << 30)):
            src, transform = source, transforms[alias]
            if alias in recorded and recorded[alias][0] in entries:
                # the bytes an absent alias stands for are those the record names,
                # even when that tensor drifts from the rest of its group
                src, transform = recorded[alias]
            ties.append(
                _tie(alias, src, transform, evidence[alias], structural[alias], held[0], confirm)
            )
    return ties


def _tie(
    alias: str,
    source: str,
    transform: Transform,
    evidence: set[Evidence],
    structural: bool,
    held: Entry,
    confirm: Confirmer,
) -> Tie:
    entries = confirm.entries
    a, s = entries.get(alias), entries.get(source)
    ev = set(evidence)
    shared = a is not None and s is not None and a.storage is not None and a.storage == s.storage
    ref = a or s or held  # neither stored: the group's stored member tells the size
    tie = Tie(
        alias,
        source,
        transform,
        "tied" if structural else "duplicate",
        [],
        stored=a is not None and not shared,
        bytes=ref.nbytes,
        source_stored=s is not None,
        across_files=a is not None and s is not None and a.storage is not None and a.file != s.file,
    )
    if a is not None and s is not None and not shared:
        if confirm.equal(alias, source, transform):
            if (alias, source, transform) in confirm.unconfirmed:
                ev.add("sampled")
                tie.unconfirmed = True
            else:
                ev.add("transposed" if transform == "transpose" else "value")
        else:
            tie.drift = confirm.drift(a, s, transform)
            tie.pad = confirm.padded(alias, source) if transform == "identity" else None
    tie.evidence = [e for e in EVIDENCE_ORDER if e in ev]
    return tie


def fills(ties: list[Tie], stored: Container[str]) -> list[Fill]:
    """Every absent member of ``ties`` that a stored member of its group gives, in tie
    order: an absent alias from its source, an absent source from a stored alias, and
    an alias whose source is absent too from whichever member is stored (a T5 file
    holding only ``encoder.embed_tokens.weight`` gives ``shared.weight``,
    ``decoder.embed_tokens.weight`` and ``lm_head.weight``)."""
    made: dict[str, Fill] = {}

    def root(n: str) -> tuple[str, Transform] | None:
        if n in stored:
            return n, "identity"
        f = made.get(n)
        return (f.origin, f.transform) if f is not None else None

    changed = True
    while changed:
        changed = False
        for t in ties:
            for want, have in ((t.alias, t.source), (t.source, t.alias)):
                if want in stored or want in made:
                    continue
                got = root(have)
                if got is not None:
                    made[want] = Fill(want, got[0], compose(t.transform, got[1]), t)
                    changed = True
    order = {t.alias: i for i, t in enumerate(ties)}
    return sorted(made.values(), key=lambda f: order.get(f.tie.alias, 0))
