"""The words of a tie report: ties, the evidence for them, and the problems found.

Detection, planning, verification and rendering all speak these types. The
kinds, transforms, evidence and severities are closed sets (``Literal``
types), and :data:`PROBLEMS` is the one table of every problem code tiecli can
emit, with its severity and meaning: the code that raises a problem takes its
severity from there (:func:`problem`).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, Literal

from .lean import dataclass

Kind = Literal["tied", "duplicate"]
Transform = Literal["identity", "transpose"]
Evidence = Literal["metadata", "declared", "pattern", "storage", "value", "transposed", "sampled"]
Severity = Literal["error", "warning"]

KINDS: tuple[Kind, ...] = ("tied", "duplicate")
TRANSFORMS: tuple[Transform, ...] = ("identity", "transpose")
EVIDENCE_ORDER: tuple[Evidence, ...] = (
    "metadata",
    "declared",
    "pattern",
    "storage",
    "value",
    "transposed",
    "sampled",
)
# Evidence that makes a tie by design (``tied``); the rest finds equal values only.
STRUCTURAL: frozenset[Evidence] = frozenset({"metadata", "declared", "pattern", "storage"})
# Which evidence makes a name the source of its group, strongest first.
SOURCE_RANK: dict[Evidence, int] = {"declared": 0, "pattern": 1, "metadata": 2, "storage": 3}


@dataclass(frozen=True)
class ProblemCode:
    """What a problem code means and how severe it is."""

    severity: Severity
    meaning: str


# Every problem code tiecli emits (the README's table lists the same).
PROBLEMS: dict[str, ProblemCode] = {
    "drift": ProblemCode("error", "a tie's stored copies differ"),
    "bad-record": ProblemCode("error", "the file's tie record is malformed"),
    "config-mismatch": ProblemCode(
        "error", "config.json unties the head, yet the file leaves it absent"
    ),
    "alias-not-declared": ProblemCode(
        "error", "an absent alias that the architecture does not tie is initialised randomly"
    ),
    "source-missing": ProblemCode("warning", "a tie's source is absent while its alias is stored"),
    "padded": ProblemCode("error", "a tie's copies differ by a padded vocabulary"),
    "config-flags-disagree": ProblemCode(
        "warning", "config.json's tie flags disagree between its levels"
    ),
    "unconfirmed": ProblemCode(
        "warning", "a tie equal at its sampled elements, not compared whole (--max-download)"
    ),
    "gguf-head-missing": ProblemCode(
        "error", "a GGUF file lacks the output.weight its llama.cpp loader requires"
    ),
    "duplicate-stored": ProblemCode("error", "(verify) a tied tensor stored more than once"),
    "consumers-disagree": ProblemCode(
        "error", "(verify) two consumers would load different values for a tensor"
    ),
    "consumer-bad-load": ProblemCode(
        "error", "(verify) a consumer would load random weights or refuse the file"
    ),
    "tie-broken-on-device": ProblemCode(
        "error", "(verify --forward) a tie is two storages in the loaded model"
    ),
    "forward-failed": ProblemCode(
        "error", "(verify --forward) the model could not be built, loaded or run"
    ),
    "forward-mismatch": ProblemCode(
        "error", "(verify --forward --against) outputs differ from the reference"
    ),
}


@dataclass
class Problem:
    """One problem found in a checkpoint, with the tensors it concerns."""

    code: str
    severity: Severity
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


def problem(code: str, message: str, tensors: list[str] | None = None) -> Problem:
    """A problem of a code in :data:`PROBLEMS`, with the severity the table gives it."""
    return Problem(code, PROBLEMS[code].severity, message, list(tensors or []))


@dataclass
class Drift:
    """How far a tie's stored copies are apart."""

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
    """One tie: ``alias`` is ``source`` (maybe transposed), with the evidence for it."""

    alias: str
    source: str
    transform: Transform
    kind: Kind
    evidence: list[Evidence]
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


def declared(t: Tie) -> bool:
    """The architecture (transformers, or the pattern table) declares this tie: a loader
    that knows nothing of tie records still restores the alias."""
    return "declared" in t.evidence or "pattern" in t.evidence


@dataclass
class TieReport:
    """Every tie and problem found in a checkpoint, and what declared them."""

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


@dataclass(frozen=True)
class Fill:
    """A tie member absent from the file, rebuilt from a stored tensor of its group:
    ``name`` is ``transform`` applied to ``origin`` (which is stored)."""

    name: str
    origin: str
    transform: Transform
    tie: Tie
