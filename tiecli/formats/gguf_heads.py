"""The GGUF head rule: what llama.cpp's loader does with ``output.weight``.

llama.cpp keeps no tie record: a tied head is ``output.weight`` left out of the
file, and the architecture's loader decides what that means. Most fall back to
``token_embd.weight``; some require the head; a few never read it. Which does
what is data read from llama.cpp's sources (``data/gguf_heads.json``, made by
``tools/gguf_fallback.py``), keyed by ``general.architecture``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..lean import dataclass

HEAD = "output.weight"
EMBEDDING = "token_embd.weight"
HEADS_TABLE = Path(__file__).parent.parent / "data" / "gguf_heads.json"


@lru_cache(maxsize=1)
def heads_table() -> dict[str, Any]:
    with open(HEADS_TABLE, encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def head_kind(architecture: str | None) -> str | None:
    """What llama.cpp's loader does with ``output.weight`` for ``architecture``
    (``falls-back``, ``always-tied``, ``required``, ``optional``, ``no-head``), or
    None for an architecture the table does not know."""
    if architecture is None:
        return None
    kind = heads_table()["architectures"].get(architecture)
    return str(kind) if kind is not None else None


@dataclass
class HeadFinding:
    """What the head rule says of one GGUF file."""

    architecture: str | None
    kind: str | None
    tie: tuple[str, str] | None = None  # (alias, source) the architecture declares
    missing: str | None = None  # an error: the loader requires the absent head
    note: str | None = None


def head_finding(
    architecture: str | None, entries: dict[str, Entry], equal: Callable[[str, str], bool]
) -> HeadFinding:
    """The tie (or the problem) of ``output.weight`` for this file; ``equal(a, b)``
    compares two stored tensors (type, shape and bytes)."""
    kind = head_kind(architecture)
    found = HeadFinding(architecture, kind)
    head, embd = entries.get(HEAD), entries.get(EMBEDDING)
    src = heads_table()["source"]
    where = f"llama.cpp's loader ({src['repo']}, {src['path']})"
    if architecture is None:
        found.note = "no general.architecture: llama.cpp would not load it"
        return found
    if kind is None:
        found.note = (
            f"architecture {architecture!r} is not in tiecli's llama.cpp table: "
            "whether output.weight falls back to token_embd.weight is unknown"
        )
        return found
    if embd is None:
        return found
    if kind in ("falls-back", "always-tied"):
        if head is None:
            found.tie = (HEAD, EMBEDDING)
        elif equal(HEAD, EMBEDDING):
            found.tie = (HEAD, EMBEDDING)  # a stored duplicate
            if kind == "always-tied":
                found.note = f"{architecture} never reads output.weight: the stored copy is unused"
        elif kind == "always-tied":
            found.note = (
                f"{architecture} never reads output.weight: llama.cpp's loader leaves the "
                "stored head unused"
            )
        elif head.dtype != embd.dtype:
            found.note = (
                f"output.weight ({head.dtype}) and token_embd.weight ({embd.dtype}) have "
                "different types: a separate head, never dropped (quantization may have "
                "given a stored copy of a tied head its own type)"
            )
        else:
            found.note = "output.weight differs from token_embd.weight: a separate head"
    elif kind == "required" and head is None:
        found.missing = (
            f"output.weight is absent and {architecture} has no fall-back to "
            f"token_embd.weight in {where}: llama.cpp refuses to load it; write it "
            "(convert again with the head stored)"
        )
    return found
