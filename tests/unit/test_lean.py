"""``tiecli.lean.dataclass`` behaves as ``dataclasses.dataclass``: the same classes,
decorated by each, give the same repr, equality, hash, fields and errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tiecli import lean

CLASSES = """
from __future__ import annotations
from dataclasses import field
from typing import Any

@dataclass
class Plain:
    name: str
    shape: tuple[int, ...]
    tags: list[str] = field(default_factory=list)
    hidden: int = field(default=0, repr=False)
    noted: str = field(default="", compare=False)

class Sub(Plain):  # no fields of its own, not decorated: still another class
    pass

@dataclass(frozen=True)
class Frozen:
    alias: str
    source: str
    rows: int = 0
    seen: bool = field(default=False, compare=False)
    weight: float = field(default=0.0, hash=False)

@dataclass(kw_only=True)
class Base:
    path: str
    bytes: int = 0

@dataclass(kw_only=True)
class Derived(Base):
    removed: list[str] = field(default_factory=list)

@dataclass(eq=False)
class Identity:
    name: str

@dataclass
class Node:
    name: str
    children: list[Any] = field(default_factory=list)

@dataclass
class OwnRepr:
    name: str

    def __repr__(self) -> str:
        return f"<{self.name}>"

@dataclass(frozen=True)
class OwnEq:
    name: str
    case: str = ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OwnEq) and self.name.lower() == other.name.lower()

@dataclass(frozen=True)
class OwnHash:
    name: str

    def __hash__(self) -> int:
        return 7
"""


def _module(tmp_path: Path, name: str, decorator: Any) -> ModuleType:
    """CLASSES as a module of its own, ``dataclass`` being ``decorator``."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(CLASSES))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.dataclass = decorator  # type: ignore[attr-defined]
    sys.modules[name] = module  # dataclass looks the module up while it decorates
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    where = tmp_path_factory.mktemp("lean")
    return (
        _module(where, "with_stdlib", dataclasses.dataclass),
        _module(where, "with_lean", lean.dataclass),
    )


def _instances(m: ModuleType) -> dict[str, list[Any]]:
    """The same values built from either module, in pairs that do and do not compare equal."""
    loop = m.Node("a")
    loop.children.append(loop)
    return {
        "plain": [
            m.Plain("w", (2, 3), ["x"], hidden=1, noted="n"),
            m.Plain("w", (2, 3), ["x"], hidden=1, noted="other"),  # noted is not compared
            m.Plain("w", (2, 3), ["x"], hidden=2),
            m.Plain("v", (2, 3)),
            m.Sub("w", (2, 3), ["x"], hidden=1, noted="n"),
        ],
        "frozen": [
            m.Frozen("lm_head.weight", "embed", 3, weight=0.5),
            m.Frozen("lm_head.weight", "embed", 3, seen=True, weight=0.5),
            m.Frozen("lm_head.weight", "embed", 3, weight=0.25),
            m.Frozen("lm_head.weight", "embed", 4),
        ],
        "derived": [
            m.Derived(path="p", bytes=3, removed=["a"]),
            m.Derived(path="p", bytes=3, removed=["a"]),
            m.Base(path="p", bytes=3),
            m.Derived(path="p", bytes=4),
        ],
        "identity": [m.Identity("x"), m.Identity("x")],
        "node": [loop, m.Node("a", [m.Node("b")])],
        "own": [m.OwnRepr("r"), m.OwnEq("Name", "a"), m.OwnEq("name", "b"), m.OwnHash("h")],
    }


def _shape(value: Any) -> Any:
    """What equality, repr and hashing say of a value, with the module's name taken out."""
    text = repr(value).replace("with_stdlib.", "").replace("with_lean.", "")
    try:
        hashed: Any = hash(value)
    except TypeError as e:
        hashed = f"TypeError: {e}"
    if type(value).__eq__ is object.__eq__:  # identity: the hash is the object's id
        hashed = "identity" if hashed == object.__hash__(value) else hashed
    return text, hashed


@pytest.mark.parametrize("group", ["plain", "frozen", "derived", "identity", "node", "own"])
def test_repr_equality_and_hash_are_the_standard_librarys(
    both: tuple[ModuleType, ModuleType], group: str
) -> None:
    stdlib, ours = (_instances(m)[group] for m in both)
    assert [_shape(v) for v in ours] == [_shape(v) for v in stdlib]
    for i in range(len(ours)):
        for j in range(len(ours)):
            assert (ours[i] == ours[j]) == (stdlib[i] == stdlib[j]), (group, i, j)
            assert (ours[i] != ours[j]) == (stdlib[i] != stdlib[j]), (group, i, j)
        assert (ours[i] == object()) is False and (ours[i] == stdlib[i]) is False


def test_fields_replace_asdict_and_the_frozen_guard_are_the_standard_librarys(
    both: tuple[ModuleType, ModuleType],
) -> None:
    stdlib, ours = both
    for name in ("Plain", "Frozen", "Base", "Derived", "Identity"):
        a, b = getattr(stdlib, name), getattr(ours, name)
        assert dataclasses.is_dataclass(b)
        assert [(f.name, f.repr, f.compare, f.kw_only) for f in dataclasses.fields(b)] == [
            (f.name, f.repr, f.compare, f.kw_only) for f in dataclasses.fields(a)
        ]
        assert b.__match_args__ == a.__match_args__
    frozen = ours.Frozen("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        frozen.rows = 3
    changed = dataclasses.replace(frozen, rows=5)
    assert changed == ours.Frozen("a", "b", 5) and changed != frozen
    assert dataclasses.asdict(ours.Derived(path="p", removed=["x"])) == dataclasses.asdict(
        stdlib.Derived(path="p", removed=["x"])
    )
    with pytest.raises(TypeError):
        ours.Derived("p")  # keyword-only, as declared
    assert len({ours.Frozen("a", "b"), ours.Frozen("a", "b", seen=True)}) == 1


def test_tiecli_defines_its_classes_with_the_lean_decorator() -> None:
    """Every dataclass of the package comes from ``tiecli.lean``: one that did not would
    cost its start-up time again (and this test would not notice a mistake in it)."""
    root = Path(lean.__file__).parent

    def stdlib_decorator(line: str) -> bool:
        line = line.strip()
        if line.startswith("from dataclasses import"):
            return "dataclass" in [n.strip() for n in line.split("import", 1)[1].split(",")]
        return line.startswith("@dataclasses.dataclass")

    stdlib_use = [
        str(p.relative_to(root))
        for p in sorted(root.rglob("*.py"))
        if p.name != "lean.py" and any(map(stdlib_decorator, p.read_text().splitlines()))
    ]
    assert stdlib_use == []
