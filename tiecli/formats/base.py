"""What a format is to the rest of tiecli: the questions the pipeline asks it.

A :class:`Format` is the form a :class:`~tiecli.checkpoint.Checkpoint` was
opened from (``ckpt.form``): how files of that form are recognised and opened,
what the form can hold (a tie record in its metadata, two names over one
storage...), and how one planned output file of that form is written and
verified. Opening, planning and rewriting ask these questions instead of
comparing format names; each form is one object, registered once in
:mod:`tiecli.formats`.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..lean import dataclass

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint
    from ..plan import Check, FilePlan, Plan
    from ..progress import Progress


class Reader(Protocol):
    """One open file of a checkpoint (or a resource its checkpoint holds open)."""

    path: Any  # the file (a remote file's is the URL shown)
    bytes_read: int  # tensor and header bytes read so far

    def close(self) -> None: ...


@dataclass
class Job:
    """One rewrite as a format's :meth:`Format.write` sees it."""

    ckpt: Checkpoint  # the input
    plan: Plan
    shown: Path  # named in messages
    progress: Progress
    durable: bool  # fsync what is written before it is renamed into place


class Format:
    """A checkpoint form. Subclasses set the capabilities and override what differs."""

    name: str = ""  # ``ckpt.format``, as JSON and tables show it
    keeps_record: bool = True  # its metadata holds tiecli's tie record
    shares_storage: bool = False  # a file holds two names over one storage (pickles)
    architecture_inside: bool = False  # the file names its architecture (ties come from it)
    converts: bool = False  # ``--to safetensors`` converts it
    refuses_conversion: bool = False  # ``--to safetensors`` is an error for it
    in_place: bool = True  # rewritten where it is (else only into a new folder)
    gathered: bool = False  # a tensor's bytes are gathered from chunks across files
    rebuilds: bool = True  # ``verify --forward`` rebuilds a PyTorch model from it
    loaded_as: str = "safetensors"  # the file form consumers load it as (consumers.json)
    overlaps_files: bool = False  # several output files are written two at a time

    def claims(self, path: Path) -> bool:
        """Whether ``path``'s name says it is a file of this form."""
        return False

    def sniffs(self, path: Path) -> bool:
        """Whether ``path``'s content says it is (asked when no name claimed it)."""
        return False

    def open(self, path: Path, shown: Path, torch_free: bool) -> Checkpoint:
        """Open ``path`` lazily (``shown`` names it in messages); see ``open_checkpoint``."""
        raise NotImplementedError(f"{self.name} files are not opened by name")

    def written_as(self, to_safetensors: bool) -> Format:
        """The form a rewrite writes (itself, unless converted)."""
        return self

    def fixed_aliases(self, ckpt: Checkpoint) -> frozenset[str]:
        """Names the format's loader always derives and refuses stored."""
        return frozenset()

    def stored_names(self, reader: Reader) -> Collection[str] | None:
        """Every tensor name a file stores, listed by an index or not; None when unknown
        (a safetensors header lists them; a shard of another form may be one)."""
        from .safetensors import SafetensorsFile

        return reader.tensors if isinstance(reader, SafetensorsFile) else None

    def file_metadata(self, reader: Reader) -> dict[str, str]:
        """The metadata one file of the checkpoint carries (a safetensors header's)."""
        from .safetensors import SafetensorsFile

        return dict(reader.metadata or {}) if isinstance(reader, SafetensorsFile) else {}

    def holds_more_than_tensors(self, ckpt: Checkpoint) -> bool:
        """Whether a file holds what a tensor-only form cannot keep (epoch, optimizer...)."""
        return False

    def loaded_tensors(self, ckpt: Checkpoint) -> dict[Path, Any]:
        """Readers whose tensors torch has loaded already, by file."""
        return {}

    def reshard(self, plan: Plan, max_shard_size: int) -> None:
        """Split the planned output into files of at most ``max_shard_size`` bytes, for a
        form whose files do not carry over to the output."""

    def write(self, job: Job, f: FilePlan, tmp: Path, checks: list[Check]) -> None:
        """Write ``f`` as ``tmp``, compare every tensor ``checks`` names with the input,
        and (when ``job.durable``) fsync it."""
        raise NotImplementedError(f"tiecli does not write {self.name} files")


def by_file(ckpt: Checkpoint, f: Path) -> Reader | None:
    """The reader of the checkpoint's file ``f``."""
    return next((r for r in ckpt.readers if r.path == f), None)
