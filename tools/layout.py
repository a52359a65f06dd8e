"""The package's layout rules, checked by reading its source: prints each violation.

    python tools/layout.py [tiecli]      # one line per violation; exit 1 when there are any

1. long: no module over ``MAX_LINES`` lines.
2. format: what a checkpoint's format is decides only inside ``tiecli/formats/``: no
   ``.startswith("pytorch")``, ``.format == "gguf"`` (or ``in (...)``) and no
   ``isinstance(x, C)`` / ``type(x) is C`` of a class defined there, anywhere else.
3. private: no private name (``_x``, not a dunder) crosses modules: neither
   ``from .a import _b`` nor ``module._b`` on an imported tiecli module.
4. storage: storage identity is answered in ``tiecli/arch/storage.py`` alone: no
   ``untyped_storage()`` or ``data_ptr()`` call elsewhere (``STORAGE_ALLOWED`` names the
   functions that read a raw storage for another purpose).
5. declared: only ``tiecli/arch/`` asks transformers which weights a model ties
   (``TIE_APIS``, called or looked up by name).

``tests/unit/test_layout.py`` runs each check as a test.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_LINES = 450
FORMAT_NAMES = ("safetensors", "pytorch", "gguf", "dcp")
STORAGE_CALLS = frozenset({"untyped_storage", "data_ptr"})
# (folder or module under the package, function): raw storages read for what is not identity
STORAGE_ALLOWED = frozenset(
    {
        ("formats", "entries"),  # a pickle reader turns tensors into entries
        ("formats", "_check_storages"),  # a storage's record offset, against the zip
        ("formats", "check_storages"),
    }
)
TIE_APIS = frozenset(
    {"get_expanded_tied_weights_keys", "_tied_weights_keys", "all_tied_weights_keys"}
)


@dataclass(frozen=True)
class Violation:
    check: str
    path: str  # relative to the package's parent: tiecli/detect.py
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.check.upper()} {self.path}:{self.line} {self.what}"


@dataclass
class Module:
    path: Path
    rel: str  # tiecli/formats/gguf.py
    name: str  # tiecli.formats.gguf
    source: str
    tree: ast.Module

    def under(self, part: str) -> bool:
        """Whether the module is ``tiecli/<part>`` or lies in the folder ``tiecli/<part>/``."""
        inner = self.rel.split("/", 1)[1]
        return inner == f"{part}.py" or inner.startswith(f"{part}/")


def modules(root: Path) -> list[Module]:
    """Every module of the package at ``root`` (the ``tiecli`` folder)."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        parts = rel[: -len(".py")].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        source = path.read_text(encoding="utf-8")
        out.append(Module(path, rel, ".".join(parts), source, ast.parse(source, rel)))
    return out


def long_modules(mods: list[Module]) -> Iterator[Violation]:
    for m in mods:
        lines = m.source.count("\n")
        if lines > MAX_LINES:
            yield Violation("long", m.rel, lines, f"{lines} lines (at most {MAX_LINES})")


def _format_classes(mods: list[Module]) -> set[str]:
    """Names of the classes defined in tiecli/formats/."""
    return {
        node.name
        for m in mods
        if m.under("formats")
        for node in ast.walk(m.tree)
        if isinstance(node, ast.ClassDef)
    }


