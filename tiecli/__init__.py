"""tiecli: find, record, dedupe, restore and verify tied weights in checkpoints.

``import tiecli`` is cheap: torch and transformers are imported only by the
functions that need them.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    BusyError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    OutputError,
    RemoteError,
    TiecliError,
    TieError,
    TieRecordError,
    UnsafePickleError,
)

__version__ = "0.1.0"

_LAZY = {
    "inspect": "api",
    "dedupe": "api",
    "untie": "api",
    "verify": "api",
    "VerifyResult": "api",
    "check_model": "guard",
    "load": "serialization",
    "save": "serialization",
    "InspectResult": "api",
    "DedupeResult": "api",
    "UntieResult": "api",
    "fix": "api",
    "FixResult": "api",
}

__all__ = [
    "BusyError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "OutputError",
    "RemoteError",
    "TiecliError",
    "TieError",
    "TieRecordError",
    "UnsafePickleError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    from .lazy import lazy_attribute

    return lazy_attribute(__name__, _LAZY, globals(), name)
