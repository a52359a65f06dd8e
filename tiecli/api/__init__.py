"""The library functions behind the commands; each returns a result object.

Every command is the same pipeline: open the checkpoint, find its ties, and
(for rewrites) plan and write. The CLI only renders what these return.
"""

from __future__ import annotations

from .fixing import FixResult, fix
from .inspecting import inspect
from .results import (
    CheckpointVerdict,
    DedupeResult,
    InspectResult,
    PathLike,
    RewriteResult,
    UntieResult,
    VerifyResult,
)
from .rewrites import dedupe, untie
from .verifying import verify

__all__ = [
    "CheckpointVerdict",
    "DedupeResult",
    "FixResult",
    "InspectResult",
    "PathLike",
    "RewriteResult",
    "UntieResult",
    "VerifyResult",
    "dedupe",
    "fix",
    "inspect",
    "untie",
    "verify",
]
