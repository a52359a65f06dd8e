"""The pickle of a PyTorch zip checkpoint, read and written with placeholders:
the classes and functions it names are kept as :class:`Global`, what calling them
would return as :class:`Call`, storages as :class:`Storage`; nothing is imported
or called. Anything torch's weights-only loader would refuse is :class:`Declined`."""

from __future__ import annotations

import io
import pickle
from typing import Any

# Storage classes torch pickles, and the element type each holds.
STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
REBUILD = ("torch._utils", "_rebuild_tensor_v2")
ORDERED_DICT = ("collections", "OrderedDict")


class Declined(Exception):
    """Not a file this reader handles; the torch-based reader takes over."""


class Global:
    """A class or function the pickle names; never imported."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def key(self) -> tuple[str, str]:
        return (self.module, self.name)

    def __call__(self, *args: Any) -> Call:
        return Call(self, args)

    def __setstate__(self, state: Any) -> None:
        raise Declined("state set on a class")  # torch's loader refuses it too


class Call:
    """What calling a :class:`Global` would have returned: kept as the call.

    Only an ``OrderedDict`` takes items (SETITEMS) and state (BUILD, its
    ``_metadata``), as torch's weights-only loader allows; anything else declines.
    """

    __slots__ = ("func", "args", "state", "items")

    def __init__(self, func: Global, args: tuple[Any, ...]):
        self.func, self.args = func, args
        self.state: Any = None
        self.items: dict[Any, Any] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.func.key() != ORDERED_DICT:
            raise Declined("items set on something else than a dict")
        self.items[key] = value

    def __setstate__(self, state: Any) -> None:
        if self.func.key() != ORDERED_DICT:
            raise Declined("state set on something else than a dict")
        self.state = state

    def with_items(self, items: dict[Any, Any]) -> Call:
        new = Call(self.func, self.args)
        new.state, new.items = self.state, items
        return new


class Storage:
    """A storage the pickle refers to by key (its bytes are the record data/<key>)."""

    __slots__ = ("pid", "kind", "key", "numel")

    def __init__(self, pid: tuple[Any, ...]):
        self.pid = pid
        self.kind: Global = pid[1]
        self.key: str = pid[2]
        self.numel: int = pid[4]

    def __setstate__(self, state: Any) -> None:
        raise Declined("state set on a storage")


def holds_tensors(obj: Any) -> bool:
    """Whether a storage or tensor is anywhere inside ``obj``."""
    if isinstance(obj, Storage):
        return True
    if isinstance(obj, Call):
        return obj.func.key() != ORDERED_DICT or any(
            holds_tensors(x) for x in (obj.args, obj.state, *obj.items.items())
        )
    if isinstance(obj, dict):
        return any(holds_tensors(k) or holds_tensors(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(holds_tensors(x) for x in obj)
    return False


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (REBUILD, ORDERED_DICT) or (
            module == "torch" and name in STORAGE_DTYPES
        ):
            return Global(module, name)
        raise Declined(f"names {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], Global)
            and pid[1].module == "torch"
            and isinstance(pid[2], str)
            and pid[3] == "cpu"
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise Declined("a storage reference of another shape")
        return Storage(pid)


class Pickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """Writes placeholders back as the globals, calls and storages they stand for."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, Storage) else None

    def _save_global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    def _save_call(self, obj: Call) -> None:
        self.save_reduce(  # type: ignore[attr-defined]
            obj.func,
            obj.args,
            obj.state,
            None,
            iter(obj.items.items()) if obj.items else None,
            obj=obj,
        )

    dispatch[Global] = _save_global  # type: ignore[assignment]
    dispatch[Call] = _save_call  # type: ignore[assignment]


def dumps(top: Any) -> bytes:
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(top)
    return buf.getvalue()


def contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))
