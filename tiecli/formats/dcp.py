"""Torch distributed checkpoints (DCP): a folder of ``.distcp`` files plus ``.metadata``.

``torch.distributed.checkpoint.save`` (FSDP/FSDP2, torchtitan, Megatron's
``torch_dist``) writes, from many ranks at once, one or more ``.distcp`` files per
rank and a ``.metadata`` pickle naming, for every tensor of the state dict, its
dtype, full shape and chunks (offsets and sizes within the tensor), and where each
chunk's bytes lie (file, offset, length). With the default (``torch_save``)
serialisation each chunk is a whole ``torch.save`` zip archive of the chunk
tensor, embedded in the ``.distcp`` file at that offset.

Read here without torch and without running pickle code:

- ``.metadata`` through an unpickler that knows exactly the classes DCP metadata
  holds and builds inert stand-ins for them (:mod:`.dcp_metadata`); any other
  global is refused;
- each chunk's zip archive through :mod:`zipfile` over its byte range, and its
  ``data.pkl`` through :mod:`tiecli.formats.torchzip_pickle`'s placeholder unpickler,
  which gives the byte range of the chunk's elements in the file;
- a tensor's bytes in row-major order as runs of byte ranges in those files
  (one run per chunk when chunks split dimension 0, as FSDP2 does), read by
  position on demand (:mod:`.dcp_chunks`): nothing holds the checkpoint in memory.

The writer side is :func:`shard_plan`: a deduped plan laid out as a Hugging Face
safetensors folder (``model.safetensors`` or ``model-0000i-of-0000n`` plus an
index), which :mod:`tiecli.write.run` writes by copying each run in the kernel.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, Entry
from ..dtypes import TORCH_TO_CODE, itemsize
from ..errors import CheckpointFormatError
from ..io import ByteFile
from .confine import escapes
from .dcp_chunks import Chunk, DcpBlob, chunk_bytes, tensor_runs
from .dcp_metadata import KINDS, Dtype, Obj, read_metadata
from .dcp_safetensors import SafetensorsRank, safetensors_rank
from .folder_names import DCP_METADATA, MAX_SHARD_SIZE

SUFFIX = ".distcp"
NESTED_KEYS = ("model", "state_dict", "module")  # where a training state keeps the model
UNREAD = object()  # a .distcp file whose layout is not yet known


# -- the checkpoint ---------------------------------------------------------------------


def _get(obj: Any, attr: str, kind: Any, fail: Any, what: str) -> Any:
    value = obj.__dict__.get(attr) if isinstance(obj, Obj) else None
    if not isinstance(value, kind):
        raise fail(f"its {what} is missing or malformed")
    return value


def _model_part(meta: Any, names: list[str]) -> tuple[str | None, list[str]]:
    """Which tensors are the model's: in a nested training state (``{"model": ...,
    "optim": ...}``) those under the model's key, named without it; else the top-level
    tensors (a flat state dict), leaving out nested entries such as optimizer state."""
    planner = meta.__dict__.get("planner_data")
    paths: dict[str, tuple[Any, ...]] = {}
    for name in names:
        path = planner.get(name) if isinstance(planner, dict) else None
        if not isinstance(path, tuple) or not path:
            path = tuple(name.split(".", 1)) if "." in name else (name,)
            if not isinstance(planner, dict) and not any(
                n.startswith(("optim.", "optimizer.")) for n in names
            ):
                path = (name,)  # without the planner's paths, nested only beside an optimizer
        paths[name] = path
    top = [n for n in names if len(paths[n]) == 1]
    if top:
        return None, top
    tops = {str(p[0]) for p in paths.values()}
    part = next((k for k in NESTED_KEYS if k in tops), None)
    if part is None:
        return None, names
    return part, [n for n in names if str(paths[n][0]) == part]


def open_dcp(path: Path) -> Checkpoint:
    """A DCP folder as a :class:`Checkpoint` (format ``dcp``): the model's tensors, each
    read from its chunks; other entries (optimizer state, values) are left out."""
    folder = path.parent if path.name == DCP_METADATA else path
    meta_path = folder / DCP_METADATA
    why = escapes(folder, meta_path)
    if why is not None:
        raise CheckpointFormatError(f"{why}; tiecli does not follow it", meta_path)
    meta = read_metadata(meta_path)

    def fail_meta(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(what, meta_path)

    state = _get(meta, "state_dict_metadata", dict, fail_meta, "state_dict_metadata")
    storage = _get(meta, "storage_data", dict, fail_meta, "storage_data")
    tensors = {k: v for k, v in state.items() if isinstance(v, KINDS["TensorStorageMetadata"])}
    if not all(isinstance(k, str) for k in state) or not all(
        isinstance(v, (KINDS["TensorStorageMetadata"], KINDS["BytesStorageMetadata"]))
        for v in state.values()
    ):
        raise fail_meta("its state_dict_metadata holds something else than tensors and values")
    where: dict[tuple[str, tuple[int, ...]], Any] = {}
    for index, info in storage.items():
        fqn = _get(index, "fqn", str, fail_meta, "storage index")
        offset = index.__dict__.get("offset")
        if not isinstance(info, KINDS["_StorageInfo"]):
            raise fail_meta(f"the storage of {fqn!r} is malformed")
        if isinstance(offset, tuple):
            where[(fqn, offset)] = info
    part, kept = _model_part(meta, list(tensors))
    prefix = f"{part}." if part else ""

    files: dict[str, _DistcpFile] = {}
    entries: dict[str, Entry] = {}
    try:
        for fqn in kept:
            name = fqn[len(prefix) :]
            entries[name] = _entry(folder, meta_path, fqn, name, tensors[fqn], where, files)
    except BaseException:
        for f in files.values():
            f.close()
        raise
    if not entries:
        raise fail_meta("names no tensor of a model")
    readers: list[Any] = list(files.values())
    weight_files = [meta_path] + sorted(
        {f.path for f in readers} | set(folder.glob("*" + SUFFIX)), key=lambda p: p.name
    )
    ckpt = Checkpoint(
        folder, "dcp", entries, weight_files, folder=folder, nested_key=part, readers=readers
    )
    if part:
        ckpt.notes.append(f"using the state dict under key {part!r} (its tensors named {part}.*)")
    elif len(kept) < len(tensors):
        ckpt.notes.append(f"left out {len(tensors) - len(kept)} tensors beside the model's")
    return ckpt


def _entry(
    folder: Path,
    meta_path: Path,
    fqn: str,
    name: str,
    tmeta: Any,
    where: dict[tuple[str, tuple[int, ...]], Any],
    files: dict[str, _DistcpFile],
) -> Entry:
    def fail(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"tensor {fqn!r}: {what}", meta_path)

    props = tmeta.__dict__.get("properties")
    shape = tmeta.__dict__.get("size")
    chunks = tmeta.__dict__.get("chunks")
    pstate = props.__dict__.get("state") if isinstance(props, Obj) else None
    if not (isinstance(pstate, tuple) and len(pstate) == 5 and isinstance(pstate[0], Dtype)):
        raise fail("its properties are malformed")
    if pstate[1] != "torch.strided":
        raise fail(f"its layout {pstate[1]!r} is not a dense (strided) tensor")
    dtype = TORCH_TO_CODE[pstate[0]]
    item = itemsize(dtype)
    if item is None:
        raise fail(f"its element type {pstate[0]} has no whole-byte size")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise fail("its size is malformed")
    if not isinstance(chunks, list) or not chunks:
        raise fail("it has no chunks")
    parsed: list[Chunk] = []
    for c in chunks:
        if not isinstance(c, KINDS["ChunkStorageMetadata"]):
            raise fail("a chunk is malformed")
        offsets, sizes = c.__dict__.get("offsets"), c.__dict__.get("sizes")
        if not (
            isinstance(offsets, tuple)
            and isinstance(sizes, tuple)
            and len(offsets) == len(sizes) == len(shape)
        ):
            raise fail("a chunk is malformed")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            raise fail(f"a chunk (offsets {list(offsets)}, sizes {list(sizes)}) is out of range")
        info = where.get((fqn, offsets))
        if info is None:
            raise fail(f"the chunk at offsets {list(offsets)} has no storage entry")
        rel = info.__dict__.get("relative_path")
        start, length = info.__dict__.get("offset"), info.__dict__.get("length")
        if info.__dict__.get("transform_descriptors"):
            raise fail("its chunks are stored transformed (compressed); tiecli reads plain ones")
        if not isinstance(rel, str) or type(start) is not int or type(length) is not int:
            raise fail("a chunk's storage entry is malformed")
        file = _file(folder, meta_path, rel, files, fail)
        if start < 0 or length < 0 or start + length > file.size:
            raise fail(
                f"a chunk's bytes ({length} at {start}) lie outside {rel} ({file.size} bytes)"
            )

        def chunk_fail(what: str, rel: str = rel, start: int = start) -> CheckpointFormatError:
            return fail(f"the chunk at byte {start} of {rel} {what}")

        def file_fail(what: str, rel: str = rel) -> CheckpointFormatError:
            return fail(f"{rel} {what}")

        if file.layout is UNREAD:
            file.layout = safetensors_rank(file, file.size, file_fail)
        if isinstance(file.layout, SafetensorsRank):
            at = file.layout.chunk(fqn, offsets, sizes, dtype, file_fail)
        else:
            at = chunk_bytes(file, start, length, dtype, sizes, chunk_fail)
        parsed.append(Chunk(offsets, sizes, file, at))
    runs = tensor_runs(
        fqn, shape, item, parsed, lambda what: CheckpointFormatError(what, meta_path)
    )
    nbytes = item * math.prod(shape)
    return Entry(name, dtype, shape, nbytes, DcpBlob(runs, nbytes), file=meta_path)


def _file(
    folder: Path, meta_path: Path, rel: str, files: dict[str, _DistcpFile], fail: Any
) -> _DistcpFile:
    if rel in files:
        return files[rel]
    if "/" in rel or os.sep in rel or rel in ("", ".", ".."):
        raise fail(f"its chunks name the file {rel!r}, outside the checkpoint folder")
    p = folder / rel
    why = escapes(folder, p)
    if why is not None:
        raise fail(f"its chunks' file {rel} {why}; tiecli does not follow it")
    if not p.is_file():
        raise fail(f"its chunks' file {rel} does not exist")
    try:
        f = _DistcpFile(p, len(files))
    except OSError as e:
        raise fail(f"cannot open its chunks' file {rel}: {e.strerror}") from None
    files[rel] = f
    return f


class _DistcpFile(ByteFile):
    """One ``.distcp`` file, read by position; its size fixed when opened."""

    def __init__(self, path: Path, file_number: int):
        super().__init__(path, file_number)
        self.size = os.fstat(self.fd).st_size
        # torch.save archives, or one safetensors file (SerializationFormat.SAFETENSORS)
        self.layout: SafetensorsRank | None | object = UNREAD

    def short_read(self, offset: int) -> Exception:
        return CheckpointFormatError("short read (file changed or truncated?)", self.path)


# -- writing: a Hugging Face folder -------------------------------------------------------


def shard_plan(plan: Any, max_shard_size: int = MAX_SHARD_SIZE) -> None:
    """Lay ``plan``'s tensors out as ``save_pretrained`` does: in order, a new shard
    whenever the next tensor would take the current one past ``max_shard_size`` (a
    tensor larger than that alone in its shard); one file is ``model.safetensors``,
    several are ``model-0000i-of-0000n.safetensors`` with an index holding the record."""
    from ..plan import FilePlan

    tensors = [t for f in plan.files for t in f.tensors]
    meta = dict(plan.files[0].metadata) if plan.files else {"format": "pt"}
    shards: list[list[Any]] = []
    size = 0
    for t in tensors:
        if not shards or (size + t.nbytes > max_shard_size and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) <= 1:
        plan.files = [FilePlan("model.safetensors", shards[0] if shards else [], meta)]
        plan.index_metadata = None
        return
    n = len(shards)
    plan.files = [
        FilePlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s, {"format": "pt"})
        for i, s in enumerate(shards)
    ]
    plan.index_metadata = meta
