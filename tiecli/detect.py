"""Finding ties in an opened checkpoint.

Claims come from every kind of evidence (the file's record, the architecture,
the pattern table, shared pickle storage); values confirm them, reveal drift,
and find duplicates nobody declared. Works on entries only, never on a file
layout.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from .arch.patterns import flag_pairs, flags, model_type_of, pattern_ties, switched_off, tie_flags
from .arch.storage import relation
from .checkpoint import Checkpoint, Entry
from .dtypes import itemsize
from .progress import NO_PROGRESS, Progress
from .record import read_record
from .values import difference, equal, find_equal, same_samples, sampled_difference

EVIDENCE_ORDER = ("metadata", "declared", "pattern", "storage", "value", "transposed", "sampled")
STRUCTURAL = frozenset({"metadata", "declared", "pattern", "storage"})
# Which evidence makes a name the source of its group, strongest first.
SOURCE_RANK = {"declared": 0, "pattern": 1, "metadata": 2, "storage": 3}


@dataclass
class Problem:
    code: str
    severity: str  # error | warning
    message: str
    tensors: list[str] = field(default_factory=list)
    # consumer findings about the same tensors, folded into this problem
    related: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "tensors": self.tensors,
        }
        if self.related:
            d["consumers"] = [p.to_dict() for p in self.related]
        return d


@dataclass
class Drift:
    max_abs_diff: float | None
    differing: int
    numel: int
    sampled: bool = False  # from the sampled elements only (remote, over --max-download)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "max_abs_diff": self.max_abs_diff,
            "differing_elements": self.differing,
            "elements": self.numel,
        }
        if self.sampled:
            d["sampled"] = True
        return d


@dataclass(frozen=True)
class Pad:
    """A padded vocabulary: the source has more rows than the alias, and the alias's
    rows are bit-identical to the source's first rows."""

    source_rows: int
    alias_rows: int
    sampled: bool = False  # remote, past --max-download: first and last rows compared only

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source_rows": self.source_rows, "alias_rows": self.alias_rows}
        if self.sampled:
            d["sampled"] = True
        return d


@dataclass
class Tie:
    alias: str
    source: str
    transform: str  # identity | transpose
    kind: str  # tied | duplicate
    evidence: list[str]
    stored: bool  # the alias's bytes are in the file, apart from the source's
    bytes: int
    source_stored: bool = True
    drift: Drift | None = None
    # pickles: alias and source in different files, which cannot share storage
    across_files: bool = False
    # equal at the sampled elements, never compared whole (remote, over --max-download)
    unconfirmed: bool = False
    # a padded vocabulary: never deduped (the copies differ in shape), always reported
    pad: Pad | None = None

    @property
    def duplicated(self) -> bool:
        """A tied tensor stored twice, its copies equal: bytes wasted."""
        return (
            self.kind == "tied"
            and self.stored
            and self.source_stored
            and self.drift is None
            and self.pad is None
        )

    @property
    def dedupable(self) -> bool:
        """What ``dedupe`` removes by default (a pickle keeps what it cannot share)."""
        return self.duplicated and not self.across_files

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "alias": self.alias,
            "source": self.source,
            "transform": self.transform,
            "kind": self.kind,
            "evidence": self.evidence,
            "stored": self.stored,
            "bytes": self.bytes,
            "source_stored": self.source_stored,
        }
        if self.drift is not None:
            d["drift"] = self.drift.to_dict()
        if self.unconfirmed:
            d["unconfirmed"] = True
        if self.pad is not None:
            d["pad"] = self.pad.to_dict()
        return d


@dataclass
class TieReport:
    ties: list[Tie]
    problems: list[Problem]
    declared_by: str | None = None  # "transformers (<class>)" | "pattern table" | None
    # (alias, source, transform) found equal by their samples alone; empty unless
    # find_ties(sampled=True). Whoever acts on these must compare them in full.
    assumed: list[tuple[str, str, str]] = field(default_factory=list)
    # With a config.json that transformers or the pattern table interprets: the
    # architecture (class, or model_type) whose declared ties a loader restores. An
    # alias absent from the file and not declared by it is initialised randomly.
    architecture: str | None = None

    @property
    def dedupable_bytes(self) -> int:
        return sum(t.bytes for t in self.ties if t.dedupable)


