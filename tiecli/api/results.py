"""What the library functions return: one dataclass per command, each with the
``to_dict`` that is its ``--json`` document; and the path type they take."""

from __future__ import annotations

import os
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ..lean import dataclass
from ..ties import Problem, Tie

if TYPE_CHECKING:
    from ..consumers import ConsumerLoad
    from ..forward import ForwardReport

PathLike = str | os.PathLike[str]


def header(result: InspectResult | RewriteResult | VerifyResult) -> dict[str, Any]:
    """The fields every command's JSON document starts with."""
    return {
        "command": result.command,
        "path": result.path,
        "format": result.format,
        "ok": result.ok,
        "problems": [p.to_dict() for p in result.problems],
    }


@dataclass
class InspectResult:
    """What ``inspect`` found in one checkpoint: its ties, problems and what consumers load."""

    path: str
    format: str
    tensors: int
    bytes: int
    ties: list[Tie]
    dedupable_bytes: int
    problems: list[Problem]
    declared_by: str | None = None
    nested_key: str | None = None
    config: str | None = None
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0
    # what each consumer (transformers 4/5, vLLM, MLX-LM, llama.cpp) loads; empty
    # without a config.json, which every consumer needs
    consumers: list[ConsumerLoad] = field(default_factory=list)
    consumer_problems: list[Problem] = field(default_factory=list)
    remote: dict[str, int] | None = None  # a remote checkpoint: requests and bytes_read
    command: str = "inspect"

    @property
    def consumers_agree(self) -> bool:
        return not self.consumer_problems

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return (
            header(self)
            | {
                "tensors": self.tensors,
                "bytes": self.bytes,
                "ties": [t.to_dict() for t in self.ties],
                "dedupable_bytes": self.dedupable_bytes,
                "declared_by": self.declared_by,
                "nested_key": self.nested_key,
                "config": self.config,
                "notes": self.notes,
                "consumers": [c.to_dict() for c in self.consumers],
                "consumers_agree": self.consumers_agree,
                "consumer_problems": [p.to_dict() for p in self.consumer_problems],
            }
            | ({"remote": self.remote} if self.remote is not None else {})
        )


@dataclass(kw_only=True)
class RewriteResult:
    """What ``dedupe`` and ``untie`` share: the input, the output and the byte counts."""

    path: str
    format: str
    output: str | None
    bytes_before: int
    bytes_after: int
    problems: list[Problem]
    dry_run: bool = False
    changed: bool = True
    command: str = ""
    # other files of the folder that -o left out, with the reason (links out of it...)
    not_copied: list[dict[str, str]] = field(default_factory=list)
    remote: dict[str, int] | None = None  # a URL's download: requests and bytes_read
    notes: list[str] = field(default_factory=list)  # what inspect notes too (a GGUF head kept)

    @property
    def ok(self) -> bool:
        return True  # drift is reported, but judging is verify's job

    def to_dict(self) -> dict[str, Any]:
        return (
            header(self)
            | {
                "output": self.output,
                "dry_run": self.dry_run,
                "changed": self.changed,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "not_copied": self.not_copied,
                "notes": self.notes,
            }
            | ({"remote": self.remote} if self.remote is not None else {})
        )


@dataclass(kw_only=True)
class DedupeResult(RewriteResult):
    """What ``dedupe`` removed, what it kept stored and why, and the record it wrote."""

    removed: list[Tie]
    kept: list[tuple[Tie, str]]
    record: list[dict[str, Any]] = field(default_factory=list)
    command: str = "dedupe"

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {
            "bytes_saved": self.bytes_saved,
            "removed": [t.alias for t in self.removed],
            "removed_ties": [t.to_dict() for t in self.removed],
            "kept": [t.to_dict() | {"reason": reason} for t, reason in self.kept],
            "record": self.record,
        }


@dataclass(kw_only=True)
class UntieResult(RewriteResult):
    """What ``untie`` stored anew: each alias written with the tensor it copies."""

    restored: list[Tie]
    made: dict[str, tuple[str, str]]  # name written -> (stored tensor it copies, transform)
    command: str = "untie"

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {
            "restored": list(self.made),
            "restored_ties": [t.to_dict() for t in self.restored],
        }


@dataclass
class CheckpointVerdict:
    """``verify``'s findings for one of the checkpoints it checked."""

    path: str
    format: str
    ties: list[Tie]
    problems: list[Problem]
    consumers: list[ConsumerLoad] = field(default_factory=list)
    remote: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "ties": [t.to_dict() for t in self.ties],
            "problems": [p.to_dict() for p in self.problems],
            "consumers": [c.to_dict() for c in self.consumers],
        } | ({"remote": self.remote} if self.remote is not None else {})


@dataclass
class VerifyResult:
    """``verify``'s findings for every checkpoint checked; ``ok`` is its verdict."""

    paths: list[str]
    checkpoints: list[CheckpointVerdict]
    strict: bool = False
    require_deduped: bool = False
    forward: ForwardReport | None = None  # with --forward
    for_consumers: str | None = None  # --for: the consumers checked (None: all)
    command: str = "verify"

    @property
    def path(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else ", ".join(self.paths)

    @property
    def format(self) -> str:
        formats = sorted({c.format for c in self.checkpoints})
        return formats[0] if len(formats) == 1 else ",".join(formats)

    @property
    def checked(self) -> list[str]:
        return [c.path for c in self.checkpoints]

    @property
    def problems(self) -> list[Problem]:
        return [p for c in self.checkpoints for p in c.problems]

    @property
    def failures(self) -> list[Problem]:
        failing = ("error", "warning") if self.strict else ("error",)
        return [p for p in self.problems if p.severity in failing]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        problems = []
        for c in self.checkpoints:
            problems += [p.to_dict() | {"path": c.path} for p in c.problems]
        d = header(self) | {
            "problems": problems,  # each also names its checkpoint
            "checked": self.checked,
            "strict": self.strict,
            "require_deduped": self.require_deduped,
            "for": self.for_consumers,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
        }
        if self.forward is not None:
            d["forward"] = self.forward.to_dict()
        remote = [c.remote for c in self.checkpoints if c.remote is not None]
        if remote:
            d["remote"] = {k: sum(r[k] for r in remote) for k in ("requests", "bytes_read")}
        return d