def _names_format(node: ast.expr) -> bool:
    """A string constant (or a tuple, list or set of them) naming a checkpoint format."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.startswith(FORMAT_NAMES)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(_names_format(e) for e in node.elts)
    return False


def _prefix_check(call: ast.Call) -> bool:
    """``x.startswith("pytorch")`` (a format's name, whole) or ``ckpt.format.startswith(...)``."""
    assert isinstance(call.func, ast.Attribute)
    receiver = call.func.value
    if isinstance(receiver, ast.Attribute) and receiver.attr == "format":
        return True
    arg = call.args[0] if call.args else None
    return isinstance(arg, ast.Constant) and arg.value in FORMAT_NAMES


def _class_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def format_checks(mods: list[Module]) -> Iterator[Violation]:
    classes = _format_classes(mods)
    for m in mods:
        if m.under("formats"):
            continue
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "startswith" and _prefix_check(node):
                    yield Violation("format", m.rel, node.lineno, ast.unparse(node))
            if isinstance(node, ast.Call) and _is_name(node.func, "isinstance"):
                if len(node.args) == 2:
                    kinds = node.args[1]
                    named = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
                    if any(_class_name(k) in classes for k in named):
                        yield Violation("format", m.rel, node.lineno, ast.unparse(node))
            if isinstance(node, ast.Compare):
                yield from _format_compare(m, node, classes)


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _format_compare(m: Module, node: ast.Compare, classes: set[str]) -> Iterator[Violation]:
    sides = [node.left, *node.comparators]
    for left, op, right in zip(sides, node.ops, sides[1:], strict=False):
        for a, b in ((left, right), (right, left)):
            if (
                isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn)
                and isinstance(a, ast.Attribute)
                and a.attr == "format"
                and _names_format(b)
            ):
                yield Violation("format", m.rel, node.lineno, ast.unparse(node))
                return
            if (
                isinstance(op, ast.Is | ast.IsNot)
                and isinstance(a, ast.Call)
                and _is_name(a.func, "type")
                and _class_name(b) in classes
            ):
                yield Violation("format", m.rel, node.lineno, ast.unparse(node))
                return


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(m: Module, level: int, module: str | None) -> str:
    """The absolute name ``from <level dots><module> import`` refers to in ``m``."""
    if level == 0:
        return module or ""
    package = m.name.split(".")
    if not m.rel.endswith("__init__.py"):
        package = package[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, module] if module else base)


def private_names(mods: list[Module]) -> Iterator[Violation]:
    known = {m.name for m in mods}
    for m in mods:
        bound: dict[str, str] = {}  # local name -> the tiecli module it is
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(m, node.level, node.module)
                if source.split(".")[0] != "tiecli":
                    continue
                for alias in node.names:
                    if _private(alias.name):
                        yield Violation(
                            "private", m.rel, node.lineno, f"from {source} import {alias.name}"
                        )
                    elif f"{source}.{alias.name}" in known:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "tiecli":
                        if alias.asname:
                            bound[alias.asname] = alias.name
                        else:
                            bound["tiecli"] = "tiecli"
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = ast.unparse(node.value)
                head = owner.split(".")[0]
                if head in bound and isinstance(node.value, ast.Name | ast.Attribute):
                    if all(p.isidentifier() for p in owner.split(".")):
                        yield Violation("private", m.rel, node.lineno, f"{owner}.{node.attr}")


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """Each node with the name of the innermost function holding it ("" at module level)."""

    def walk(node: ast.AST, where: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else where
            )
            yield inner, child
            yield from walk(child, inner)

    return walk(tree, "")


def storage_calls(mods: list[Module]) -> Iterator[Violation]:
    for m in mods:
        if m.rel == "tiecli/arch/storage.py":
            continue
        for function, node in _functions(m.tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in STORAGE_CALLS
            ):
                if any(m.under(part) and function == f for part, f in STORAGE_ALLOWED):
                    continue
                yield Violation("storage", m.rel, node.lineno, ast.unparse(node.func))


def declared_ties(mods: list[Module]) -> Iterator[Violation]:
    for m in mods:
        if m.under("arch"):
            continue
        for node in ast.walk(m.tree):
            name = None
            if isinstance(node, ast.Attribute) and node.attr in TIE_APIS:
                name = node.attr
            elif isinstance(node, ast.Constant) and node.value in TIE_APIS:
                name = node.value  # getattr(model, "get_expanded_tied_weights_keys")
            if name is not None:
                yield Violation("declared", m.rel, node.lineno, name)


CHECKS: dict[str, Callable[[list[Module]], Iterator[Violation]]] = {
    "long": long_modules,
    "format": format_checks,
    "private": private_names,
    "storage": storage_calls,
    "declared": declared_ties,
}


def violations(root: Path, check: str | None = None) -> list[Violation]:
    """What breaks the rules in the package at ``root``: every check's, or ``check``'s."""
    mods = modules(root)
    chosen = CHECKS if check is None else {check: CHECKS[check]}
    return [v for fn in chosen.values() for v in fn(mods)]


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "tiecli"
    found = violations(root)
    for v in found:
        print(v)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
