"""The library functions behind the commands; each returns a result object.

Every command is the same pipeline: open the checkpoint, find its ties, and
(for rewrites) plan and write. The CLI only renders what these return.

One module per command: ``inspecting`` (inspect), ``rewrites`` (dedupe, untie),
``verifying`` (verify), ``fixing`` (fix); what they share: ``results`` (what they
return), ``target`` (opening a checkpoint to rewrite), ``remote`` (URLs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# each name from its module, imported when first asked for: a command imports its own
# module, not every other command's (``fix`` alone needs the consumers' rules)
_LAZY = {
    "CheckpointVerdict": "results",
    "DedupeResult": "results",
    "FixResult": "fixing",
    "InspectResult": "results",
    "PathLike": "results",
    "RewriteResult": "results",
    "UntieResult": "results",
    "VerifyResult": "results",
    "dedupe": "rewrites",
    "fix": "fixing",
    "inspect": "inspecting",
    "untie": "rewrites",
    "verify": "verifying",
}

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


def __getattr__(name: str) -> Any:
    from ..lazy import lazy_attribute

    return lazy_attribute(__name__, _LAZY, globals(), name)
