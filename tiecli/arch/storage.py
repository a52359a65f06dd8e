"""Storage identity: the one place that decides whether two tensors are one memory.

A tie between ``a`` and ``b`` is one storage viewed twice: the same bytes at
the same offset, read either with the same shape and strides ("identity") or,
for a 2-D head stored transposed, with both reversed ("transpose"). Any other
overlap is not a tie. The answer is the same whether the tensors are live torch
tensors (a model's parameters, a state dict) or entries read from a pickle,
whose ``storage`` and ``view`` fields say the same thing without torch.
"""

from __future__ import annotations

from typing import Any, Literal

Relation = Literal["identity", "transpose"]


def where(t: Any) -> tuple[Any, ...] | None:
    """Which memory ``t`` views and from where: (place, storage, byte offset, dtype).

    ``t`` is a torch tensor or a pickle :class:`~tiecli.checkpoint.Entry`;
    ``None`` when it has no storage to compare (an entry outside a pickle, a
    tensor subclass without one, an empty tensor)."""
    if hasattr(t, "untyped_storage"):
        try:
            storage = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        if storage == 0:  # no memory at all (an empty tensor): nothing to share
            return None
        return (str(t.device), storage, int(t.storage_offset()) * t.element_size(), t.dtype)
    if getattr(t, "storage", None) is None or getattr(t, "view", None) is None:
        return None
    return (t.file, t.storage[0], t.view[0], t.dtype)


def _layout(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if hasattr(t, "untyped_storage"):
        return tuple(t.shape), tuple(t.stride())
    return tuple(t.shape), tuple(t.view[1])


def relation(a: Any, b: Any) -> Relation | None:
    """How ``b`` views the memory of ``a``: ``"identity"``, ``"transpose"``, or ``None``.

    ``None`` for separate memory and for overlapping views that are neither
    the same tensor nor its transpose."""
    wa, wb = where(a), where(b)
    if wa is None or wa != wb:
        return None
    (shape_a, strides_a), (shape_b, strides_b) = _layout(a), _layout(b)
    if shape_a == shape_b and strides_a == strides_b:
        return "identity"
    if len(shape_a) == 2 and shape_a == shape_b[::-1] and strides_a == strides_b[::-1]:
        return "transpose"
    return None


def same_storage(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are one memory: the same tensor, or one the transpose of the other."""
    return relation(a, b) is not None
