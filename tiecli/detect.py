"""Finding ties in an opened checkpoint.

Claims come from every kind of evidence (the file's record, the architecture,
the pattern table, shared pickle storage); values confirm them, reveal drift,
and find duplicates nobody declared (:mod:`tiecli.confirm`); claims that share
a name form one group (:mod:`tiecli.grouping`). Works on entries only, never on
a file layout.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .arch.patterns import flag_pairs, flags, model_type_of, pattern_ties, switched_off, tie_flags
from .arch.storage import relation
from .checkpoint import Checkpoint, Entry
from .confirm import Confirmer, add_value_matches
from .grouping import Adjacency, Claim, assemble, component
from .progress import NO_PROGRESS, Progress
from .record import read_record
from .tie_problems import tie_problems
from .ties import Problem, Tie, TieReport, Transform, problem


class _Finder:
    """The claims of one checkpoint, by kind of evidence, and the problems they show."""

    def __init__(self, ckpt: Checkpoint, use_transformers: bool, sampled: bool = False):
        self.ckpt = ckpt
        self.entries = ckpt.entries
        self.order = {name: i for i, name in enumerate(ckpt.entries)}
        self.use_transformers = use_transformers
        self.values = Confirmer(ckpt.entries, ckpt.budget, sampled)
        self.claims: list[Claim] = []
        self.problems: list[Problem] = []
        self.declared_by: str | None = None
        self.architecture: str | None = None
        # absent alias -> (source, transform) exactly as the file's record says
        self.recorded: dict[str, tuple[str, Transform]] = {}

    # -- claims ---------------------------------------------------------

    def from_record(self) -> None:
        shapes = {n: (e.shape, e.dtype) for n, e in self.entries.items()}
        rec = read_record(self.ckpt.metadata, shapes)
        for issue in rec.issues:
            self.problems.append(problem("bad-record", issue.message, list(issue.tensors)))
        for t in rec.ties:
            self.claims.append(
                Claim(t.alias, t.source, t.transform, "metadata", t.kind == "duplicate")
            )
        for t in rec.convention:
            self.claims.append(Claim(t.alias, t.source, "identity", "metadata"))
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
            adj: Adjacency = defaultdict(list)
            for alias, source in ties.items():
                adj[alias].append((source, "identity"))
                adj[source].append((alias, "identity"))
            for alias, source in ties.items():
                if any(n in self.entries for n in component(adj, alias)):
                    self.claims.append(
                        Claim(alias, source, self.values.shape_transform(alias, source), "declared")
                    )
            return
        found = pattern_ties(self.entries, cfg)
        if found:
            self.declared_by = "pattern table"
        model_type = model_type_of(cfg)
        if model_type is not None:
            self.architecture = f"model_type {model_type!r}"
        for p in found:
            transform = self.values.shape_transform(p.alias, p.source)
            both = p.alias in self.entries and p.source in self.entries
            if (
                both
                and not p.from_config
                and not self.values.equal(p.alias, p.source, transform)
                and self.values.padded(p.alias, p.source) is None
            ):
                continue  # a hypothesis the values reject: not a tie
            self.claims.append(Claim(p.alias, p.source, transform, "pattern"))

    def _from_gguf(self) -> None:
        """llama.cpp's loader is the architecture: its head rule, from the table."""
        from .formats.gguf_heads import head_finding

        arch = getattr(self.ckpt.readers[0], "architecture", None)
        found = head_finding(arch, self.entries, lambda a, s: self.values.equal(a, s, "identity"))
        # set even when unknown: a GGUF loader restores no name the table does not declare
        self.architecture = f"llama.cpp {arch!r}"
        if found.kind is not None:
            self.declared_by = f"llama.cpp table ({arch}: {found.kind})"
        if found.tie is not None:
            self.claims.append(Claim(*found.tie, "identity", "declared"))
        if found.missing is not None:
            self.problems.append(problem("gguf-head-missing", found.missing, ["output.weight"]))
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
                        self.claims.append(Claim(other.name, owner.name, transform, "storage"))
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

    def candidates(self) -> list[Entry]:
        """The tensors that hold their own bytes: one per pickle view of a storage."""
        seen_views: set[Any] = set()
        out = []
        for e in self.entries.values():
            view = (e.storage, e.view) if e.storage is not None else id(e)
            if view not in seen_views and _owns(e):
                seen_views.add(view)
                out.append(e)
        return out

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
            pad = self.values.padded(alias, source)
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
                    drift=self.values.drift(a, s, "identity"),
                    pad=pad,
                )
            )
        return ties


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
    f = _Finder(ckpt, use_transformers, sampled)
    f.from_record()
    f.from_architecture()
    f.from_storage()
    f.check_config()
    ties = assemble(f.claims, f.entries, f.order, f.recorded, f.values)
    ties = add_value_matches(ties, f.candidates(), f.order, progress, ckpt.budget)
    ties = f.add_untied_pads(ties)
    ties.sort(
        key=lambda t: (f.order.get(t.source, 1 << 30), f.order.get(t.alias, 1 << 30), t.alias)
    )
    mismatched = {n for p in f.problems if p.code == "config-mismatch" for n in p.tensors}
    f.problems += tie_problems(ties, ckpt, f.architecture, mismatched)
    return TieReport(ties, f.problems, f.declared_by, f.values.assumed, f.architecture)
