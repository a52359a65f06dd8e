"""Reading PyTorch zip checkpoints (.bin/.pt/.pth/.ckpt) safely and lazily.

Only ``torch.load(weights_only=True, mmap=True)`` is ever used: a pickle that
needs anything beyond tensors and plain containers is refused, never run.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..dtypes import TORCH_TO_CODE, uint_view
from ..errors import CheckpointFormatError, CheckpointNotFoundError, UnsafePickleError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Where training frameworks nest the state dict, in the order tried.
NESTED_KEYS = ("state_dict", "model", "module")


class PickleFile:
    """One loaded (memory-mapped) PyTorch checkpoint."""

    def __init__(self, path: Path, file_number: int = 0):
        self.path = path
        self.file_number = file_number
        self.bytes_read = 0
        self.top, self.state_dict, self.nested_key = _load(path)

    def entries(self) -> list[Entry]:
        import torch

        out = []
        for position, (name, t) in enumerate(self.state_dict.items()):
            if not isinstance(t, torch.Tensor):
                continue
            dtype_name = str(t.dtype).removeprefix("torch.")
            dtype = TORCH_TO_CODE.get(dtype_name)
            if dtype is None:
                raise CheckpointFormatError(f"tensor {name!r}: dtype {dtype_name} is not supported", self.path)
            storage = t.untyped_storage()
            nbytes = t.numel() * t.element_size()
            view = (t.storage_offset() * t.element_size(), tuple(t.stride()))
            out.append(
                Entry(
                    name,
                    dtype,
                    tuple(t.shape),
                    nbytes,
                    TensorBlob(self, t, position),
                    storage=(storage.data_ptr() or id(storage), storage.nbytes()),
                    view=view,
                    file=self.path,
                )
            )
        return out

    def close(self) -> None:
        self.top = self.state_dict = None  # type: ignore[assignment]


class TensorBlob:
    """A tensor of a memory-mapped pickle, read as contiguous row-major bytes."""

    __slots__ = ("owner", "tensor", "position", "nbytes", "_flat")

    def __init__(self, owner: PickleFile, tensor: Any, position: int):
        self.owner = owner
        self.tensor = tensor
        self.position = position
        self.nbytes = tensor.numel() * tensor.element_size()
        self._flat: Any = None

    @property
    def order(self) -> tuple[int, int]:
        return (self.owner.file_number, self.position)

    def _bytes_view(self) -> Any:
        if self._flat is None:
            import torch

            t = self.tensor.contiguous().reshape(-1)
            self._flat = t.view(torch.uint8) if t.element_size() > 0 and t.numel() else t.to(torch.uint8)
        return self._flat

    def read(self, offset: int, size: int) -> bytes:
        self.owner.bytes_read += size
        return self._bytes_view()[offset : offset + size].numpy().tobytes()

    def array(self, dtype: str, shape: tuple[int, ...]) -> Any:
        import numpy as np

        view = uint_view(dtype)
        if view is None:
            return None
        self.owner.bytes_read += self.nbytes
        return self._bytes_view().numpy().view(np.dtype(view)).reshape(shape)


def _load(path: Path) -> tuple[Any, dict[str, Any], str | None]:
    if not path.exists():
        raise CheckpointNotFoundError("no such file", path)
    if path.is_dir():
        raise CheckpointFormatError("is a folder, expected a PyTorch checkpoint file", path)
    if path.stat().st_size == 0:
        raise CheckpointFormatError("file is empty, not a PyTorch checkpoint", path)
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            "not a zip-format PyTorch checkpoint (legacy pickle format, or not PyTorch at all)",
            path,
            hint="re-save it with torch.save() from PyTorch 1.6 or newer",
        )
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointFormatError(f"unreadable zip archive: {e}", path) from None
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointFormatError("zip archive is not a PyTorch checkpoint (no data.pkl inside)", path)

    import pickle

    import torch

    try:
        top = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported global" in ln or "GLOBAL" in ln), "")
        raise UnsafePickleError(
            "refused: unpickling it would need more than tensors and plain containers"
            + (f" ({detail})" if detail else ""),
            path,
            hint="tiecli never runs pickled code; re-save the state dict with torch.save(model.state_dict())",
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(f"cannot load PyTorch checkpoint: {msg}", path) from None

    state_dict, key = find_state_dict(top)
    if state_dict is None:
        raise CheckpointFormatError(
            "no state dict found: expected {name: tensor} at the top level or under "
            + ", ".join(repr(k) for k in NESTED_KEYS),
            path,
        )
    return top, state_dict, key


def find_state_dict(top: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The flat ``{name: tensor}`` dict of a checkpoint, and the key it sits under."""
    import torch

    def is_state_dict(d: Any) -> bool:
        return (
            isinstance(d, dict)
            and bool(d)
            and all(isinstance(k, str) for k in d)
            and any(isinstance(v, torch.Tensor) for v in d.values())
            and not any(isinstance(v, dict) for v in d.values())
        )

    if isinstance(top, dict):
        for key in NESTED_KEYS:
            if key in top and is_state_dict(top[key]):
                return top[key], key
        if is_state_dict(top):
            return top, None
    return None, None
