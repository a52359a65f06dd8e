"""Loading a checkpoint with its ties restored, and saving one deduped.

``load`` gives ``{name: tensor}`` for every name the model uses: tied aliases
absent from the file come back as views sharing memory with their source
(``src`` or ``src.t()``), duplicates as independent copies, exactly as the
tie record says. ``save`` writes a deduped safetensors file with the record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .atomic import Staging, fsync_file, output_errors
from .checkpoint import Checkpoint
from .detect import find_ties
from .errors import TieRecordError, UsageError
from .formats import open_checkpoint
from .grouping import fills
from .ties import TieReport


def load(path: str | os.PathLike[str], *, use_transformers: bool = True) -> dict[str, Any]:
    """Every tensor of the checkpoint by name, with ties restored (see module doc)."""
    with open_checkpoint(path, torch_free=False) as ckpt:
        return load_opened(ckpt, find_ties(ckpt, use_transformers=use_transformers))


def load_opened(ckpt: Checkpoint, report: TieReport) -> dict[str, Any]:
    """:func:`load` for a checkpoint already opened and searched for ties."""
    from safetensors import safe_open

    bad = [p for p in report.problems if p.code == "bad-record"]
    if bad:
        raise TieRecordError(bad[0].message, ckpt.path)
    tensors: dict[str, Any] = {}
    pickles = ckpt.form.loaded_tensors(ckpt)
    by_file: dict[Path, list[str]] = {}
    for name, entry in ckpt.entries.items():
        assert entry.file is not None
        by_file.setdefault(entry.file, []).append(name)
    for file, names in by_file.items():
        if file in pickles:
            sd = pickles[file].state_dict
            tensors.update({n: sd[n] for n in names})
        elif ckpt.form.gathered:  # gathered from chunks across files: read into memory
            tensors.update({n: _gathered(ckpt.entries[n]) for n in names})
        else:
            with safe_open(str(file), framework="pt") as f:
                tensors.update({n: f.get_tensor(n) for n in names})
    tensors = {n: tensors[n] for n in ckpt.entries}  # file order
    for f in fills(report.ties, ckpt.entries):
        tensors[f.name] = _restore(tensors[f.origin], f.transform, f.tie.kind)
    return tensors


def _gathered(entry: Any) -> Any:
    """A tensor whose bytes lie in several ranges (a DCP's chunks), read into one buffer."""
    import torch

    from .dtypes import CODE_TO_TORCH

    dtype = getattr(torch, CODE_TO_TORCH[entry.dtype])
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    buf = bytearray(entry.nbytes)
    entry.blob.readinto(0, memoryview(buf))
    return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)


def _restore(t: Any, transform: str, kind: str) -> Any:
    view = t if transform == "identity" else t.t()
    return view if kind == "tied" else view.contiguous().clone()


def save(obj: Any, path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None) -> Path:
    """Save a module or state dict as safetensors: one copy per shared tensor plus the record.

    Ties come from shared storage (identity, or a transposed view) and, for a
    transformers model, from the ties its architecture declares.
    """
    import torch
    from safetensors.torch import save_file

    from .arch.declared import module_ties
    from .arch.storage import relation, where
    from .record import RecordedTie, record_metadata

    declared: dict[str, str] = {}
    if isinstance(obj, torch.nn.Module):
        state = obj.state_dict()
        declared = module_ties(obj)
    elif isinstance(obj, dict):
        state = dict(obj)
    else:
        raise UsageError(
            f"save() takes an nn.Module or a {{name: tensor}} dict, not {type(obj).__name__}"
        )
    sources = set(declared.values())
    groups: dict[Any, list[str]] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        at = where(t)  # one memory at one byte offset: a group, whatever the views
        groups.setdefault(at[1:3] if at is not None else id(t), []).append(name)
    kept: dict[str, Any] = {}
    ties: list[RecordedTie] = []
    for names in groups.values():
        names.sort(key=lambda n: (n not in sources, n in declared, list(state).index(n)))
        head = state[names[0]]
        for n in names:
            t = state[n]
            if n == names[0]:
                kept[n] = t.detach().contiguous()
                continue
            transform = relation(head, t)
            if transform is None:  # overlapping but different views: store separately
                kept[n] = t.detach().contiguous().clone()
                continue
            evidence = ("declared", "storage") if declared.get(n) == names[0] else ("storage",)
            ties.append(RecordedTie(n, names[0], transform, "tied", evidence))
    kept = {n: kept[n] for n in state if n in kept}
    meta = record_metadata(
        dict(metadata or {}), set(kept), sorted(ties, key=lambda r: (r.source, r.alias))
    )
    target = Path(path)
    replacing = target.exists()  # then durable before the rename, as every rewrite is
    staging = Staging(durable=replacing)
    try:
        with output_errors(target):
            tmp = staging.file(target)
            save_file(kept, str(tmp), metadata={k: str(v) for k, v in meta.items()})
            if replacing:
                fsync_file(tmp)
            staging.commit()
    except BaseException:
        staging.abort()
        raise
    return target