@dataclass
class _Claim:
    alias: str
    source: str
    transform: str
    evidence: str
    duplicate: bool = False  # a recorded duplicate: metadata evidence, but not a tie by design


SAMPLED_FROM = 1 << 20  # bytes: smaller tensors are always compared whole


class _Finder:
    def __init__(
        self, ckpt: Checkpoint, use_transformers: bool, progress: Progress, sampled: bool = False
    ):
        self.ckpt = ckpt
        self.sampled = sampled
        self.assumed: list[tuple[str, str, str]] = []
        # remote: bytes that may still be read whole, and pairs equal only by samples
        self.budget = ckpt.budget
        self.unconfirmed: set[tuple[str, str, str]] = set()
        self.entries = ckpt.entries
        self.order = {name: i for i, name in enumerate(ckpt.entries)}
        self.use_transformers = use_transformers
        self.progress = progress
        self.claims: list[_Claim] = []
        self.problems: list[Problem] = []
        self.declared_by: str | None = None
        self.architecture: str | None = None
        # absent alias -> (source, transform) exactly as the file's record says
        self.recorded: dict[str, tuple[str, str]] = {}
        self._equal_cache: dict[tuple[str, str, str], bool] = {}

    # -- claims ---------------------------------------------------------

    def from_record(self) -> None:
        shapes = {n: (e.shape, e.dtype) for n, e in self.entries.items()}
        rec = read_record(self.ckpt.metadata, shapes)
        for issue in rec.issues:
            self.problems.append(Problem("bad-record", "error", issue.message, list(issue.tensors)))
        for t in rec.ties:
            self.claims.append(
                _Claim(t.alias, t.source, t.transform, "metadata", t.kind == "duplicate")
            )
        for t in rec.convention:
            self.claims.append(_Claim(t.alias, t.source, "identity", "metadata"))
        for t in [*rec.convention, *rec.ties]:  # tiecli's own entry wins
            if t.alias not in self.entries:
                self.recorded[t.alias] = (t.source, t.transform)

    def from_architecture(self) -> None:
        if self.ckpt.form.architecture_inside:
            self._from_gguf()
            return
        cfg = self.ckpt.config
        declared = None
        if cfg is not None and self.use_transformers and self.ckpt.config_path is not None:
            from .arch.build import Budget
            from .arch.declared import declared_ties

            budget = Budget.of(self.entries)
            declared, why = declared_ties(self.ckpt.config_path.parent, budget)
            if why is not None:
                self.ckpt.notes.append(f"{why}: ties come from the pattern table")
        if declared is not None:
            self.declared_by = f"transformers ({declared.architecture})"
            self.architecture = declared.architecture or "its architecture"
            # the file's names: those it stores and the absent ones its record names
            ties = declared.ties_for([*self.entries, *self.recorded])
            # a whole group when any member is stored: T5 with only encoder.embed_tokens
            # still ties shared, decoder.embed_tokens and lm_head to it
            adj: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for alias, source in ties.items():
                adj[alias].append((source, "identity"))
                adj[source].append((alias, "identity"))
            for alias, source in ties.items():
                if any(n in self.entries for n in _component(adj, alias)):
                    self.claims.append(
                        _Claim(alias, source, self._shape_transform(alias, source), "declared")
                    )
            return
        found = pattern_ties(self.entries, cfg)
        if found:
            self.declared_by = "pattern table"
        model_type = model_type_of(cfg)
        if model_type is not None:
            self.architecture = f"model_type {model_type!r}"
        for p in found:
            transform = self._shape_transform(p.alias, p.source)
            both = p.alias in self.entries and p.source in self.entries
            if (
                both
                and not p.from_config
                and not self._equal(p.alias, p.source, transform)
                and self._padded(p.alias, p.source) is None
            ):
                continue  # a hypothesis the values reject: not a tie
            self.claims.append(_Claim(p.alias, p.source, transform, "pattern"))

    def _from_gguf(self) -> None:
        """llama.cpp's loader is the architecture: its head rule, from the table."""
        from .formats.gguf_heads import head_finding

        arch = getattr(self.ckpt.readers[0], "architecture", None)
        found = head_finding(arch, self.entries, lambda a, s: self._equal(a, s, "identity"))
        # set even when unknown: a GGUF loader restores no name the table does not declare
        self.architecture = f"llama.cpp {arch!r}"
        if found.kind is not None:
            self.declared_by = f"llama.cpp table ({arch}: {found.kind})"
        if found.tie is not None:
            self.claims.append(_Claim(*found.tie, "identity", "declared"))
        if found.missing is not None:
            self.problems.append(
                Problem("gguf-head-missing", "error", found.missing, ["output.weight"])
            )
        if found.note is not None:
            self.ckpt.notes.append(found.note)

    def from_storage(self) -> None:
        groups: dict[tuple[Any, int], list[Entry]] = defaultdict(list)
        for e in self.entries.values():
            if e.storage is not None:
                groups[(e.file, e.storage[0])].append(e)
        for members in groups.values():
            if len(members) < 2:
                continue
            for i, a in enumerate(members):
                for b in members[:i]:
                    transform = relation(b, a)
                    if transform:
                        owner, other = (b, a) if _owns(b) or not _owns(a) else (a, b)
                        self.claims.append(_Claim(other.name, owner.name, transform, "storage"))
                        break

    def check_config(self) -> None:
        """A config that unties what the file only stores once; tie flags that disagree
        between the top level and nested sub-configs (``text_config``)."""
        cfg = self.ckpt.config
        for flag in tie_flags():
            said = flags(cfg, flag)
            if len(set(said.values())) > 1:
                levels = ", ".join(f"{k}={'true' if v else 'false'}" for k, v in said.items())
                self.problems.append(
                    Problem(
                        "config-flags-disagree",
                        "warning",
                        f"config.json's tie flags disagree ({levels}): consumers read different "
                        f"levels and load different models; make every level say the same",
                        [],
                    )
                )
        if not cfg or model_type_of(cfg) is None:
            return
        declared = {c.alias for c in self.claims if c.evidence == "declared"}
        # the pairs a flag the config turns off governs, at whatever prefix the file
        # holds them (language_model.)
        for p in switched_off(self.entries, cfg):
            if (
                p.source in self.entries
                and p.alias not in self.entries
                and p.alias not in declared  # the architecture ties it all the same
            ):
                self.problems.append(
                    Problem(
                        "config-mismatch",
                        "error",
                        f"config.json says {p.when}=false but {p.alias} is absent: "
                        f"loaders will initialise it randomly; store it (tiecli untie) or set "
                        f"{p.when}=true",
                        [p.alias, p.source],
                    )
                )

    # -- values ---------------------------------------------------------

    def _shape_transform(self, alias: str, source: str) -> str:
        a, s = self.entries.get(alias), self.entries.get(source)
        if a and s and len(a.shape) == 2 and a.shape != s.shape and a.shape == s.shape[::-1]:
            return "transpose"
        return "identity"

    def _equal(self, alias: str, source: str, transform: str) -> bool:
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

    # -- assembling -----------------------------------------------------

    def assemble(self) -> list[Tie]:
        adj: dict[str, list[tuple[str, str]]] = defaultdict(list)
        evidence: dict[str, set[str]] = defaultdict(set)
        structural: dict[str, bool] = defaultdict(bool)
        as_source: dict[str, int] = defaultdict(lambda: 9)
        as_alias: dict[str, int] = defaultdict(lambda: 9)
        for c in self.claims:
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
            component = _component(adj, start)
            seen.update(component)
            held = [self.entries[n] for n in component if n in self.entries]
            if not held:
                continue  # nothing of the group is stored: nothing to tell
            source = min(
                component, key=lambda n: (rank(n), n not in self.entries, self.order.get(n, 0))
            )
            transforms = _transforms_from(adj, source)
            for alias in sorted(component - {source}, key=lambda n: self.order.get(n, 1 << 30)):
                src, transform = source, transforms[alias]
                if alias in self.recorded and self.recorded[alias][0] in self.entries:
                    # the bytes an absent alias stands for are those the record names,
                    # even when that tensor drifts from the rest of its group
                    src, transform = self.recorded[alias]
                ties.append(self._tie(alias, src, transform, evidence, structural, held[0]))
        return ties

    def _tie(
        self,
        alias: str,
        source: str,
        transform: str,
        evidence: dict[str, set[str]],
        structural: dict[str, bool],
        held: Entry,
    ) -> Tie:
        a, s = self.entries.get(alias), self.entries.get(source)
        ev = set(evidence[alias])
        shared = (
            a is not None and s is not None and a.storage is not None and a.storage == s.storage
        )
        ref = a or s or held  # neither stored: the group's stored member tells the size
        tie = Tie(
            alias,
            source,
            transform,
            "tied" if structural[alias] else "duplicate",
            [],
            stored=a is not None and not shared,
            bytes=ref.nbytes,
            source_stored=s is not None,
            across_files=a is not None
            and s is not None
            and a.storage is not None
            and a.file != s.file,
        )
        if a is not None and s is not None and not shared:
            if self._equal(alias, source, transform):
                if (alias, source, transform) in self.unconfirmed:
                    ev.add("sampled")
                    tie.unconfirmed = True
                else:
                    ev.add("transposed" if transform == "transpose" else "value")
            else:
                tie.drift = self._drift(a, s, transform)
                tie.pad = self._padded(alias, source) if transform == "identity" else None
        tie.evidence = [e for e in EVIDENCE_ORDER if e in ev]
        return tie

    def _padded(self, alias: str, source: str) -> Pad | None:
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
        if not _same_prefix(short, long):
            return None
        return Pad(source_rows=s.shape[0], alias_rows=a.shape[0])

    def _drift(self, a: Entry, s: Entry, transform: str) -> Drift:
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

    def add_value_matches(self, ties: list[Tie]) -> list[Tie]:
        """Equal tensors nobody declared: duplicates, or extra members of a tie group."""
        # only copies confirmed equal to their source form a group others may join: a
        # tensor equal to a drifted copy is not equal to that copy's source
        sound = [t for t in ties if t.drift is None and t.source_stored]
        root_of = {t.alias: t.source for t in sound} | {t.source: t.source for t in sound}
        relation = {t.alias: t.transform for t in sound}  # transform from the group's source
        for t in ties:  # a drifted alias stays where it is, never a duplicate of anything
            root_of.setdefault(t.alias, t.alias if t.drift is not None else t.source)
        seen_views: set[Any] = set()
        candidates = []
        for e in self.entries.values():
            view = (e.storage, e.view) if e.storage is not None else id(e)
            if view not in seen_views and _owns(e):
                seen_views.add(view)
                candidates.append(e)
        # identity ties whose copies were compared equal are one class: read once
        known = {
            n: t.source
            for t in ties
            if t.transform == "identity" and t.drift is None and t.source_stored
            for n in (t.alias, t.source)
            if n in self.entries
        }
        matches = find_equal(candidates, self.progress, known, self.budget)
        adj: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for group in matches.groups:
            for e in group[1:]:
                adj[e.name].append((group[0].name, "identity"))
                adj[group[0].name].append((e.name, "identity"))
        for x, y in matches.transposed:
            adj[x.name].append((y.name, "transpose"))
            adj[y.name].append((x.name, "transpose"))
        seen: set[str] = set()
        for start in sorted(adj, key=self.order.__getitem__):
            if start in seen:
                continue
            component = _component(adj, start)
            seen |= component
            anchors = sorted((n for n in component if n in root_of), key=self.order.__getitem__)
            anchor = anchors[0] if anchors else start
            root = root_of.get(anchor, anchor)
            rel = _transforms_from(adj, anchor)
            for name in sorted(component - root_of.keys() - {root}, key=self.order.__getitem__):
                transform = _compose(rel[name], relation.get(anchor, "identity"))
                unconfirmed = name in matches.unconfirmed
                ties.append(
                    Tie(
                        name,
                        root,
                        transform,
                        "duplicate",
                        [
                            "sampled"
                            if unconfirmed
                            else "transposed"
                            if transform == "transpose"
                            else "value"
                        ],
                        stored=True,
                        bytes=self.entries[name].nbytes,
                        source_stored=root in self.entries,
                        unconfirmed=unconfirmed,
                    )
                )
        return ties

    def add_untied_pads(self, ties: list[Tie]) -> list[Tie]:
        """A pair of the config's flag that the config unties (so no claim made it a
        tie) whose shorter tensor is the longer one's first rows: a padded copy, which
        consumers refuse or read differently all the same. Reported, never deduped."""
        if self.ckpt.config is None:
            return ties
        named = {n for t in ties for n in (t.alias, t.source)}
        for alias, source in flag_pairs(self.entries, self.ckpt.config):
            if alias in named or source in named:
                continue
            if alias not in self.entries or source not in self.entries:
                continue
            pad = self._padded(alias, source)
            if pad is None:
                continue
            a, s = self.entries[alias], self.entries[source]
            ties.append(
                Tie(
                    alias,
                    source,
                    "identity",
                    "duplicate",
                    ["pattern"],
                    stored=True,
                    bytes=a.nbytes,
                    drift=self._drift(a, s, "identity"),
                    pad=pad,
                )
            )
        return ties

    def report_problems(self, ties: list[Tie]) -> None:
        mismatched = {n for p in self.problems if p.code == "config-mismatch" for n in p.tensors}
        for t in ties:
            if (
                self.architecture is not None
                and t.alias not in self.entries
                and t.source_stored
                and t.alias not in mismatched
                and not declared(t)
            ):
                self.problems.append(
                    Problem(
                        "alias-not-declared",
                        "error",
                        f"{t.alias} is absent, recorded as {t.source}, but {self.architecture} "
                        f"does not tie them: transformers will initialise {t.alias} randomly "
                        f"on load; fix: tiecli untie {self.ckpt.shown}"
                        + (" -o LOCAL_FOLDER" if self.ckpt.url is not None else ""),
                        [t.alias, t.source],
                    )
                )
            if t.unconfirmed:
                self.problems.append(
                    Problem(
                        "unconfirmed",
                        "warning",
                        f"{t.alias} and {t.source} agree at their sampled elements but were not "
                        f"compared whole: reading them would pass the --max-download budget; "
                        f"raise --max-download to confirm the tie",
                        [t.alias, t.source],
                    )
                )
            if t.pad is not None:
                p = t.pad
                how = (
                    f"are tied ({', '.join(t.evidence)})"
                    if t.kind == "tied"
                    else "are untied by config.json, yet one is the other"
                )
                self.problems.append(
                    Problem(
                        "padded",
                        "error",
                        f"{t.alias} ({p.alias_rows} rows) and {t.source} ({p.source_rows} rows) "
                        f"{how} with a padded vocabulary: the "
                        f"first {min(p.alias_rows, p.source_rows)} rows are bit-identical; "
                        f"most consumers refuse the mismatched shapes, so trim the padding to "
                        f"the config's vocab_size or pad both"
                        + (
                            f" (tiecli fix {self.ckpt.shown} --trim-padding)"
                            if self.ckpt.url is None and self.ckpt.config is not None
                            else ""
                        ),
                        [t.alias, t.source],
                    )
                )
            elif t.drift is not None:
                d = t.drift
                diff = (
                    f"max abs diff {d.max_abs_diff:g}"
                    if d.max_abs_diff is not None
                    else "shapes or dtypes differ"
                )
                if d.sampled:
                    diff += " among sampled elements (over --max-download, not read whole)"
                self.problems.append(
                    Problem(
                        "drift",
                        "error",
                        f"{t.alias} and {t.source} are tied ({', '.join(t.evidence)}) but differ: "
                        f"{diff}, {d.differing} of {d.numel} elements; pick the right copy and re-tie "
                        f"(dedupe keeps both until they agree)",
                        [t.alias, t.source],
                    )
                )
            if not t.source_stored and t.stored and t.kind == "tied":
                self.problems.append(
                    Problem(
                        "source-missing",
                        "warning",
                        f"source {t.source} is absent while its alias {t.alias} is stored: some "
                        f"transformers versions load {t.source} randomly initialised; run "
                        f"'tiecli untie' to store it",
                        [t.source, t.alias],
                    )
                )


