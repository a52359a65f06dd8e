"""The ``.metadata`` pickle of a torch distributed checkpoint, read through an
allow-list: an unpickler that knows exactly the classes DCP metadata holds (read
from torch/distributed/checkpoint/metadata.py and filesystem.py) and builds inert
stand-ins for them (:class:`Obj`, one subclass a kind in :data:`KINDS`); any other
global is refused, and no code of the pickle runs."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from ..dtypes import TORCH_TO_CODE
from ..errors import CheckpointFormatError, UnsafePickleError
from .folder_names import DCP_METADATA

MAX_METADATA = 1 << 30  # the largest .metadata read (thousands of ranks: some 100 MB)

_META = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
_CLASSES = {
    (_META, "Metadata"),
    (_META, "TensorStorageMetadata"),
    (_META, "TensorProperties"),
    (_META, "ChunkStorageMetadata"),
    (_META, "BytesStorageMetadata"),
    (_META, "StorageMeta"),
    (_META, "MetadataIndex"),
    (_FS, "_StorageInfo"),
}
_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}


class Obj:
    """An instance of one of DCP's metadata dataclasses, as plain attributes."""

    kind = ""

    def __new__(cls, *args: Any) -> Obj:  # NEWOBJ: cls.__new__(cls, *args)
        if args:
            raise pickle.UnpicklingError(f"{cls.kind} built with arguments")
        return object.__new__(cls)

    def __init__(self, *args: Any) -> None:
        raise pickle.UnpicklingError(f"{self.kind} called")  # dataclasses are never REDUCEd

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            self.__dict__.update(state)
        elif self.kind == "TensorProperties" and isinstance(state, tuple):
            self.__dict__["state"] = state  # (dtype, layout, requires_grad, format, pinned)
        else:
            raise pickle.UnpicklingError(f"{self.kind} with a state of another shape")


KINDS = {name: type(name, (Obj,), {"kind": name}) for _module, name in _CLASSES}


class Dtype(str):
    """A torch dtype the metadata names (``torch.float32``): its attribute name."""


def _size(dims: Any = ()) -> tuple[int, ...]:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise pickle.UnpicklingError("a torch.Size of something else than integers")
    return tuple(dims)


def _layout(name: Any) -> str:
    if not isinstance(name, str):
        raise pickle.UnpicklingError("a layout that is not named")
    return name


def _mem_format(value: Any) -> int:
    if type(value) is not int:
        raise pickle.UnpicklingError("a memory format that is not a number")
    return value


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError("a path of something else than strings")
    return "/".join(parts)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: io.BytesIO, where: Path):
        super().__init__(data)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CLASSES:
            return KINDS[name]
        if module == _META and name == "_MEM_FORMAT_ENCODING":
            return _mem_format
        if module == "torch" and name == "Size":
            return _size
        if module == "torch" and name in TORCH_TO_CODE:
            return Dtype(name)
        if module == "torch.serialization" and name == "_get_layout":
            return _layout
        if module == "pathlib" and name in _PATHS:
            return _path
        raise UnsafePickleError(
            f"{DCP_METADATA} names {module}.{name}, which torch distributed checkpoint metadata "
            "never holds; tiecli does not load it (a pickle that could run code)",
            self.where,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent reference")


def read_metadata(path: Path) -> Any:
    """The ``Metadata`` stand-in of a ``.metadata`` file, no code of it run."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_METADATA:
                raise CheckpointFormatError(f"is larger than {MAX_METADATA >> 30} GiB", path)
            raw = f.read(MAX_METADATA + 1)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read: {e.strerror}", path) from None
    if len(raw) > MAX_METADATA:
        raise CheckpointFormatError(f"is larger than {MAX_METADATA >> 30} GiB", path)
    try:
        top = _MetadataUnpickler(io.BytesIO(raw), path).load()
    except CheckpointFormatError:
        raise
    except Exception:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise CheckpointFormatError(
            "is not a torch distributed checkpoint metadata pickle (damaged or truncated?)", path
        ) from None
    if not isinstance(top, KINDS["Metadata"]):
        raise CheckpointFormatError("does not hold a torch distributed checkpoint Metadata", path)
    return top
