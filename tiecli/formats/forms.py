"""The forms tiecli reads and writes, one :class:`~tiecli.formats.base.Format` each.

Each object answers the pipeline's questions for its form and delegates the
work to the form's own module: reading to ``safetensors``/``pytorch``/
``torchzip``/``gguf``/``dcp``, writing to ``safetensors_write``/``pytorch_write``.
A remote checkpoint is a safetensors one read by range: it has the same forms.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..checkpoint import Checkpoint
from ..errors import VerificationError
from .base import Format, Job
from .folder_names import INDEX_SUFFIX, PICKLE_SUFFIXES, is_dcp
from .safetensors import SafetensorsFile

if TYPE_CHECKING:
    from ..plan import Check, FilePlan, Plan
    from .pytorch import PickleFile
    from .torchzip import TorchZip

# The pickle readers (and zipfile, pickle) are imported where a pickle is met: a
# safetensors run never needs them.


class Safetensors(Format):
    """A ``.safetensors`` file: a JSON header (metadata holds the tie record), then bytes."""

    name = "safetensors"
    overlaps_files = True

    def claims(self, path: Path) -> bool:
        return path.suffix == ".safetensors"

    def open(self, path: Path, shown: Path, torch_free: bool) -> Checkpoint:
        f = SafetensorsFile(path)
        entries = {e.name: e for e in f.entries()}
        return Checkpoint(
            shown, self.name, entries, [f.path], metadata=dict(f.metadata), readers=[f]
        )

    def write(self, job: Job, f: FilePlan, tmp: Path, checks: list[Check]) -> None:
        from .safetensors_write import write_safetensors

        write_safetensors(job, f, tmp, checks)


class SafetensorsSharded(Safetensors):
    """A ``*.index.json`` naming shards (safetensors; pickles make it ``pytorch-sharded``)."""

    name = "safetensors-sharded"

    def claims(self, path: Path) -> bool:
        return path.name.endswith(INDEX_SUFFIX)

    def open(self, path: Path, shown: Path, torch_free: bool) -> Checkpoint:
        from .index import open_index

        return open_index(path, shown, torch_free)


class Pytorch(Format):
    """A pickle ``torch.save`` wrote: aliases share one storage; no metadata to hold a record."""

    name = "pytorch"
    keeps_record = False
    shares_storage = True
    converts = True
    loaded_as = "pytorch"

    def claims(self, path: Path) -> bool:
        return path.suffix in PICKLE_SUFFIXES

    def sniffs(self, path: Path) -> bool:
        import zipfile

        return zipfile.is_zipfile(path)

    def open(self, path: Path, shown: Path, torch_free: bool) -> Checkpoint:
        f = pickle_reader(path, 0, torch_free)
        entries = {e.name: e for e in f.entries()}
        ckpt = Checkpoint(shown, self.name, entries, [f.path], nested_key=f.nested_key, readers=[f])
        if f.nested_key:
            ckpt.notes.append(f"using the state dict under key {f.nested_key!r}")
        return ckpt

    def written_as(self, to_safetensors: bool) -> Format:
        return SAFETENSORS if to_safetensors else self

    def holds_more_than_tensors(self, ckpt: Checkpoint) -> bool:
        from .pytorch import PickleFile

        return any(r.holds_more_than_tensors() for r in ckpt.readers if isinstance(r, PickleFile))

    def loaded_tensors(self, ckpt: Checkpoint) -> dict[Path, Any]:
        from .pytorch import PickleFile

        return {r.path: r for r in ckpt.readers if isinstance(r, PickleFile)}

    def write(self, job: Job, f: FilePlan, tmp: Path, checks: list[Check]) -> None:
        from .pytorch_write import write_pickle

        write_pickle(job, f, tmp, checks)


class PytorchSharded(Pytorch):
    """An index naming pickle shards (opened through the index, as safetensors shards are)."""

    name = "pytorch-sharded"

    def claims(self, path: Path) -> bool:
        return False

    def sniffs(self, path: Path) -> bool:
        return False

    def written_as(self, to_safetensors: bool) -> Format:
        return SAFETENSORS_SHARDED if to_safetensors else self


class Gguf(Format):
    """llama.cpp's single file: its metadata names the architecture and is kept as it is."""

    name = "gguf"
    keeps_record = False
    architecture_inside = True
    refuses_conversion = True
    rebuilds = False

    def sniffs(self, path: Path) -> bool:
        from .gguf import is_gguf

        return is_gguf(path)

    def open(self, path: Path, shown: Path, torch_free: bool) -> Checkpoint:
        from .gguf import open_gguf

        return cast(Checkpoint, open_gguf(path, shown))

    def fixed_aliases(self, ckpt: Checkpoint) -> frozenset[str]:
        return frozenset(a for r in ckpt.readers for a in cast(Any, r).fixed_aliases)

    def write(self, job: Job, f: FilePlan, tmp: Path, checks: list[Check]) -> None:
        """Its metadata kept as it is, tensors copied, read back with gguf."""
        from ..atomic import output_errors
        from .gguf_write import check_written, write_gguf

        src = cast(Any, job.ckpt.readers[0])
        with job.progress.task(f"writing {f.name}", sum(t.nbytes for t in f.tensors)) as bar:
            with output_errors(job.shown):
                write_gguf(src, f.tensors, tmp, bar, job.durable)
        wrong = check_written(src, tmp, checks, job.progress)
        if wrong is not None:
            raise VerificationError(
                f"verification failed: the written {tmp.name}: {wrong}; nothing was changed",
                job.shown,
            )


class Dcp(Format):
    """A torch distributed checkpoint: ``.metadata`` plus ``.distcp`` files, read in place;
    its rewrite is a Hugging Face safetensors folder, sharded anew."""

    name = "dcp"
    in_place = False
    gathered = True

    def claims(self, path: Path) -> bool:
        return is_dcp(path)

    def open(self, path: Path, shown: Path, torch_free: bool) -> Checkpoint:
        from .dcp import open_dcp

        return open_dcp(path)

    def written_as(self, to_safetensors: bool) -> Format:
        return SAFETENSORS_SHARDED

    def reshard(self, plan: Plan, max_shard_size: int) -> None:
        from .dcp import shard_plan

        shard_plan(plan, max_shard_size)


def pickle_reader(p: Path, number: int, torch_free: bool) -> PickleFile | TorchZip:
    """A pickle read without torch where it allows it (``torch_free``), else with torch."""
    from .pytorch import PickleFile
    from .torchzip import open_torchzip

    if torch_free:
        fast = open_torchzip(p, number)
        if fast is not None:
            return fast
    return PickleFile(p, number)


SAFETENSORS = Safetensors()
SAFETENSORS_SHARDED = SafetensorsSharded()
PYTORCH = Pytorch()
PYTORCH_SHARDED = PytorchSharded()
GGUF = Gguf()
DCP = Dcp()