@dataclass(frozen=True)
class Fill:
    """A tie member absent from the file, rebuilt from a stored tensor of its group:
    ``name`` is ``transform`` applied to ``origin`` (which is stored)."""

    name: str
    origin: str
    transform: str
    tie: Tie


def fills(ties: list[Tie], stored: Container[str]) -> list[Fill]:
    """Every absent member of ``ties`` that a stored member of its group gives, in tie
    order: an absent alias from its source, an absent source from a stored alias, and
    an alias whose source is absent too from whichever member is stored (a T5 file
    holding only ``encoder.embed_tokens.weight`` gives ``shared.weight``,
    ``decoder.embed_tokens.weight`` and ``lm_head.weight``)."""
    made: dict[str, Fill] = {}

    def root(n: str) -> tuple[str, str] | None:
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
                    made[want] = Fill(want, got[0], _compose(t.transform, got[1]), t)
                    changed = True
    order = {t.alias: i for i, t in enumerate(ties)}
    return sorted(made.values(), key=lambda f: order.get(f.tie.alias, 0))


def _same_prefix(short: Entry, long: Entry) -> bool:
    """The bytes of ``short`` are the first bytes of ``long`` (read in bounded pieces)."""
    step = 8 << 20
    for offset in range(0, short.nbytes, step):
        k = min(step, short.nbytes - offset)
        if short.blob.read(offset, k) != long.blob.read(offset, k):
            return False
    return True


