"""What every format hands to the rest of tiecli: entries and a checkpoint.

An :class:`Entry` is a tensor described without its values: name, dtype,
shape, byte size and a :class:`Blob` that knows where the bytes live and reads
them on demand, in bounded pieces. Tie logic works on entries only; each
format module builds them for its own files.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .lean import dataclass

if TYPE_CHECKING:
    from .formats.base import Format, Reader

CHUNK = 8 << 20  # bytes per read when streaming a tensor


class Blob(Protocol):
    """The bytes of one tensor, row-major and contiguous as seen by readers."""

    nbytes: int

    def read(self, offset: int, size: int) -> bytes: ...

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with ``len(view)`` bytes starting at ``offset``."""
        ...

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        """The elements as a numpy array of unsigned ints of the element width."""
        ...

    @property
    def order(self) -> tuple[int, int]:
        """Position in the checkpoint: (file number, byte offset)."""
        ...


@dataclass(eq=False)
class Entry:
    """One stored tensor: its name, dtype, shape, and where its bytes are read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    blob: Blob
    # Pickles only: (storage id, storage bytes) and how the tensor views that
    # storage (byte offset, strides). torch.save keeps one storage under several
    # names, which is how a pickle records a tie.
    storage: tuple[int, int] | None = None
    view: tuple[int, tuple[int, ...]] | None = None
    file: Path | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        for start in range(0, self.nbytes, size):
            yield self.blob.read(start, min(size, self.nbytes - start))


@dataclass
class Checkpoint:
    """An opened checkpoint: entries in file order plus what surrounds them."""

    path: Path  # what the user named
    format: str  # the name of its form: safetensors, pytorch-sharded, gguf... (see ``form``)
    entries: dict[str, Entry]
    weight_files: list[Path]
    folder: Path | None = None  # set when the checkpoint is a folder
    index_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # header or index metadata
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    nested_key: str | None = None  # pickles: the key holding the state dict
    readers: list[Reader] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # A remote checkpoint: the URL shown for it and for its config, what its reads
    # cost so far (RemoteStats) and the bytes it may still download in full (DownloadBudget).
    url: str | None = None
    config_url: str | None = None
    remote: Any = None
    budget: Any = None

    @property
    def shown(self) -> str:
        """How the checkpoint is named in results and messages."""
        return self.url if self.url is not None else str(self.path)

    @property
    def form(self) -> Format:
        """The registered form it was opened from: what it can hold, how it is written."""
        from .formats import form_named

        return form_named(self.format)

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers)

    def stored_bytes(self) -> int:
        """Bytes of tensor data in the files (a shared pickle storage counted once)."""
        seen: set[Any] = set()
        total = 0
        for e in self.entries.values():
            if e.storage is None:
                total += e.nbytes
            elif e.storage[0] not in seen:
                seen.add(e.storage[0])
                total += e.storage[1]
        return total

    def close(self) -> None:
        for r in self.readers:
            r.close()
        self.readers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def collecting_less() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block, as it was before after.

    Opening a checkpoint of 100,000 tensors makes a million small objects that hold
    no cycles; the collector, run every 700 allocations, would scan them over and
    over and take about a third of ``inspect``'s time, more the more tensors.
    Reference counting still frees everything as it goes."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
