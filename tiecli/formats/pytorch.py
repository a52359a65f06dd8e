"""Reading PyTorch zip checkpoints (.bin/.pt/.pth/.ckpt) safely and lazily, with torch.

Only ``torch.load(weights_only=True, mmap=True)`` is ever used: a pickle that
needs anything beyond tensors and plain containers is refused, never run. Flat
state dicts are usually read without torch first (:mod:`.torchzip`); this
reader takes what that one declines, and every load that wants torch tensors.
"""

from __future__ import annotations

import warnings
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

from ..checkpoint import Entry
from ..dtypes import TORCH_TO_CODE, uint_view
from ..errors import CheckpointFormatError, CheckpointNotFoundError, UnsafePickleError
from .safetensors import LFS_POINTER
from .torchzip import data_start, record_fault

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
            dtype = TORCH_TO_CODE[str(t.dtype).removeprefix("torch.")]  # checked by _check_tensors
            storage = t.untyped_storage()
            nbytes = t.numel() * t.element_size()
            view = (int(t.storage_offset()) * t.element_size(), tuple(int(s) for s in t.stride()))
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

    def holds_more_than_tensors(self) -> bool:
        """Whether anything but the state dict's tensors is in the file (epoch, optimizer...)."""
        import torch

        extra_top = self.nested_key is not None and len(self.top) > 1
        return extra_top or any(not isinstance(v, torch.Tensor) for v in self.state_dict.values())

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
            self._flat = (
                t.view(torch.uint8) if t.element_size() > 0 and t.numel() else t.to(torch.uint8)
            )
        return self._flat

    def read(self, offset: int, size: int) -> bytes:
        self.owner.bytes_read += size
        return self._bytes_view()[offset : offset + size].numpy().tobytes()

    def readinto(self, offset: int, view: memoryview) -> None:
        import numpy as np

        self.owner.bytes_read += len(view)
        src = self._bytes_view()[offset : offset + len(view)].numpy()
        np.frombuffer(view, dtype=np.uint8)[:] = src

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
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_POINTER))
    except OSError as e:
        raise CheckpointFormatError(f"cannot open: {e.strerror}", path) from None
    if not head:
        raise CheckpointFormatError("file is empty, not a PyTorch checkpoint", path)
    if not _is_zipfile(path):
        raise _not_zip(path, head)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            records = _data_records(z, infos)
            if not any(i.filename.endswith("data.pkl") for i in infos):
                raise CheckpointFormatError(
                    "zip archive is not a PyTorch checkpoint (no data.pkl inside)", path
                )
            _check_small_records(z, infos, path)
    except CheckpointFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile raises many kinds on damaged bytes
        raise CheckpointFormatError(f"unreadable zip archive: {_first_sentence(e)}", path) from None

    top = _torch_load(path, map_location="cpu", mmap=True)
    state_dict, key = find_state_dict(top)
    if state_dict is None:
        raise CheckpointFormatError(
            "no state dict found: expected {name: tensor} at the top level or under "
            + ", ".join(repr(k) for k in NESTED_KEYS),
            path,
        )
    _check_tensors(path, state_dict)
    _check_storages(path, key, records)
    return top, state_dict, key


def _check_small_records(z: zipfile.ZipFile, infos: list[zipfile.ZipInfo], path: Path) -> None:
    """Every record but the storages is bounded before anything unpacks it; the small
    ones torch reads are checked, so its errors never quote a file's bytes."""
    for info in infos:
        name = info.filename.split("/", 1)[-1]
        fault = record_fault(name, info.file_size, partial(z.read, info))
        if fault is not None:
            raise CheckpointFormatError(fault, path)


