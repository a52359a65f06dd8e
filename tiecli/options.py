"""The options a rewrite runs with: one value that goes from the library function
(``dedupe``, ``untie``, ``fix``) to the plan and the writer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .lean import dataclass

if TYPE_CHECKING:
    from .formats.base import Format


@dataclass(frozen=True)
class RewriteOptions:
    """What the caller asked of a rewrite; each field is the keyword argument of the
    same name (``dedupe``'s, ``untie``'s or ``fix``'s)."""

    output: Path | None = None  # None: in place
    dry_run: bool = False
    force: bool = False  # replace an existing output
    fsync: bool = False  # make a new output durable too
    # dedupe
    to: str | None = None  # "safetensors": convert on the way
    by_value: bool = False
    min_bytes: int = 1 << 20
    max_shard_size: int | str | None = None  # a size, as given or in bytes
    # fix
    tie: bool = False
    untie_head: bool = False
    trim_padding: bool = False

    @property
    def to_safetensors(self) -> bool:
        return self.to == "safetensors"

    def converts(self, form: Format) -> bool:
        """Whether the rewrite turns a checkpoint of ``form`` into safetensors."""
        return self.to_safetensors and form.converts
