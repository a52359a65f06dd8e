"""The library functions behind the commands; each returns a result object.

Every command is the same pipeline: open the checkpoint, find its ties, and
(for rewrites) plan and write. The CLI only renders what these return.

One module per command: ``inspecting`` (inspect), ``rewrites`` (dedupe, untie),
``verifying`` (verify), ``fixing`` (fix); what they share: ``results`` (what they
return), ``target`` (opening a checkpoint to rewrite), ``remote`` (URLs).
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