def declared(t: Tie) -> bool:
    """The architecture (transformers, or the pattern table) declares this tie: a loader
    that knows nothing of tie records still restores the alias."""
    return "declared" in t.evidence or "pattern" in t.evidence


def _owns(e: Entry) -> bool:
    """A pickle tensor that is a plain contiguous view of its storage."""
    if e.view is None:
        return True
    offset, strides = e.view
    expected, step = [], 1
    for dim in reversed(e.shape):
        expected.append(step)
        step *= dim
    return tuple(reversed(expected)) == strides or e.numel <= 1


def _component(adj: dict[str, list[tuple[str, str]]], start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        n = todo.pop()
        for m, _ in adj[n]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def _compose(a: str, b: str) -> str:
    return "identity" if a == b else "transpose"


def _transforms_from(adj: dict[str, list[tuple[str, str]]], source: str) -> dict[str, str]:
    out = {source: "identity"}
    queue = deque([source])
    while queue:
        n = queue.popleft()
        for m, t in adj[n]:
            if m not in out:
                out[m] = _compose(out[n], t)
                queue.append(m)
    return out


def find_ties(
    ckpt: Checkpoint,
    *,
    use_transformers: bool = True,
    progress: Progress = NO_PROGRESS,
    sampled: bool = False,
) -> TieReport:
    """Every tie of ``ckpt`` with its evidence, and the problems found.

    ``sampled``: a large alias and its source count as equal when their sampled
    elements are, without reading them whole (listed in ``assumed``). Only for a
    caller that compares them in full afterwards, as a rewrite's verification does.
    """
    f = _Finder(ckpt, use_transformers, progress, sampled)
    f.from_record()
    f.from_architecture()
    f.from_storage()
    f.check_config()
    ties = f.assemble()
    ties = f.add_value_matches(ties)
    ties = f.add_untied_pads(ties)
    ties.sort(
        key=lambda t: (f.order.get(t.source, 1 << 30), f.order.get(t.alias, 1 << 30), t.alias)
    )
    f.report_problems(ties)
    return TieReport(ties, f.problems, f.declared_by, f.assumed, f.architecture)
