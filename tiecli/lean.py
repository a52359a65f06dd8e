"""``dataclass`` as the standard library's, quicker to define.

For every class, ``dataclasses.dataclass`` writes out the source of ``__init__``,
``__repr__`` and ``__eq__`` (and, frozen, of ``__setattr__``, ``__delattr__`` and
``__hash__``) and compiles each: some 300 µs a class on Python 3.11, 500 frozen, and
a command imports some thirty classes at every start. Here the standard library
still writes ``__init__`` (and a frozen class's guards), while ``__repr__``,
``__eq__`` and a frozen class's ``__hash__`` are written once, below, for every
class, and behave as the generated ones do:

- ``repr``: the class's qualified name and each field shown (``field(repr=...)``),
  ``...`` where an object contains itself;
- ``==``: only with an object of the very same class, every compared field equal
  (``field(compare=...)``), else ``NotImplemented``;
- ``hash``: of the compared fields, for a frozen class; a class that compares by
  value and is not frozen has none, as a dataclass has none;
- a method the class writes itself is kept, and ``eq=False`` keeps identity.

``fields``, ``replace``, ``asdict`` and ``is_dataclass`` see an ordinary dataclass.
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:  # typing has it from Python 3.11; it only informs type checkers

    def dataclass_transform(**_kwargs: Any) -> Callable[[Any], Any]:
        return lambda f: f


T = TypeVar("T")


# (class, "compare" | "hash") -> a function of an instance: the values of those
# fields, as a tuple; built from fields() on first use, since a class's fields are fixed
_GETTERS: dict[tuple[type, str], Callable[[Any], tuple[Any, ...]]] = {}


def _getter(cls: type, which: str) -> Callable[[Any], tuple[Any, ...]]:
    names = [
        f.name
        for f in dataclasses.fields(cls)
        if (f.compare if which == "hash" and f.hash is None else getattr(f, which))
    ]
    if len(names) == 1:
        one = attrgetter(names[0])
        get: Callable[[Any], tuple[Any, ...]] = lambda obj: (one(obj),)  # noqa: E731
    elif names:
        get = attrgetter(*names)
    else:
        get = lambda obj: ()  # noqa: E731
    _GETTERS[cls, which] = get
    return get


def _values(obj: Any, which: str) -> tuple[Any, ...]:
    get = _GETTERS.get((obj.__class__, which))
    return (get or _getter(obj.__class__, which))(obj)


@reprlib.recursive_repr()
def _repr(self: Any) -> str:
    shown = ", ".join(
        f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
    )
    return f"{self.__class__.__qualname__}({shown})"


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self, "compare") == _values(other, "compare")


def _hash(self: Any) -> int:
    return hash(_values(self, "hash"))


@overload
def dataclass(cls: type[T], /) -> type[T]: ...


@overload
def dataclass(
    *, frozen: bool = False, eq: bool = True, kw_only: bool = False
) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def dataclass(
    cls: type[T] | None = None, /, *, frozen: bool = False, eq: bool = True, kw_only: bool = False
) -> Any:
    """``dataclasses.dataclass(cls, frozen=..., eq=..., kw_only=...)``, its ``__repr__``,
    ``__eq__`` and ``__hash__`` shared rather than generated (see the module)."""

    def wrap(c: type[T]) -> type[T]:
        own = c.__dict__
        has_repr, has_eq = "__repr__" in own, "__eq__" in own
        # as dataclass reads it: the None Python sets beside a class's own __eq__ is no hash
        explicit_hash = "__hash__" in own and not (own["__hash__"] is None and has_eq)
        made = dataclasses.dataclass(c, repr=False, eq=False, frozen=frozen, kw_only=kw_only)
        if not has_repr:
            made.__repr__ = _repr  # type: ignore[method-assign]
        if eq and not has_eq:
            made.__eq__ = _eq  # type: ignore[method-assign]
        if eq and not explicit_hash:
            made.__hash__ = _hash if frozen else None  # type: ignore[assignment,method-assign]
        return made

    return wrap if cls is None else wrap(cls)
