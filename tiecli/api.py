"""The library functions behind the commands; each returns a result object.

Every command is the same pipeline: open the checkpoint, find its ties, and
(for rewrites) plan and write. The CLI only renders what these return.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .detect import Problem, Tie, TieReport, find_ties
from .formats import open_checkpoint
from .progress import NO_PROGRESS, Progress

PathLike = str | os.PathLike[str]


@dataclass
class InspectResult:
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
    command: str = "inspect"

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "path": self.path,
            "format": self.format,
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
            "tensors": self.tensors,
            "bytes": self.bytes,
            "ties": [t.to_dict() for t in self.ties],
            "dedupable_bytes": self.dedupable_bytes,
            "declared_by": self.declared_by,
            "nested_key": self.nested_key,
            "config": self.config,
            "notes": self.notes,
        }


def _inspect_opened(ckpt: Checkpoint, report: TieReport) -> InspectResult:
    return InspectResult(
        path=str(ckpt.path),
        format=ckpt.format,
        tensors=len(ckpt.entries),
        bytes=ckpt.stored_bytes(),
        ties=report.ties,
        dedupable_bytes=report.dedupable_bytes,
        problems=report.problems,
        declared_by=report.declared_by,
        nested_key=ckpt.nested_key,
        config=str(ckpt.config_path) if ckpt.config_path else None,
        notes=list(ckpt.notes),
        bytes_read=ckpt.bytes_read,
    )


def inspect(path: PathLike, *, use_transformers: bool = True, progress: Progress = NO_PROGRESS) -> InspectResult:
    """Tensors, ties and problems of the checkpoint at ``path``; changes nothing."""
    with open_checkpoint(path) as ckpt:
        report = find_ties(ckpt, use_transformers=use_transformers, progress=progress)
        return _inspect_opened(ckpt, report)