def _torch_load(path: Path, **kwargs: Any) -> Any:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():  # torch's deprecation chatter is not ours to print
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if detail.startswith("Unsupported operand"):
            msg = "data.pkl is damaged or not a pickle (an unknown opcode)"
            raise CheckpointFormatError(msg, path) from None
        raise UnsafePickleError(
            "refused: unpickling it would need more than tensors and plain containers"
            + (f" ({detail})" if detail else ""),
            path,
            hint="tiecli never runs pickled code; "
            "re-save the state dict with torch.save(model.state_dict())",
        ) from None
    except EOFError:
        msg = "data.pkl ends early (truncated or damaged file)"
        raise CheckpointFormatError(msg, path) from None
    except (RuntimeError, ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
        msg = f"cannot load PyTorch checkpoint: {_first_sentence(e)}"
        raise CheckpointFormatError(msg, path) from None
    except Exception as e:  # noqa: BLE001 - the unpickler fails in many ways on damaged bytes
        what = f"{type(e).__name__}: {_first_sentence(e)}"
        msg = f"cannot load PyTorch checkpoint (damaged file?): {what}"
        raise CheckpointFormatError(msg, path) from None


def _is_zipfile(path: Path) -> bool:
    """Whether ``path`` ends like a zip archive (a damaged end record still counts)."""
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - zipfile.is_zipfile lets BadZipFile escape on some damage
        return True


def _unpickler_detail(text: str) -> str:
    """The line of torch's weights-only error that says what it refused."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error:" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            if not rest and i + 1 < len(lines):
                rest = lines[i + 1]
            return _first_sentence(rest) if rest else ""
    found = next((ln for ln in lines if "Unsupported global" in ln or "GLOBAL" in ln), "")
    return _first_sentence(found) if found else ""


def _first_sentence(e: BaseException | str) -> str:
    """torch's error text up to its first full stop, without its boilerplate."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    text = text.split(" (Could this error message be improved?")[0]
    cut = text.find(". ", 20)
    text = text[: cut + 1] if cut > 0 else text
    return text if len(text) <= 200 else text[:197] + "..."


def _not_zip(path: Path, head: bytes) -> CheckpointFormatError:
    if head == LFS_POINTER:
        return CheckpointFormatError(
            "is a Git LFS pointer, not the weights", path, hint="fetch them with 'git lfs pull'"
        )
    if head.startswith(b"PK"):
        return CheckpointFormatError(
            "zip archive is truncated or damaged (its central directory is missing)",
            path,
            hint="download or save it again",
        )
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]"):
        return CheckpointFormatError(
            "legacy (non-zip) PyTorch pickle: tiecli reads only zip checkpoints",
            path,
            hint="re-save it with torch.save() from PyTorch 1.6 or newer",
        )
    if len(head) >= 9 and head[8:9] == b"{":
        return CheckpointFormatError(
            "not a PyTorch checkpoint, it looks like a safetensors file",
            path,
            hint="rename it to .safetensors",
        )
    return CheckpointFormatError(
        "not a PyTorch checkpoint (neither a zip archive nor a pickle)", path
    )


def _data_records(z: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> dict[int, int]:
    """``{data offset: size}`` of the uncompressed tensor records of a torch zip."""
    if z.fp is None:
        return {}
    fd = z.fp.fileno()
    return {
        data_start(fd, info): info.file_size
        for info in infos
        if "/data/" in info.filename and info.compress_type == zipfile.ZIP_STORED
    }


def _check_tensors(path: Path, state_dict: dict[str, Any]) -> None:
    """Only dense CPU tensors of a dtype safetensors can name are read."""
    import torch

    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout != torch.strided:
            raise CheckpointFormatError(
                f"tensor {name!r}: {str(t.layout).removeprefix('torch.')} tensors are not "
                "supported",
                path,
                hint="save it dense (tensor.to_dense())",
            )
        if t.device.type != "cpu":
            raise CheckpointFormatError(
                f"tensor {name!r} has no data (saved on the {t.device.type!r} device)", path
            )
        dtype_name = str(t.dtype).removeprefix("torch.")
        if dtype_name not in TORCH_TO_CODE:
            msg = f"tensor {name!r}: dtype {dtype_name} is not supported"
            raise CheckpointFormatError(msg, path)


def _check_storages(path: Path, key: str | None, records: dict[int, int]) -> None:
    """Every tensor's storage lies inside its zip record.

    With ``mmap=True`` torch slices storages out of the mapped file by the sizes
    the pickle claims, without checking them against the archive: a damaged or
    crafted file would be read past its record (the bytes of whatever follows).
    A second load on the ``meta`` device gives each storage's record offset.
    """
    import torch

    top = _torch_load(path, map_location="meta")
    state_dict = top[key] if key is not None else top
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None or offset not in records:
            continue  # a torch that does not say where the storage lives: nothing to check
        if storage.nbytes() > records[offset]:
            raise CheckpointFormatError(
                f"tensor {name!r}: its storage needs more bytes than its record in the "
                "archive holds (truncated or damaged file)",
                path,
            )


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
