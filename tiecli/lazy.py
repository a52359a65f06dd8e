"""Names a package exports from modules it imports only when first asked for."""

from __future__ import annotations

from importlib import import_module
from typing import Any


def lazy_attribute(
    package: str, homes: dict[str, str], namespace: dict[str, Any], name: str
) -> Any:
    """``name`` from its home module in ``homes`` (relative to ``package``), kept in
    ``namespace`` so the next use is a plain lookup; AttributeError for any other."""
    module = homes.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", package), name)
    namespace[name] = value
    return value
